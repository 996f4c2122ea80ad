"""Why a round made a warm student worse: round 1 retrained from the same student on the same data, one setting
changed at a time.

    python bench/round_settings.py [--run data/bench/warm] [variant ...]

`--run` is a finished `configs/demo-rounds.yaml` run (or a copy: `dataset/`, `student/`, `rounds/1/dataset/`):
its round-0 student (600 steps, warm) and its round-1 dataset (that student's samples, scored by the teacher)
are fixed; each variant trains round 1's 300 steps from them with one setting changed (lr, divergence, alpha,
earlier data), or continues off-policy on the teacher's samples only (the control). Each is evaluated on the
run's held-out teacher samples (KL, top-1, accuracy sampled at T=1 and greedy); `--on-policy` also has the
teacher score the variant's own held-out samples (transformers backend; slow on CPU). Variants are cached
under `<run>/var/<name>`. Prints a table and writes bench/results/round_settings.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import HFTeacherConfig, MixConfig, load_config  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.rounds import evaluate_on_policy, round_train_config  # noqa: E402
from pipeline.train import train_student  # noqa: E402

FKL = {"kind": "forward_kl"}
OFF = {"kind": "forward_kl", "alpha": 0.2, "tail_bucket": False}  # round 0's own loss
VARIANTS: dict[str, tuple[dict, str, str | None]] = {
    # name: (train settings over the round defaults, the round's dataset, mix: None = own + earlier)
    "reverse KL, lr 3e-3 (old default: round 0's peak)": ({"lr": 3e-3}, "own", None),
    "reverse KL, lr 1e-3": ({"lr": 1e-3}, "own", None),
    "reverse KL, lr 3e-4 (new default: round 0's last lr)": ({"lr": 3e-4}, "own", None),
    "forward KL, lr 3e-3": ({**FKL, "lr": 3e-3}, "own", None),
    "forward KL, lr 3e-4": ({**FKL, "lr": 3e-4}, "own", None),
    "forward KL, alpha 0.2, lr 3e-4": ({**FKL, "alpha": 0.2, "lr": 3e-4}, "own", None),
    "reverse KL, lr 3e-4, earlier: none": ({"lr": 3e-4}, "own", "none"),
    "forward KL, lr 3e-4, earlier: none": ({**FKL, "lr": 3e-4}, "own", "none"),
    "reverse KL, lr 3e-4, own data x2": ({"lr": 3e-4}, "own", "x2"),
    "off-policy only (teacher samples), lr 3e-3": ({**OFF, "lr": 3e-3}, "teacher", "none"),
    "off-policy only (teacher samples), lr 3e-4": ({**OFF, "lr": 3e-4}, "teacher", "none"),
}
DIRS = {  # the work directory names of the variants (short, stable)
    "reverse KL, lr 3e-3 (old default: round 0's peak)": "default",
    "reverse KL, lr 1e-3": "rkl_lr1e-3",
    "reverse KL, lr 3e-4 (new default: round 0's last lr)": "lr3e-4",
    "forward KL, lr 3e-3": "fkl_lr3e-3",
    "forward KL, lr 3e-4": "fkl_lr3e-4",
    "forward KL, alpha 0.2, lr 3e-4": "fkl_a0.2_lr3e-4",
    "reverse KL, lr 3e-4, earlier: none": "rkl_none_lr3e-4",
    "forward KL, lr 3e-4, earlier: none": "fkl_none_lr3e-4",
    "reverse KL, lr 3e-4, own data x2": "rkl_repeat2_lr3e-4",
    "off-policy only (teacher samples), lr 3e-3": "offpolicy_cont_lr3e-3",
    "off-policy only (teacher samples), lr 3e-4": "offpolicy_cont_lr3e-4",
}


def train_variant(run: Path, name: str) -> dict:
    """Round 1's training with the variant's settings, evaluated on the run's held-out teacher samples."""
    out = run / "var" / DIRS[name]
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    base = load_config("configs/demo-rounds.yaml", [f"output_dir={run}"])
    update, data, mix = VARIANTS[name]
    own, teacher = run / "rounds/1/dataset", run / "dataset"
    rcfg = round_train_config(base, 1)
    update = dict(update)
    if mix == "none":
        update["mix"] = []
    elif mix == "x2":
        update["mix"] = [MixConfig(path=str(own)), MixConfig(path=str(teacher))]
    rcfg = rcfg.model_copy(update={"train": rcfg.train.model_copy(update=update)})
    t0 = time.perf_counter()
    train_student(rcfg, dataset_dir=own if data == "own" else teacher, student_dir=out / "student", progress=False)
    seconds = time.perf_counter() - t0
    metrics = evaluate(base, student_dir=out / "student", metrics_path=out / "metrics.json")
    metrics["train_seconds"] = seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def round0(run: Path) -> dict:
    """The starting point: the run's round-0 student, evaluated the same way."""
    out = run / "var" / "round0"
    if not (out / "metrics.json").is_file():
        shutil.copytree(run / "student", out / "student", ignore=shutil.ignore_patterns("checkpoints"))
        base = load_config("configs/demo-rounds.yaml", [f"output_dir={run}"])
        evaluate(base, student_dir=out / "student", metrics_path=out / "metrics.json")
    return json.loads((out / "metrics.json").read_text())


def on_policy(run: Path, work: str) -> dict | None:
    """The teacher's per-token reverse KL and the accuracy on the variant's own held-out samples (cached)."""
    out = run / "var" / work
    path = out / "onpolicy.json"
    if not path.is_file():
        base = load_config("configs/demo-rounds.yaml", [f"output_dir={out}"])
        hf = HFTeacherConfig(model=base.teacher.model, batch_size=256)
        path.write_text(json.dumps(evaluate_on_policy(base.model_copy(update={"teacher": hf}), 0)))
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="names from VARIANTS (default: all)")
    ap.add_argument("--run", default="data/bench/warm")
    ap.add_argument("--on-policy", action="store_true", help="also the teacher's scores of the student's samples")
    ap.add_argument("--out", default="bench/results/round_settings.json")
    args = ap.parse_args()
    run = Path(args.run)
    rows = {"round 0 (the start)": (round0(run), "round0")}
    rows |= {name: (train_variant(run, name), DIRS[name]) for name in args.variants or VARIANTS}
    table = []
    print(f"{'round 1 setting':<54}{'KL':>8}{'top-1':>8}{'acc':>8}{'greedy':>8}{'own rKL':>9}{'own acc':>9}")
    for name, (m, work) in rows.items():
        s = m["student"]
        op = on_policy(run, work) if args.on_policy or (run / "var" / work / "onpolicy.json").is_file() else None
        row = {
            "setting": name,
            "kl_teacher_samples": s["kl"],
            "top1_agreement": s["top1_agreement"],
            "accuracy": s["accuracy"],
            "greedy_accuracy": s["greedy_accuracy"],
            "reverse_kl_own_samples": op and op["reverse_kl"],
            "accuracy_own_samples": op and op.get("accuracy"),
        }
        table.append(row)
        own = f"{op['reverse_kl']:>9.4f}{op['accuracy']:>9.3f}" if op else f"{'':>18}"
        print(
            f"{name:<54}{s['kl']:>8.4f}{s['top1_agreement']:>8.4f}{s['accuracy']:>8.3f}{s['greedy_accuracy']:>8.3f}{own}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
