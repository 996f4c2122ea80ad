"""Read a dataset's committed shards whole (`load_samples`, for evaluation) and collate them into padded
batches; training streams instead (`pipeline/dataset/stream.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.dataset.schema import DatasetError, Manifest, read_manifest
from pipeline.dataset.validate import verify_shards
from pipeline.core import heldout_mask

TOKEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "completion_token_ids", "token_logprobs",
                 "topk_token_ids", "topk_logprobs"]


@dataclass
class Samples:
    """Samples of one split as numpy arrays; topk arrays are [L_i, k] per sample."""

    prompt_ids: list[str]
    prompts: list[str]
    prompt_tokens: list[np.ndarray]
    completion_tokens: list[np.ndarray]
    token_logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray]
    topk_logprobs: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def num_tokens(self) -> int:
        return int(sum(len(c) for c in self.completion_tokens))


def shard_paths(dataset_dir: Path, manifest: Manifest | None = None) -> list[Path]:
    """The committed shards, in order (files the manifest does not list are not part of the dataset)."""
    manifest = manifest or read_manifest(dataset_dir)
    return [Path(dataset_dir) / s.file for s in manifest.shards]


def _split_list(col: pa.ChunkedArray) -> list[np.ndarray]:
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.split(flat, offsets[1:-1] - offsets[0]) if len(arr) else []


def _split_nested(col: pa.ChunkedArray, k: int) -> list[np.ndarray]:
    arr = col.combine_chunks()
    outer = arr.offsets.to_numpy()
    flat = arr.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return np.split(flat, outer[1:-1] - outer[0]) if len(arr) else []


def load_samples(dataset_dir: Path, *, split: str = "all", limit_prompts: int | None = None) -> Samples:
    """Load `train`, `heldout` or `all` samples; the split is by prompt id (manifest's heldout_fraction)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if not manifest.shards:
        raise DatasetError(f"{dataset_dir}: the dataset has no committed shards yet; run the generate stage")
    verify_shards(dataset_dir, manifest)
    tables = [pq.read_table(p, columns=TOKEN_COLUMNS) for p in shard_paths(dataset_dir, manifest)]
    table = pa.concat_tables(tables, promote_options="permissive")  # shards from before 2026-12 have nullable fields
    if split != "all":
        want = split == "heldout"
        keep = heldout_mask(table["prompt_id"], manifest.heldout_fraction) == want
        table = table.filter(pa.array(keep, pa.bool_()))
    if limit_prompts is not None:
        seen: dict[str, None] = {}
        for pid in table["prompt_id"].to_pylist():
            if len(seen) >= limit_prompts:
                break
            seen.setdefault(pid)
        table = table.filter(pc.is_in(table["prompt_id"], pa.array(list(seen))))
    k = manifest.k
    return Samples(
        prompt_ids=table["prompt_id"].to_pylist(), prompts=table["prompt"].to_pylist(),
        prompt_tokens=_split_list(table["prompt_token_ids"]), completion_tokens=_split_list(table["completion_token_ids"]),
        token_logprobs=_split_list(table["token_logprobs"]), topk_ids=_split_nested(table["topk_token_ids"], k),
        topk_logprobs=[a.astype(np.float32) for a in _split_nested(table["topk_logprobs"], k)])


@dataclass
class Batch:
    """Right-padded prompt+completion sequences; the loss positions select completion tokens.

    `loss_mask[b, t]` is True where position t predicts a completion token (its next token), so
    `hidden[loss_mask]` lines up row-for-row with `labels`, `topk_ids` and `topk_logprobs` ([N] / [N, k]).
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [N]
    topk_ids: torch.Tensor  # [N, k]
    topk_logprobs: torch.Tensor  # [N, k]

    @property
    def n_tokens(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.loss_mask,
                                                               self.labels, self.topk_ids, self.topk_logprobs)))


def collate(samples: Samples, indices: list[int] | np.ndarray, pad_id: int) -> Batch:
    """Build one padded batch from the samples at `indices`."""
    seqs = [np.concatenate([samples.prompt_tokens[i], samples.completion_tokens[i]]) for i in indices]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    loss_mask = np.zeros((len(seqs), width), dtype=bool)
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        p, c = len(samples.prompt_tokens[i]), len(samples.completion_tokens[i])
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        loss_mask[row, p - 1 : p - 1 + c] = True
    labels = np.concatenate([samples.completion_tokens[i] for i in indices]).astype(np.int64)
    topk_ids = np.concatenate([samples.topk_ids[i] for i in indices]).astype(np.int64)
    topk_lp = np.concatenate([samples.topk_logprobs[i] for i in indices]).astype(np.float32)
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(loss_mask),
                 torch.from_numpy(labels), torch.from_numpy(topk_ids), torch.from_numpy(topk_lp))
