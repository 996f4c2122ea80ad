"""The generate stage: prompts -> teacher -> sharded Parquet dataset with a manifest; resumable.

Shard i holds the samples of prompts [i*shard_size, (i+1)*shard_size) and is generated with a seed
derived from (seed, i), so a rerun after a kill redoes only uncommitted shards, and redoes them the
same way. A complete dataset with the same generate key is returned without starting the teacher.

`generate_dataset` is the one orchestrator: plan -> endpoints -> shards -> commit -> clean up. Where the
shards run is the executor's business (`InSequence` here for `distill generate`; the Prefect flow passes
one that submits a task per shard); only the orchestrator writes the manifest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from pydantic import BaseModel

from pipeline.config import ConfigError, RunConfig
from pipeline.core import path_fingerprint, stable_id
from pipeline.dataset.schema import (
    MANIFEST,
    DatasetError,
    Manifest,
    SamplingRecord,
    ShardInfo,
    TeacherRecord,
    build_table,
    read_manifest,
)
from pipeline.dataset.validate import shard_is_intact
from pipeline.dataset.writer import commit_shard, remove_stray_files, write_manifest, write_shard
from pipeline.models import load_tokenizer, tokenizer_fingerprint
from pipeline.progress import progress_bar
from pipeline.prompts import PromptSet, load_prompt_set
from pipeline.teachers import Endpoint, SamplingSpec, Teacher, TeacherInfo, open_teacher, teacher_endpoints

log = logging.getLogger(__name__)


class DatasetMismatchError(DatasetError):
    """An existing dataset directory was made with other teacher/prompts/sampling settings."""


# ---- what the orchestrator returns and what executors hand back ----------------------------------------------


@dataclass
class GenerateResult:
    """What one generate run did; `distill generate`, the flow and its artifacts report it."""

    dataset_dir: str
    generate_fingerprint: str
    shards_written: int
    samples: int
    tokens: int
    seconds: float
    teacher_loaded: bool
    """Whether any teacher endpoint was started or attached (False: the dataset was already complete)."""
    shards_cached: int = 0
    """Shards whose file came from an earlier run's task cache (the flow) instead of the teacher."""
    teacher_seconds: float = 0.0
    """Time the shards spent in the teacher (summed over shards; cached shards count 0)."""
    endpoints: dict[str, int] = field(default_factory=dict)
    """Shards generated per endpoint (`in-process` for the hf backend)."""

    @property
    def cached(self) -> bool:
        """Nothing was generated: every shard was already committed or came from the cache."""
        return self.shards_written == 0


class ShardDone(BaseModel):
    """One shard file written (not yet committed): what it holds and how it was made."""

    index: int
    shard: ShardInfo
    teacher: dict
    """`TeacherInfo` as a dict (it is stored with cached task results)."""
    endpoint: str
    seconds: float
    cached: bool = False

    def teacher_info(self) -> TeacherInfo:
        return TeacherInfo(**{**self.teacher, "eos_token_ids": tuple(self.teacher.get("eos_token_ids", ()))})


@dataclass(frozen=True)
class TeacherReady:
    """A teacher is up (the manifest can be written before its first shard)."""

    info: TeacherInfo


@dataclass(frozen=True)
class ShardFailed:
    """A shard that could not be written; the others are still committed."""

    index: int
    error: BaseException


ShardEvent = TeacherReady | ShardDone | ShardFailed


@dataclass
class GeneratePlan:
    """What is left to do for one dataset directory (plain data: paths, counts, hashes); reads, never writes."""

    dataset_dir: Path
    fingerprint: str
    num_prompts: int
    num_shards: int
    prompts_fingerprint: str
    tokenizer_fingerprint: str
    skipped_prompts: dict[str, int]
    manifest: Manifest | None
    """The existing manifest with bad shards dropped (in memory); None when the dataset is not created yet."""
    todo: list[int] = field(default_factory=list)
    """Shard indices not committed (or committed but missing/corrupted)."""
    dropped: list[str] = field(default_factory=list)
    """Committed shard files that are missing or fail their checksum (to be written again)."""

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.manifest.complete and not self.todo


class ShardExecutor(Protocol):
    """Runs the plan's shards on the endpoints and yields events as they happen (in the caller's thread)."""

    parallel: ClassVar[bool]
    """Whether it can use several endpoints at once (else one managed server is started, not num_servers)."""

    def __call__(self, cfg: RunConfig, plan: GeneratePlan, endpoints: list[Endpoint]) -> Iterator[ShardEvent]: ...


# ---- plan -----------------------------------------------------------------------------------------------------


def generate_key(cfg: RunConfig) -> str:
    """Cache key of the generate stage: teacher + prompts + sampling config and their contents on disk."""
    return stable_id(
        cfg.generate_fingerprint(), path_fingerprint(cfg.prompts.path), path_fingerprint(cfg.teacher.model)
    )


def shard_seed(seed: int, index: int) -> int:
    return int(stable_id("shard", seed, index)[:8], 16)


_prompt_cache: dict[tuple, tuple] = {}
_prompt_lock = threading.Lock()


def load_prompts(cfg: RunConfig) -> tuple[object, PromptSet]:
    """The teacher's tokenizer and the tokenized prompt set, loaded once per process and prompts-file content.

    Shard tasks running in threads of one process share it instead of re-tokenizing every prompt per shard.
    """
    t = cfg.teacher
    key = (
        t.model,
        t.revision,
        t.trust_remote_code,
        path_fingerprint(t.model),
        cfg.prompts,
        path_fingerprint(cfg.prompts.path),
    )
    with _prompt_lock:
        if key not in _prompt_cache:
            tokenizer = load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
            _prompt_cache.clear()  # one prompt set at a time is enough; do not grow with every config
            _prompt_cache[key] = (tokenizer, load_prompt_set(cfg.prompts, tokenizer))
        return _prompt_cache[key]


def plan_dataset(cfg: RunConfig) -> GeneratePlan:
    """Check an existing dataset against the config and list the shards left to write (no teacher needed).

    A complete dataset is not re-read beyond its manifest and checksums (the prompts are not loaded).
    """
    dataset_dir = Path(cfg.dataset_dir)
    fingerprint = generate_key(cfg)
    manifest, dropped = None, []
    if (dataset_dir / MANIFEST).is_file():
        manifest = read_manifest(dataset_dir)
        if manifest.generate_fingerprint != fingerprint:
            raise DatasetMismatchError(
                f"{dataset_dir} holds a dataset made with other teacher/prompts/sampling settings "
                f"({manifest.generate_fingerprint} != {fingerprint}); set output_dir elsewhere or delete it"
            )
        bad = [s for s in manifest.shards if not shard_is_intact(dataset_dir, s)]
        if bad:
            dropped = [s.file for s in bad]
            manifest.shards = [s for s in manifest.shards if s not in bad]
            manifest.complete = False
            manifest.total_samples = sum(s.rows for s in manifest.shards)
            manifest.total_tokens = sum(s.tokens for s in manifest.shards)
    if manifest is not None and manifest.complete:
        return GeneratePlan(
            dataset_dir,
            fingerprint,
            manifest.num_prompts,
            manifest.num_shards,
            manifest.prompts_fingerprint,
            manifest.tokenizer_fingerprint,
            manifest.skipped_prompts,
            manifest,
        )
    tokenizer, prompts = load_prompts(cfg)
    if manifest is not None and (manifest.prompts_fingerprint, manifest.num_prompts) != (
        prompts.fingerprint,
        len(prompts),
    ):
        raise DatasetMismatchError(
            f"{dataset_dir} was generated from another prompt list ({manifest.num_prompts} prompts, "
            f"{manifest.prompts_fingerprint}); resuming would mix shards: set output_dir elsewhere"
        )
    num_shards = -(-len(prompts) // cfg.generate.shard_size)
    done = {s.index for s in manifest.shards} if manifest is not None else set()
    return GeneratePlan(
        dataset_dir,
        fingerprint,
        len(prompts),
        num_shards,
        prompts.fingerprint,
        tokenizer_fingerprint(tokenizer),
        prompts.skipped,
        manifest,
        [i for i in range(num_shards) if i not in done],
        dropped,
    )


def new_manifest(cfg: RunConfig, plan: GeneratePlan, info: TeacherInfo) -> Manifest:
    """The manifest of a dataset about to be created, from the config, the plan and the teacher's info."""
    t, g = cfg.teacher, cfg.generate
    return Manifest(
        teacher=TeacherRecord(
            model=t.model, backend=info.backend, revision=t.revision, versions=info.versions, vocab_size=info.vocab_size
        ),
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        k=g.k,
        logprobs_dtype=g.logprobs_dtype,
        sampling=SamplingRecord(
            temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, n=g.n, seed=g.seed
        ),
        prompts_source=cfg.prompts.path,
        prompts_fingerprint=plan.prompts_fingerprint,
        generate_fingerprint=plan.fingerprint,
        config_hash=cfg.config_hash(),
        num_prompts=plan.num_prompts,
        shard_size=g.shard_size,
        num_shards=plan.num_shards,
        heldout_fraction=cfg.prompts.heldout_fraction,
        skipped_prompts=plan.skipped_prompts,
    )


def check_teacher(cfg: RunConfig, info: TeacherInfo) -> None:
    """Settings the teacher cannot honour, stated before anything is written."""
    if info.vocab_size and cfg.generate.k > info.vocab_size:
        raise ConfigError(
            f"generate.k={cfg.generate.k} is larger than the teacher's vocabulary ({info.vocab_size} tokens); "
            "lower generate.k"
        )


# ---- one shard ------------------------------------------------------------------------------------------------


def generate_shard(cfg: RunConfig, index: int, teacher: Teacher, *, dataset_dir: Path | None = None) -> ShardInfo:
    """Teacher completes shard `index`'s prompts; writes the shard file atomically (the caller commits it)."""
    g = cfg.generate
    check_teacher(cfg, teacher.info)
    tokenizer, prompts = load_prompts(cfg)
    lo, hi = index * g.shard_size, min((index + 1) * g.shard_size, len(prompts))
    if not 0 <= lo < hi:
        raise ValueError(
            f"shard {index} is out of range: {len(prompts)} prompts make {-(-len(prompts) // g.shard_size)} shards"
        )
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
    return write_shard(
        Path(dataset_dir or cfg.dataset_dir),
        index,
        table,
        prompts=hi - lo,
        heldout_fraction=cfg.prompts.heldout_fraction,
    )


def run_shard(cfg: RunConfig, index: int, teacher: Teacher, endpoint: Endpoint) -> ShardDone:
    """`generate_shard` timed and described for the orchestrator."""
    start = time.perf_counter()
    info = generate_shard(cfg, index, teacher)
    return ShardDone(
        index=index,
        shard=info,
        teacher=_teacher_dict(teacher.info),
        endpoint=endpoint.label,
        seconds=time.perf_counter() - start,
    )


def _teacher_dict(info: TeacherInfo) -> dict:
    return {
        "model": info.model,
        "backend": info.backend,
        "revision": info.revision,
        "versions": dict(info.versions),
        "vocab_size": info.vocab_size,
        "eos_token_ids": list(info.eos_token_ids),
    }


@dataclass
class InSequence:
    """Shards one after another with one teacher on the first endpoint (`distill generate`).

    A failure stops the run at once; the shards committed before it are kept.
    """

    open_teacher: Callable[[RunConfig, Endpoint], Teacher] = open_teacher
    parallel: ClassVar[bool] = False

    def __call__(self, cfg: RunConfig, plan: GeneratePlan, endpoints: list[Endpoint]) -> Iterator[ShardEvent]:
        teacher = self.open_teacher(cfg, endpoints[0])
        try:
            yield TeacherReady(teacher.info)
            for index in plan.todo:
                yield run_shard(cfg, index, teacher, endpoints[0])
        finally:
            teacher.close()


# ---- the orchestrator -----------------------------------------------------------------------------------------


def generate_dataset(cfg: RunConfig, *, executor: ShardExecutor | None = None, progress: bool = True) -> GenerateResult:
    """Run (or resume) the generate stage: plan, start endpoints, run shards through `executor`, commit each
    one to the manifest as it arrives, remove leftovers of interrupted runs, and say what was done."""
    executor = executor or InSequence()
    start = time.perf_counter()
    plan = plan_dataset(cfg)
    if plan.complete:
        log.info(
            "dataset %s is complete (%d samples); teacher not started", plan.dataset_dir, plan.manifest.total_samples
        )
        return GenerateResult(
            str(plan.dataset_dir),
            plan.fingerprint,
            0,
            plan.manifest.total_samples,
            plan.manifest.total_tokens,
            time.perf_counter() - start,
            False,
        )
    if plan.dropped:
        log.warning(
            "%d committed shard(s) missing or corrupted (%s); they will be generated again",
            len(plan.dropped),
            ", ".join(plan.dropped),
        )
    written, cached, teacher_seconds, per_endpoint, errors = 0, 0, 0.0, Counter(), []
    with (
        teacher_endpoints(cfg, max_servers=None if executor.parallel else 1) as endpoints,
        progress_bar("generate", plan.num_prompts, enabled=progress) as advance,
    ):
        advance(sum(s.prompts for s in plan.manifest.shards) if plan.manifest else 0)
        for event in executor(cfg, plan, endpoints):
            if isinstance(event, ShardFailed):
                log.error("shard %d failed: %s", event.index, event.error)
                errors.append(event.error)
                continue
            manifest = _open_manifest(
                cfg, plan, event.info if isinstance(event, TeacherReady) else event.teacher_info()
            )
            if isinstance(event, TeacherReady):
                continue
            if not shard_is_intact(plan.dataset_dir, event.shard):
                raise RuntimeError(f"shard {event.index}'s file does not match the record its executor returned")
            commit_shard(plan.dataset_dir, manifest, event.shard)
            written, cached = written + (not event.cached), cached + event.cached
            teacher_seconds += 0.0 if event.cached else event.seconds
            per_endpoint[event.endpoint] += not event.cached
            advance(event.shard.prompts, info=f"shard {event.index + 1}/{plan.num_shards}")
            log.info(
                "committed shard %d/%d (%d samples, %s)",
                event.index + 1,
                plan.num_shards,
                event.shard.rows,
                "cached" if event.cached else event.endpoint,
            )
    if errors:
        raise errors[0]  # the first failed shard's error; the committed shards stay for a rerun
    removed = remove_stray_files(plan.dataset_dir, plan.manifest)
    if removed:
        log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))
    manifest = plan.manifest
    return GenerateResult(
        str(plan.dataset_dir),
        plan.fingerprint,
        written,
        manifest.total_samples,
        manifest.total_tokens,
        time.perf_counter() - start,
        True,
        cached,
        teacher_seconds,
        dict(per_endpoint),
    )


def _open_manifest(cfg: RunConfig, plan: GeneratePlan, info: TeacherInfo) -> Manifest:
    """The plan's manifest, created (and written) on the first teacher info; shards dropped by the plan are
    dropped on disk too."""
    if plan.manifest is None:
        check_teacher(cfg, info)
        plan.dataset_dir.mkdir(parents=True, exist_ok=True)
        plan.manifest = new_manifest(cfg, plan, info)
        write_manifest(plan.dataset_dir, plan.manifest)
    elif plan.dropped:
        write_manifest(plan.dataset_dir, plan.manifest)
        plan.dropped = []
    return plan.manifest
