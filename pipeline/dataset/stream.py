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

from pipeline.core import heldout_mask
from pipeline.dataset.batch import Batch, Rows, collate, collate_rows
from pipeline.dataset.schema import DatasetError, committed_shards, read_manifest
from pipeline.dataset.validate import verify_shards

_LOWER_HEX = re.compile(r"^[0-9a-f]{8}")
STREAM_COLUMNS = ["prompt_token_ids", "completion_token_ids", "topk_token_ids", "topk_logprobs"]


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

    `mix` adds other datasets' rows of the same split (same tokenizer and k), each (path, repeat) seen `repeat`
    times per epoch: a re-scored set beside teacher samples, say.

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
        mix: Sequence[tuple[Path, int]] = (),
    ):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be train, heldout or all, got {split!r}")
        if batch_size < 1 or shuffle_rows < 1:
            raise ValueError("batch_size and shuffle_rows must be >= 1")
        self.dataset_dir = Path(dataset_dir)
        self.manifest = read_manifest(self.dataset_dir)
        self.split, self.batch_size, self.pad_id, self.seed = split, batch_size, pad_id, seed
        self.shuffle_rows = shuffle_rows
        self.k = self.manifest.k
        self._footers: dict[Path, pq.FileMetaData] = {}  # parsed once; reopening a shard then skips its footer
        self.units = self._units(self.dataset_dir, self.manifest)
        self.mix_fingerprints: list[str] = []
        """Generate fingerprints of the mixed-in datasets (a resumed run must see the same data)."""
        for other, repeat in mix:
            manifest = read_manifest(Path(other))
            if (manifest.k, manifest.tokenizer_fingerprint) != (self.k, self.manifest.tokenizer_fingerprint):
                raise DatasetError(
                    f"{other} cannot be mixed into {dataset_dir}: made with another tokenizer or k "
                    f"({manifest.k} vs {self.k}); mix only datasets of the same teacher tokenizer and k"
                )
            self.units += self._units(Path(other), manifest) * repeat
            self.mix_fingerprints.append(manifest.generate_fingerprint)
        self.num_samples = sum(u.kept for u in self.units)
        if self.num_samples == 0:
            raise DatasetError(f"{dataset_dir}: no {split} samples (all prompts on the other side of the split?)")
        self.batches_per_epoch = -(-self.num_samples // batch_size)
        self.position: dict = {"epoch": 0, "batch": 0}

    def _units(self, dataset_dir: Path, manifest) -> list[_Unit]:
        """One dataset's row groups (checksums verified), each with the rows of this stream's split."""
        paths = committed_shards(dataset_dir, manifest)
        verify_shards(dataset_dir, manifest)
        units = []
        for path in paths:
            pf = pq.ParquetFile(path)
            self._footers[path] = pf.metadata
            for rg in range(pf.metadata.num_row_groups):
                units.append(_Unit(path, rg, self._row_group_keep(pf, rg, manifest.heldout_fraction)))
        return units

    def _row_group_keep(self, pf: pq.ParquetFile, rg: int, heldout_fraction: float) -> np.ndarray:
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
            bounds = heldout_mask(pa.array([stats.min, stats.max], pa.string()), heldout_fraction)
            if bounds[0] == bounds[1]:
                return np.full(meta.num_rows, bounds[0] == (self.split == "heldout"))
        held = heldout_mask(
            pf.read_row_group(rg, columns=["prompt_id"], use_threads=False)["prompt_id"], heldout_fraction
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
                yield collate(pending, None, self.pad_id)
                pending = None
            while len(order) - lo >= size:
                batch = collate(rows, order[lo : lo + size], self.pad_id)
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
