"""The generate stage: prompts -> teacher -> sharded Parquet dataset with a manifest; resumable.

`generate_dataset` is the one orchestrator: plan -> endpoints -> shards -> commit -> clean up. Where the
shards run is the executor's business (pipeline/shards.py: `InSequence` for `distill generate`; the Prefect
flow passes one that submits a task per shard); only the orchestrator writes the manifest. Shards are
seeded per index, so a rerun after a kill redoes only uncommitted shards, and redoes them the same way; a
complete dataset with the same generate key is returned without starting the teacher.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.core import path_fingerprint, stable_id
from pipeline.dataset.schema import (
    MANIFEST,
    CompletionsRecord,
    DatasetError,
    Manifest,
    SamplingRecord,
    TeacherRecord,
    read_manifest,
)
from pipeline.dataset.validate import shard_is_intact
from pipeline.dataset.writer import commit_shard, remove_stray_files, write_manifest
from pipeline.models import tokenizer_fingerprint
from pipeline.progress import progress_bar
from pipeline.shards import (
    InSequence,
    ShardExecutor,
    ShardFailed,
    ShardWork,
    TeacherReady,
    check_teacher,
    load_prompts,
)
from pipeline.teachers import TeacherInfo, teacher_endpoints

log = logging.getLogger(__name__)


class DatasetMismatchError(DatasetError):
    """An existing dataset directory was made with other teacher/prompts/sampling settings."""


# ---- what the orchestrator returns ---------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What one generate run did; `distill generate`, the flow and its artifacts report it."""

    dataset_dir: str
    generate_fingerprint: str
    samples: int
    tokens: int
    seconds: float
    teacher_loaded: bool
    """Whether any teacher endpoint was started or attached (False: the dataset was already complete)."""
    shards_written: int = 0
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


# ---- plan -----------------------------------------------------------------------------------------------------


def generate_key(cfg: RunConfig) -> str:
    """Cache key of the generate stage: teacher + prompts + sampling config and their contents on disk."""
    return stable_id(
        cfg.generate_fingerprint(), path_fingerprint(cfg.prompts.path), path_fingerprint(cfg.teacher.model)
    )


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
            model=t.model,
            backend=info.backend,
            revision=t.revision,
            versions=info.versions,
            vocab_size=info.vocab_size,
            tokenizer_size=info.tokenizer_size or None,
        ),
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        k=g.k,
        logprobs_dtype=g.logprobs_dtype,
        sampling=SamplingRecord(
            temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, n=g.n, seed=g.seed
        ),
        mode=g.mode,
        completions=completions_record(cfg) if g.mode == "rescore" else None,
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


def completions_record(cfg: RunConfig) -> CompletionsRecord:
    """Where a re-scored dataset's completions come from, for its manifest."""
    _, prompts = load_prompts(cfg)
    return CompletionsRecord(
        source=cfg.prompts.path,
        field=f"{cfg.prompts.field}[-1]" if prompts.chat else cfg.prompts.completion_field,
        fingerprint=path_fingerprint(cfg.prompts.path),
        truncated=prompts.truncated,
        made_by=cfg.prompts.completions_by,
    )


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
        return GenerateResult(**_totals(plan), seconds=time.perf_counter() - start, teacher_loaded=False)
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
        for event in executor(cfg, ShardWork(plan.dataset_dir, plan.fingerprint, plan.todo), endpoints):
            if isinstance(event, ShardFailed):
                log.error("shard %d failed: %s", event.index, event.error)
                errors.append(event.error)
                continue
            manifest = _open_manifest(cfg, plan, event.info if isinstance(event, TeacherReady) else event.teacher)
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
    if plan.manifest is None:  # an executor that yielded nothing: no teacher info, so no dataset was created
        raise RuntimeError("the shard executor finished without a teacher or a shard")
    removed = remove_stray_files(plan.dataset_dir, plan.manifest)
    if removed:
        log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))
    return GenerateResult(
        **_totals(plan),
        seconds=time.perf_counter() - start,
        teacher_loaded=True,
        shards_written=written,
        shards_cached=cached,
        teacher_seconds=teacher_seconds,
        endpoints=dict(per_endpoint),
    )


def _totals(plan: GeneratePlan) -> dict:
    m = plan.manifest
    return {
        "dataset_dir": str(plan.dataset_dir),
        "generate_fingerprint": plan.fingerprint,
        "samples": m.total_samples,
        "tokens": m.total_tokens,
    }


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
