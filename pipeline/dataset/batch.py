"""Padded training batches from flat token arrays: `Rows` (samples as flat arrays plus offsets) and the one
collate (`collate_rows`) both training and evaluation use; `Batch` is what the losses read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.dataset.schema import DatasetError


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

    def within_vocab(self, vocab_size: int, replacement: int) -> Batch:
        """The batch with input ids >= vocab_size (sampled from a larger teacher embedding's padding rows: the
        student has no row for them) replaced by `replacement` (a pad id); labels and top-k are left to the losses."""
        ids = self.input_ids.masked_fill(self.input_ids >= vocab_size, replacement)
        return Batch(ids, self.attention_mask, self.loss_mask, self.labels, self.topk_ids, self.topk_logprobs)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.loss_mask,
                    self.labels,
                    self.topk_ids,
                    self.topk_logprobs,
                )
            )
        )


@dataclass
class Rows:
    """Samples as flat arrays plus offsets: sample r's tokens are `[offsets[r], offsets[r+1])`."""

    prompt: np.ndarray  # int32 [P]
    prompt_offsets: np.ndarray  # int64 [n+1]
    completion: np.ndarray  # int32 [C]
    completion_offsets: np.ndarray  # int64 [n+1]
    topk_ids: np.ndarray  # int32 [C, k]
    topk_logprobs: np.ndarray  # float16/32 [C, k]

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    @staticmethod
    def from_table(table: pa.Table, k: int) -> Rows:
        """Zero-copy where Arrow allows; slices and filtered tables are handled by rebasing the offsets."""

        def flat(name: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
            col = table[name]
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # combine_chunks copies even one chunk
            offsets = arr.offsets.to_numpy().astype(np.int64)
            for _ in range(depth):
                arr = arr.flatten()
            return arr.to_numpy(zero_copy_only=False), offsets - offsets[0]

        prompt, p_off = flat("prompt_token_ids", 1)
        completion, c_off = flat("completion_token_ids", 1)
        ids, _ = flat("topk_token_ids", 2)
        lp, _ = flat("topk_logprobs", 2)
        return Rows(prompt, p_off, completion, c_off, ids.reshape(-1, k), lp.reshape(-1, k))

    def take(self, idx: np.ndarray) -> Rows:
        """The samples at `idx`, in that order (one vectorised gather per column)."""
        p_src, p_off = _gather_ranges(self.prompt_offsets, idx)
        c_src, c_off = _gather_ranges(self.completion_offsets, idx)
        return Rows(
            self.prompt[p_src],
            p_off,
            self.completion[c_src],
            c_off,
            np.take(self.topk_ids, c_src, axis=0),
            np.take(self.topk_logprobs, c_src, axis=0),
        )

    def slice(self, lo: int, hi: int) -> Rows:
        """Samples [lo, hi) as views."""
        p0, p1 = self.prompt_offsets[lo], self.prompt_offsets[hi]
        c0, c1 = self.completion_offsets[lo], self.completion_offsets[hi]
        return Rows(
            self.prompt[p0:p1],
            self.prompt_offsets[lo : hi + 1] - p0,
            self.completion[c0:c1],
            self.completion_offsets[lo : hi + 1] - c0,
            self.topk_ids[c0:c1],
            self.topk_logprobs[c0:c1],
        )

    @staticmethod
    def concat(parts: list[Rows], scratch: dict[str, np.ndarray] | None = None) -> Rows:
        """The parts one after the other. With `scratch`, the flat arrays are written into buffers kept there
        (grown as needed) and the result is a view of them, valid until the next concat with that scratch."""

        def offsets(name: str) -> np.ndarray:
            offs = [getattr(r, name) for r in parts]
            starts = np.cumsum([0] + [o[-1] for o in offs[:-1]])
            return np.concatenate([offs[0][:1]] + [o[1:] + s for o, s in zip(offs, starts, strict=True)])

        def join(name: str) -> np.ndarray:
            arrays = [getattr(r, name) for r in parts]
            if scratch is None:
                return np.concatenate(arrays)
            n, first = sum(len(a) for a in arrays), arrays[0]
            buf = scratch.get(name)
            if buf is None or len(buf) < n or buf.dtype != first.dtype or buf.shape[1:] != first.shape[1:]:
                buf = scratch[name] = np.empty((n * 5 // 4,) + first.shape[1:], first.dtype)  # room for larger windows
            return np.concatenate(arrays, out=buf[:n])

        return Rows(
            join("prompt"),
            offsets("prompt_offsets"),
            join("completion"),
            offsets("completion_offsets"),
            join("topk_ids"),
            join("topk_logprobs"),
        )


def _gather_ranges(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat source positions of the ranges of samples `idx`, and the offsets of the gathered result."""
    idx = np.asarray(idx)
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return np.repeat(starts - out[:-1], lengths) + np.arange(out[-1]), out


def collate_rows(rows: Rows, pad_id: int) -> Batch:
    """Padded batch of all `rows`, vectorised over the offsets (no per-sample Python loop)."""
    return collate(rows, None, pad_id)


def collate(rows: Rows, idx: np.ndarray | None, pad_id: int) -> Batch:
    """Padded batch of the samples `idx` of `rows` (all of them if None), gathered straight into the batch
    tensors: the stream's path, with no intermediate per-batch `Rows`. Outputs never share memory with `rows`."""
    if idx is None:
        p_start, c_start = rows.prompt_offsets[:-1], rows.completion_offsets[:-1]
        p_len, c_len = rows.prompt_offsets[1:] - p_start, rows.completion_offsets[1:] - c_start
    else:  # only the batch's samples (not the whole window's offsets)
        p_start, c_start = rows.prompt_offsets[idx], rows.completion_offsets[idx]
        p_len, c_len = rows.prompt_offsets[idx + 1] - p_start, rows.completion_offsets[idx + 1] - c_start
    n = len(p_len)
    if n and p_len.min() < 1:
        raise DatasetError(
            "every sample needs at least one prompt token (the position that predicts its first completion token)"
        )
    seq = p_len + c_len
    width = int(seq.max()) if n else 0
    p_row, c_row = np.repeat(np.arange(n), p_len), np.repeat(np.arange(n), c_len)
    p_out, c_out = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    np.cumsum(p_len, out=p_out[1:])
    np.cumsum(c_len, out=c_out[1:])
    p_within = np.arange(len(p_row)) - p_out[p_row]
    c_within = np.arange(len(c_row)) - c_out[c_row]
    if idx is None:  # contiguous: sources as they are, converted (copied) once
        prompt = rows.prompt
        labels = rows.completion.astype(np.int64)
        topk_ids = rows.topk_ids.astype(np.int64)
        topk_lp = rows.topk_logprobs.astype(np.float32)
    else:
        c_src = c_start[c_row] + c_within
        prompt = rows.prompt[p_start[p_row] + p_within]
        labels = rows.completion[c_src].astype(np.int64)
        topk_ids = np.take(rows.topk_ids, c_src, axis=0).astype(np.int64)
        # the take is already a copy
        topk_lp = np.take(rows.topk_logprobs, c_src, axis=0).astype(np.float32, copy=False)
    flat_ids = np.full(n * width, pad_id, dtype=np.int64)
    flat_ids[p_row * width + p_within] = prompt
    c_pos = c_row * width + p_len[c_row] + c_within
    flat_ids[c_pos] = labels
    loss_mask = np.zeros(n * width, dtype=bool)
    loss_mask[c_pos - 1] = True  # position t predicts token t+1
    attention = (np.arange(width)[None, :] < seq[:, None]).astype(np.int64)
    return Batch(
        torch.from_numpy(flat_ids.reshape(n, width)),
        torch.from_numpy(attention),
        torch.from_numpy(loss_mask.reshape(n, width)),
        torch.from_numpy(labels),
        torch.from_numpy(topk_ids),
        torch.from_numpy(topk_lp),
    )
