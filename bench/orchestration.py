"""Orchestration overhead: the same stages called directly vs through the Prefect flow (ephemeral API).

    python bench/orchestration.py [--config configs/demo-hf.yaml] [--set prompts.limit=1000 ...] [--repeats 1]

Each repeat runs generate -> train -> eval once through the plain stage functions and once through
`distill_flow`, into fresh output dirs under `--out` (order alternates between repeats). The
ephemeral API server is started once, before the first flow run, with its own empty PREFECT_HOME so
no cached generate result is reused; its start is timed separately. Prints a table and writes
bench/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("PREFECT_API_URL", None)  # the ephemeral API is what `distill run` uses by default
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bench-orchestration-prefect-")

from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.generate import generate_dataset  # noqa: E402
from pipeline.train import train_student  # noqa: E402

STAGES = ["generate", "train", "eval"]


def fresh(cfg: RunConfig, out: Path) -> RunConfig:
    """The same config writing to an empty `out` (so nothing is resumed or reused)."""
    shutil.rmtree(out, ignore_errors=True)
    return cfg.model_copy(update={"output_dir": str(out)})


def run_direct(cfg: RunConfig) -> dict:
    """The three stage functions back to back, as `distill generate/train/eval` would call them."""
    seconds, t_all = {}, time.perf_counter()
    t0 = time.perf_counter()
    gen = generate_dataset(cfg)
    seconds["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = train_student(cfg)
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(cfg)
    seconds["eval"] = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "total": time.perf_counter() - t_all,
        "samples": gen.samples,
        "tokens": gen.tokens,
        "final_loss": tr.final_loss,
    }


def start_ephemeral_api() -> float:
    """Seconds until the ephemeral API answers (what the first `distill run` of a session pays once)."""
    from prefect.client.orchestration import get_client

    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.hello().raise_for_status()
    return time.perf_counter() - t0


def run_flow(cfg: RunConfig) -> dict:
    """The same stages through `distill_flow`; its per-stage seconds are measured inside the flow."""
    from flows.distill import distill_flow

    t0 = time.perf_counter()
    out = distill_flow(cfg, stages=STAGES)
    total = time.perf_counter() - t0
    gen = out.generate
    # time spent inside the task bodies (teacher shards, training loop, evaluation), as the stages report it
    inside = {"generate": gen.teacher_seconds, "train": out.train.seconds, "eval": out.eval.get("seconds")}
    return {
        "seconds": {s: out.seconds[s] for s in STAGES},
        "total": total,
        "samples": gen.samples,
        "tokens": gen.tokens,
        "final_loss": out.train.final_loss,
        "generate_cached": gen.cached,
        "inside_tasks": inside,
    }


def task_costs(n: int = 8) -> dict[str, float]:
    """Seconds per no-op Prefect task run, one after another in one flow: plain, with a persisted result and a
    cache key (what a shard task adds), and with a tag that has a concurrency limit of 1 (the teacher tag's
    mechanism; no other task holds a slot). Isolates the fixed cost per shard task from the stage work."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    @task
    def plain(i: int) -> int:
        return i

    @task(persist_result=True, cache_key_fn=lambda ctx, params: f"bench-noop-{params['i']}-{time.time_ns()}")
    def persisted(i: int) -> int:
        return i

    @task(tags=["bench-limited"])
    def limited(i: int) -> int:
        return i

    @flow(name="bench-task-costs")
    def costs(n: int) -> dict[str, float]:
        out = {}
        for name, fn in (
            ("plain", plain),
            ("persisted_result_and_cache_key", persisted),
            ("tag_concurrency_limit_1", limited),
        ):
            fn(-1)  # warm
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            out[name] = (time.perf_counter() - t0) / n
        return out

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="bench-limited", concurrency_limit=1)
    return costs(n)


def pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo-hf.yaml")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="Config override key=value (repeatable)."
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("data/runs/bench-orchestration"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/orchestration.json"))
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    import flows.distill  # noqa: F401  (imports are not part of either measurement)

    load_before = os.getloadavg()
    server_start = start_ephemeral_api()
    rounds = []
    for r in range(args.repeats):
        order = ["direct", "flow"] if r % 2 == 0 else ["flow", "direct"]
        res = {}
        for mode in order:
            run_cfg = fresh(cfg, args.out / f"{mode}-{r}")
            res[mode] = run_direct(run_cfg) if mode == "direct" else run_flow(run_cfg)
            print(f"round {r} {mode}: {res[mode]['total']:.1f}s {res[mode]['seconds']}", flush=True)
        res["order"] = order
        rounds.append(res)

    per_task = task_costs()
    direct = statistics.median(r["direct"]["total"] for r in rounds)
    flow = statistics.median(r["flow"]["total"] for r in rounds)
    same_work = all(
        r["direct"]["samples"] == r["flow"]["samples"]
        and r["direct"]["tokens"] == r["flow"]["tokens"]
        and not r["flow"]["generate_cached"]
        for r in rounds
    )
    # within one flow run, so not skewed by the load changing between passes: wall time outside the task bodies
    inside = statistics.median(sum(v or 0.0 for v in r["flow"]["inside_tasks"].values()) for r in rounds)
    summary = {
        "direct_total_s": direct,
        "flow_total_s": flow,
        "ephemeral_server_start_s": server_start,
        "overhead_pct": pct(flow, direct),
        "overhead_pct_with_server_start": pct(flow + server_start, direct),
        "flow_inside_tasks_s": inside,
        "flow_outside_tasks_s": flow - inside,
        "flow_outside_tasks_pct": 100.0 * (flow - inside) / inside,
        "same_work": same_work,
        "seconds_per_noop_task": per_task,
    }
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": args.overrides,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "rounds": rounds,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(f"\n{'stage':10s} {'direct s':>10s} {'flow s':>10s} {'diff %':>8s}")
    for stage in STAGES:
        d = statistics.median(r["direct"]["seconds"][stage] for r in rounds)
        f = statistics.median(r["flow"]["seconds"][stage] for r in rounds)
        print(f"{stage:10s} {d:10.1f} {f:10.1f} {pct(f, d):+8.1f}")
    print(f"{'total':10s} {direct:10.1f} {flow:10.1f} {summary['overhead_pct']:+8.1f}")
    print(
        f"inside the flow's task bodies {inside:.1f}s, outside them {flow - inside:.1f}s "
        f"({summary['flow_outside_tasks_pct']:+.1f}% of the stage work)"
    )
    print("seconds per no-op task run: " + ", ".join(f"{k} {v:.3f}" for k, v in per_task.items()))
    print(
        f"ephemeral API start (once): {server_start:.1f}s -> overhead incl. start "
        f"{summary['overhead_pct_with_server_start']:+.1f}%"
    )
    print(
        f"same samples/tokens in both and generate not served from cache: {same_work}; load average {load_before} -> "
        f"{os.getloadavg()}"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
