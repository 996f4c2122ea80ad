"""The one reader: stream a dataset split row group by row group into padded batches (`TrainStream`).

Training takes endless shuffled epochs (`batches`): memory is bounded by one shuffle window whatever the
dataset size, the order is a function of (seed, epoch), and a saved `position` resumes with exactly the
batches an uninterrupted run gets. Evaluation takes one unshuffled pass in file order (`in_order`), through
the same row-group units and the same collate, with the extra columns it needs beside each batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.core import heldout_mask
from pipeline.dataset.schema import DatasetError, committed_shards, read_manifest
from pipeline.dataset.validate import verify_shards

_LOWER_HEX = re.compile(r"^[0-9a-f]{8}")
STREAM_COLUMNS = ["prompt_token_ids", "completion_token_ids", "topk_token_ids", "topk_logprobs"]


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
    return _collate(rows, None, pad_id)


def _collate(rows: Rows, idx: np.ndarray | None, pad_id: int) -> Batch:
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


@dataclass(frozen=True, eq=False)
class _Unit:
    """One row group of one shard, and which of its rows belong to the stream's split (one byte a row)."""

    path: Path
    row_group: int
    keep: np.ndarray  # bool [rows]

    @property
    def rows(self) -> int:
        return len(self.keep)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())


class TrainStream:
    """Padded batches of one split, streamed one row group at a time: endless, seeded and resumable for
    training (`batches`), or one pass in file order for evaluation (`in_order`).

    Epoch e: row groups in an order drawn from (seed, e), grouped into windows of >= `shuffle_rows`
    rows; each window's split rows are shuffled (seed, e, window) and cut into batches that run on
    across windows. Every sample appears exactly once per epoch (the last batch of an epoch may be
    short). Memory holds about one window, whatever the dataset size. `position` after each yielded
    batch is `{"epoch": e, "batch": i}` (next batch to yield); `batches(start=position)` resumes with
    exactly the batches the uninterrupted stream would have given, reading (not collating) only the
    window where it resumes.
    """

    def __init__(
        self,
        dataset_dir: Path,
        *,
        split: str = "train",
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle_rows: int = 4096,
    ):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be train, heldout or all, got {split!r}")
        if batch_size < 1 or shuffle_rows < 1:
            raise ValueError("batch_size and shuffle_rows must be >= 1")
        self.dataset_dir = Path(dataset_dir)
        self.manifest = read_manifest(self.dataset_dir)
        paths = committed_shards(self.dataset_dir, self.manifest)
        verify_shards(self.dataset_dir, self.manifest)
        self.split, self.batch_size, self.pad_id, self.seed = split, batch_size, pad_id, seed
        self.shuffle_rows = shuffle_rows
        self.k = self.manifest.k
        self._footers: dict[Path, pq.FileMetaData] = {}  # parsed once; reopening a shard then skips its footer
        self.units = []
        for path in paths:
            pf = pq.ParquetFile(path)
            self._footers[path] = pf.metadata
            self.units += [_Unit(path, rg, self._row_group_keep(pf, rg)) for rg in range(pf.metadata.num_row_groups)]
        self.num_samples = sum(u.kept for u in self.units)
        if self.num_samples == 0:
            raise DatasetError(f"{dataset_dir}: no {split} samples (all prompts on the other side of the split?)")
        self.batches_per_epoch = -(-self.num_samples // batch_size)
        self.position: dict = {"epoch": 0, "batch": 0}

    def _row_group_keep(self, pf: pq.ParquetFile, rg: int) -> np.ndarray:
        """Which rows of row group `rg` belong to the split. Held-out is a threshold on a prompt id's first 8 hex
        digits, and lowercase hex ids (as `stable_id` writes them) sort as those digits do, so a row group whose
        smallest and largest prompt_id (footer statistics) fall on one side holds only that split: no read.
        Otherwise (a mixed row group, as in interleaved datasets, or no statistics) the column is read."""
        meta = pf.metadata.row_group(rg)
        if self.split == "all":
            return np.ones(meta.num_rows, dtype=bool)
        col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "prompt_id")
        stats = col.statistics
        if stats is not None and stats.has_min_max and all(_LOWER_HEX.match(str(v)) for v in (stats.min, stats.max)):
            bounds = heldout_mask(pa.array([stats.min, stats.max], pa.string()), self.manifest.heldout_fraction)
            if bounds[0] == bounds[1]:
                return np.full(meta.num_rows, bounds[0] == (self.split == "heldout"))
        held = heldout_mask(
            pf.read_row_group(rg, columns=["prompt_id"], use_threads=False)["prompt_id"], self.manifest.heldout_fraction
        )
        return held if self.split == "heldout" else ~held

    def windows(self, epoch: int) -> list[list[_Unit]]:
        """Epoch `epoch`'s row groups, in order, grouped into shuffle windows."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        out, cur, rows = [], [], 0
        for i in order:
            cur.append(self.units[i])
            rows += self.units[i].rows
            if rows >= self.shuffle_rows:
                out.append(cur)
                cur, rows = [], 0
        return out + [cur] if cur else out

    def _read_unit(self, unit: _Unit) -> Rows:
        """One row group's stream columns, every row (Parquet cannot skip the other split's rows inside a page)."""
        pf = pq.ParquetFile(unit.path, metadata=self._footers[unit.path])
        return Rows.from_table(pf.read_row_group(unit.row_group, columns=STREAM_COLUMNS, use_threads=False), self.k)

    def _window(
        self, epoch: int, index: int, units: list[_Unit], scratch: dict | None = None
    ) -> tuple[Rows, np.ndarray]:
        """All rows of the window's row groups (joined: one copy, into `scratch` if given) and the shuffled
        order of its split rows."""
        units = [u for u in units if u.kept]  # a row group of the other split only is never read (order unchanged)
        parts = [self._read_unit(u) for u in units]
        kept = np.flatnonzero(np.concatenate([u.keep for u in units]))
        rows = Rows.concat(parts, scratch) if len(parts) > 1 else parts[0]
        return rows, kept[np.random.default_rng([self.seed, epoch, index]).permutation(len(kept))]

    def _read_window(self, epoch: int, index: int, units: list[_Unit]) -> Rows:
        """The window's split rows, shuffled."""
        rows, order = self._window(epoch, index, units)
        return rows.take(order)

    def _epoch(self, epoch: int, first_batch: int) -> Iterator[Batch]:
        # Each batch gathers its samples straight from the joined window (no shuffled copy of the whole
        # window); fewer than a batch left at a window's end are carried into the next window's first batch.
        skip, seen, b, size = first_batch * self.batch_size, 0, first_batch, self.batch_size
        pending: Rows | None = None
        scratch: dict[str, np.ndarray] = {}  # this generator's window buffers: batches and `pending` are copies
        for index, units in enumerate(self.windows(epoch)):
            kept = sum(u.kept for u in units)
            if seen + kept <= skip or kept == 0:  # wholly before the resume point, or none of the split: not even read
                seen += kept
                continue
            rows, order = self._window(epoch, index, units, scratch)
            if skip > seen:
                order = order[skip - seen :]
            seen += kept
            lo = 0
            if pending is not None:
                lo = min(size - len(pending), len(order))
                pending = Rows.concat([pending, rows.take(order[:lo])])
                if len(pending) < size:
                    continue
                b += 1
                self.position = {"epoch": epoch, "batch": b}
                yield _collate(pending, None, self.pad_id)
                pending = None
            while len(order) - lo >= size:
                batch = _collate(rows, order[lo : lo + size], self.pad_id)
                lo += size
                b += 1
                self.position = {"epoch": epoch, "batch": b}
                yield batch
            if lo < len(order):
                pending = rows.take(order[lo:])
        if pending is not None and len(pending):
            self.position = {"epoch": epoch, "batch": b + 1}
            yield collate_rows(pending, self.pad_id)

    def tables(self, columns: Sequence[str], *, limit_prompts: int | None = None) -> Iterator[pa.Table]:
        """The split's rows in file order, one row group at a time, as tables of `columns`. With `limit_prompts`,
        only the rows of the split's first that many prompt ids in file order (all of their rows, wherever they lie)."""
        chosen = None if limit_prompts is None else self._first_prompts(limit_prompts)
        for unit in self.units:
            if not unit.kept:
                continue
            pf = pq.ParquetFile(unit.path, metadata=self._footers[unit.path])
            keep = unit.keep
            if chosen is not None:
                ids = pf.read_row_group(unit.row_group, columns=["prompt_id"], use_threads=False)["prompt_id"]
                keep = keep & pc.is_in(ids, value_set=chosen.cast(ids.type)).to_numpy()
                if not keep.any():
                    continue
            table = pf.read_row_group(unit.row_group, columns=list(columns), use_threads=False)
            yield table if keep.all() else table.filter(pa.array(keep, pa.bool_()))

    def _first_prompts(self, limit: int) -> pa.Array:
        """The split's first `limit` distinct prompt ids in file order (reading only prompt_id, stopping early)."""
        seen: dict[str, None] = {}
        for unit in self.units:
            if len(seen) >= limit:
                break
            if not unit.kept:
                continue
            pf = pq.ParquetFile(unit.path, metadata=self._footers[unit.path])
            ids = pf.read_row_group(unit.row_group, columns=["prompt_id"], use_threads=False)["prompt_id"]
            for pid in ids.filter(pa.array(unit.keep, pa.bool_())).to_pylist():
                if len(seen) >= limit:
                    break
                seen.setdefault(pid)
        return pa.array(list(seen), pa.string())

    def in_order(
        self, columns: Sequence[str] = (), *, limit_prompts: int | None = None
    ) -> Iterator[tuple[Batch, pa.Table]]:
        """One unshuffled pass over the split in file order (evaluation): batches of `batch_size` consecutive
        samples (the last may be short), collated as `batches` collates them, each with the same samples'
        `columns` as a table. Memory holds about one row group and one batch."""
        read = STREAM_COLUMNS + [c for c in columns if c not in STREAM_COLUMNS]
        pending: list[pa.Table] = []
        rows = 0
        for table in self.tables(read, limit_prompts=limit_prompts):
            pending.append(table)
            rows += table.num_rows
            while rows >= self.batch_size:
                joined = pa.concat_tables(pending, promote_options="permissive")  # shards may differ in nullability
                yield self._collate_table(joined.slice(0, self.batch_size), columns)
                pending, rows = [joined.slice(self.batch_size)], rows - self.batch_size
        if rows:
            yield self._collate_table(pa.concat_tables(pending, promote_options="permissive"), columns)

    def _collate_table(self, table: pa.Table, columns: Sequence[str]) -> tuple[Batch, pa.Table]:
        return collate_rows(Rows.from_table(table, self.k), self.pad_id), table.select(list(columns))

    def batches(self, start: dict | None = None) -> Iterator[Batch]:
        """Batches forever, epoch after epoch, from `start` (a saved `position`) or the beginning."""
        epoch, batch = (int(start["epoch"]), int(start["batch"])) if start else (0, 0)
        if not 0 <= batch <= self.batches_per_epoch:
            raise DatasetError(
                f"position {start} is outside an epoch of {self.batches_per_epoch} batches "
                "(another dataset or batch size?)"
            )
        self.position = {"epoch": epoch, "batch": batch}
        while True:
            yield from self._epoch(epoch, batch)
            epoch, batch = epoch + 1, 0
