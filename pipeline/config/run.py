"""The whole run config and its cache keys (generate, train resume, config hash)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from pipeline.config.base import _hash, _Strict
from pipeline.config.data import RESCORE_ONLY, GenerateConfig, PromptsConfig
from pipeline.config.evaluation import EvalConfig
from pipeline.config.student import StudentConfig
from pipeline.config.teacher import TeacherConfig
from pipeline.config.training import LIVE_FIELDS, OnPolicyConfig, TrainConfig


class RunConfig(_Strict):
    """A whole distillation run."""

    name: str = "run"
    output_dir: str = "data/runs/run"
    """Dataset, student and metrics go under this directory."""
    teacher: TeacherConfig
    prompts: PromptsConfig
    generate: GenerateConfig = GenerateConfig()
    student: StudentConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    rounds: int = Field(1, ge=1)
    """Training rounds: round 0 trains on the teacher's samples; each later round on the previous student's own
    samples scored by the teacher (`on_policy`), under `<output_dir>/rounds/<r>/`."""
    on_policy: OnPolicyConfig = OnPolicyConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict) and "backend" not in data["teacher"]:
            data = {**data, "teacher": {**data["teacher"], "backend": "hf"}}
        return data

    @property
    def dataset_dir(self) -> Path:
        return Path(self.output_dir) / "dataset"

    @property
    def student_dir(self) -> Path:
        return Path(self.output_dir) / "student"

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "metrics.json"

    def generate_fingerprint(self) -> str:
        """Hash of everything that changes the teacher's output (teacher, prompts, sampling)."""
        # on_invalid only decides whether a run stops; the prompts that are kept are the same. In sample mode the
        # rescore settings change nothing, and leaving them (and the mode) out keeps the keys datasets made before
        # rescore mode existed.
        sample = self.generate.mode == "sample"
        return _hash(
            {
                "teacher": self.teacher.identity(),
                "prompts": self.prompts.model_dump(exclude={"on_invalid", *(RESCORE_ONLY if sample else ())}),
                "generate": self.generate.model_dump(exclude={"mode"} if sample else set()),
            }
        )

    def train_fingerprint(self) -> str:
        """Hash of what a resumed training run must share with the run that wrote the checkpoint.

        Left out: settings that change where training runs, how often it logs and saves, and how much memory a step
        takes (`gradient_checkpointing`, `loss_chunk_size`: the same numbers up to float summation order), so a run
        that ran out of memory can resume with them changed."""
        operational = {
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "device",
            "gradient_checkpointing",
            "loss_chunk_size",
            "report_to",
        }
        key = {"student": self.student.identity()}
        if self.train.live_teacher:  # the teacher itself then shapes training, not only through the dataset
            key["live_teacher"] = self.teacher.model_dump(include={"model", "revision"})
        else:  # the live settings act only with it: keys of runs without one stay as they were
            operational |= set(LIVE_FIELDS)
        return _hash({**key, "train": self.train.model_dump(exclude=operational)})

    def config_hash(self) -> str:
        return _hash(self.model_dump())
