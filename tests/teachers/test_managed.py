"""Managed vLLM server processes (pipeline/teachers/managed.py and server_guard.py), without starting vLLM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.config import VLLMServerTeacherConfig
from pipeline.teachers.base import TeacherServerError
from pipeline.teachers.managed import ManagedServer, gpu_slices, group_members


def test_managed_servers_get_disjoint_gpus(tmp_path):
    assert gpu_slices(1, 4, "0,1") == [None]  # one server keeps the caller's devices
    assert gpu_slices(2, 1, None) == [["0"], ["1"]]
    assert gpu_slices(2, 2, "4, 5,6,7,8") == [["4", "5"], ["6", "7"]]
    assert gpu_slices(3, 1, "") == [None, None, None]  # no GPUs: CPU servers, nothing to split
    with pytest.raises(
        TeacherServerError,
        match=r"num_servers=3 x tensor_parallel_size=2 needs 6 GPUs but CUDA_VISIBLE_DEVICES lists 4",
    ):
        gpu_slices(3, 2, "0,1,2,3")
    cfg = VLLMServerTeacherConfig(model="m", tensor_parallel_size=2)
    env = ManagedServer(cfg, max_logprobs=20, log_path=tmp_path / "s.log", devices=["6", "7"]).environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and "PYTHONPATH" not in env


@pytest.mark.slow
def test_guard_stops_as_soon_as_its_server_exits():
    """SIGTERM to the group: the guard waits for the server only while it runs, not the whole grace period
    (it once polled a Popen whose wait lock its own interrupted wait() held, and always waited 15 s)."""
    import subprocess
    import sys
    import time

    from pipeline.teachers import server_guard

    guard = Path(server_guard.__file__)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(guard),
            str(os.getpid()),
            "--",
            sys.executable,
            "-c",
            "import time; print('up', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=server_guard.GRACE_S + 10)
        assert time.monotonic() - t0 < server_guard.GRACE_S / 2, "the guard waited out its grace period"
        assert not group_members(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
