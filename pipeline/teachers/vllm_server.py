"""vLLM-served teacher: a managed `vllm` OpenAI server in its own environment (or one already running).

vLLM and Prefect pin incompatible fastapi versions, so the teacher never shares our Python: we start
`python -m vllm.entrypoints.openai.api_server` from the teacher environment on 127.0.0.1 and talk HTTP.
Prompts go as token ids, so the dataset's prompt ids are exactly what the teacher saw; logprobs come
back keyed `token_id:N` (`return_tokens_as_token_ids`) and are raw (`--logprobs-mode raw_logprobs`).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from pipeline.core import UserError, stable_id
from pipeline.dataset.schema import Generation
from pipeline.teachers.base import SamplingSpec, TeacherInfo


class TeacherServerError(UserError):
    """The teacher server could not start, died, or kept failing; one line with where to look."""


class TeacherRequestError(UserError):
    """The server refused a request (HTTP 4xx): a setting is wrong, retrying will not help."""


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
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self.cfg.cpu_kvcache_space_gb is not None:  # read only by CPU builds of vLLM
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.cpu_kvcache_space_gb)
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        env.pop("PYTHONPATH", None)  # our packages must not shadow the teacher environment's
        return env

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
        if not Path(self.cfg.python).exists():
            raise TeacherServerError(
                f"teacher python {self.cfg.python!r} not found; create the teacher environment "
                "(`make teacher-env`) or set teacher.python / teacher.url"
            )
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # Own process group, so stop() reaches every child; the guard stops that group if we are killed (-9 included).
        guarded = [
            self.cfg.python,
            str(Path(__file__).with_name("server_guard.py")),
            str(os.getpid()),
            "--",
            *self.command(),
        ]
        self.proc = subprocess.Popen(
            guarded, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.close()
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
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or [""])[-1].strip()[:300]

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left (engine workers included)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if group_members(pgid):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while group_members(pgid) and time.monotonic() < deadline:
                self.proc.poll()
                time.sleep(0.2)
            if group_members(pgid):
                _signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
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
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    except ValueError:  # not the main thread: the caller's handler stays
        old = None
    try:
        for server in servers:  # all launched before any is waited for: start-ups overlap
            server.launch()
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop()
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


def parse_choice(choice: dict, k: int) -> Generation:
    """One OpenAI completions choice -> Generation (top-k sorted descending, sampled token kept)."""
    lp = choice.get("logprobs") or {}
    ids = np.array(choice.get("token_ids") or [int(t.split(":", 1)[1]) for t in lp.get("tokens", [])], np.int32)
    top_ids = np.zeros((len(ids), k), np.int32)
    top_lp = np.full((len(ids), k), -np.inf, np.float32)
    for t, entries in enumerate(lp.get("top_logprobs") or []):
        # up to k+1 entries: the sampled token is added when it is outside the top-k
        best = sorted(((v, int(key.split(":", 1)[1])) for key, v in (entries or {}).items()), key=lambda e: -e[0])[:k]
        for j, (value, tok) in enumerate(best):
            top_ids[t, j], top_lp[t, j] = tok, value
    tok_lp = np.array([v if v is not None else -np.inf for v in lp.get("token_logprobs", [])], np.float32)
    if len(tok_lp) != len(ids) or len(lp.get("top_logprobs") or []) != len(ids):
        raise TeacherServerError(
            f"server returned {len(ids)} tokens but {len(tok_lp)} logprobs; is logprobs={k} supported?"
        )
    return Generation(ids, tok_lp, top_ids, top_lp, "stop" if choice.get("finish_reason") == "stop" else "length")


class VLLMServerTeacher:
    """Teacher protocol over the OpenAI completions API of a running vLLM server (`cfg.url`).

    `server` is the managed process behind the URL when this run started it: a request that fails while it
    is down is reported as the server's death, with its log, instead of as a connection error.
    """

    def __init__(self, cfg, *, server: ManagedServer | None = None):
        from transformers import AutoConfig

        from pipeline.models import eos_ids, load_tokenizer

        self.cfg, self.server = cfg, server
        tok = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        try:
            vocab = AutoConfig.from_pretrained(
                cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            ).vocab_size
        except OSError:
            vocab = len(tok)
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise TeacherServerError(
                    f"teacher.api_key_env={cfg.api_key_env!r} is set but that environment variable is empty"
                )
            headers["Authorization"] = f"Bearer {key}"
        if not cfg.endpoints():
            raise ValueError("VLLMServerTeacher needs teacher.url: start servers with teacher_endpoints()")
        self.url, self.model_name = cfg.endpoints()[0], cfg.served_model_name or cfg.model
        self.client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=cfg.request_timeout_s,
            limits=httpx.Limits(max_connections=cfg.concurrency),
        )
        self.info = TeacherInfo(
            model=cfg.model,
            backend="vllm_server",
            revision=cfg.revision,
            versions={"vllm": self._server_version()},
            vocab_size=int(vocab),
            eos_token_ids=tuple(eos_ids(tok)),
        )

    def _server_version(self) -> str:
        try:
            return str(self.client.get("/version", timeout=10).json().get("version", "unknown"))
        except (httpx.HTTPError, ValueError):
            return "unknown"

    def _post(self, body: dict) -> dict:
        c = self.cfg
        for attempt in range(c.max_retries + 1):
            if self.server is not None and not self.server.alive():
                raise TeacherServerError(
                    f"teacher server died (exit code {self.server.proc.returncode}): "
                    f"{self.server.log_tail()} (log: {self.server.log_path})"
                )
            try:
                resp = self.client.post("/v1/completions", json=body)
            except httpx.TransportError as err:
                problem = f"cannot reach the teacher server at {self.url} ({type(err).__name__})"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise TeacherServerError(
                            f"teacher server at {self.url} answered with non-JSON: {resp.text[:200]!r}"
                        ) from None
                detail = _error_message(resp)
                if resp.status_code < 500 and resp.status_code not in (408, 429):  # those two are worth a retry
                    if "logprobs" in detail and "max" in detail:
                        raise TeacherRequestError(
                            f"k={body['logprobs']} exceeds the server's --max-logprobs ({detail}); lower generate.k "
                            "or raise --max-logprobs"
                        )
                    raise TeacherRequestError(f"teacher server refused the request (HTTP {resp.status_code}): {detail}")
                problem = f"teacher server error HTTP {resp.status_code}: {detail}"
            if attempt < c.max_retries:
                time.sleep(min(30.0, 0.5 * 2**attempt) * (1 + random.random() * 0.25))
        raise TeacherServerError(f"{problem}; gave up after {c.max_retries} retries")

    def _request(self, prompt: list[int], spec: SamplingSpec, seed: int) -> list[Generation]:
        body = {
            "model": self.model_name,
            "prompt": prompt,
            "n": spec.n,
            "max_tokens": spec.max_new_tokens,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "seed": seed,
            "logprobs": spec.k,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        choices = sorted(self._post(body)["choices"], key=lambda c: c["index"])
        return [parse_choice(c, spec.k) for c in choices]

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        # One request per prompt with its own seed: results do not depend on concurrency or batching.
        # vLLM seeds sample j of a request with seed + j, so prompts get hashed, far-apart seeds.
        seeds = [int(stable_id("request", seed, i)[:15], 16) for i in range(len(prompts))]
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        ok = False
        try:
            futures = [pool.submit(self._request, p, spec, s) for p, s in zip(prompts, seeds)]
            results = [f.result() for f in futures]
            ok = True
            return results
        finally:
            # On error or Ctrl-C, do not wait for in-flight requests: the caller stops the server next.
            pool.shutdown(wait=ok, cancel_futures=True)

    def close(self) -> None:
        """Close the HTTP client (a managed server is stopped by whoever started it)."""
        self.client.close()


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return str(msg or body)[:300]
    except ValueError:
        return resp.text[:300]
