"""Teacher backends behind one protocol; `load_teacher` picks one from the config."""

from __future__ import annotations

from pipeline.dataset.schema import Generation
from pipeline.teachers.base import SamplingSpec, Teacher, TeacherInfo

__all__ = ["Generation", "SamplingSpec", "Teacher", "TeacherInfo", "load_teacher"]


def load_teacher(cfg, *, workdir=None, k: int = 20) -> Teacher:
    """Build the backend named by `cfg.backend` (imports are lazy: vLLM lives in its own env).

    `workdir` receives a managed server's log; `k` sizes the server's --max-logprobs.
    """
    if cfg.backend == "hf":
        from pipeline.teachers.hf import HFTeacher

        return HFTeacher(cfg)
    if cfg.backend == "vllm_server":
        from pipeline.teachers.vllm_server import VLLMServerTeacher

        return VLLMServerTeacher(cfg, workdir=workdir, k=k)
    raise ValueError(f"unknown teacher backend {cfg.backend!r}")
