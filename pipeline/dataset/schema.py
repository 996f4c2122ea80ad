"""THE dataset contract (schema v1, DESIGN.md §3): the Parquet schema, the manifest, and row building.

A dataset is a directory with `manifest.json` and `shards/part-NNNNN.parquet`. Only shards listed in
the manifest count; the manifest records how the numbers were made (teacher, k, logprobs mode, dtype).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.teachers.base import Generation

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def arrow_schema(logprobs_dtype: str = "float32") -> pa.Schema:
    """Schema v1: one row per sampled completion; top-k columns are L x k nested lists."""
    lp = pa.float16() if logprobs_dtype == "float16" else pa.float32()
    return pa.schema([
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion_token_ids", pa.list_(pa.int32())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(lp))),
        ("finish_reason", pa.string()),
    ], metadata={b"distill_schema_version": str(SCHEMA_VERSION).encode()})


class ShardInfo(BaseModel):
    """One committed shard: the prompts slice it covers and what it holds."""

    index: int
    file: str
    rows: int
    prompts: int
    tokens: int
    bytes: int
    sha256: str


class TeacherRecord(BaseModel):
    model: str
    backend: str
    revision: str | None = None
    versions: dict[str, str] = {}
    vocab_size: int


class SamplingRecord(BaseModel):
    temperature: float
    top_p: float
    max_new_tokens: int
    n: int
    seed: int


class Manifest(BaseModel):
    """Everything needed to trust, resume and reuse a dataset."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    teacher: TeacherRecord
    tokenizer_fingerprint: str
    k: int
    logprobs_mode: Literal["raw"] = "raw"
    """`raw`: teacher distribution at temperature 1, before sampling processors (what the losses assume)."""
    logprobs_dtype: Literal["float16", "float32"] = "float32"
    sampling: SamplingRecord
    prompts_source: str
    prompts_fingerprint: str
    generate_fingerprint: str
    config_hash: str
    num_prompts: int
    shard_size: int
    num_shards: int
    heldout_fraction: float = 0.0
    skipped_prompts: dict[str, int] = Field(default_factory=dict)
    shards: list[ShardInfo] = Field(default_factory=list)
    total_samples: int = 0
    total_tokens: int = 0
    complete: bool = False
    created_at: str = Field(default_factory=lambda: now())
    updated_at: str = Field(default_factory=lambda: now())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(dataset_dir: Path) -> Manifest:
    """Load and check the manifest; a newer schema version is refused with a clear message."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir}: no {MANIFEST} (not a distill dataset, or generation never committed a shard)")
    raw = json.loads(path.read_text())
    version = raw.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is newer than this distill supports ({SCHEMA_VERSION}); upgrade distill")
    return Manifest.model_validate(raw)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_id(*parts: object) -> str:
    """A short stable hash used for prompt and sample ids."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def _list_array(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype))


def _nested_array(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """[L_i, k_i] arrays -> list<list<dtype>> without a Python loop over tokens."""
    rows = [a.reshape(a.shape[0], -1) for a in arrays]
    inner_lengths = np.concatenate([np.full(r.shape[0], r.shape[1], dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    inner_offsets = np.zeros(len(inner_lengths) + 1, dtype=np.int32)
    np.cumsum(inner_lengths, out=inner_offsets[1:])
    flat = np.concatenate([r.ravel() for r in rows]) if rows else np.zeros(0)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype))
    outer_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([r.shape[0] for r in rows], out=outer_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def build_table(
    *,
    prompt_ids: list[str],
    prompts: list[str],
    prompt_token_ids: list[list[int]],
    generations: list[list[Generation]],
    completions: list[list[str]],
    seed: int,
    logprobs_dtype: str = "float32",
) -> pa.Table:
    """One row per (prompt, sample) in schema v1; generations[i][j] is sample j of prompt i."""
    rows = [(i, j, g) for i, gens in enumerate(generations) for j, g in enumerate(gens)]
    schema = arrow_schema(logprobs_dtype)
    lp_type = schema.field("topk_logprobs").type.value_type.value_type
    cols = {
        "sample_id": pa.array([stable_id(prompt_ids[i], j, seed) for i, j, _ in rows], pa.string()),
        "prompt_id": pa.array([prompt_ids[i] for i, _, _ in rows], pa.string()),
        "prompt": pa.array([prompts[i] for i, _, _ in rows], pa.string()),
        "completion": pa.array([completions[i][j] for i, j, _ in rows], pa.string()),
        "prompt_token_ids": _list_array([np.asarray(prompt_token_ids[i], np.int32) for i, _, _ in rows], pa.int32()),
        "completion_token_ids": _list_array([g.completion_token_ids for _, _, g in rows], pa.int32()),
        "token_logprobs": _list_array([g.token_logprobs for _, _, g in rows], pa.float32()),
        "topk_token_ids": _nested_array([g.topk_token_ids for _, _, g in rows], pa.int32()),
        "topk_logprobs": _nested_array([g.topk_logprobs for _, _, g in rows], lp_type),
        "finish_reason": pa.array([g.finish_reason for _, _, g in rows], pa.string()),
    }
    return pa.table(cols, schema=schema)
