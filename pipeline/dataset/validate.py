"""`distill validate`: check a dataset against its manifest and the schema-v1 invariants."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import heldout_mask, sha256_file
from pipeline.dataset.schema import DatasetError, arrow_schema, read_manifest

LOGSUMEXP_TOL = 1e-3  # float16 storage rounds each logprob by up to ~5e-4 relative; the grid adds its own bound


class DatasetInvalid(DatasetError):
    """The first problem found in a dataset, in one line."""


@dataclass
class ValidationReport:
    shards: int
    samples: int
    tokens: int
    complete: bool


def shard_is_intact(dataset_dir: Path, info) -> bool:
    """The shard file exists with the size and sha256 its manifest record (`ShardInfo`) says."""
    path = Path(dataset_dir) / info.file
    return path.is_file() and path.stat().st_size == info.bytes and sha256_file(path) == info.sha256


def verify_shards(dataset_dir: Path, manifest=None) -> None:
    """Every committed shard exists with its manifest size and sha256; readers call this before trusting them."""
    dataset_dir = Path(dataset_dir)
    manifest = manifest or read_manifest(dataset_dir)
    for shard in manifest.shards:
        if not shard_is_intact(dataset_dir, shard):
            raise DatasetInvalid(
                f"shard {shard.file} is missing or does not match its manifest checksum; "
                "rerun `distill generate` with the same config to rewrite it"
            )


def _check_shard(path: Path, table: pa.Table, vocab_size: int, k: int, lse_tol: float = LOGSUMEXP_TOL) -> None:
    comp = table["completion_token_ids"].combine_chunks()
    lengths = np.diff(comp.offsets.to_numpy())
    for name in ("token_logprobs", "topk_token_ids", "topk_logprobs"):
        other = np.diff(table[name].combine_chunks().offsets.to_numpy())
        bad = np.nonzero(other != lengths)[0]
        if len(bad):
            raise DatasetInvalid(
                f"{path.name} row {bad[0]}: {name} has {other[bad[0]]} entries but the completion has "
                f"{lengths[bad[0]]} tokens"
            )
    for name in ("topk_token_ids", "topk_logprobs"):
        widths = np.diff(table[name].combine_chunks().flatten().offsets.to_numpy())
        if len(widths) and (widths != k).any():
            raise DatasetInvalid(
                f"{path.name}: {name} rows must hold k={k} entries per token, found {widths[widths != k][0]}"
            )
    ids = table["topk_token_ids"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    all_ids = np.concatenate([ids, comp.flatten().to_numpy(zero_copy_only=False)])
    if len(all_ids) and (all_ids.min() < 0 or all_ids.max() >= vocab_size):
        raise DatasetInvalid(
            f"{path.name}: token id {int(all_ids.max() if all_ids.max() >= vocab_size else all_ids.min())} is "
            f"outside the teacher vocabulary [0, {vocab_size})"
        )
    lp = (
        table["topk_logprobs"]
        .combine_chunks()
        .flatten()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .astype(np.float64)
        .reshape(-1, k)
    )
    if len(lp):
        if np.isnan(lp).any():
            raise DatasetInvalid(f"{path.name}: topk_logprobs contains NaN")
        if (np.diff(lp, axis=1) > 1e-6).any():
            row = int(np.nonzero((np.diff(lp, axis=1) > 1e-6).any(axis=1))[0][0])
            raise DatasetInvalid(f"{path.name}: top-k logprobs at flat token {row} are not sorted descending")
        m = lp.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True))).ravel()
        if (lse > lse_tol).any():
            row = int(np.argmax(lse))
            raise DatasetInvalid(
                f"{path.name}: top-k probabilities at flat token {row} sum to {np.exp(lse[row]):.4f} > 1 (logsumexp "
                f"{lse[row]:.4f} > 0)"
            )


def _check_split_layout(path: Path, table: pa.Table, heldout_fraction: float) -> None:
    """Training rows first, held-out rows after them, and no row group holding both (manifest's storage)."""
    held = heldout_mask(table["prompt_id"], heldout_fraction)
    if (np.diff(held.astype(np.int8)) < 0).any():
        raise DatasetInvalid(
            f"{path.name}: a training row follows a held-out row, but the manifest says held-out rows come last"
        )
    meta = pq.ParquetFile(path).metadata
    bounds = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if 0 < held[lo:hi].sum() < hi - lo:
            raise DatasetInvalid(
                f"{path.name}: row group {i} mixes training and held-out rows, but the manifest says they are apart"
            )


def validate_dataset(dataset_dir: Path) -> ValidationReport:
    """Raise DatasetInvalid with the first problem; return a short report when all is well."""
    dataset_dir = Path(dataset_dir)
    try:
        manifest = read_manifest(dataset_dir)
    except DatasetError as err:
        raise DatasetInvalid(str(err).splitlines()[0]) from None
    # shards written before 2026-12 have the same columns with nullable fields
    expected = [arrow_schema(manifest.logprobs_dtype, nullable=n).remove_metadata() for n in (False, True)]
    seen_ids: set[str] = set()
    samples = tokens = 0
    for shard in manifest.shards:
        path = dataset_dir / shard.file
        if not path.is_file():
            raise DatasetInvalid(
                f"shard {shard.file} is listed in the manifest but missing; rerun `distill generate` with the same "
                "config to rewrite it"
            )
        if not shard_is_intact(dataset_dir, shard):
            raise DatasetInvalid(
                f"shard {shard.file} does not match its manifest checksum (corrupted or modified); rerun `distill "
                "generate` with the same config to rewrite it"
            )
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetInvalid(f"shard {shard.file} is not readable Parquet: {err}") from None
        if not any(table.schema.remove_metadata().equals(e) for e in expected):
            raise DatasetInvalid(
                f"shard {shard.file} does not have the schema v{manifest.schema_version} columns/types"
            )
        if table.num_rows != shard.rows:
            raise DatasetInvalid(f"shard {shard.file} has {table.num_rows} rows but the manifest says {shard.rows}")
        grid = manifest.storage.max_logprob_error if manifest.storage else 0.0  # rounding can lift the sum by this
        _check_shard(path, table, manifest.teacher.vocab_size, manifest.k, LOGSUMEXP_TOL + grid)
        if manifest.storage and manifest.storage.heldout_row_groups:
            _check_split_layout(path, table, manifest.heldout_fraction)
        for sid in table["sample_id"].to_pylist():
            if sid in seen_ids:
                raise DatasetInvalid(f"duplicate sample_id {sid} (in {shard.file})")
            seen_ids.add(sid)
        samples += table.num_rows
        tokens += shard.tokens
    if samples != manifest.total_samples:
        raise DatasetInvalid(f"manifest total_samples={manifest.total_samples} but the shards hold {samples}")
    return ValidationReport(len(manifest.shards), samples, tokens, manifest.complete)
