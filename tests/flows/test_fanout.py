"""Generation fanned out as per-shard Prefect tasks: same bytes as the sequential path, per-shard cache,
one manifest writer, several vLLM servers sharing the shards, and reruns that never reach the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.distill import distill_flow
from pipeline.config import ConfigError
from pipeline.core import sha256_file
from pipeline.dataset.schema import read_manifest
from pipeline.dataset.validate import validate_dataset
from tests.helpers import TEACHER_PYTHON, refuse_teacher

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # a Prefect API per module


def _shards(dataset_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((dataset_dir / "shards").iterdir())}


def _shard_runs(flow_state) -> list:
    """The shard task runs of one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    return [r for r in runs if r.task_key.startswith("shard_task") or r.name.startswith("generate-shard")]


def test_fanout_writes_the_same_shards_as_the_sequential_path(generated, make_config, tmp_path):
    cfg = make_config(out=tmp_path / "fan")
    out = distill_flow(cfg, stages=["generate"])
    assert out.generate.shards_written == 3 and out.generate.endpoints == {"in-process": 3}
    assert _shards(cfg.dataset_dir) == _shards(generated.dataset_dir)  # same per-shard seeds, byte for byte
    fan, seq = read_manifest(cfg.dataset_dir), read_manifest(generated.dataset_dir)
    assert [s.model_dump() for s in fan.shards] == [s.model_dump() for s in seq.shards]
    assert fan.complete and fan.teacher == seq.teacher and fan.generate_fingerprint == seq.generate_fingerprint
    assert validate_dataset(cfg.dataset_dir).samples == 96


def test_uncommitted_shards_come_from_the_cache_only_while_their_files_are_intact(make_config, tmp_path, monkeypatch):
    cfg = make_config(out=tmp_path / "crash")
    distill_flow(cfg, stages=["generate"])
    good = _shards(cfg.dataset_dir)
    (cfg.dataset_dir / "manifest.json").unlink()  # as if killed after the shard tasks finished, before the commits
    with monkeypatch.context() as m:
        refuse_teacher(m)
        state = distill_flow(cfg, stages=["generate"], return_state=True)
    out = state.result()
    assert out.generate.shards_cached == 3 and out.generate.shards_written == 0
    assert {r.state.name for r in _shard_runs(state)} == {"Cached"}
    assert validate_dataset(cfg.dataset_dir).complete and _shards(cfg.dataset_dir) == good

    (cfg.dataset_dir / "manifest.json").unlink()
    damaged = cfg.dataset_dir / "shards/part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # the cached record no longer matches this file
    (cfg.dataset_dir / "shards/part-00002.parquet").unlink()  # no file: the cache is not even consulted
    out = distill_flow(cfg, stages=["generate"])
    assert out.generate.shards_cached == 1 and out.generate.shards_written == 2
    assert _shards(cfg.dataset_dir) == good and validate_dataset(cfg.dataset_dir).complete


def test_a_failed_shard_keeps_the_others_and_the_rerun_redoes_only_it(make_config, tmp_path, monkeypatch):
    import pipeline.shards as gen

    cfg = make_config(out=tmp_path / "fail")
    real = gen.generate_shard

    def fail_shard_1(cfg_, index, teacher, **kw):
        if index == 1:
            raise ConfigError("shard 1 refused")  # a user error is not retried
        return real(cfg_, index, teacher, **kw)

    with monkeypatch.context() as m:
        m.setattr(gen, "generate_shard", fail_shard_1)
        with pytest.raises(ConfigError, match="shard 1 refused"):
            distill_flow(cfg, stages=["generate"])
    manifest = read_manifest(cfg.dataset_dir)
    assert [s.index for s in manifest.shards] == [0, 2] and not manifest.complete
    state = distill_flow(cfg, stages=["generate"], return_state=True)
    assert state.result().generate.shards_written == 1
    assert [r.name for r in _shard_runs(state)] == ["generate-shard-1"]
    assert validate_dataset(cfg.dataset_dir).complete


def test_student_only_reruns_spend_zero_seconds_in_the_teacher(make_config, tmp_path, monkeypatch):
    cfg = make_config(out=tmp_path / "student")
    first = distill_flow(cfg, stages=["generate"], return_state=True)
    assert len(_shard_runs(first)) == 3 and all(r.total_run_time.total_seconds() > 0 for r in _shard_runs(first))
    refuse_teacher(monkeypatch)

    only = distill_flow(cfg, stages=["train", "eval"], return_state=True)
    assert only.is_completed() and _shard_runs(only) == []

    changed = make_config(out=tmp_path / "student", train={"max_steps": 3})
    again = distill_flow(changed, return_state=True)
    out = again.result()
    assert out.generate.cached and out.generate.teacher_seconds == 0 and out.train.steps == 3
    assert _shard_runs(again) == []  # the manifest is complete: no shard task is even submitted
    assert read_manifest(cfg.dataset_dir).complete


@pytest.mark.skipif(not Path(TEACHER_PYTHON).exists(), reason=f"no vLLM teacher environment at {TEACHER_PYTHON}")
def test_two_managed_vllm_servers_share_the_shards(make_config, tiny_teacher, tmp_path):
    teacher = {
        "backend": "vllm_server",
        "model": str(tiny_teacher),
        "python": TEACHER_PYTHON,
        "dtype": "float32",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.3,
        "cpu_kvcache_space_gb": 1,
        "startup_timeout_s": 900,
        "extra_args": ["--enforce-eager"],
        "concurrency": 8,
        "max_retries": 1,
        "num_servers": 2,
    }
    cfg = make_config(out=tmp_path / "two", teacher=teacher, generate={"shard_size": 16})
    state = distill_flow(cfg, stages=["generate"], return_state=True)
    out = state.result().generate
    assert out.shards_written == 6 and len(out.endpoints) == 2 and all(n >= 2 for n in out.endpoints.values())
    assert len(_shard_runs(state)) == 6 and {r.state.name for r in _shard_runs(state)} == {"Completed"}
    report = validate_dataset(cfg.dataset_dir)
    assert report.complete and report.samples == 96
    assert read_manifest(cfg.dataset_dir).teacher.backend == "vllm_server"
    logs = sorted(p.name for p in Path(cfg.output_dir).glob("teacher_server-*.log"))
    assert logs == ["teacher_server-0.log", "teacher_server-1.log"]
    import httpx

    for url in out.endpoints:  # both servers were stopped with the flow
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)


@pytest.mark.skipif(not Path(TEACHER_PYTHON).exists(), reason=f"no vLLM teacher environment at {TEACHER_PYTHON}")
def test_the_engine_backend_runs_every_shard_task_on_one_engine_and_writes_distill_generates_bytes(
    make_config, tiny_teacher, tmp_path
):
    from pipeline.generate import generate_dataset

    teacher = {
        "backend": "vllm_engine",
        "model": str(tiny_teacher),
        "python": TEACHER_PYTHON,
        "dtype": "float32",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.3,
        "cpu_kvcache_space_gb": 1,
        "startup_timeout_s": 900,
        "engine_args": {"enforce_eager": True},
    }
    cfg = make_config(out=tmp_path / "flow", teacher=teacher, generate={"shard_size": 16})
    state = distill_flow(cfg, stages=["generate"], return_state=True)
    out = state.result().generate
    assert out.shards_written == 6 and out.endpoints == {"vllm-engine": 6}
    assert {r.state.name for r in _shard_runs(state)} == {"Completed"} and len(_shard_runs(state)) == 6
    log = (Path(cfg.output_dir) / "teacher_engine.log").read_text()
    assert log.count("init engine") == 1  # one engine for the whole run, not one per shard
    direct = make_config(out=tmp_path / "direct", teacher=teacher, generate={"shard_size": 16})
    generate_dataset(direct, progress=False)
    assert _shards(cfg.dataset_dir) == _shards(direct.dataset_dir)
