"""Scheduling: `distill schedule` against a real local Prefect server (SQLite, 127.0.0.1), then a
student-only run through the same deployment that reuses the scheduled run's dataset.

Also the schedule command's one-line errors and the shipped prefect.yaml.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import raw_config
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[2]


def _write_config(tiny_teacher, prompts_file, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw_config(tiny_teacher, prompts_file, tmp_path / "run", train={"max_steps": 3})))
    return path


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--cron", "0 3 * *"], "invalid cron expression '0 3 * *'"),
        (["--cron", "0 3 * * *", "--interval", "60"], "exactly one of --cron"),
        ([], "exactly one of --cron"),
        (["--interval", "0"], "--interval must be a positive"),
    ],
)
def test_schedule_errors_are_one_line(args, fragment, tiny_teacher, prompts_file, tmp_path):
    result = CliRunner().invoke(app, ["schedule", str(_write_config(tiny_teacher, prompts_file, tmp_path)), *args])
    one_line_error(result, fragment)


def test_prefect_yaml_deploys_the_demo_config():
    """The shipped prefect.yaml points at the flow and carries exactly configs/demo.yaml as its parameters."""
    from pipeline.config import build_config, load_config

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "demo"]
    path, func = dep["entrypoint"].split(":")
    assert (ROOT / path).is_file() and f"def {func}(" in (ROOT / path).read_text()
    assert build_config(dep["parameters"]["cfg"]) == load_config(ROOT / "configs/demo.yaml")
    assert dep["parameters"]["stages"] == ["generate", "train", "eval"]
    assert dep["work_pool"]["name"] and dep["schedules"][0]["cron"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _processes_with(home: Path) -> list[int]:
    """Pids whose environment names this test's PREFECT_HOME (the server, the runner, flow-run children)."""
    marker = f"PREFECT_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the Prefect server exited during startup"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the Prefect server did not become healthy in {timeout:.0f}s")


async def _first_completed_scheduled_run(client, deployment_name: str, timeout: float):
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dep = await client.read_deployment_by_name(deployment_name)
        except Exception:  # not registered yet: the runner is still importing the flow
            await asyncio.sleep(2)
            continue
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
            flow_run_filter=FlowRunFilter(state={"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}),
        )
        assert not [r for r in runs if r.state.type.value != "COMPLETED"], [(r.name, r.state) for r in runs]
        if runs:
            return dep, runs[0]
        await asyncio.sleep(2)
    raise AssertionError(f"no completed run of {deployment_name} within {timeout:.0f}s")


async def _drain(client, deployment_id, timeout: float) -> None:
    """Pause the schedule and let the deployment go quiet: queued runs deleted, a running one finished."""
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter

    await client.pause_deployment(deployment_id)
    mine = DeploymentFilter(id={"any_": [deployment_id]})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = await client.read_flow_runs(
            deployment_filter=mine, flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}})
        )
        for run in queued:  # late runs the interval queued while the first one ran
            await client.delete_flow_run(run.id)
        busy = await client.read_flow_runs(
            deployment_filter=mine, flow_run_filter=FlowRunFilter(state={"type": {"any_": ["PENDING", "RUNNING"]}})
        )
        if not queued and not busy:
            return
        await asyncio.sleep(2)
    raise AssertionError("the deployment did not go quiet after its schedule was paused")


async def _task_runs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter

    return await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))


@pytest.mark.slow
def test_scheduled_run_then_student_only_rerun(tiny_teacher, prompts_file, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = _write_config(tiny_teacher, prompts_file, tmp_path)
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=open(tmp_path / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    served = None
    try:
        _wait_healthy(url, server, timeout=150)
        served = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "schedule", str(config), "--interval", "10", "--name", "tiny"],
            env={**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "3"},
            cwd=ROOT,
            start_new_session=True,
            stdout=open(tmp_path / "serve.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        with temporary_settings({PREFECT_API_URL: url}):

            async def scenario():
                async with get_client() as client:
                    dep, first = await _first_completed_scheduled_run(client, "distill/tiny", timeout=300)
                    assert first.auto_scheduled and first.parameters["stages"] == ["generate", "train", "eval"]
                    await _drain(client, dep.id, timeout=240)
                    return dep, first, await _task_runs(client, first.id)

            dep, first, first_tasks = asyncio.run(scenario())
            assert any(t.name.startswith("generate") and t.state.name == "Completed" for t in first_tasks), first_tasks
            dataset = tmp_path / "run" / "dataset"
            before = {
                p.name: (p.stat().st_mtime_ns, p.read_bytes())
                for p in [dataset / "manifest.json", *dataset.glob("shards/*")]
            }
            weights = tmp_path / "run" / "student" / "model.safetensors"
            weights_mtime = weights.stat().st_mtime_ns

            rerun = run_deployment("distill/tiny", parameters={"stages": ["train", "eval"]}, timeout=300)
            assert rerun.state.is_completed(), (rerun.state, (tmp_path / "serve.log").read_text()[-3000:])
            assert rerun.parameters["cfg"] == first.parameters["cfg"]  # the deployment's config, only stages changed
            tasks = asyncio.run(_run_with_client(_task_runs, rerun.id))

        ran = {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks if t.state.name != "Cached"}
        assert {"train", "eval"} <= set(ran) and all(state == "Completed" for state in ran.values()), ran
        assert not [name for name in ran if name.startswith(("generate", "shard"))], ran  # the teacher was not started
        after = {
            p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in [dataset / "manifest.json", *dataset.glob("shards/*")]
        }
        assert after == before and len(before) >= 2, "the student-only run must reuse the dataset untouched"
        assert weights.stat().st_mtime_ns > weights_mtime, "the student was trained again"

        # `distill run` reports to the server PREFECT_API_URL names (no deployment: an ad-hoc run)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(config), "--stages", "eval"],
            cwd=ROOT,
            env={**env, "PREFECT_API_URL": url},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        with temporary_settings({PREFECT_API_URL: url}):
            adhoc = [r for r in asyncio.run(_run_with_client(_all_flow_runs)) if r.deployment_id is None]
        assert [r.state.name for r in adhoc] == ["Completed"] and adhoc[0].parameters["stages"] == ["eval"]
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
        leftover = _processes_with(home)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert not leftover, f"processes survived the test: {leftover}"


async def _all_flow_runs(client) -> list:
    return await client.read_flow_runs()


async def _run_with_client(fn, *args):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await fn(client, *args)
