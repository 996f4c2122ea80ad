"""THE dataset contract (schema v1, docs/design.md): the Parquet schema, the manifest, and row building.

A dataset is a directory with `manifest.json` and `shards/part-NNNNN.parquet`. Only shards listed in
the manifest count; the manifest records how the numbers were made (teacher, k, logprobs mode, dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core import UserError, stable_id, utc_now


class DatasetError(UserError):
    """A dataset that cannot be used as asked (missing, incomplete, newer, made with other settings)."""


SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"


IDS_LEAF = "topk_token_ids.list.element.list.element"
LP_LEAF = "topk_logprobs.list.element.list.element"
TOKEN_LP_LEAF = "token_logprobs.list.element"
LOGPROBS_STEP = 2.0**-7
"""Default grid for stored logprobs (nats): round-to-nearest error <= 2^-8 = 0.0039; bench/storage.py."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _list(value: pa.DataType, nullable: bool) -> pa.DataType:
    return pa.list_(pa.field("element", value, nullable=nullable))


def arrow_schema(logprobs_dtype: str = "float32", *, nullable: bool = False) -> pa.Schema:
    """Schema v1: one row per sampled completion; top-k columns are L x k nested lists.

    Every column and list element is non-null (Parquet `required`): nulls are never valid here, and required
    levels decode ~1.5x faster (bench/reader.py). `nullable=True` is the same schema as shards written before
    2026-12 stored it; readers accept both.
    """
    lp = pa.float16() if logprobs_dtype == "float16" else pa.float32()
    columns = [
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("prompt_token_ids", _list(pa.int32(), nullable)),
        ("completion_token_ids", _list(pa.int32(), nullable)),
        ("token_logprobs", _list(pa.float32(), nullable)),
        ("topk_token_ids", _list(_list(pa.int32(), nullable), nullable)),
        ("topk_logprobs", _list(_list(lp, nullable), nullable)),
        ("finish_reason", pa.string()),
    ]
    return pa.schema(
        [pa.field(name, typ, nullable=nullable) for name, typ in columns],
        metadata={b"distill_schema_version": str(SCHEMA_VERSION).encode()},
    )


class StorageRecord(BaseModel):
    """How shards are encoded (bench/storage.py measured the choices); every value is a plain Parquet type.

    Column names are Parquet leaf paths (`col.list.element.list.element`): pyarrow silently ignores a
    top-level name of a nested column in `column_encoding`.
    """

    model_config = ConfigDict(extra="forbid")

    compression: Literal["zstd"] = "zstd"
    compression_level: int = Field(9, ge=1, le=22)
    row_group_size: int = Field(1024, ge=1)
    """Rows per row group: the unit the streaming reader reads and shuffles."""
    logprobs_step: float = LOGPROBS_STEP
    """`topk_logprobs` and `token_logprobs` are rounded to the nearest multiple of this (0: not rounded)."""
    column_encoding: dict[str, str] = Field(
        default_factory=lambda: {
            IDS_LEAF: "BYTE_STREAM_SPLIT",
            LP_LEAF: "BYTE_STREAM_SPLIT",
            TOKEN_LP_LEAF: "BYTE_STREAM_SPLIT",
        }
    )
    """Parquet encoding per leaf column; the grid's zeroed low mantissa bytes compress to almost nothing.
    With `logprobs_dtype: float16` the logprobs leaf is written PLAIN (DuckDB cannot read float16 BYTE_STREAM_SPLIT)."""
    dictionary_columns: list[str] = Field(default_factory=lambda: ["*"])
    """Dictionary-encoded leaf columns; "*" = every column without an explicit encoding."""
    heldout_row_groups: bool = True
    """Each shard holds its training rows first and its held-out rows (by prompt id) after them, in row
    groups of their own, so the training stream never decodes a held-out row (False in datasets written
    before this field existed)."""

    @field_validator("logprobs_step")
    @classmethod
    def _power_of_two(cls, v: float) -> float:
        if v != 0 and not (0 < v <= 1 and float(np.log2(v)).is_integer()):
            raise ValueError(f"logprobs_step must be 0 or a power of two <= 1 (exact in float16/32), got {v}")
        return v

    @property
    def max_logprob_error(self) -> float:
        """Bound on |stored - computed| from the grid (float16 storage adds its own rounding on top)."""
        return self.logprobs_step / 2


def quantize_logprobs(values: np.ndarray, step: float) -> np.ndarray:
    """Round to the nearest multiple of `step` (a power of two, so exact in float32); step 0 keeps values."""
    values = np.asarray(values, dtype=np.float32)
    if step == 0:
        return values
    return (np.round(values.astype(np.float64) / step) * step).astype(np.float32)


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
    """Token ids the teacher scores: its LM head's rows, padding rows included (top-k ids are below it)."""
    tokenizer_size: int | None = None
    """len(tokenizer): ids from it up to vocab_size are padding rows with no text, which an undertrained teacher
    can still rank or sample. None in manifests written before it was recorded."""


class SamplingRecord(BaseModel):
    temperature: float
    top_p: float
    max_new_tokens: int
    n: int
    seed: int


class CompletionsRecord(BaseModel):
    """Where a re-scored dataset's completions came from (`generate.mode: rescore`)."""

    source: str
    """The prompts source that also gave the completions."""
    field: str
    """Its completion column, or `<prompts.field>[-1]` when the last assistant turn of a chat was the completion."""
    fingerprint: str
    """Content fingerprint of the source file or directory when the dataset was made."""
    truncated: int = 0
    """Completions cut to fit the teacher's context (finish_reason `given_truncated`)."""
    made_by: str | None = None
    """Who wrote them, when the config says (`prompts.completions_by`; on-policy rounds: the student)."""


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
    storage: StorageRecord | None = Field(default_factory=StorageRecord)
    """Shard encoding; None in manifests written before it was recorded (shards then hold unrounded logprobs)."""
    sampling: SamplingRecord
    """The teacher's sampling settings; for a re-scored dataset, how evaluation samples the student."""
    mode: Literal["sample", "rescore"] = "sample"
    """`sample`: the teacher wrote the completions; `rescore`: they were given and the teacher scored them."""
    completions: CompletionsRecord | None = None
    """Where the given completions came from (rescore only)."""
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
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)


def read_manifest(dataset_dir: Path) -> Manifest:
    """Load and check the manifest; a newer schema version is refused with a clear message."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{dataset_dir}: no {MANIFEST} (not a distill dataset, or generation never committed a shard)"
        )
    raw = json.loads(path.read_text())
    version = raw.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema_version {version!r} is newer than this distill supports ({SCHEMA_VERSION}); upgrade "
            "distill"
        )
    raw.setdefault("storage", None)
    if isinstance(raw["storage"], dict):
        raw["storage"].setdefault("heldout_row_groups", False)  # written before shards were laid out by split
    return Manifest.model_validate(raw)


def committed_shards(dataset_dir: Path, manifest: Manifest) -> list[Path]:
    """The shard files the manifest lists, in order (other files in shards/ are not part of the dataset);
    a dataset with none committed yet is a DatasetError."""
    if not manifest.shards:
        raise DatasetError(f"{dataset_dir}: the dataset has no committed shards yet; run the generate stage")
    return [Path(dataset_dir) / s.file for s in manifest.shards]


@dataclass
class Generation:
    """One completion as a backend hands it to the writer: the teacher's raw (T=1) top-k at every token.

    Shapes: L completion tokens (the EOS token included when generation stopped on it), k candidates. A rescored
    completion holds the given tokens, with `token_logprobs` the teacher's logprob of each.
    """

    completion_token_ids: np.ndarray  # int32 [L]
    token_logprobs: np.ndarray  # float32 [L], logprob of the sampled token, even outside the top-k
    topk_token_ids: np.ndarray  # int32 [L, k], sorted by logprob descending
    topk_logprobs: np.ndarray  # float32 [L, k]
    finish_reason: str  # "stop" | "length" (sampled), "given" | "given_truncated" (rescored)


def _list_array(arrays: list[np.ndarray], list_type: pa.ListType) -> pa.Array:
    dtype = list_type.value_type
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype), type=list_type
    )


def _nested_array(arrays: list[np.ndarray], list_type: pa.ListType) -> pa.Array:
    """[L_i, k_i] arrays -> `list_type` (list<list<dtype>>) without a Python loop over tokens."""
    inner_type = list_type.value_type
    dtype = inner_type.value_type
    rows = [a.reshape(a.shape[0], -1) for a in arrays]
    inner_lengths = (
        np.concatenate([np.full(r.shape[0], r.shape[1], dtype=np.int32) for r in rows])
        if rows
        else np.zeros(0, np.int32)
    )
    inner_offsets = np.zeros(len(inner_lengths) + 1, dtype=np.int32)
    np.cumsum(inner_lengths, out=inner_offsets[1:])
    flat = np.concatenate([r.ravel() for r in rows]) if rows else np.zeros(0)
    inner = pa.ListArray.from_arrays(
        pa.array(inner_offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype), type=inner_type
    )
    outer_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([r.shape[0] for r in rows], out=outer_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner, type=list_type)


def build_table(
    *,
    prompt_ids: list[str],
    prompts: list[str],
    prompt_token_ids: list[list[int]],
    generations: list[list[Generation]],
    completions: list[list[str]],
    seed: int,
    logprobs_dtype: str = "float32",
    logprobs_step: float = LOGPROBS_STEP,
) -> pa.Table:
    """One row per (prompt, sample) in schema v1; generations[i][j] is sample j of prompt i.

    Logprobs are rounded to `logprobs_step` (record it in the manifest's `storage`) before the dtype cast.
    """
    rows = [(i, j, g) for i, gens in enumerate(generations) for j, g in enumerate(gens)]
    schema = arrow_schema(logprobs_dtype)
    typ = {f.name: f.type for f in schema}
    cols = {
        "sample_id": pa.array([stable_id(prompt_ids[i], j, seed) for i, j, _ in rows], pa.string()),
        "prompt_id": pa.array([prompt_ids[i] for i, _, _ in rows], pa.string()),
        "prompt": pa.array([prompts[i] for i, _, _ in rows], pa.string()),
        "completion": pa.array([completions[i][j] for i, j, _ in rows], pa.string()),
        "prompt_token_ids": _list_array(
            [np.asarray(prompt_token_ids[i], np.int32) for i, _, _ in rows], typ["prompt_token_ids"]
        ),
        "completion_token_ids": _list_array([g.completion_token_ids for _, _, g in rows], typ["completion_token_ids"]),
        "token_logprobs": _list_array(
            [quantize_logprobs(g.token_logprobs, logprobs_step) for _, _, g in rows], typ["token_logprobs"]
        ),
        "topk_token_ids": _nested_array([g.topk_token_ids for _, _, g in rows], typ["topk_token_ids"]),
        "topk_logprobs": _nested_array(
            [quantize_logprobs(g.topk_logprobs, logprobs_step) for _, _, g in rows], typ["topk_logprobs"]
        ),
        "finish_reason": pa.array([g.finish_reason for _, _, g in rows], pa.string()),
    }
    return pa.table(cols, schema=schema)
