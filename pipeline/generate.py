"""The generate stage: prompts -> teacher -> sharded Parquet dataset with a manifest; resumable.

Shard i holds the samples of prompts [i*shard_size, (i+1)*shard_size) and is generated with a seed
derived from (seed, i), so a rerun after a kill redoes only uncommitted shards, and redoes them the
same way. A complete dataset with the same generate fingerprint is returned without loading the teacher.

The stage is split so that shards can be written by independent workers (the Prefect flow's shard
tasks) while ONE writer commits them: `prepare_dataset` (what is left to do), `open_manifest`,
`generate_shard` (writes one shard file, never the manifest), `commit_shard`. `generate_dataset` is the
sequential path (`distill generate`) built from the same pieces.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.core import UserError, path_fingerprint, sha256_file, stable_id
from pipeline.dataset.schema import (MANIFEST, Manifest, SamplingRecord, ShardInfo, TeacherRecord, build_table,
                                     read_manifest)
from pipeline.dataset.writer import commit_shard, remove_stray_files, write_manifest, write_shard
from pipeline.models import load_tokenizer, tokenizer_fingerprint
from pipeline.progress import progress_bar
from pipeline.prompts import PromptSet, load_prompt_set
from pipeline.teachers import SamplingSpec, Teacher, TeacherInfo, load_teacher

log = logging.getLogger(__name__)


class DatasetMismatchError(UserError):
    """An existing dataset directory was made with other teacher/prompts/sampling settings."""


@dataclass
class GenerateResult:
    dataset_dir: str
    generate_fingerprint: str
    shards_written: int
    samples: int
    tokens: int
    seconds: float
    teacher_loaded: bool


@dataclass
class GeneratePlan:
    """What is left to do for one dataset directory (plain data: paths, counts, hashes)."""

    dataset_dir: Path
    fingerprint: str
    num_prompts: int
    num_shards: int
    prompts_fingerprint: str
    tokenizer_fingerprint: str
    skipped_prompts: dict[str, int]
    manifest: Manifest | None
    """The existing manifest with bad shards dropped; None when the dataset is not created yet."""
    todo: list[int] = field(default_factory=list)
    """Shard indices not committed (or committed but missing/corrupted)."""

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.manifest.complete and not self.todo


def generate_key(cfg: RunConfig) -> str:
    """Cache key of the generate stage: teacher + prompts + sampling config and their contents on disk."""
    return stable_id(cfg.generate_fingerprint(), path_fingerprint(cfg.prompts.path), path_fingerprint(cfg.teacher.model))


def shard_seed(seed: int, index: int) -> int:
    return int(stable_id("shard", seed, index)[:8], 16)


def shard_is_intact(dataset_dir: Path, info: ShardInfo) -> bool:
    """The shard file exists with the size and checksum its record says."""
    path = Path(dataset_dir) / info.file
    return path.is_file() and path.stat().st_size == info.bytes and sha256_file(path) == info.sha256


_prompt_cache: dict[tuple, tuple] = {}
_prompt_lock = threading.Lock()


def load_prompts(cfg: RunConfig) -> tuple[object, PromptSet]:
    """The teacher's tokenizer and the tokenized prompt set, loaded once per process and prompts-file content.

    Shard tasks running in threads of one process share it instead of re-tokenizing every prompt per shard.
    """
    t = cfg.teacher
    key = (t.model, t.revision, t.trust_remote_code, path_fingerprint(t.model), cfg.prompts, path_fingerprint(cfg.prompts.path))
    with _prompt_lock:
        if key not in _prompt_cache:
            tokenizer = load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
            _prompt_cache.clear()  # one prompt set at a time is enough; do not grow with every config
            _prompt_cache[key] = (tokenizer, load_prompt_set(cfg.prompts, tokenizer))
        return _prompt_cache[key]


def _existing(dataset_dir: Path, fingerprint: str) -> Manifest | None:
    """The dataset's manifest, with shards that are missing or fail their checksum dropped (to be redone)."""
    if not (dataset_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(dataset_dir)
    if manifest.generate_fingerprint != fingerprint:
        raise DatasetMismatchError(
            f"{dataset_dir} holds a dataset made with other teacher/prompts/sampling settings "
            f"({manifest.generate_fingerprint} != {fingerprint}); set output_dir elsewhere or delete it")
    bad = [s for s in manifest.shards if not shard_is_intact(dataset_dir, s)]
    if bad:
        log.warning("%d committed shard(s) missing or corrupted (%s); they will be generated again",
                    len(bad), ", ".join(s.file for s in bad))
        manifest.shards = [s for s in manifest.shards if s not in bad]
        manifest.complete = False
        manifest.total_samples = sum(s.rows for s in manifest.shards)
        manifest.total_tokens = sum(s.tokens for s in manifest.shards)
        write_manifest(dataset_dir, manifest)
    return manifest


def prepare_dataset(cfg: RunConfig, *, dataset_dir: Path | None = None) -> GeneratePlan:
    """Check an existing dataset against the config and list the shards left to write (no teacher needed).

    A complete dataset is not re-read beyond its manifest and checksums (the prompts are not loaded).
    """
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    fingerprint = generate_key(cfg)
    manifest = _existing(dataset_dir, fingerprint)
    if manifest is not None and manifest.complete:
        return GeneratePlan(dataset_dir, fingerprint, manifest.num_prompts, manifest.num_shards,
                            manifest.prompts_fingerprint, manifest.tokenizer_fingerprint, manifest.skipped_prompts,
                            manifest, [])
    tokenizer, prompts = load_prompts(cfg)
    if manifest is not None and (manifest.prompts_fingerprint, manifest.num_prompts) != (prompts.fingerprint, len(prompts)):
        raise DatasetMismatchError(f"{dataset_dir} was generated from another prompt list ({manifest.num_prompts} prompts, "
                                   f"{manifest.prompts_fingerprint}); resuming would mix shards: set output_dir elsewhere")
    num_shards = -(-len(prompts) // cfg.generate.shard_size)
    done = {s.index for s in manifest.shards} if manifest is not None else set()
    return GeneratePlan(dataset_dir, fingerprint, len(prompts), num_shards, prompts.fingerprint,
                        tokenizer_fingerprint(tokenizer), prompts.skipped, manifest,
                        [i for i in range(num_shards) if i not in done])


def open_manifest(cfg: RunConfig, plan: GeneratePlan, info: TeacherInfo) -> Manifest:
    """The plan's manifest, created (and written) from the config and the teacher's info if there is none yet."""
    if plan.manifest is not None:
        return plan.manifest
    t, g = cfg.teacher, cfg.generate
    plan.dataset_dir.mkdir(parents=True, exist_ok=True)
    plan.manifest = Manifest(
        teacher=TeacherRecord(model=t.model, backend=info.backend, revision=t.revision, versions=info.versions,
                              vocab_size=info.vocab_size),
        tokenizer_fingerprint=plan.tokenizer_fingerprint, k=g.k, logprobs_dtype=g.logprobs_dtype,
        sampling=SamplingRecord(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, n=g.n, seed=g.seed),
        prompts_source=cfg.prompts.path, prompts_fingerprint=plan.prompts_fingerprint, generate_fingerprint=plan.fingerprint,
        config_hash=cfg.config_hash(), num_prompts=plan.num_prompts, shard_size=g.shard_size, num_shards=plan.num_shards,
        heldout_fraction=cfg.prompts.heldout_fraction, skipped_prompts=plan.skipped_prompts)
    write_manifest(plan.dataset_dir, plan.manifest)
    return plan.manifest


def generate_shard(cfg: RunConfig, index: int, teacher: Teacher, *, dataset_dir: Path | None = None) -> ShardInfo:
    """Teacher completes shard `index`'s prompts; writes the shard file atomically (the caller commits it)."""
    g = cfg.generate
    tokenizer, prompts = load_prompts(cfg)
    lo, hi = index * g.shard_size, min((index + 1) * g.shard_size, len(prompts))
    if not 0 <= lo < hi:
        raise ValueError(f"shard {index} is out of range: {len(prompts)} prompts make {-(-len(prompts) // g.shard_size)} shards")
    spec = SamplingSpec(n=g.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, k=g.k, seed=g.seed)
    gens = teacher.generate(prompts.token_ids[lo:hi], spec, seed=shard_seed(g.seed, index))
    completions = [[tokenizer.decode(s.completion_token_ids, skip_special_tokens=True) for s in per] for per in gens]
    table = build_table(prompt_ids=prompts.ids[lo:hi], prompts=prompts.texts[lo:hi], prompt_token_ids=prompts.token_ids[lo:hi],
                        generations=gens, completions=completions, seed=g.seed, logprobs_dtype=g.logprobs_dtype)
    return write_shard(Path(dataset_dir or cfg.dataset_dir), index, table, prompts=hi - lo,
                       heldout_fraction=cfg.prompts.heldout_fraction)


def generate_dataset(cfg: RunConfig, *, dataset_dir: Path | None = None, progress: bool = True,
                     teacher_factory: Callable[..., Teacher] = load_teacher) -> GenerateResult:
    """Run (or resume) the generate stage shard after shard with one teacher; returns what was done."""
    start = time.perf_counter()
    plan = prepare_dataset(cfg, dataset_dir=dataset_dir)
    if plan.complete:
        log.info("dataset %s is complete (%d samples); teacher not started", plan.dataset_dir, plan.manifest.total_samples)
        return GenerateResult(str(plan.dataset_dir), plan.fingerprint, 0, plan.manifest.total_samples,
                              plan.manifest.total_tokens, time.perf_counter() - start, False)

    teacher = teacher_factory(cfg.teacher, workdir=plan.dataset_dir.parent, k=cfg.generate.k)
    written = 0
    try:
        manifest = open_manifest(cfg, plan, teacher.info)
        removed = remove_stray_files(plan.dataset_dir, manifest)
        if removed:
            log.info("removed %d uncommitted file(s) from an interrupted run", len(removed))
        with progress_bar("generate", plan.num_prompts, enabled=progress) as advance:
            advance(sum(s.prompts for s in manifest.shards))
            for index in plan.todo:
                info = generate_shard(cfg, index, teacher, dataset_dir=plan.dataset_dir)
                manifest = commit_shard(plan.dataset_dir, manifest, info)
                written += 1
                advance(info.prompts, info=f"shard {index + 1}/{plan.num_shards}")
                log.info("committed shard %d/%d (%d samples)", index + 1, plan.num_shards, info.rows)
    finally:
        teacher.close()
    return GenerateResult(str(plan.dataset_dir), plan.fingerprint, written, manifest.total_samples, manifest.total_tokens,
                          time.perf_counter() - start, True)


def reset_dataset(dataset_dir: Path) -> None:
    """Delete a dataset directory (used by `--overwrite`)."""
    if Path(dataset_dir).exists():
        shutil.rmtree(dataset_dir)
