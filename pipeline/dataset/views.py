"""`distill inspect --sample N`: one sample token by token, with the teacher's top candidates at every position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipeline.dataset.schema import DatasetError, Manifest, committed_shards, read_manifest
from pipeline.dataset.stats import flat_values, position_stats, sampled_rank, topk_matrix


class TokenView(BaseModel):
    """One generated position: the sampled token and the teacher's top candidates there."""

    position: int
    token_id: int
    text: str
    logprob: float
    rank: int | None
    """1-based rank of the sampled token in the top-k; None when outside it."""
    entropy: float
    coverage: float
    candidates: list[tuple[int, str, float]]
    """(token id, text, probability) for the top-k, most likely first."""


class SampleView(BaseModel):
    """One sample token by token (`index` counts rows across the committed shards, from 0)."""

    index: int
    sample_id: str
    prompt_id: str
    prompt: str
    completion: str
    finish_reason: str
    k: int
    decoded: bool
    """False when the teacher's tokenizer was not found: token texts are then `#id`."""
    tokens: list[TokenView]


def _locate(dataset_dir: Path, manifest: Manifest, index: int) -> pa.Table:
    """Read only the row group holding row `index` (0-based across the committed shards) and return that row."""
    paths = committed_shards(dataset_dir, manifest)
    total = sum(s.rows for s in manifest.shards)
    if not 0 <= index < total:
        raise DatasetError(f"sample {index} is out of range: the dataset has {total} samples (0..{total - 1})")
    for path, shard in zip(paths, manifest.shards):
        if index >= shard.rows:
            index -= shard.rows
            continue
        pf = pq.ParquetFile(path)
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if index < rows:
                return pf.read_row_group(group).slice(index, 1)
            index -= rows
    raise DatasetError(f"{dataset_dir}: shard row counts disagree with the manifest; run `distill validate`")


def sample_view(dataset_dir: Path, index: int, *, decoder=None, top: int | None = None) -> SampleView:
    """Sample `index` with per-token teacher statistics; `top` limits the candidates kept (default: all k)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: no such dataset directory")
    manifest = read_manifest(dataset_dir)
    row = _locate(dataset_dir, manifest, index)
    k = manifest.k
    sampled = flat_values(row.column("completion_token_ids").combine_chunks(), np.int64)
    ids = topk_matrix(row.column("topk_token_ids").combine_chunks(), k, np.int64)
    lps = topk_matrix(row.column("topk_logprobs").combine_chunks(), k, np.float32)
    token_lp = flat_values(row.column("token_logprobs").combine_chunks(), np.float32)
    stats = position_stats(lps)
    ranks = sampled_rank(sampled, ids)
    order = np.argsort(-lps, axis=1, kind="stable")
    text = decoder or (lambda token_id: f"#{token_id}")
    keep = k if top is None else min(top, k)
    tokens = [
        TokenView(
            position=t,
            token_id=int(sampled[t]),
            text=text(int(sampled[t])),
            logprob=float(token_lp[t]),
            rank=int(ranks[t]) if ranks[t] <= k else None,
            entropy=float(stats["entropy"][t]),
            coverage=float(stats["coverage"][t]),
            candidates=[(int(ids[t, i]), text(int(ids[t, i])), float(np.exp(lps[t, i]))) for i in order[t, :keep]],
        )
        for t in range(len(sampled))
    ]
    first = {
        name: row.column(name)[0].as_py()
        for name in ("sample_id", "prompt_id", "prompt", "completion", "finish_reason")
    }
    return SampleView(index=index, k=k, decoded=decoder is not None, tokens=tokens, **first)
