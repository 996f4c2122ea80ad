"""Where a run's teacher runs (pipeline/teachers/endpoints.py): one shared teacher per endpoint and process."""

from __future__ import annotations

import pytest

from pipeline.teachers import Endpoint, shared_teacher, teacher_endpoints
from pipeline.teachers.base import TeacherServerError
from pipeline.teachers.endpoints import release_teachers


def test_a_teacher_is_opened_once_per_endpoint_and_released_with_the_run(make_config):
    cfg = make_config()
    with teacher_endpoints(cfg) as endpoints:
        first = shared_teacher(cfg, endpoints[0])
        assert shared_teacher(cfg, Endpoint.local(cfg)) is first  # a shard task's endpoint finds the run's teacher
        other = make_config(teacher={**cfg.teacher.model_dump(), "batch_size": 8})
        assert shared_teacher(other, Endpoint()) is not first  # another teacher config: its own
        release_teachers(other, [Endpoint()])
    assert first.model is None  # closed when the run's endpoints went away
    again = shared_teacher(cfg, Endpoint())
    assert again is not first and again.model is not None
    release_teachers(cfg, [Endpoint()])


def test_an_engine_shard_outside_the_engines_process_is_one_clear_error(make_config, tiny_teacher):
    cfg = make_config(teacher={"backend": "vllm_engine", "model": str(tiny_teacher)})
    assert Endpoint.local(cfg).label == "vllm-engine"
    with pytest.raises(TeacherServerError, match="ran in a process without the run's engine"):
        shared_teacher(cfg, Endpoint.local(cfg))
