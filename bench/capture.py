"""Throughput of top-k capture through the vLLM server vs the same server without logprobs, and vs transformers.

    python bench/capture.py [--model data/models/demo-teacher] [--prompts 2000] [--repeats 3]

Prints a table and writes bench/results/capture.json. Each mode runs `--repeats` times on the same
server (one warm-up first); medians are reported, ratios are against `no logprobs` of the same run.
Tokens/s counts generated tokens, including the client's parsing into the dataset's arrays.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import HFTeacherConfig, VLLMServerTeacherConfig  # noqa: E402
from pipeline.demo.task import make_prompts  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.teachers.base import SamplingSpec  # noqa: E402
from pipeline.teachers.managed import ManagedServer  # noqa: E402
from pipeline.teachers.vllm_server import VLLMServerTeacher, parse_choice  # noqa: E402


def run_server_mode(
    teacher: VLLMServerTeacher, prompts: list[list[int]], k: int | None, max_new: int, concurrency: int
) -> float:
    """Tokens/s for one pass over the prompts; k=None asks for no logprobs at all."""

    def one(i: int) -> int:
        body = {
            "model": teacher.model_name,
            "prompt": prompts[i],
            "n": 1,
            "max_tokens": max_new,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "seed": i,
            "return_token_ids": True,
            "ignore_eos": True,
        }
        if k is not None:
            body.update(logprobs=k, return_tokens_as_token_ids=True)
        choice = teacher._post(body)["choices"][0]
        if k is not None:
            parse_choice(choice, max(k, 1))
        return len(choice["token_ids"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(len(prompts))))
    return tokens / (time.perf_counter() - start)


def run_hf(model: str, prompts: list[list[int]], k: int, max_new: int, batch_size: int) -> float:
    from pipeline.teachers.hf import HFTeacher

    teacher = HFTeacher(HFTeacherConfig(model=model, batch_size=batch_size))
    spec = SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=max_new, k=k, seed=0)
    start = time.perf_counter()
    gens = teacher.generate(prompts, spec, seed=0)
    return sum(len(g[0].completion_token_ids) for g in gens) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/demo-teacher")
    ap.add_argument("--python", default=".venv-teacher/bin/python")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/capture.json")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in make_prompts(args.prompts, seed=777)]
    cfg = VLLMServerTeacherConfig(
        model=args.model,
        python=args.python,
        dtype=args.dtype,
        max_model_len=128,
        gpu_memory_utilization=0.3,
        cpu_kvcache_space_gb=1,
        concurrency=args.concurrency,
    )
    server = ManagedServer(cfg, max_logprobs=20, log_path=Path(args.out).parent / "capture_server.log")
    server.start()
    modes: dict[str, list[float]] = {}
    try:
        teacher = VLLMServerTeacher(cfg.model_copy(update={"url": server.url, "served_model_name": server.model_name}))
        run_server_mode(teacher, prompts[:200], 20, args.max_new_tokens, args.concurrency)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
            for name, k in (("no logprobs", None), ("k=0", 0), ("k=5", 5), ("k=20", 20)):
                modes.setdefault(name, []).append(
                    run_server_mode(teacher, prompts, k, args.max_new_tokens, args.concurrency)
                )
        teacher.close()
    finally:
        server.stop()
    modes["transformers k=20"] = [
        run_hf(args.model, prompts, 20, args.max_new_tokens, args.hf_batch_size)
        for _ in range(max(1, args.repeats - 1))
    ]

    base = statistics.median(modes["no logprobs"])
    rows = [
        {
            "mode": name,
            "tokens_per_s_median": statistics.median(v),
            "runs": v,
            "ratio_vs_no_logprobs": statistics.median(v) / base,
        }
        for name, v in modes.items()
    ]
    print(f"{'mode':<20} {'tok/s (median)':>15} {'vs no logprobs':>15}")
    for r in rows:
        print(f"{r['mode']:<20} {r['tokens_per_s_median']:>15,.0f} {r['ratio_vs_no_logprobs']:>14.2f}x")
    vllm20 = statistics.median(modes["k=20"])
    print(f"vLLM k=20 vs transformers k=20: {vllm20 / statistics.median(modes['transformers k=20']):.1f}x")
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "model": args.model,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency,
        "vllm": teacher.info.versions.get("vllm"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
