"""Off-policy only vs on-policy rounds, same student steps and about the same teacher-scored tokens, 3 seeds.

    python bench/onpolicy.py [--prompts 400] [--steps 150] [--seeds 0 1 2]

The demo teacher and student (transformers backend, in process), in a regime with headroom: few prompts and
few steps, so the student does not already match the teacher.
- off-policy: the teacher samples all `--prompts` prompts; the student trains `--steps` steps on them;
- rounds: the teacher samples half the prompts (round 0, a third of the steps); then two rounds in which the
  student samples half of those training prompts, the teacher scores them, and the student trains another
  third of the steps. Three round settings: the defaults (reverse KL with the tail bucket, alpha 0, earlier data
  mixed in, peak lr where round 0's schedule ended); the same with forward KL, alpha 0.2 as round 0; and the
  defaults at round 0's full peak lr (`on_policy.lr` = `train.lr`, the default before the lr was measured).
Every arm is evaluated on the same held-out prompts (those of all `--prompts`): held-out KL against the
off-policy arm's teacher samples, task accuracy, and the teacher's per-token reverse KL on the student's own
held-out samples. Prints a table (mean ± std over seeds) and writes bench/results/onpolicy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import build_config  # noqa: E402
from pipeline.dataset.schema import read_manifest  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.generate import generate_dataset  # noqa: E402
from pipeline.rounds import evaluate_on_policy, round_dir, run_round  # noqa: E402
from pipeline.train import train_student  # noqa: E402

STUDENT = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}


def config(out: Path, prompts: int, steps: int, seed: int, rounds: int, round_loss: dict | None = None) -> dict:
    return {
        "output_dir": str(out),
        "teacher": {"backend": "hf", "model": "data/models/demo-teacher", "batch_size": 256},
        "prompts": {"path": "data/demo/prompts.jsonl", "limit": prompts, "heldout_fraction": 0.34},
        "generate": {"k": 20, "max_new_tokens": 24, "seed": seed, "shard_size": 1000},
        "student": {"shrink": {**STUDENT, "intermediate_size": 256}},
        "train": {"alpha": 0.2, "max_steps": steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "seed": seed},
        "eval": {"task": "demo", "max_prompts": 300, "batch_size": 512, "seed": seed},
        "rounds": rounds,
        "on_policy": {"share": 0.5, "steps": steps, **(round_loss or {})},
    }


def scored_tokens(dataset: Path) -> int:
    return read_manifest(dataset).total_tokens


def summary(metrics: dict, on_policy: dict) -> dict:
    s = metrics["student"]
    return {
        "accuracy": s["accuracy"],
        "greedy_accuracy": s["greedy_accuracy"],
        "kl_teacher_samples": s["kl"],
        "reverse_kl_own_samples": on_policy["reverse_kl"],
        "accuracy_own_samples": on_policy.get("accuracy"),
    }


def off_policy(root: Path, prompts: int, steps: int, seed: int) -> dict:
    cfg = build_config(config(root / "offpolicy", prompts, steps, seed, rounds=1))
    t0 = time.perf_counter()
    generate_dataset(cfg, progress=False)
    train_student(cfg, progress=False)
    seconds = time.perf_counter() - t0
    out = summary(evaluate(cfg), evaluate_on_policy(cfg, 0))
    return {**out, "teacher_scored_tokens": scored_tokens(cfg.dataset_dir), "seconds": [seconds]}


ROUND_LOSSES = {
    "rounds, reverse KL": ("rounds", {}),  # the defaults: reverse_kl, tail bucket, alpha 0, lr 10% of train.lr
    "rounds, forward KL": ("rounds-forward", {"kind": "forward_kl", "tail_bucket": True, "alpha": 0.2}),
    "rounds, reverse KL, peak lr": ("rounds-peak-lr", {"lr": 3e-3}),  # the rounds' lr before it was measured
}


def on_policy(root: Path, prompts: int, steps: int, seed: int, arm: str) -> dict:
    name, round_loss = ROUND_LOSSES[arm]
    cfg = build_config(config(root / name, prompts // 2, steps // 3, seed, rounds=3, round_loss=round_loss))
    same_heldout = build_config(config(root / name, prompts, steps // 3, seed, rounds=3, round_loss=round_loss))
    reference = build_config(config(root / "offpolicy", prompts, steps, seed, rounds=1))
    seconds = []
    t0 = time.perf_counter()
    generate_dataset(cfg, progress=False)
    train_student(cfg, progress=False)
    seconds.append(time.perf_counter() - t0)
    per_round = [teacher_forced(reference, cfg.student_dir, root / name / "m0.json")]
    for r in (1, 2):
        t0 = time.perf_counter()
        run_round(cfg, r, ["generate", "train"])
        seconds.append(time.perf_counter() - t0)
        per_round.append(teacher_forced(reference, round_dir(cfg, r) / "student", round_dir(cfg, r) / "m.json"))
    # the off-policy arm's held-out prompts and teacher samples: the same evaluation for every arm
    metrics = evaluate(reference, student_dir=round_dir(cfg, 2) / "student", metrics_path=round_dir(cfg, 2) / "m.json")
    tokens = scored_tokens(cfg.dataset_dir) + sum(scored_tokens(round_dir(cfg, r) / "dataset") for r in (1, 2))
    out = summary(metrics, evaluate_on_policy(same_heldout, 2))
    return {**out, "teacher_scored_tokens": tokens, "seconds": seconds, "per_round": per_round}


def teacher_forced(reference, student: Path, metrics_path: Path) -> dict:
    """One round's student on the off-policy arm's held-out teacher samples: KL and accuracy."""
    s = evaluate(reference, student_dir=student, metrics_path=metrics_path)["student"]
    return {"kl_teacher_samples": s["kl"], "accuracy": s["accuracy"], "greedy_accuracy": s["greedy_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="data/bench/onpolicy")
    ap.add_argument("--out", default="bench/results/onpolicy.json")
    args = ap.parse_args()

    runs: dict[str, list[dict]] = {"off-policy": [], **{arm: [] for arm in ROUND_LOSSES}}
    for seed in args.seeds:
        root = Path(args.work) / f"seed{seed}"
        runs["off-policy"].append(off_policy(root, args.prompts, args.steps, seed))
        for arm in ROUND_LOSSES:
            runs[arm].append(on_policy(root, args.prompts, args.steps, seed, arm))
        print(f"seed {seed}: " + json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)

    keys = ["accuracy", "greedy_accuracy", "kl_teacher_samples", "reverse_kl_own_samples", "teacher_scored_tokens"]
    print(f"{'arm':<20}" + "".join(f"{k:>26}" for k in keys))
    rows = []
    for arm, rs in runs.items():
        row = {"arm": arm, "runs": rs}
        cells = []
        for k in keys:
            vals = [r[k] for r in rs]
            mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[k] = {"mean": mean, "std": std}
            cells.append(f"{mean:>17.4f} ± {std:<6.4f}" if k != "teacher_scored_tokens" else f"{mean:>26,.0f}")
        rows.append(row)
        print(f"{arm:<20}" + "".join(cells))
    for arm in ROUND_LOSSES:
        for i in range(3):
            cells = {k: statistics.mean(r["per_round"][i][k] for r in runs[arm]) for k in runs[arm][0]["per_round"][i]}
            print(f"{arm}, after round {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in cells.items()))
    per_round = [statistics.median(r["seconds"][i] for r in runs["rounds, reverse KL"]) for i in range(3)]
    print("rounds arm, median seconds per round (generate + train): " + ", ".join(f"{s:.0f}" for s in per_round))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "rows": rows, "round_seconds_median": per_round}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
