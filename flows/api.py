"""The local Prefect API of one `distill run` when no PREFECT_API_URL is set: Prefect's ephemeral server, guarded.

Prefect starts its ephemeral API as a plain child process and stops it from an atexit handler, so a `kill -9` of
`distill run` leaves that server running for good (holding the SQLite database and, for a test, its output
pipes). Here the same server (uvicorn on Prefect's app factory, UI off, as Prefect runs it) is started under
pipeline/teachers/server_guard.py, which takes it down when `distill` dies however it dies, and stopped on
the way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import prefect
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

from pipeline.teachers import server_guard
from pipeline.teachers.managed import free_port


class PrefectAPIError(RuntimeError):
    """The local Prefect API did not come up."""


@contextmanager
def local_api() -> Iterator[str | None]:
    """Yield the API URL the flow runs against: the configured one (PREFECT_API_URL), or a guarded local server
    started here (and stopped on the way out)."""
    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    uvicorn = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent)]
    uvicorn += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    uvicorn += ["--log-level", "error", "--lifespan", "on"]
    guarded = [sys.executable, server_guard.__file__, str(os.getpid()), "--", *uvicorn]
    proc = subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(proc, url, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with prefect.settings.temporary_settings({PREFECT_API_URL: url}):
                yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PrefectAPIError(f"the local Prefect API exited with code {proc.returncode} while starting")
            try:
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise PrefectAPIError(
        f"the local Prefect API did not answer within {timeout:.0f} s; raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server"
    )


def _drain() -> None:
    """Send the logs and events still queued (Prefect's test harness does the same before it stops its server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except RuntimeError:  # never started
            pass


def _stop(proc: subprocess.Popen) -> None:
    """Drain, then SIGTERM to the guard, which stops the server's group (grace period, then SIGKILL)."""
    if proc.poll() is None:
        _drain()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
