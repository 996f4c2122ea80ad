"""`kill -9` of `distill generate` while the vLLM engine worker (backend vllm_engine) computes a shard.

The engine runs in a process group of its own, guarded like a managed server: no vLLM process may outlive the
killed `distill`; the shards committed before the kill are kept, a rerun finishes the dataset, and the result
equals an uninterrupted engine run's byte for byte.
"""

from __future__ import annotations

import signal

import pytest

from pipeline.dataset.validate import validate_dataset
from tests.faults.harness import child_env, distill, listed_shards, processes_mentioning, wait_until, write_config
from tests.helpers import TEACHER_PYTHON, needs_vllm

pytestmark = [pytest.mark.slow, needs_vllm]

ENGINE = {
    "backend": "vllm_engine",
    "python": TEACHER_PYTHON,
    "dtype": "float32",
    "max_model_len": 128,
    "gpu_memory_utilization": 0.3,
    "cpu_kvcache_space_gb": 1,
    "startup_timeout_s": 1200,  # a start takes ~30 s alone, far longer beside other test runs
    "engine_args": {"enforce_eager": True},
}


def test_kill_9_mid_shard_leaves_no_engine_and_the_rerun_matches_an_uninterrupted_run(
    fault_raw, tiny_teacher, tmp_path
):
    marker = str(tmp_path)
    env = child_env(DISTILL_FAULT_MARKER=marker)
    teacher = {**ENGINE, "model": str(tiny_teacher)}
    config = write_config(tmp_path / "cfg.yaml", fault_raw(tmp_path / "run", teacher=teacher))
    dataset = tmp_path / "run" / "dataset"

    # the third shard's request is in the engine; the shards before it are written or being written beside it
    res = distill("generate", str(config), kill=("engine_busy", 3), env=env, timeout=1500)
    assert res.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {res.returncode}\n{res.stderr[-2000:]}"
    gone = wait_until(lambda: not processes_mentioning(marker), 60)
    assert gone, f"engine processes outlived the killed distill: {processes_mentioning(marker)}"
    kept = listed_shards(dataset)
    assert len(kept) < 4 and not validate_dataset(dataset).complete

    res = distill("generate", str(config), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert wait_until(lambda: not processes_mentioning(marker), 60), "the finished run left engine processes"
    final = listed_shards(dataset)
    assert {n: final[n] for n in kept} == kept and len(final) == 4
    assert validate_dataset(dataset).complete

    clean = write_config(tmp_path / "clean.yaml", fault_raw(tmp_path / "clean", teacher=teacher))
    res = distill("generate", str(clean), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert final == listed_shards(tmp_path / "clean" / "dataset"), "the resumed dataset differs from a clean run"
