"""Streaming reader: peak memory over one epoch at 1x/10x/100x the demo dataset, and collation throughput.

The demo shards are re-encoded with the current writer (1x); 10x and 100x are the same shard files
hard-linked under new names with a manifest listing them all (no extra disk). Each size runs in a fresh
subprocess limited to one thread, which reports its peak RSS (VmHWM) after one full training epoch.

    .venv/bin/python bench/reader.py [--dataset data/runs/demo/dataset] [--sizes 1 10 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dataset.schema import (  # noqa: E402
    ShardInfo,
    StorageRecord,
    arrow_schema,
    quantize_logprobs,
    read_manifest,
    shard_name,
)
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _requantize(table: pa.Table, step: float) -> pa.Table:
    """Round both logprob columns to the writer's grid, as the generate stage now stores them."""
    for name in ("token_logprobs", "topk_logprobs"):
        col = table[name].combine_chunks()
        inner = col if name == "token_logprobs" else col.flatten()
        values = pa.array(
            quantize_logprobs(inner.flatten().to_numpy(zero_copy_only=False), step), inner.type.value_type
        )
        new = pa.ListArray.from_arrays(inner.offsets, values, type=inner.type)
        if name == "topk_logprobs":
            new = pa.ListArray.from_arrays(col.offsets, new, type=col.type)
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), new)
    return table


def prepare(src: Path, root: Path, sizes: list[int], *, split: bool, nullable: bool = False) -> dict[int, Path]:
    """Datasets of `size` x the demo under `root`; the 1x one re-encoded (held-out rows in row groups of
    their own if `split`, else interleaved as before; nullable fields as shards before 2026-12 had them if
    `nullable`), the others hard links to it."""
    base = root / "x1"
    manifest = read_manifest(src)
    if not (base / "manifest.json").is_file():
        manifest.storage = StorageRecord(heldout_row_groups=split)
        manifest.shards, manifest.complete = [], False
        base.mkdir(parents=True, exist_ok=True)
        write_manifest(base, manifest)
        for s in read_manifest(src).shards:
            table = _requantize(pq.read_table(src / s.file), manifest.storage.logprobs_step)
            table = table.cast(arrow_schema(manifest.logprobs_dtype, nullable=nullable))
            manifest = commit_shard(
                base,
                manifest,
                write_shard(
                    base,
                    s.index,
                    table,
                    prompts=s.prompts,
                    storage=manifest.storage,
                    heldout_fraction=manifest.heldout_fraction,
                ),
            )
    base_manifest = read_manifest(base)
    out = {}
    for size in sizes:
        if size == 1:
            out[1] = base
            continue
        d = root / f"x{size}"
        if not (d / "manifest.json").is_file():
            (d / "shards").mkdir(parents=True, exist_ok=True)
            m = base_manifest.model_copy(deep=True)
            m.shards = []
            for rep in range(size):
                for s in base_manifest.shards:
                    i = rep * len(base_manifest.shards) + s.index
                    target = d / "shards" / shard_name(i)
                    if not target.exists():
                        os.link(base / s.file, target)
                    m.shards.append(ShardInfo(**(s.model_dump() | {"index": i, "file": f"shards/{shard_name(i)}"})))
            m.num_shards, m.num_prompts = len(m.shards), base_manifest.num_prompts * size
            m.total_samples, m.total_tokens = sum(s.rows for s in m.shards), sum(s.tokens for s in m.shards)
            m.complete = True
            write_manifest(d, m)
        out[size] = d
    return out


def _vm(key: str) -> int:
    """A /proc/self/status memory line in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return -1


def child(dataset: Path, batch_size: int, mode: str) -> dict:
    """One epoch in this process (one thread), opening the dataset included; peak RSS and tokens/s. The stream
    then runs a second epoch, timed on its own: the rate a training run sees once the stream is open."""
    import pandas  # noqa: F401  (pyarrow imports it on first read; keep that out of the timing)
    import torch

    from pipeline.dataset.batch import collate_rows
    from pipeline.dataset.stream import TrainStream

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    base = _vm("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = padded = batches = 0
    if mode == "stream":
        stream = TrainStream(dataset, batch_size=batch_size, pad_id=0, seed=0)
        it = stream.batches()
        init = time.perf_counter() - t0
        for _ in range(stream.batches_per_epoch):
            b = next(it)
            tokens, padded, batches = tokens + b.n_tokens, padded + b.input_ids.numel(), batches + 1
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        c1 = time.process_time()
        steady = sum(next(it).n_tokens for _ in range(stream.batches_per_epoch))
        steady_cpu = time.process_time() - c1
    else:  # the whole split in memory (one shuffle window as large as the split), for contrast
        stream = TrainStream(dataset, batch_size=batch_size, pad_id=0, seed=0, shuffle_rows=1 << 30)
        rows = _whole_split(stream)
        init = time.perf_counter() - t0
        for lo in range(0, len(rows), batch_size):
            b = collate_rows(rows.slice(lo, min(lo + batch_size, len(rows))), 0)
            tokens, padded, batches = tokens + b.n_tokens, padded + b.input_ids.numel(), batches + 1
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "mode": mode,
        "dataset": str(dataset),
        "batches": batches,
        "completion_tokens": tokens,
        "padded_tokens": padded,
        "seconds": seconds,
        "init_seconds": init,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu,
        "rss_before_mib": base,
        "peak_rss_mib": _vm("VmHWM"),
        "epoch2_tokens_per_cpu_s": steady / steady_cpu if mode == "stream" else None,
    }


def _whole_split(stream):
    """The stream's whole split in memory, shuffled as epoch 0 (a stream whose one window is the whole split)."""
    rows, order = stream._window(0, 0, stream.windows(0)[0])
    return rows.take(order)


def collate_throughput(dataset: Path, batch_size: int, repeats: int = 3) -> dict:
    """Collation alone (vectorised `collate_rows`; the per-sample `collate` it was compared with is gone), data
    already in memory, one thread; and Parquet decoding alone (the stream's columns, every row group once), the
    ceiling for the stream."""
    import torch

    from pipeline.dataset.batch import collate_rows
    from pipeline.dataset.stream import STREAM_COLUMNS, TrainStream

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    stream = TrainStream(dataset, batch_size=batch_size, pad_id=0, seed=0, shuffle_rows=1 << 30)
    rows = _whole_split(stream)  # the whole train split, shuffled, in memory
    n, out = len(rows), {}
    best = float("inf")  # CPU seconds: the machine is shared, wall time would measure the neighbours
    for _ in range(repeats):
        t0 = time.process_time()
        for u in stream.units:
            if u.kept:  # what the stream reads
                pq.ParquetFile(u.path).read_row_group(u.row_group, columns=STREAM_COLUMNS, use_threads=False)
        best = min(best, time.process_time() - t0)
    out["decode_only_tokens_per_cpu_s"] = len(rows.completion) / best  # the split's tokens over all rows decoded
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        tokens = sum(
            collate_rows(rows.slice(lo, min(lo + batch_size, n)), 0).n_tokens for lo in range(0, n, batch_size)
        )
        best = min(best, time.process_time() - t0)
    out["collate_rows_tokens_per_cpu_s"] = tokens / best
    return out | {"batch_size": batch_size, "samples": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=Path("data/runs/demo/dataset"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per stream row; the median is reported")
    ap.add_argument("--work", type=Path, default=RESULTS / "reader-data")
    ap.add_argument("--out", type=Path, default=RESULTS / "reader.json")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch_size, args.mode)))
        return
    # held-out rows in row groups of their own, or mixed in (before); required fields, or nullable (before 2026-12)
    layouts = {"split": (True, False), "interleaved": (False, False), "split-nullable": (True, True)}
    dirs = {
        name: prepare(args.dataset, args.work / name, args.sizes, split=split, nullable=nullable)
        for name, (split, nullable) in layouts.items()
    }
    runs = []
    print(f"stream: median of {args.repeats} fresh processes per row (layouts alternate)")
    print(
        "| dataset | layout | reader | train tokens | batches | wall s (of which init) | CPU s | tokens/CPU-s | "
        "epoch 2 tokens/CPU-s | RSS before (MiB) | peak RSS (MiB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    jobs = [(s, layout, "stream") for s in args.sizes for layout in layouts] + [
        (s, "split", "whole-split") for s in args.sizes if s <= 10
    ]
    for size, layout, mode in jobs:
        reps = []
        for _ in range(args.repeats if mode == "stream" else 1):
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(dirs[layout][size]),
                    "--batch-size",
                    str(args.batch_size),
                    "--mode",
                    mode,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            reps.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = sorted(reps, key=lambda x: x["tokens_per_cpu_s"])[len(reps) // 2] | {
            "size": size,
            "layout": layout,
            "tokens_per_cpu_s_all": [x["tokens_per_cpu_s"] for x in reps],
            "epoch2_tokens_per_cpu_s_all": [x["epoch2_tokens_per_cpu_s"] for x in reps],
        }
        runs.append(r)
        print(
            f"| {size}x demo | {layout} | {mode} | {r['completion_tokens']:,} | {r['batches']:,} | {r['seconds']:.1f} "
            f"({r['init_seconds']:.1f}) | {r['cpu_seconds']:.1f} | {r['tokens_per_cpu_s']:,.0f} | "
            f"{'—' if mode != 'stream' else format(float(np.median(r['epoch2_tokens_per_cpu_s_all'])), ',.0f')} | "
            f"{r['rss_before_mib']} | "
            f"{r['peak_rss_mib']} |",
            flush=True,
        )
    for size in args.sizes:
        mine = [r for r in runs if r["size"] == size and r["mode"] == "stream"]
        by = {r["layout"]: r["tokens_per_cpu_s"] for r in mine}
        by2 = {r["layout"]: float(np.median(r["epoch2_tokens_per_cpu_s_all"])) for r in mine}
        print(
            f"{size}x tokens/CPU-s (first epoch; epoch 2): split / interleaved = "
            f"{by['split'] / by['interleaved']:.2f}x; "
            f"{by2['split'] / by2['interleaved']:.2f}x, required / nullable = "
            f"{by['split'] / by['split-nullable']:.2f}x; "
            f"{by2['split'] / by2['split-nullable']:.2f}x"
        )
    coll = {name: collate_throughput(d[1], args.batch_size) for name, d in dirs.items()}
    c = coll["split"]
    print(
        f"\ncollation only (batch {args.batch_size}, one thread): collate_rows "
        f"{c['collate_rows_tokens_per_cpu_s']:,.0f} "
        "tokens/CPU-s"
    )
    for name, c in coll.items():
        print(
            f"Parquet decoding alone ({name} layout; the row groups the stream reads; split tokens): "
            f"{c['decode_only_tokens_per_cpu_s']:,.0f} tokens/CPU-s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "runs": runs, "collate": coll}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
