"""Capture throughput: what a user compares (`--compare`), and the server's cost of top-k logprobs (default mode).

    python bench/capture.py --compare [--config configs/demo.yaml] [--repeats 3] [--hf] [--ray] [--only WORD ...]
    python bench/capture.py [--model data/models/demo-teacher] [--prompts 2000] [--repeats 3]

`--compare`: in one run, on the config's prompts and teacher, whole commands as a user runs them, rows
interleaved (the order rotates each repeat) so drift on a shared machine hits every row alike: the plain
offline script (bench/plain_vllm.py: `vllm.LLM(...).generate(prompts, SamplingParams(logprobs=20))`, arrays,
one pyarrow Parquet write; in the teacher env), `distill generate` with each vLLM backend (vllm_engine,
vllm_server; `--hf` adds configs/demo-hf.yaml), and the flow (`distill run --stages generate`, its own Prefect
ephemeral API, as `distill run` does by default) with each (`--ray` adds the flow on a local Ray cluster,
server backend). `--only engine ...` keeps the rows whose name holds a word (and the plain script). Per row,
medians of: whole-command wall seconds, the generate stage's own seconds (what the command reports), and
steady tokens/s (plain script: tokens over its `generate` call; distill: the tokens of shards 2..n over the
time between the first and the last shard file). Writes bench/results/capture-compare.json.

Default mode: one managed server; tokens/s with no logprobs, k=0, 5, 20 and transformers, median of
`--repeats`, ratios against `no logprobs` of the same run. Writes bench/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


# ---- --compare: whole commands, as a user runs them -------------------------------------------------------------


def command_env(prefect_home: Path) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "PREFECT_HOME": str(prefect_home),
        "PYTHONPATH": str(ROOT),  # this checkout's code, whatever is installed
    }
    env.pop("PREFECT_API_URL", None)  # the ephemeral API, as a plain `distill run` uses
    return env


def steady_rate(dataset: Path) -> float:
    """Tokens of shards 2..n over the seconds between the first and the last shard file (the sustained rate)."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    shards = sorted(manifest["shards"], key=lambda s: (dataset / s["file"]).stat().st_mtime)
    if len(shards) < 2:
        return float("nan")
    span = (dataset / shards[-1]["file"]).stat().st_mtime - (dataset / shards[0]["file"]).stat().st_mtime
    return sum(s["tokens"] for s in shards[1:]) / span


def run_row(name: str, cmd: list[str], env: dict, out: Path, log: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    if res.returncode != 0:
        raise SystemExit(f"{name} failed (exit {res.returncode}); see {log}")
    if name.startswith("plain"):
        info = json.loads(next(ln for ln in reversed(res.stdout.splitlines()) if ln.startswith('{"ready_s"')))
        return {
            "wall_s": wall,
            "stage_s": info["total_s"],
            "steady_tps": info["tokens_per_s"],
            "tokens": info["tokens"],
        }
    dataset = out / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    flat = " ".join(res.stdout.split())
    found = re.search(r"teacher ran, ([0-9.]+)s", flat) or re.search(r"generate\W+([0-9.]+)\W+\d+ samples", flat)
    return {
        "wall_s": wall,
        "stage_s": float(found.group(1)) if found else float("nan"),
        "steady_tps": steady_rate(dataset),
        "tokens": manifest["total_tokens"],
    }


def compare(args) -> None:
    from pipeline.config import load_config

    cfg = load_config(args.config)
    t = cfg.teacher
    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    env = command_env(work / "prefect")
    llm_kwargs = {
        "dtype": t.dtype,
        "max_model_len": t.max_model_len,
        "gpu_memory_utilization": t.gpu_memory_utilization,
        "seed": 0,
    }
    plain_env = {**env, "VLLM_NO_USAGE_STATS": "1"}
    plain_env.pop("PYTHONPATH")
    if getattr(t, "cpu_kvcache_space_gb", None):
        plain_env["VLLM_CPU_KVCACHE_SPACE"] = str(t.cpu_kvcache_space_gb)
    distill = [sys.executable, "-m", "pipeline.cli"]
    rows: dict[str, tuple] = {
        "plain vLLM script": (
            lambda out: [
                args.python,
                str(ROOT / "bench/plain_vllm.py"),
                "--model",
                t.model,
                "--prompts",
                cfg.prompts.path,
                "--out",
                str(out / "plain.parquet"),
                "--k",
                str(cfg.generate.k),
                "--max-new-tokens",
                str(cfg.generate.max_new_tokens),
                "--llm-kwargs",
                json.dumps(llm_kwargs),
                *(["--limit", str(cfg.prompts.limit)] if cfg.prompts.limit else []),
            ],
            plain_env,
        )
    }
    for backend in ("vllm_engine", "vllm_server"):
        sets = ["--set", f"teacher.backend={backend}", "--set", f"teacher.python={args.python}"]
        rows[f"distill generate ({backend})"] = (
            lambda out, s=sets: [*distill, "generate", args.config, *s, "--set", f"output_dir={out}"],
            env,
        )
        rows[f"distill run --stages generate ({backend})"] = (
            lambda out, s=sets: [
                *distill,
                "run",
                args.config,
                "--stages",
                "generate",
                *s,
                "--set",
                f"output_dir={out}",
            ],
            env,
        )
    if args.ray:
        sets = ["--set", "teacher.backend=vllm_server", "--set", f"teacher.python={args.python}"]
        rows["distill run --stages generate --task-runner ray (vllm_server)"] = (
            lambda out, s=sets: [
                *distill, "run", args.config, "--stages", "generate", "--task-runner", "ray", *s,
                "--set", f"output_dir={out}",
            ],
            env,
        )  # fmt: skip
    if args.hf:
        rows["distill generate (hf)"] = (
            lambda out: [*distill, "generate", "configs/demo-hf.yaml", "--set", f"output_dir={out}"],
            env,
        )
    if args.only:
        rows = {n: r for n, r in rows.items() if n == "plain vLLM script" or any(o in n for o in args.only)}
    results: dict[str, list[dict]] = {name: [] for name in rows}
    names = list(rows)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            out = work / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            make, row_env = rows[name]
            r = run_row(name, make(out), row_env, out, out.with_suffix(".log"))
            results[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: {r['wall_s']:.1f} s, {r['steady_tps']:,.0f} tok/s", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    med = {n: {k: statistics.median(r[k] for r in v) for k in v[0]} for n, v in results.items()}
    plain = med["plain vLLM script"]
    print(f"\n{'row':<44} {'wall s':>8} {'stage s':>8} {'steady tok/s':>13} {'wall/plain':>11} {'tok/s/plain':>12}")
    for name, m in med.items():
        print(
            f"{name:<44} {m['wall_s']:>8.1f} {m['stage_s']:>8.1f} {m['steady_tps']:>13,.0f} "
            f"{m['wall_s'] / plain['wall_s']:>10.2f}x {m['steady_tps'] / plain['steady_tps']:>11.2f}x"
        )
    for backend in ("vllm_engine", "vllm_server"):
        if f"distill generate ({backend})" not in med or f"distill run --stages generate ({backend})" not in med:
            continue
        g, f = med[f"distill generate ({backend})"], med[f"distill run --stages generate ({backend})"]
        print(
            f"flow vs distill generate ({backend}): generate stage {100 * (f['stage_s'] / g['stage_s'] - 1):+.1f}%, "
            f"whole command {100 * (f['wall_s'] / g['wall_s'] - 1):+.1f}%"
        )
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "config": args.config,
        "repeats": args.repeats,
        "median": med,
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="store_true", help="whole commands: plain script, distill generate, flow")
    ap.add_argument("--config", default="configs/demo.yaml", help="--compare: the run config (prompts, teacher)")
    ap.add_argument("--hf", action="store_true", help="--compare: add `distill generate configs/demo-hf.yaml`")
    ap.add_argument("--keep", action="store_true", help="--compare: keep the output directories")
    ap.add_argument("--ray", action="store_true", help="--compare: add the flow on a local Ray cluster (server)")
    ap.add_argument("--only", nargs="*", help="--compare: only the rows whose name holds one of these (and plain)")
    ap.add_argument("--model", default="data/models/demo-teacher")
    ap.add_argument("--python", default=".venv-teacher/bin/python")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compare:
        args.out = args.out or "bench/results/capture-compare.json"
        compare(args)
        return
    args.out = args.out or "bench/results/capture.json"

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
        "cpus": os.cpu_count(),
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
