"""One shard of the generate stage, and the executors that run shards for the orchestrator (pipeline/generate.py).

Shard i holds the samples of prompts [i*shard_size, (i+1)*shard_size) and is generated with a seed derived
from (seed, i), so any worker writes the same bytes for it, at any time. An executor runs the shards left to
do and yields events (`TeacherReady`, `ShardDone`, `ShardFailed`) that the orchestrator turns into manifest
commits; `InSequence` is the one `distill generate` uses, the Prefect flow has its own (flows/distill.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar, Protocol

from pydantic import BaseModel

from pipeline.config import ConfigError, RunConfig
from pipeline.core import path_fingerprint, stable_id
from pipeline.dataset.schema import Generation, ShardInfo, build_table
from pipeline.dataset.writer import write_shard
from pipeline.models import context_length, load_tokenizer
from pipeline.prompts import GivenCompletion, PromptSet, load_prompt_set
from pipeline.teachers import Endpoint, SamplingSpec, Teacher, TeacherInfo, open_teacher


@dataclass(frozen=True)
class ShardWork:
    """The shards an executor is asked to write: plain data, so it can travel to other workers."""

    dataset_dir: Path
    key: str
    """The generate key (`generate.generate_key`): with a shard index, the task cache key."""
    todo: list[int]


class ShardDone(BaseModel):
    """One shard file written (not yet committed): what it holds and how it was made."""

    index: int
    shard: ShardInfo
    teacher: TeacherInfo
    endpoint: str
    seconds: float
    cached: bool = False
    """The file came from an earlier run (a task cache) instead of the teacher."""


@dataclass(frozen=True)
class TeacherReady:
    """A teacher is up: the manifest can be written before its first shard."""

    info: TeacherInfo


@dataclass(frozen=True)
class ShardFailed:
    """A shard that could not be written; the others are still committed."""

    index: int
    error: BaseException


ShardEvent = TeacherReady | ShardDone | ShardFailed


class ShardExecutor(Protocol):
    """Runs `work.todo` on the endpoints and yields events as they happen (consumed in the caller's thread)."""

    parallel: ClassVar[bool]
    """Whether it can use several endpoints at once (else one managed server is started, not num_servers)."""

    def __call__(self, cfg: RunConfig, work: ShardWork, endpoints: list[Endpoint]) -> Iterator[ShardEvent]: ...


def shard_seed(seed: int, index: int) -> int:
    return int(stable_id("shard", seed, index)[:8], 16)


_prompt_cache: dict[tuple, tuple] = {}
_prompt_lock = threading.Lock()


def load_prompts(cfg: RunConfig) -> tuple[object, PromptSet]:
    """The teacher's tokenizer and the tokenized prompt set, loaded once per process and prompts-file content.

    Shard tasks running in threads of one process share it instead of re-tokenizing every prompt per shard.
    """
    t = cfg.teacher
    rescore = cfg.generate.mode == "rescore"
    key = (
        t.model,
        t.revision,
        t.trust_remote_code,
        path_fingerprint(t.model),
        getattr(t, "max_model_len", None),
        cfg.prompts,
        rescore,
        None if rescore else cfg.generate.max_new_tokens,
        path_fingerprint(cfg.prompts.path),
    )
    with _prompt_lock:
        if key not in _prompt_cache:
            tokenizer = load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
            context = teacher_context(cfg)
            if rescore:
                limits = {"max_tokens": context - 1 if context else None}
            else:
                limits = {"max_tokens": context, "new_tokens": cfg.generate.max_new_tokens}
            _prompt_cache.clear()  # one prompt set at a time is enough; do not grow with every config
            _prompt_cache[key] = (tokenizer, load_prompt_set(cfg.prompts, tokenizer, rescore=rescore, **limits))
        return _prompt_cache[key]


def teacher_context(cfg: RunConfig) -> int | None:
    """The teacher's context (`teacher.max_model_len`, else the model config's), the same for every backend so
    datasets agree. Sampling needs the prompt plus `generate.max_new_tokens` to fit; scoring, prompt plus completion
    plus the one token vLLM must generate."""
    t = cfg.teacher
    return getattr(t, "max_model_len", None) or context_length(
        t.model, revision=t.revision, trust_remote_code=t.trust_remote_code
    )


def check_teacher(cfg: RunConfig, info: TeacherInfo) -> None:
    """Settings the teacher cannot honour, stated before anything is written."""
    if info.vocab_size and cfg.generate.k > info.vocab_size:
        raise ConfigError(
            f"generate.k={cfg.generate.k} is larger than the teacher's vocabulary ({info.vocab_size} tokens); "
            "lower generate.k"
        )


def generate_shard(cfg: RunConfig, index: int, teacher: Teacher) -> ShardInfo:
    """Teacher completes shard `index`'s prompts; writes the shard file atomically (the caller commits it)."""
    g = cfg.generate
    check_teacher(cfg, teacher.info)
    tokenizer, prompts = load_prompts(cfg)
    lo, hi = index * g.shard_size, min((index + 1) * g.shard_size, len(prompts))
    if not 0 <= lo < hi:
        raise ValueError(f"shard {index} is out of range: {len(prompts)} prompts and shard_size {g.shard_size}")
    if prompts.completions is not None:
        gens = score_given(teacher, prompts.token_ids[lo:hi], prompts.completions[lo:hi], g.k)
    else:
        spec = SamplingSpec(
            n=g.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, k=g.k, seed=g.seed
        )
        gens = teacher.generate(prompts.token_ids[lo:hi], spec, seed=shard_seed(g.seed, index))
    completions = [[tokenizer.decode(s.completion_token_ids, skip_special_tokens=True) for s in per] for per in gens]
    table = build_table(
        prompt_ids=prompts.ids[lo:hi],
        prompts=prompts.texts[lo:hi],
        prompt_token_ids=prompts.token_ids[lo:hi],
        generations=gens,
        completions=completions,
        seed=g.seed,
        logprobs_dtype=g.logprobs_dtype,
    )
    return write_shard(cfg.dataset_dir, index, table, prompts=hi - lo, heldout_fraction=cfg.prompts.heldout_fraction)


def score_given(
    teacher: Teacher, prompts: list[list[int]], given: list[list[GivenCompletion]], k: int
) -> list[list[Generation]]:
    """The teacher's top-k along each prompt's given completions, grouped per prompt like sampled ones."""
    pairs = [(p, c) for p, cs in zip(prompts, given, strict=True) for c in cs]
    scored = iter(teacher.score([p for p, _ in pairs], [c.token_ids for _, c in pairs], k))
    out = []
    for cs in given:
        gens = [next(scored) for _ in cs]
        for gen, c in zip(gens, cs, strict=True):
            gen.finish_reason = "given_truncated" if c.truncated else "given"
        out.append(gens)
    return out


def run_shard(cfg: RunConfig, index: int, teacher: Teacher, endpoint: Endpoint) -> ShardDone:
    """`generate_shard`, timed and described for the orchestrator."""
    start = time.perf_counter()
    info = generate_shard(cfg, index, teacher)
    return ShardDone(
        index=index, shard=info, teacher=teacher.info, endpoint=endpoint.label, seconds=time.perf_counter() - start
    )


@dataclass
class InSequence:
    """Shards in order with one teacher on the first endpoint (`distill generate`).

    A failure stops the run; the shards committed before it are kept. With the vLLM engine the next shard is
    already waiting when one is in the engine (it takes one request at a time), so a shard's Parquet write
    overlaps the engine's next shard instead of leaving it idle; other teachers run one shard at a time.
    """

    open_teacher: Callable[[RunConfig, Endpoint], Teacher] = open_teacher
    parallel: ClassVar[bool] = False

    def __call__(self, cfg: RunConfig, work: ShardWork, endpoints: list[Endpoint]) -> Iterator[ShardEvent]:
        teacher = self.open_teacher(cfg, endpoints[0])
        try:
            yield TeacherReady(teacher.info)
            if endpoints[0].engine is None:
                for index in work.todo:
                    yield run_shard(cfg, index, teacher, endpoints[0])
            else:
                yield from two_at_a_time(cfg, work.todo, teacher, endpoints[0])
        finally:
            teacher.close()


def two_at_a_time(cfg: RunConfig, todo: list[int], teacher: Teacher, endpoint: Endpoint) -> Iterator[ShardDone]:
    """`run_shard` for each index, two in flight on threads, yielded in order; the first failure is raised once
    the shard beside it has finished."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard") as pool:
        rest = iter(todo)
        running = deque(pool.submit(run_shard, cfg, index, teacher, endpoint) for index in islice(rest, 2))
        while running:
            done = running.popleft().result()
            following = next(rest, None)
            if following is not None:
                running.append(pool.submit(run_shard, cfg, following, teacher, endpoint))
            yield done
