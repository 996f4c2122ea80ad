"""vLLM's offline engine as the teacher: one worker process per generate run, flat arrays over a pipe.

`EngineProcess` starts engine_worker.py from the teacher environment (vLLM and our pipeline cannot share a
Python), guarded like a managed server (own process group, parent-death guard, log file, start-up timeout,
one-line errors with the log's last error line). The worker builds one `vllm.LLM` and keeps it for every
shard of the run; a shard is one request, so vLLM batches all its prompts continuously, and the answer comes
back as NumPy buffers: no HTTP, no per-token JSON. `VLLMEngineTeacher` is the Teacher protocol over it, with
the server backend's per-request seeds and its top-k order, so both backends write the same shards where vLLM
computes the same numbers.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.dataset.schema import Generation
from pipeline.teachers import engine_worker
from pipeline.teachers.base import (
    SamplingSpec,
    TeacherInfo,
    TeacherRequestError,
    TeacherServerError,
    request_seeds,
)
from pipeline.teachers.managed import launch_guarded, log_tail, stop_group, teacher_environment

WORKER = Path(engine_worker.__file__)
OPENAI_FLOOR = -9999.0
"""vLLM's server reports -inf logprobs as this (OpenAI's convention); the engine path does the same."""


class EngineProcess:
    """A `vllm.LLM` in a worker process we start from the teacher environment, talk to, and always stop."""

    def __init__(self, cfg, *, max_logprobs: int, log_path: Path):
        self.cfg, self.max_logprobs, self.log_path = cfg, max_logprobs, Path(log_path)
        self.proc = None
        self.version = "unknown"
        self.vocab_size = 0
        self._to = self._from = None
        self._lock = threading.Lock()
        self._deadline = 0.0

    def llm_kwargs(self) -> dict:
        """Keyword arguments of `vllm.LLM`: the managed server's settings, then `teacher.engine_args`."""
        c = self.cfg
        kwargs = {
            "model": c.model,
            "revision": c.revision,
            "dtype": c.dtype,
            "max_model_len": c.max_model_len,
            "tensor_parallel_size": c.tensor_parallel_size,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "max_logprobs": self.max_logprobs,
            "logprobs_mode": "raw_logprobs",
            "seed": 0,
            "trust_remote_code": c.trust_remote_code,
        }
        return {**{k: v for k, v in kwargs.items() if v is not None}, **c.engine_args}

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Spawn the worker (returns at once); call from the thread that outlives it (see `launch_guarded`)."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cmd = [self.cfg.python, str(WORKER), str(req_r), str(rep_w), json.dumps(self.llm_kwargs())]
        try:
            self.proc = launch_guarded(
                self.cfg.python, cmd, teacher_environment(self.cfg), self.log_path, pass_fds=(req_r, rep_w)
            )
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)  # the worker holds the only write end: its death closes the pipe
        self._to, self._from = os.fdopen(req_w, "wb"), os.fdopen(rep_r, "rb", buffering=0)
        self._deadline = time.monotonic() + self.cfg.startup_timeout_s

    def wait_ready(self) -> None:
        """Block until the worker's engine is built; stop it and raise if it exits or times out."""
        try:
            header, _ = self._receive(deadline=self._deadline, starting=True)
        except BaseException:
            self.stop()
            raise
        self.version, self.vocab_size = str(header.get("vllm", "unknown")), int(header.get("vocab_size", 0))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _died(self, during: str) -> TeacherServerError:
        code = self.proc.poll() if self.proc is not None else None
        return TeacherServerError(
            f"teacher engine exited (code {code}) {during}: {log_tail(self.log_path)} (log: {self.log_path})"
        )

    def _receive(self, deadline: float | None = None, starting: bool = False) -> tuple[dict, dict]:
        during = "during start-up" if starting else "mid-run"
        while not select.select([self._from], [], [], 1.0)[0]:
            if not self.alive():
                raise self._died(during)
            if deadline is not None and time.monotonic() > deadline:
                raise TeacherServerError(
                    f"teacher engine not ready after {self.cfg.startup_timeout_s:.0f}s (log: {self.log_path})"
                )
        try:
            return engine_worker.read_message(self._from)
        except EOFError:
            self.proc.wait(timeout=30)
            raise self._died(during) from None

    def request(self, op: str, params: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One operation of the worker's protocol (engine_worker.py); its arrays, or one clear error."""
        with self._lock:
            if not self.alive():
                raise self._died("mid-run")
            try:
                engine_worker.write_message(self._to, {"op": op, "params": params}, arrays)
            except BrokenPipeError:
                raise self._died("mid-run") from None
            header, out = self._receive()
        if not header.get("ok"):
            error = header.get("error", "unknown error")
            if header.get("kind") == "request":
                raise TeacherRequestError(f"teacher engine refused the request: {error}")
            raise TeacherServerError(f"teacher engine failed: {error} (log: {self.log_path})")
        return out

    def stop(self) -> None:
        """Ask the worker to exit, then stop its whole process group (engine core included) as for a server."""
        if self._to is not None:
            try:
                engine_worker.write_message(self._to, {"op": "shutdown"})
                self._to.close()
            except OSError:
                pass
        stop_group(self.proc)
        if self._from is not None:
            self._from.close()
        self._to = self._from = None


def topk_like_the_server(entry_ids: np.ndarray, entry_lps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, k+1] entries (the sampled token, then the top-k in rank order) -> the top-k the server backend stores.

    The server puts the entries in a dict (the sampled token's key first; a top-k duplicate of it collapses
    into it) and `parse_choice` sorts that by value, stably, and keeps k: the same here, without a loop.
    """
    dup = np.zeros(entry_ids.shape, bool)
    dup[:, 1:] = entry_ids[:, 1:] == entry_ids[:, :1]
    values = np.maximum(entry_lps, OPENAI_FLOOR)
    order = np.lexsort((-values, dup), axis=-1)[:, :k]
    return np.take_along_axis(entry_ids, order, 1), np.take_along_axis(values, order, 1)


def generations_from_arrays(out: dict[str, np.ndarray], prompts: int, n: int, k: int) -> list[list[Generation]]:
    """The worker's `generate` arrays -> per prompt, its `n` completions as dataset records."""
    top_ids, top_lps = topk_like_the_server(out["entry_ids"], out["entry_logprobs"], k)
    sampled_lps = np.maximum(out["entry_logprobs"][:, 0], OPENAI_FLOOR)
    ends = np.cumsum(out["lengths"])
    if len(ends) != prompts * n or (len(ends) and ends[-1] != len(out["token_ids"])):
        raise TeacherServerError(f"teacher engine returned {len(ends)} completions for {prompts} prompts x n={n}")
    gens, start = [], 0
    for end, stop in zip(ends.tolist(), out["finish_stop"].tolist()):
        gens.append(
            Generation(
                out["token_ids"][start:end],
                sampled_lps[start:end],
                top_ids[start:end],
                top_lps[start:end],
                "stop" if stop else "length",
            )
        )
        start = end
    return [gens[i : i + n] for i in range(0, len(gens), n)]


class VLLMEngineTeacher:
    """Teacher protocol over an `EngineProcess` (started by `teacher_endpoints`, shared by every shard)."""

    def __init__(self, cfg, engine: EngineProcess):
        from pipeline.models import eos_ids, load_tokenizer

        self.cfg, self.engine = cfg, engine
        tok = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.info = TeacherInfo(
            model=cfg.model,
            backend="vllm_engine",
            revision=cfg.revision,
            versions={"vllm": engine.version},
            vocab_size=engine.vocab_size or len(tok),
            tokenizer_size=len(tok),
            eos_token_ids=tuple(eos_ids(tok)),
        )

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        if spec.k > self.engine.max_logprobs:
            raise TeacherRequestError(
                f"k={spec.k} exceeds the engine's max_logprobs ({self.engine.max_logprobs}); lower generate.k"
            )
        arrays = {
            "prompt_tokens": np.asarray([t for p in prompts for t in p], np.int32),
            "prompt_lengths": np.asarray([len(p) for p in prompts], np.int64),
            "seeds": np.asarray(request_seeds(seed, len(prompts)), np.int64),
        }
        params = {
            "n": spec.n,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_tokens": spec.max_new_tokens,
            "k": spec.k,
        }
        out = self.engine.request("generate", params, arrays)
        return generations_from_arrays(out, len(prompts), spec.n, spec.k)

    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[Generation]:
        if k > self.engine.max_logprobs:
            raise TeacherRequestError(
                f"k={k} exceeds the engine's max_logprobs ({self.engine.max_logprobs}); lower generate.k"
            )
        pairs = list(zip(prompts, completions, strict=True))
        arrays = {
            "prompt_tokens": np.asarray([t for p, c in pairs for t in (*p, *c)], np.int32),
            "prompt_lengths": np.asarray([len(p) + len(c) for p, c in pairs], np.int64),
            "completion_lengths": np.asarray([len(c) for c in completions], np.int64),
        }
        out = self.engine.request("score", {"k": k}, arrays)
        top_ids, top_lps = topk_like_the_server(out["entry_ids"], out["entry_logprobs"], k)
        given_lps = np.maximum(out["entry_logprobs"][:, 0], OPENAI_FLOOR)
        if len(top_ids) != sum(map(len, completions)):
            raise TeacherServerError(f"teacher engine scored {len(top_ids)} of {sum(map(len, completions))} tokens")
        gens, start = [], 0
        for c in completions:
            end = start + len(c)
            ids = np.asarray(c, np.int32)
            gens.append(Generation(ids, given_lps[start:end], top_ids[start:end], top_lps[start:end], "given"))
            start = end
        return gens

    def close(self) -> None:
        """Nothing to release: the engine belongs to `teacher_endpoints`, which stops it."""
