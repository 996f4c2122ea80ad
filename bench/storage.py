"""Bytes per top-k entry, write/read throughput and logprob error of candidate Parquet encodings.

Datasets: the demo dataset (vocab 287) and two generated with a realistic vocabulary (32,000): a random
Llama whose logits are scaled to a realistic entropy, without and with a Zipf unigram prior over token
ids (real LMs put frequent tokens in the top-k everywhere, and BPE vocabularies number tokens roughly by
frequency, so low ids dominate; a random model does neither, so it is the worst case for ids).

    .venv/bin/python bench/storage.py [--dataset data/runs/demo/dataset] [--samples 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dataset.schema import (  # noqa: E402  # noqa: E402
    IDS_LEAF,
    LP_LEAF,
    Generation,  # noqa: E402
    StorageRecord,
    arrow_schema,
    build_table,
    committed_shards,
    quantize_logprobs,
    read_manifest,
    stable_id,
)
from pipeline.dataset.writer import parquet_options  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOPK = ("topk_token_ids", "topk_logprobs")


def demo_table(dataset_dir: Path) -> pa.Table:
    """The demo dataset as one table with float32 logprobs (the reference values), in the current writer's schema."""
    table = pa.concat_tables(
        (pq.read_table(p) for p in committed_shards(dataset_dir, read_manifest(dataset_dir))),
        promote_options="permissive",
    )
    lp = table["topk_logprobs"].type.value_type.value_type
    if lp != pa.float32():
        raise SystemExit(f"{dataset_dir}: reference logprobs must be float32, found {lp}")
    return table.cast(arrow_schema())


def realistic_table(samples: int, length: int, *, vocab: int, zipf: float, seed: int, k: int = 20) -> pa.Table:
    """Sample `samples` completions of `length` tokens from a random Llama (vocab `vocab`) with top-k logprobs.

    Logits are standardised and scaled by 5 (mean entropy ~2.5 nats, top-1 ~0.45, top-20 mass ~0.85, like
    an instruct model on open-ended text); `zipf` > 0 adds `-zipf * log(1 + id)` (frequency rank = id, as in BPE).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=length + 16,
    )
    model = LlamaForCausalLM(cfg).eval()
    prior = -zipf * torch.log1p(torch.arange(vocab).float())
    gens, prompts = [], []
    with torch.no_grad():
        for lo in range(0, samples, 256):
            b = min(256, samples - lo)
            ids = (
                torch.multinomial(torch.softmax(prior, 0), b * 8, replacement=True).view(b, 8)
                if zipf
                else torch.randint(0, vocab, (b, 8))
            )
            prompts += ids.tolist()
            out = model(ids, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            steps = {"tok": [], "tlp": [], "ids": [], "lp": []}
            for _ in range(length):
                logp = torch.log_softmax(5 * logits / logits.std(-1, keepdim=True) + prior, -1)
                u = torch.rand(b, 1)  # inverse-CDF sampling: torch.multinomial is ~10x slower at this vocab
                tok = torch.searchsorted(logp.exp().cumsum(-1), u * logp.exp().sum(-1, keepdim=True)).clamp_max(
                    vocab - 1
                )
                top = logp.topk(k, -1)
                for key, val in zip(steps, (tok[:, 0], logp.gather(-1, tok)[:, 0], top.indices, top.values)):
                    steps[key].append(val)
                out = model(tok, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
            arr = {key: torch.stack(v, 1).numpy() for key, v in steps.items()}
            gens += [
                Generation(
                    arr["tok"][i].astype(np.int32),
                    arr["tlp"][i].astype(np.float32),
                    arr["ids"][i].astype(np.int32),
                    arr["lp"][i].astype(np.float32),
                    "length",
                )
                for i in range(b)
            ]
    pids = [stable_id("bench", i) for i in range(samples)]
    return build_table(
        prompt_ids=pids,
        prompts=[""] * samples,
        prompt_token_ids=prompts,
        generations=[[g] for g in gens],
        completions=[[""]] * samples,
        seed=seed,
        logprobs_dtype="float32",
        logprobs_step=0.0,
    )


@dataclass
class Candidate:
    name: str
    storage: StorageRecord
    logprobs_dtype: str = "float32"
    raw: dict = field(default_factory=dict)
    """pq.write_table keywords overriding what the writer would do (to measure what it refuses to write)."""


def candidates() -> list[Candidate]:
    """Encodings to compare; `StorageRecord()` is what the writer uses by default."""
    plain = {IDS_LEAF: "PLAIN", LP_LEAF: "PLAIN"}
    bss = {IDS_LEAF: "BYTE_STREAM_SPLIT", LP_LEAF: "BYTE_STREAM_SPLIT"}
    step7, step8, step6 = 2.0**-7, 2.0**-8, 2.0**-6
    S = StorageRecord
    legacy = S(compression_level=1, row_group_size=256, logprobs_step=0.0, column_encoding={}, dictionary_columns=["*"])
    out = [
        Candidate("v1 writer (dict everywhere, f32, zstd 1)", legacy),
        Candidate("v1 writer, f16", legacy, "float16"),
        Candidate("f32 plain", S(compression_level=1, row_group_size=256, logprobs_step=0.0, column_encoding=plain)),
        Candidate("f32 BSS", S(compression_level=1, row_group_size=256, logprobs_step=0.0, column_encoding=bss)),
        Candidate(
            "f16 BSS (DuckDB cannot read)",
            S(compression_level=1, row_group_size=256, logprobs_step=0.0, column_encoding=bss),
            "float16",
            {"column_encoding": bss},
        ),
        Candidate(
            "f32 grid 2^-7 BSS", S(compression_level=1, row_group_size=256, logprobs_step=step7, column_encoding=bss)
        ),
        Candidate(
            "f16 grid 2^-7 BSS (DuckDB cannot read)",
            S(compression_level=1, row_group_size=256, logprobs_step=step7, column_encoding=bss),
            "float16",
            {"column_encoding": bss},
        ),
        Candidate(
            "f16 grid 2^-7 PLAIN",
            S(compression_level=1, row_group_size=256, logprobs_step=step7, column_encoding=bss),
            "float16",
        ),
        Candidate(
            "f32 grid 2^-7 BSS, ids dict",
            S(
                compression_level=1,
                row_group_size=256,
                logprobs_step=step7,
                column_encoding={LP_LEAF: "BYTE_STREAM_SPLIT"},
                dictionary_columns=[IDS_LEAF],
            ),
        ),
        Candidate(
            "f32 grid 2^-7 BSS, ids plain",
            S(
                compression_level=1,
                row_group_size=256,
                logprobs_step=step7,
                column_encoding={IDS_LEAF: "PLAIN", LP_LEAF: "BYTE_STREAM_SPLIT"},
            ),
        ),
        Candidate(
            "f32 grid 2^-7 BSS, ids delta",
            S(
                compression_level=1,
                row_group_size=256,
                logprobs_step=step7,
                column_encoding={IDS_LEAF: "DELTA_BINARY_PACKED", LP_LEAF: "BYTE_STREAM_SPLIT"},
            ),
        ),
        Candidate(
            "f32 grid 2^-8 BSS", S(compression_level=1, row_group_size=256, logprobs_step=step8, column_encoding=bss)
        ),
        Candidate(
            "f16 grid 2^-7 PLAIN, zstd 9",
            S(compression_level=9, row_group_size=1024, logprobs_step=step7, column_encoding=bss),
            "float16",
        ),
        Candidate(
            "f32 grid 2^-6 BSS", S(compression_level=1, row_group_size=256, logprobs_step=step6, column_encoding=bss)
        ),
    ]
    for level in (3, 9, 19):
        out.append(
            Candidate(
                f"f32 grid 2^-7 BSS, zstd {level}",
                S(compression_level=level, row_group_size=256, logprobs_step=step7, column_encoding=bss),
            )
        )
    for rows in (1024, 4096):
        out.append(
            Candidate(
                f"f32 grid 2^-7 BSS, zstd 9, rg {rows}",
                S(compression_level=9, row_group_size=rows, logprobs_step=step7, column_encoding=bss),
            )
        )
    out.append(Candidate("default StorageRecord()", S()))
    return out


def stored_table(table: pa.Table, c: Candidate) -> pa.Table:
    """`table` with logprobs as the candidate stores them (rounded to its grid, cast to its dtype)."""
    col = table["topk_logprobs"].combine_chunks()
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False)
    values = quantize_logprobs(flat, c.storage.logprobs_step).astype(
        np.float16 if c.logprobs_dtype == "float16" else np.float32
    )
    lp_field = arrow_schema(c.logprobs_dtype).field("topk_logprobs")
    inner = pa.ListArray.from_arrays(col.flatten().offsets, pa.array(values), type=lp_field.type.value_type)
    nested = pa.ListArray.from_arrays(col.offsets, inner, type=lp_field.type)
    return table.set_column(table.schema.get_field_index("topk_logprobs"), lp_field, nested)


def measure(table: pa.Table, c: Candidate, repeats: int = 2) -> dict:
    """Write `table` the candidate's way into memory; sizes from the footer, best-of-`repeats` timings."""
    ref = table["topk_logprobs"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    t0 = time.perf_counter()
    stored = stored_table(table, c)
    prep = time.perf_counter() - t0
    opts = parquet_options(c.storage, stored.schema) | c.raw
    write_s, read_s = [], []
    for _ in range(repeats):
        buf = io.BytesIO()
        t0 = time.perf_counter()
        pq.write_table(stored, buf, **opts)
        write_s.append(time.perf_counter() - t0)
    data = buf.getvalue()
    for _ in range(repeats):
        t0 = time.perf_counter()
        back = pq.read_table(io.BytesIO(data), columns=list(TOPK))
        read_s.append(time.perf_counter() - t0)
    got = back["topk_logprobs"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    ids_ok = back["topk_token_ids"].combine_chunks().equals(table["topk_token_ids"].combine_chunks())
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    per_col: dict[str, int] = {}
    for r in range(md.num_row_groups):
        for i in range(md.num_columns):
            col = md.row_group(r).column(i)
            per_col[col.path_in_schema.split(".")[0]] = (
                per_col.get(col.path_in_schema.split(".")[0], 0) + col.total_compressed_size
            )
    entries = len(ref)
    tokens = int(pc.sum(pc.list_value_length(table["completion_token_ids"])).as_py())
    finite = np.isfinite(ref)
    return {
        "candidate": c.name,
        "logprobs_dtype": c.logprobs_dtype,
        "storage": c.storage.model_dump(),
        "entries": entries,
        "tokens": tokens,
        "bytes_per_entry_topk": (per_col["topk_token_ids"] + per_col["topk_logprobs"]) / entries,
        "bytes_per_entry_ids": per_col["topk_token_ids"] / entries,
        "bytes_per_entry_logprobs": per_col["topk_logprobs"] / entries,
        "file_bytes_per_token": len(data) / tokens,
        "max_abs_logprob_error": float(np.abs(got[finite] - ref[finite]).max()),
        "max_abs_logprob_error_above_-20": float(np.abs(got - ref)[finite & (ref > -20)].max()),
        "ids_exact": bool(ids_ok),
        "write_mentries_per_s": entries / (min(write_s) + prep) / 1e6,
        "read_mentries_per_s": entries / min(read_s) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=Path("data/runs/demo/dataset"))
    ap.add_argument("--samples", type=int, default=2000, help="completions per realistic-vocab dataset")
    ap.add_argument("--length", type=int, default=32, help="tokens per realistic-vocab completion")
    ap.add_argument("--out", type=Path, default=RESULTS / "storage.json")
    args = ap.parse_args()
    datasets = {"demo (vocab 287)": demo_table(args.dataset)}
    for name, zipf in (("random Llama, vocab 32000", 0.0), ("random Llama + Zipf prior, vocab 32000", 1.1)):
        t0 = time.perf_counter()
        datasets[name] = realistic_table(args.samples, args.length, vocab=32000, zipf=zipf, seed=0)
        print(f"built {name}: {datasets[name].num_rows} samples in {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    for dname, table in datasets.items():
        lp = table["topk_logprobs"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 20)
        p = np.exp(lp.astype(np.float64))
        print(
            f"\n### {dname}: {table.num_rows} samples, {len(lp)} tokens, top-1 prob {p[:, 0].mean():.3f}, "
            f"top-20 mass {p.sum(1).mean():.3f}\n"
        )
        print("| candidate | B/entry (ids + lp) | ids | lp | max err (nats) | write Mentry/s | read Mentry/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for c in candidates():
            r = measure(table, c) | {"dataset": dname}
            results.append(r)
            print(
                f"| {c.name} | {r['bytes_per_entry_topk']:.3f} | {r['bytes_per_entry_ids']:.3f} | "
                f"{r['bytes_per_entry_logprobs']:.3f} | {r['max_abs_logprob_error']:.2g} | "
                f"{r['write_mentries_per_s']:.1f} | {r['read_mentries_per_s']:.1f} |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": platform.platform(), "pyarrow": pa.__version__, "results": results}, indent=1)
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
