"""What a dataset holds, computed in one streaming pass: lengths, teacher uncertainty, top-k coverage, ranks.

Shards are read `batch_rows` rows at a time (`ParquetFile.iter_batches`), so memory is bounded by one
batch; every per-token number is numpy over the flattened `L x k` arrays of that batch.

Definitions (per generated position t, with the teacher's raw T=1 top-k probabilities `p_i = exp(l_i)`):
- coverage `c = sum_i p_i`: the teacher mass inside the top-k; `1 - c` is the tail bucket.
- entropy (nats) over k+1 buckets: the k candidates plus the tail as one extra bucket (not renormalised);
  lumping the tail makes it a lower bound on the full-vocabulary entropy.
- top-1 probability: `max_i p_i`, exact (no token outside the top-k is more likely).
- k needed for mass p: the smallest j <= k whose top-j mass reaches p; positions where even all k fall
  short count as ">k".
- sampled-token rank: 1-based position of the sampled token id in the top-k ids (1 = the teacher's top
  choice), or "outside top-k".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipeline.dataset.schema import (
    CompletionsRecord,
    DatasetError,
    SamplingRecord,
    TeacherRecord,
    committed_shards,
    read_manifest,
)

MASS_LEVELS = (0.9, 0.95, 0.99)
STAT_COLUMNS = [
    "prompt_id",
    "completion_token_ids",
    "token_logprobs",
    "topk_token_ids",
    "topk_logprobs",
    "finish_reason",
]
NEAR_ONE_HOT = 0.99
BINS = 40


class Histogram(BaseModel):
    """Counts over fixed bins: `counts[i]` lies in `[edges[i], edges[i+1])` (the last bin is closed)."""

    edges: list[float]
    counts: list[int]


class TokenStat(BaseModel):
    """A per-position quantity: its mean over all generated positions and its histogram."""

    mean: float | None
    histogram: Histogram


class LengthStats(BaseModel):
    """Completion lengths in tokens; `counts[n]` = samples of exactly n tokens."""

    min: int
    max: int
    mean: float
    p50: int
    p90: int
    p99: int
    counts: list[int]


class DatasetSummary(BaseModel):
    """The dataset at a glance; JSON-serialisable (`model_dump_json`)."""

    dataset_dir: str
    shards: int
    complete: bool
    samples: int
    prompts: int
    tokens: int
    k: int
    finish_reasons: dict[str, int]
    length: LengthStats
    entropy: TokenStat
    """Teacher entropy in nats over the k candidates + the tail bucket."""
    top1: TokenStat
    """Probability of the teacher's most likely token."""
    coverage: TokenStat
    """Teacher mass inside the top-k."""
    near_one_hot: float | None
    """Share of positions whose top-1 probability is >= 0.99."""
    coverage_curve: list[float]
    """Mean top-j mass for j = 1..k."""
    k_needed: dict[str, list[int]]
    """Per mass level ("0.9", ...): counts of positions needing j = 1..k candidates, then the ">k" count."""
    sampled_rank: list[int]
    """Counts of the sampled token at rank 1..k (1-based), then "outside top-k"."""
    sampled_logprob_mean: float | None
    """Mean teacher logprob of the sampled tokens (T = 1)."""
    topk_beyond_tokenizer: int | None = None
    """Top-k entries whose id is >= the tokenizer's size (teacher padding rows: no text); None when the manifest
    does not record the tokenizer size."""
    sampled_beyond_tokenizer: int | None = None
    """Sampled tokens with such an id."""
    teacher: TeacherRecord
    sampling: SamplingRecord
    logprobs_mode: str
    logprobs_dtype: str
    prompts_source: str
    mode: str = "sample"
    """`sample` (the teacher's own completions) or `rescore` (given completions the teacher scored)."""
    completions: CompletionsRecord | None = None
    heldout_fraction: float
    created_at: str
    updated_at: str

    def k_needed_share(self, level: float) -> list[float]:
        """Share of positions for which j candidates suffice, cumulative over j = 1..k."""
        counts = np.asarray(self.k_needed[str(level)][:-1], np.float64)
        return (np.cumsum(counts) / max(1, self.tokens)).tolist()


def flat_values(arr: pa.Array, dtype: type) -> np.ndarray:
    """Innermost values of a (nested) list array as numpy `dtype`, whatever list type or value type is stored."""
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def topk_matrix(arr: pa.Array, k: int, dtype: type) -> np.ndarray:
    """A batch's `L x k` column as one [positions, k] matrix (rows of every sample, concatenated)."""
    flat = flat_values(arr, dtype)
    if flat.size % k:
        raise DatasetError(f"top-k rows are not all of length k={k}; run `distill validate` on the dataset")
    return flat.reshape(-1, k)


def topk_entropy(topk_logprobs: np.ndarray) -> np.ndarray:
    """Teacher entropy in nats over k+1 buckets (the top-k plus the tail as one bucket, not renormalised), from raw
    T=1 top-k logprobs [N, k] (-inf: a missing entry) -> [N]. A lower bound on the full-vocabulary entropy.

    The one definition of teacher entropy: `distill inspect` shows it (`position_stats`) and evaluation splits
    kl_uncertain / kl_deterministic on it.
    """
    lp = _sorted_desc(topk_logprobs)
    p = np.exp(lp)
    return _bucket_entropy(lp, p, np.cumsum(p, axis=1)[:, -1])


def _sorted_desc(topk_logprobs: np.ndarray) -> np.ndarray:
    return np.sort(topk_logprobs.astype(np.float32), axis=1)[:, ::-1]


def _bucket_entropy(lp: np.ndarray, p: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """`topk_entropy` from the sorted logprobs, their probabilities and their sum (shared with `position_stats`)."""
    tail = np.clip(1.0 - coverage, 0.0, 1.0)
    plogp = np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0).sum(axis=1)
    tail_term = np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
    return np.maximum(-(plogp + tail_term), 0.0)


def position_stats(topk_logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position teacher statistics from raw top-k logprobs [N, k] (definitions in the module docstring)."""
    lp = _sorted_desc(topk_logprobs)
    p = np.exp(lp)
    cum = np.cumsum(p, axis=1)
    coverage = cum[:, -1]
    return {"entropy": _bucket_entropy(lp, p, coverage), "top1": p[:, 0], "coverage": coverage, "cum": cum}


def k_needed(cum: np.ndarray, level: float) -> np.ndarray:
    """Smallest 1-based j with cumulative top-j mass >= level; k+1 where the top-k never reaches it."""
    reached = cum >= level
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, cum.shape[1] + 1)


def sampled_rank(sampled: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """1-based rank of each sampled id among its position's top-k ids; k+1 when it is not among them."""
    hit = topk_ids == sampled[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, topk_ids.shape[1] + 1)


class _Accumulator:
    """Running sums and fixed-bin histograms, so nothing grows with the number of tokens."""

    def __init__(self, k: int, tokenizer_size: int | None = None):
        self.k, self.tokenizer_size = k, tokenizer_size
        self.beyond = [0, 0]  # top-k entries, sampled tokens with id >= tokenizer_size
        self.edges = {
            "entropy": np.linspace(0.0, float(np.log(k + 1)), BINS + 1),
            "top1": np.linspace(0.0, 1.0, BINS + 1),
            "coverage": np.linspace(0.0, 1.0, BINS + 1),
        }
        self.hist = {name: np.zeros(BINS, np.int64) for name in self.edges}
        self.sums = {name: 0.0 for name in self.edges}
        self.cum_sum = np.zeros(k, np.float64)
        self.k_needed = {level: np.zeros(k + 1, np.int64) for level in MASS_LEVELS}
        self.rank = np.zeros(k + 1, np.int64)
        self.near_one_hot = 0
        self.sampled_lp = 0.0
        self.tokens = 0
        self.lengths: list[np.ndarray] = []
        self.finish = Counter()
        self.prompts: set[str] = set()

    def add(self, batch: pa.RecordBatch) -> None:
        lengths = pc.list_value_length(batch.column("completion_token_ids")).to_numpy(zero_copy_only=False)
        self.lengths.append(lengths.astype(np.int64))
        self.finish.update(batch.column("finish_reason").to_pylist())
        self.prompts.update(pc.unique(batch.column("prompt_id")).to_pylist())
        sampled = flat_values(batch.column("completion_token_ids"), np.int64)
        if sampled.size == 0:
            return
        ids = topk_matrix(batch.column("topk_token_ids"), self.k, np.int64)
        lps = topk_matrix(batch.column("topk_logprobs"), self.k, np.float32)
        if ids.shape[0] != sampled.size or lps.shape[0] != sampled.size:
            raise DatasetError(
                "top-k rows and completion tokens disagree in length; run `distill validate` on the dataset"
            )
        stats = position_stats(lps)
        for name, edges in self.edges.items():
            values = np.clip(stats[name], edges[0], edges[-1])
            self.hist[name] += np.histogram(values, bins=edges)[0]
            self.sums[name] += float(stats[name].sum(dtype=np.float64))
        self.cum_sum += stats["cum"].sum(axis=0, dtype=np.float64)
        for level in MASS_LEVELS:
            self.k_needed[level] += np.bincount(k_needed(stats["cum"], level), minlength=self.k + 2)[1:]
        self.rank += np.bincount(sampled_rank(sampled, ids), minlength=self.k + 2)[1:]
        self.near_one_hot += int((stats["top1"] >= NEAR_ONE_HOT).sum())
        self.sampled_lp += float(flat_values(batch.column("token_logprobs"), np.float64).sum())
        self.tokens += sampled.size
        if self.tokenizer_size is not None:
            self.beyond[0] += int((ids >= self.tokenizer_size).sum())
            self.beyond[1] += int((sampled >= self.tokenizer_size).sum())

    def token_stat(self, name: str) -> TokenStat:
        mean = self.sums[name] / self.tokens if self.tokens else None
        return TokenStat(
            mean=mean, histogram=Histogram(edges=self.edges[name].tolist(), counts=self.hist[name].tolist())
        )

    def length_stats(self) -> LengthStats:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        if lengths.size == 0:
            return LengthStats(min=0, max=0, mean=0.0, p50=0, p90=0, p99=0, counts=[])
        q = np.percentile(lengths, [50, 90, 99], method="lower")
        return LengthStats(
            min=int(lengths.min()),
            max=int(lengths.max()),
            mean=float(lengths.mean()),
            p50=int(q[0]),
            p90=int(q[1]),
            p99=int(q[2]),
            counts=np.bincount(lengths).tolist(),
        )


def summarize(dataset_dir: Path, *, batch_rows: int = 128) -> DatasetSummary:
    """One streaming pass over the committed shards; `batch_rows` bounds memory (rows per Arrow batch)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: no such dataset directory")
    manifest = read_manifest(dataset_dir)
    known = manifest.teacher.tokenizer_size
    acc = _Accumulator(manifest.k, known)
    for path in committed_shards(dataset_dir, manifest):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=STAT_COLUMNS):
            acc.add(batch)
    samples = int(sum(len(x) for x in acc.lengths))
    return DatasetSummary(
        dataset_dir=str(dataset_dir),
        shards=len(manifest.shards),
        complete=manifest.complete,
        samples=samples,
        prompts=len(acc.prompts),
        tokens=acc.tokens,
        k=manifest.k,
        finish_reasons=dict(sorted(acc.finish.items())),
        length=acc.length_stats(),
        entropy=acc.token_stat("entropy"),
        top1=acc.token_stat("top1"),
        coverage=acc.token_stat("coverage"),
        near_one_hot=acc.near_one_hot / acc.tokens if acc.tokens else None,
        coverage_curve=(acc.cum_sum / max(1, acc.tokens)).tolist(),
        k_needed={str(level): counts.tolist() for level, counts in acc.k_needed.items()},
        sampled_rank=acc.rank.tolist(),
        sampled_logprob_mean=acc.sampled_lp / acc.tokens if acc.tokens else None,
        topk_beyond_tokenizer=acc.beyond[0] if known is not None else None,
        sampled_beyond_tokenizer=acc.beyond[1] if known is not None else None,
        teacher=manifest.teacher,
        sampling=manifest.sampling,
        logprobs_mode=manifest.logprobs_mode,
        logprobs_dtype=manifest.logprobs_dtype,
        prompts_source=manifest.prompts_source,
        mode=manifest.mode,
        completions=manifest.completions,
        heldout_fraction=manifest.heldout_fraction,
        created_at=manifest.created_at,
        updated_at=manifest.updated_at,
    )
