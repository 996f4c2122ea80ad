"""vLLM-served teacher: a client of vLLM's OpenAI-compatible server (managed.py starts one, or attach to yours).

Prompts go as token ids, so the dataset's prompt ids are exactly what the teacher saw; logprobs come
back keyed `token_id:N` (`return_tokens_as_token_ids`) and are raw (`--logprobs-mode raw_logprobs`).
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from pipeline.dataset.schema import Generation
from pipeline.teachers.base import (
    SamplingSpec,
    TeacherInfo,
    TeacherRequestError,
    TeacherServerError,
    request_seeds,
)
from pipeline.teachers.managed import ManagedServer


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


def parse_prompt_logprobs(entries: list, completion: list[int], k: int) -> Generation:
    """The `prompt_logprobs` of a completion's positions (one dict of `token id -> {logprob, rank}` per token, the
    given token included even outside the top-k) -> Generation."""
    if len(entries) != len(completion):
        raise TeacherServerError(
            f"server returned prompt logprobs for {len(entries)} of {len(completion)} completion tokens"
        )
    top_ids = np.zeros((len(completion), k), np.int32)
    top_lp = np.full((len(completion), k), -np.inf, np.float32)
    tok_lp = np.full(len(completion), -np.inf, np.float32)
    for t, (entry, token) in enumerate(zip(entries, completion, strict=True)):
        scored = {int(key): value["logprob"] for key, value in (entry or {}).items()}
        best = sorted(((v, tok) for tok, v in scored.items()), key=lambda e: -e[0])[:k]
        for j, (value, tok) in enumerate(best):
            top_ids[t, j], top_lp[t, j] = tok, value
        if token not in scored:
            raise TeacherServerError(f"server's prompt logprobs at completion token {t} leave out the given token")
        tok_lp[t] = scored[token]
    return Generation(np.asarray(completion, np.int32), tok_lp, top_ids, top_lp, "given")


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
            tokenizer_size=len(tok),
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
                        k = body.get("logprobs", body.get("prompt_logprobs"))
                        raise TeacherRequestError(
                            f"k={k} exceeds the server's --max-logprobs ({detail}); lower generate.k or raise "
                            "--max-logprobs"
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

    def _score(self, prompt: list[int], completion: list[int], k: int) -> Generation:
        body = {
            "model": self.model_name,
            "prompt": prompt + completion,
            "max_tokens": 1,  # vLLM generates at least one token; prompt logprobs come from the prefill
            "temperature": 0.0,
            "prompt_logprobs": k,
            "skip_special_tokens": True,
        }
        entries = self._post(body)["choices"][0].get("prompt_logprobs") or []
        return parse_prompt_logprobs(entries[len(prompt) : len(prompt) + len(completion)], completion, k)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        seeds = request_seeds(seed, len(prompts))  # one request per prompt, each with its own seed
        return self._in_parallel(self._request, [(p, spec, s) for p, s in zip(prompts, seeds)])

    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[Generation]:
        # One request per completion: the server batches them; each is prefill only (plus one decoded token).
        return self._in_parallel(self._score, [(p, c, k) for p, c in zip(prompts, completions, strict=True)])

    def _in_parallel(self, fn, calls: list[tuple]) -> list:
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        ok = False
        try:
            futures = [pool.submit(fn, *args) for args in calls]
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
