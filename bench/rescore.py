"""Re-score vs sample: the teacher's top-k along given completions (one prefill each) vs logging it while decoding.

    python bench/rescore.py [--model data/models/demo-teacher] [--prompts 2000] [--k 20] [--repeats 3]

Same teacher, same prompts, same tokens: each repeat first samples completions with top-k logprobs (what
`generate.mode: sample` does), then re-scores exactly those completions (`generate.mode: rescore`), on one
managed vLLM server and through transformers. Tokens/s counts completion tokens, including the client's
parsing into the dataset's arrays. Prints a table (medians of `--repeats`, interleaved) and writes
bench/results/rescore.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import HFTeacherConfig, VLLMServerTeacherConfig  # noqa: E402
from pipeline.demo.task import make_prompts  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.teachers.base import SamplingSpec  # noqa: E402
from pipeline.teachers.managed import ManagedServer  # noqa: E402


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def sample_then_rescore(teacher, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> dict[str, float]:
    """Tokens/s of sampling with top-k, then of re-scoring the very same completions."""
    secs, gens = timed(teacher.generate, prompts, spec, seed)
    completions = [g[0].completion_token_ids.tolist() for g in gens]
    tokens = sum(map(len, completions))
    rsecs, scored = timed(teacher.score, prompts, completions, spec.k)
    assert sum(len(s.completion_token_ids) for s in scored) == tokens
    return {"sample": tokens / secs, "rescore": tokens / rsecs, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/demo-teacher")
    ap.add_argument("--python", default=".venv-teacher/bin/python")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--hf-prompts", type=int, default=500)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/rescore.json")
    args = ap.parse_args()

    from pipeline.teachers.hf import HFTeacher
    from pipeline.teachers.vllm_server import VLLMServerTeacher

    tok = load_tokenizer(args.model)
    prompts = [tok(p)["input_ids"] for p in make_prompts(args.prompts, seed=777)]
    spec = SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, k=args.k, seed=0)
    cfg = VLLMServerTeacherConfig(
        model=args.model,
        python=args.python,
        dtype="float32",
        max_model_len=128,
        gpu_memory_utilization=0.3,
        cpu_kvcache_space_gb=1,
        concurrency=args.concurrency,
    )
    server = ManagedServer(cfg, max_logprobs=max(args.k, 20), log_path=Path(args.out).parent / "rescore_server.log")
    runs: dict[str, list[dict]] = {"vllm_server": [], "hf": []}
    server.start()
    try:
        teacher = VLLMServerTeacher(cfg.model_copy(update={"url": server.url, "served_model_name": server.model_name}))
        sample_then_rescore(teacher, prompts[:200], spec, seed=99)  # warm-up
        version = teacher.info.versions.get("vllm")
        for r in range(args.repeats):
            runs["vllm_server"].append(sample_then_rescore(teacher, prompts, spec, seed=r))
        teacher.close()
    finally:
        server.stop()
    hf = HFTeacher(HFTeacherConfig(model=args.model, batch_size=256))
    for r in range(args.repeats):
        runs["hf"].append(sample_then_rescore(hf, prompts[: args.hf_prompts], spec, seed=r))

    rows = []
    for backend, rs in runs.items():
        sample = statistics.median(r["sample"] for r in rs)
        rescore = statistics.median(r["rescore"] for r in rs)
        rows.append(
            {
                "backend": backend,
                "prompts": args.prompts if backend == "vllm_server" else args.hf_prompts,
                "tokens": [r["tokens"] for r in rs],
                "sample_tokens_per_s_median": sample,
                "rescore_tokens_per_s_median": rescore,
                "rescore_vs_sample": rescore / sample,
                "runs": rs,
            }
        )
    print(f"{'backend':<12} {'prompts':>8} {'sample tok/s':>13} {'rescore tok/s':>14} {'rescore/sample':>15}")
    for r in rows:
        print(
            f"{r['backend']:<12} {r['prompts']:>8} {r['sample_tokens_per_s_median']:>13,.0f} "
            f"{r['rescore_tokens_per_s_median']:>14,.0f} {r['rescore_vs_sample']:>14.2f}x"
        )
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency,
        "vllm": version,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
