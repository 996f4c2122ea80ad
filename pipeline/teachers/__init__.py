"""Teacher backends behind one protocol; `load_teacher` picks one from the config."""

from __future__ import annotations

from pipeline.teachers.base import Generation, SamplingSpec, Teacher, TeacherInfo

__all__ = ["Generation", "SamplingSpec", "Teacher", "TeacherInfo", "load_teacher"]


def load_teacher(cfg) -> Teacher:
    """Build the backend named by `cfg.backend` (imports are lazy: vLLM lives in its own env)."""
    if cfg.backend == "hf":
        from pipeline.teachers.hf import HFTeacher

        return HFTeacher(cfg)
    raise ValueError(f"unknown teacher backend {cfg.backend!r}")
