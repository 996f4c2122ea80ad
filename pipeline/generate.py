"""The generate stage: prompts -> teacher -> sharded Parquet dataset with a manifest; resumable.

Shard i holds the samples of prompts [i*shard_size, (i+1)*shard_size) and is generated with a seed
derived from (seed, i), so a rerun after a kill redoes only uncommitted shards, and redoes them the
same way. A complete dataset with the same generate fingerprint is returned without loading the teacher.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.dataset.schema import (MANIFEST, Manifest, SamplingRecord, TeacherRecord, build_table, read_manifest,
                                     sha256_file, stable_id)
from pipeline.dataset.writer import commit_shard, remove_stray_files, write_manifest, write_shard
from pipeline.models import load_tokenizer, tokenizer_fingerprint
from pipeline.progress import progress_bar
from pipeline.prompts import load_prompt_set
from pipeline.teachers import SamplingSpec, Teacher, load_teacher

log = logging.getLogger(__name__)


class DatasetMismatchError(ValueError):
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


def path_fingerprint(name: str) -> str:
    """Content fingerprint of a local file or model/prompts directory; '' for a hub id.

    Weight files count by name, size and their first MiB, so a retrained model at the same path is a new
    teacher without hashing gigabytes; everything else is hashed whole.
    """
    path = Path(name)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = []
    for f in files:
        heavy = f.suffix in (".safetensors", ".bin", ".pt", ".gguf") or f.stat().st_size > (64 << 20)
        with open(f, "rb") as fh:
            head = fh.read(1 << 20) if heavy else fh.read()
        parts.append((str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, hashlib.sha256(head).hexdigest()))
    return stable_id(*parts)


def generate_key(cfg: RunConfig) -> str:
    """Cache key of the generate stage: teacher + prompts + sampling config and their contents on disk."""
    return stable_id(cfg.generate_fingerprint(), path_fingerprint(cfg.prompts.path), path_fingerprint(cfg.teacher.model))


def shard_seed(seed: int, index: int) -> int:
    return int(stable_id("shard", seed, index)[:8], 16)


def _existing(dataset_dir: Path, fingerprint: str) -> Manifest | None:
    """The dataset's manifest, with shards that are missing or fail their checksum dropped (to be redone)."""
    if not (dataset_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(dataset_dir)
    if manifest.generate_fingerprint != fingerprint:
        raise DatasetMismatchError(
            f"{dataset_dir} holds a dataset made with other teacher/prompts/sampling settings "
            f"({manifest.generate_fingerprint} != {fingerprint}); set output_dir elsewhere or delete it")
    bad = [s for s in manifest.shards if not (dataset_dir / s.file).is_file()
           or (dataset_dir / s.file).stat().st_size != s.bytes or sha256_file(dataset_dir / s.file) != s.sha256]
    if bad:
        log.warning("%d committed shard(s) missing or corrupted (%s); they will be generated again",
                    len(bad), ", ".join(s.file for s in bad))
        manifest.shards = [s for s in manifest.shards if s not in bad]
        manifest.complete = False
        manifest.total_samples = sum(s.rows for s in manifest.shards)
        manifest.total_tokens = sum(s.tokens for s in manifest.shards)
        write_manifest(dataset_dir, manifest)
    return manifest


def generate_dataset(cfg: RunConfig, *, dataset_dir: Path | None = None, progress: bool = True,
                     teacher_factory: Callable[..., Teacher] = load_teacher) -> GenerateResult:
    """Run (or resume) the generate stage; returns where the dataset is and what was done."""
    start = time.perf_counter()
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    fingerprint = generate_key(cfg)
    manifest = _existing(dataset_dir, fingerprint)
    if manifest is not None and manifest.complete:
        log.info("dataset %s is complete (%d samples); teacher not started", dataset_dir, manifest.total_samples)
        return GenerateResult(str(dataset_dir), fingerprint, 0, manifest.total_samples, manifest.total_tokens,
                              time.perf_counter() - start, False)

    t = cfg.teacher
    tokenizer = load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    prompts = load_prompt_set(cfg.prompts, tokenizer)
    g = cfg.generate
    spec = SamplingSpec(n=g.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, k=g.k, seed=g.seed)
    num_shards = -(-len(prompts) // g.shard_size)
    if manifest is not None and (manifest.prompts_fingerprint, manifest.num_prompts) != (prompts.fingerprint, len(prompts)):
        raise DatasetMismatchError(f"{dataset_dir} was generated from another prompt list ({manifest.num_prompts} prompts, "
                                   f"{manifest.prompts_fingerprint}); resuming would mix shards: set output_dir elsewhere")

    teacher = teacher_factory(t, workdir=dataset_dir.parent, k=g.k)
    try:
        if manifest is None:
            dataset_dir.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(
                teacher=TeacherRecord(model=t.model, backend=teacher.info.backend, revision=t.revision,
                                      versions=teacher.info.versions, vocab_size=teacher.info.vocab_size),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), k=g.k, logprobs_dtype=g.logprobs_dtype,
                sampling=SamplingRecord(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                        n=g.n, seed=g.seed),
                prompts_source=cfg.prompts.path, prompts_fingerprint=prompts.fingerprint,
                generate_fingerprint=fingerprint, config_hash=cfg.config_hash(), num_prompts=len(prompts),
                shard_size=g.shard_size, num_shards=num_shards, heldout_fraction=cfg.prompts.heldout_fraction,
                skipped_prompts=prompts.skipped)
            write_manifest(dataset_dir, manifest)
        removed = remove_stray_files(dataset_dir, manifest)
        if removed:
            log.info("removed %d uncommitted file(s) from an interrupted run", len(removed))
        done = {s.index for s in manifest.shards}
        todo = [i for i in range(num_shards) if i not in done]
        written = 0
        with progress_bar("generate", len(prompts), enabled=progress) as advance:
            advance(sum(s.prompts for s in manifest.shards))
            for index in todo:
                lo, hi = index * g.shard_size, min((index + 1) * g.shard_size, len(prompts))
                gens = teacher.generate(prompts.token_ids[lo:hi], spec, seed=shard_seed(g.seed, index))
                completions = [[tokenizer.decode(s.completion_token_ids, skip_special_tokens=True) for s in per]
                               for per in gens]
                table = build_table(prompt_ids=prompts.ids[lo:hi], prompts=prompts.texts[lo:hi],
                                    prompt_token_ids=prompts.token_ids[lo:hi], generations=gens,
                                    completions=completions, seed=g.seed, logprobs_dtype=g.logprobs_dtype)
                info = write_shard(dataset_dir, index, table, prompts=hi - lo)
                manifest = commit_shard(dataset_dir, manifest, info)
                written += 1
                advance(hi - lo, info=f"shard {index + 1}/{num_shards}")
                log.info("committed shard %d/%d (%d samples)", index + 1, num_shards, info.rows)
    finally:
        teacher.close()
    return GenerateResult(str(dataset_dir), fingerprint, written, manifest.total_samples, manifest.total_tokens,
                          time.perf_counter() - start, True)


def reset_dataset(dataset_dir: Path) -> None:
    """Delete a dataset directory (used by `--overwrite`)."""
    if Path(dataset_dir).exists():
        shutil.rmtree(dataset_dir)
