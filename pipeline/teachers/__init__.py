"""Teacher backends behind one protocol (base.py), and where they run for a generate run (endpoints.py).

Backends: hf.py (transformers in this process), vllm_server.py (a vLLM OpenAI-compatible server, managed or
attached) and vllm_engine.py (vLLM's offline engine in a worker process, engine_worker.py). vLLM itself is never
imported by the pipeline: it runs in its own environment.
"""

from __future__ import annotations

from pipeline.teachers.base import SamplingSpec, Teacher, TeacherInfo
from pipeline.teachers.endpoints import Endpoint, open_teacher, shared_teacher, teacher_endpoints

__all__ = ["Endpoint", "SamplingSpec", "Teacher", "TeacherInfo", "open_teacher", "shared_teacher", "teacher_endpoints"]
