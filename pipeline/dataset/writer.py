"""Crash-safe shard writing: temp file -> fsync -> rename, then an atomic manifest update.

A shard counts only once the manifest lists it, so a kill at any point leaves either the old state or
the new one; a rerun rewrites any shard the manifest does not list (generation is seeded per shard).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import atomic_write_bytes, fsync_dir, fsync_file, heldout_mask, sha256_file, utc_now
from pipeline.dataset.schema import MANIFEST, SHARDS_DIR, Manifest, ShardInfo, StorageRecord, arrow_schema, shard_name


def leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet leaf column paths (`col`, `col.list.element`, ...) of an Arrow schema of scalars and lists."""
    out = []
    for f in schema:
        path, t = f.name, f.type
        while pa.types.is_list(t):
            path, t = path + ".list.element", t.value_type
        out.append(path)
    return out


def _leaf_type(t: pa.DataType) -> pa.DataType:
    while pa.types.is_list(t):
        t = t.value_type
    return t


def parquet_options(storage: StorageRecord, schema: pa.Schema | None = None) -> dict:
    """`pq.write_table` keyword arguments that realise `storage` for a schema-v1 table.

    A float16 leaf is written PLAIN instead of BYTE_STREAM_SPLIT: DuckDB (2.0) cannot read float16 stored
    that way, and every dtype/encoding here must stay readable by datasets, pandas and DuckDB.
    """
    schema = schema or arrow_schema()
    half = {p for p, f in zip(leaf_paths(schema), schema) if _leaf_type(f.type) == pa.float16()}
    explicit = {
        c: ("PLAIN" if c in half and e == "BYTE_STREAM_SPLIT" else e) for c, e in storage.column_encoding.items()
    }
    if "*" in storage.dictionary_columns:
        dictionary = [p for p in leaf_paths(schema) if p not in explicit]
    else:
        dictionary = list(storage.dictionary_columns)
    return {
        "compression": storage.compression,
        "compression_level": storage.compression_level,
        "row_group_size": storage.row_group_size,
        "use_dictionary": dictionary or False,
        "column_encoding": dict(explicit) or None,
    }


def write_manifest(dataset_dir: Path, manifest: Manifest) -> None:
    manifest.updated_at = utc_now()
    atomic_write_bytes(Path(dataset_dir) / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())


def write_shard(
    dataset_dir: Path,
    index: int,
    table: pa.Table,
    *,
    prompts: int,
    heldout_fraction: float,
    storage: StorageRecord | None = None,
) -> ShardInfo:
    """Write shard `index` atomically, encoded as `storage` (default: `StorageRecord()`, what a new
    manifest records), and return its record (not yet committed). With `storage.heldout_row_groups`, the
    rows held out at `heldout_fraction` (the manifest's) go after the others, in row groups of their own."""
    storage = storage or StorageRecord()
    shards = Path(dataset_dir) / SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    final = shards / shard_name(index)
    tmp = shards / f".{final.name}.tmp-{os.getpid()}"
    options = parquet_options(storage, table.schema)
    row_group_size = options.pop("row_group_size")
    parts = [table]
    if storage.heldout_row_groups and heldout_fraction > 0:
        held = heldout_mask(table["prompt_id"], heldout_fraction)
        parts = [table.filter(pa.array(~held)), table.filter(pa.array(held))]
    try:
        with pq.ParquetWriter(tmp, table.schema, **options) as writer:
            for part in parts:
                if part.num_rows or len(parts) == 1:
                    writer.write_table(part, row_group_size=row_group_size)  # each call starts a new row group
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(shards)
    tokens = int(pc.sum(pc.list_value_length(table["completion_token_ids"])).as_py() or 0)
    return ShardInfo(
        index=index,
        file=f"{SHARDS_DIR}/{final.name}",
        rows=table.num_rows,
        prompts=prompts,
        tokens=tokens,
        bytes=final.stat().st_size,
        sha256=sha256_file(final),
    )


def commit_shard(dataset_dir: Path, manifest: Manifest, info: ShardInfo) -> Manifest:
    """List the shard in the manifest (replacing a stale entry of the same index) and persist it."""
    manifest.shards = sorted([s for s in manifest.shards if s.index != info.index] + [info], key=lambda s: s.index)
    manifest.total_samples = sum(s.rows for s in manifest.shards)
    manifest.total_tokens = sum(s.tokens for s in manifest.shards)
    manifest.complete = len(manifest.shards) == manifest.num_shards
    write_manifest(dataset_dir, manifest)
    return manifest


def remove_stray_files(dataset_dir: Path, manifest: Manifest) -> list[str]:
    """Delete temp files and shards the manifest does not list (leftovers of a killed run)."""
    shards = Path(dataset_dir) / SHARDS_DIR
    listed = {Path(s.file).name for s in manifest.shards}
    removed = []
    for path in shards.glob("*") if shards.is_dir() else []:
        if path.name not in listed:
            path.unlink()
            removed.append(path.name)
    for path in Path(dataset_dir).glob(f".{MANIFEST}.tmp-*"):
        path.unlink()
        removed.append(path.name)
    return removed
