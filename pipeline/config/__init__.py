"""Typed run configuration: validated once at the edge (YAML + dotted overrides), then passed explicitly.

One model per section (a module per group of sections below); the teacher backend is a discriminated union on
`backend`. The generate stage's cache key (`RunConfig.generate_fingerprint`) covers only what changes the
teacher's output, so a change to training settings reruns the student without touching the teacher.
"""

from pipeline.config.base import STAGES, ConfigError
from pipeline.config.data import RESCORE_ONLY, GenerateConfig, PromptsConfig
from pipeline.config.evaluation import EvalConfig, LMEvalConfig
from pipeline.config.load import build_config, load_config, parse_override
from pipeline.config.run import RunConfig
from pipeline.config.student import FromTeacherConfig, ShrinkConfig, StudentConfig
from pipeline.config.teacher import HFTeacherConfig, TeacherConfig, VLLMEngineTeacherConfig, VLLMServerTeacherConfig
from pipeline.config.training import (
    LIVE_FIELDS,
    AttentionLossConfig,
    FeatureLossConfig,
    MixConfig,
    OnPolicyConfig,
    RelationLossConfig,
    TrainConfig,
)

__all__ = [
    "LIVE_FIELDS",
    "RESCORE_ONLY",
    "STAGES",
    "AttentionLossConfig",
    "ConfigError",
    "EvalConfig",
    "FeatureLossConfig",
    "FromTeacherConfig",
    "GenerateConfig",
    "HFTeacherConfig",
    "LMEvalConfig",
    "MixConfig",
    "OnPolicyConfig",
    "PromptsConfig",
    "RelationLossConfig",
    "RunConfig",
    "ShrinkConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "VLLMEngineTeacherConfig",
    "VLLMServerTeacherConfig",
    "build_config",
    "load_config",
    "parse_override",
]
