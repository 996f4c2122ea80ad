"""Managed vLLM servers: processes this run starts from the teacher environment, health-checks and always stops.

vLLM and Prefect pin incompatible fastapi versions, so the teacher never shares our Python: a server runs
`python -m vllm.entrypoints.openai.api_server` from the teacher environment on 127.0.0.1, in a process group
of its own watched by server_guard.py, so no vLLM process outlives a killed `distill`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from pipeline.teachers.base import TeacherServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """A vLLM OpenAI-compatible server process we start, health-check and always stop."""

    def __init__(self, cfg, *, max_logprobs: int, log_path: Path, devices: list[str] | None = None):
        self.cfg, self.max_logprobs, self.log_path = cfg, max_logprobs, Path(log_path)
        self.devices = devices  # CUDA_VISIBLE_DEVICES for this server; None: inherit ours
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._deadline = 0.0

    def command(self) -> list[str]:
        c = self.cfg
        cmd = [
            c.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            c.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            c.dtype,
            "--max-logprobs",
            str(self.max_logprobs),
            "--logprobs-mode",
            "raw_logprobs",
            "--tensor-parallel-size",
            str(c.tensor_parallel_size),
            "--gpu-memory-utilization",
            str(c.gpu_memory_utilization),
            "--seed",
            "0",
            "--served-model-name",
            self.model_name,
            "--disable-uvicorn-access-log",
        ]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if c.revision:
            cmd += ["--revision", c.revision]
        if c.trust_remote_code:
            cmd.append("--trust-remote-code")
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, minus PYTHONPATH, plus vLLM settings and this server's GPUs."""
        return teacher_environment(self.cfg, self.devices)

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name or "teacher"

    def start(self) -> None:
        """Launch the server and wait until it answers /health."""
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        """Spawn the server process (returns at once). Call from the thread that outlives the server: the
        guard's PR_SET_PDEATHSIG fires when the spawning *thread* exits."""
        self.proc = launch_guarded(self.cfg.python, self.command(), self.environment(), self.log_path)
        self._deadline = time.monotonic() + self.cfg.startup_timeout_s

    def wait_healthy(self) -> None:
        """Block until the launched server answers /health; stop it and raise if it exits or times out."""
        while time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                raise TeacherServerError(
                    f"teacher server exited with code {self.proc.returncode} during start-up: "
                    f"{self.log_tail()} (log: {self.log_path})"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TeacherServerError(
            f"teacher server not healthy after {self.cfg.startup_timeout_s:.0f}s (log: {self.log_path})"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left (engine workers included)."""
        stop_group(self.proc)


def teacher_environment(cfg, devices: list[str] | None = None) -> dict[str, str]:
    """The environment of a process run from the teacher environment: ours, minus PYTHONPATH, plus vLLM settings
    and its GPUs (None: inherit ours)."""
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if cfg.cpu_kvcache_space_gb is not None:  # read only by CPU builds of vLLM
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gb)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    env.pop("PYTHONPATH", None)  # our packages must not shadow the teacher environment's
    return env


def launch_guarded(
    python: str, cmd: list[str], env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    """Start `cmd` under server_guard.py in a new session (its own process group, so `stop_group` reaches every
    child, and the guard stops that group if we are killed, -9 included), output appended to `log_path`;
    `pass_fds` are handed on to `cmd`. Call from the thread that outlives the process: the guard's
    PR_SET_PDEATHSIG fires when the spawning *thread* exits."""
    if not Path(python).exists():
        raise TeacherServerError(
            f"teacher python {python!r} not found; create the teacher environment "
            "(`make teacher-env`) or set teacher.python / teacher.url"
        )
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fds = ["--pass-fds", ",".join(map(str, pass_fds))] if pass_fds else []
    guarded = [python, str(Path(__file__).with_name("server_guard.py")), str(os.getpid()), *fds, "--", *cmd]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            guarded,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )


def log_tail(log_path: Path) -> str:
    """The last error line of a log (else its last line), for one-line errors."""
    try:
        lines = [ln for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    # pydantic ends its message with a link line that also says "error"; the reason is the line above it
    errors = [ln for ln in lines if ("Error" in ln or "error" in ln) and "errors.pydantic.dev" not in ln]
    return (errors or lines or [""])[-1].strip()[:300]


def stop_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM a guarded process's group, then SIGKILL whatever is left (engine workers included)."""
    if proc is None:
        return
    pgid = proc.pid
    if group_members(pgid):
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while group_members(pgid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def gpu_slices(count: int, tensor_parallel_size: int, visible: str | None) -> list[list[str] | None]:
    """Disjoint GPU lists for `count` servers of `tensor_parallel_size` GPUs each, taken in order from
    CUDA_VISIBLE_DEVICES (or 0, 1, ... when unset). One server keeps the caller's devices (None)."""
    if count == 1 or (visible is not None and not visible.strip()):  # one server, or no GPUs at all (CPU servers)
        return [None] * count
    need = count * tensor_parallel_size
    pool = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(need)]
    if len(pool) < need:
        raise TeacherServerError(
            f"teacher.num_servers={count} x tensor_parallel_size={tensor_parallel_size} needs {need} "
            f"GPUs but CUDA_VISIBLE_DEVICES lists {len(pool)} ({visible!r}); lower num_servers or "
            "list more devices"
        )
    return [pool[i * tensor_parallel_size : (i + 1) * tensor_parallel_size] for i in range(count)]


@contextmanager
def managed_servers(cfg, *, count: int, max_logprobs: int, workdir: Path) -> Iterator[list[ManagedServer]]:
    """Start `count` servers of `cfg` side by side (each on its own free port, logging to `teacher_server.log`,
    or `teacher_server-<i>.log` when there are several), yield them once all are healthy, and always stop all of
    them; a SIGTERM in the main thread becomes SystemExit."""
    devices = gpu_slices(count, cfg.tensor_parallel_size, os.environ.get("CUDA_VISIBLE_DEVICES"))
    servers: list[ManagedServer] = []
    while len(servers) < count:
        log_name = "teacher_server.log" if count == 1 else f"teacher_server-{len(servers)}.log"
        server = ManagedServer(
            cfg, max_logprobs=max_logprobs, log_path=Path(workdir) / log_name, devices=devices[len(servers)]
        )
        if server.port not in {s.port for s in servers}:  # free_port() may hand out a port twice
            servers.append(server)
    with sigterm_as_exit():
        try:
            for server in servers:  # all launched before any is waited for: start-ups overlap
                server.launch()
            for server in servers:
                server.wait_healthy()
            yield servers
        finally:
            for s in servers:
                s.stop()


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside: a SIGTERM to the main thread raises SystemExit(143), so `finally` blocks stop what we started."""
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    except ValueError:  # not the main thread: the caller's handler stays
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
