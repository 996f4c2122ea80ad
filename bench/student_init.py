"""Student initialisation: the demo's randomly initialised shrunk student vs the same architecture cut from the teacher.

    python bench/student_init.py --dataset /path/to/runs/demo/dataset [--steps 2000] [--every 100] [--rows ...]

Rows (configs/demo.yaml's training settings unless a row says otherwise; the demo's dataset, read only):
- `random`: the demo's student, `student.shrink` (hidden 64, 2 heads of 32, MLP 256, all 4 layers), random init;
- `from_teacher`: `student.from_teacher` with the same sizes (all 4 layers narrowed to hidden 64, 2 heads, MLP 256):
  the same architecture and parameter count, only the initial weights differ. The fair pair;
- `from_teacher lr 3e-4`: the same cut at a tenth of the demo's peak learning rate (a trained start may want less);
- `every_other`: DistilBERT's cut, teacher layers 0 and 2 at full width (about twice the parameters: not a pair).
Every `--every` steps a checkpoint is kept; each is scored on the held-out split (teacher-forced KL of the teacher's
top-k against the student, top-1 agreement), as is the initial student (step 0). The final students also get
`pipeline.evaluate` (task accuracy). Last, the untrained narrowed cut is scored with its channels, heads and
neurons picked by weight norm and, as a control, simply the first ones. Prints a table and writes
bench/results/student_init.json (`--tag`: student_init-<tag>.json; `--merge` joins such files).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.checkpoint import Checkpoint, _step_dirs, read_weights  # noqa: E402
from pipeline.compat import tied_names  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import evaluate, heldout_batches, teacher_forced  # noqa: E402
from pipeline.models import build_student, load_causal_lm, load_tokenizer  # noqa: E402
from pipeline.train import train_student  # noqa: E402

SIZES = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 256}
ROWS = {
    "random": ({"shrink": {**SIZES, "head_dim": 32}}, {}),
    "from_teacher": ({"from_teacher": SIZES}, {}),
    "from_teacher lr 3e-4": ({"from_teacher": SIZES}, {"lr": 3e-4}),
    "every_other": ({"from_teacher": {"layers": "every_other"}}, {}),
}


def run_row(name: str, args, out: Path, batches) -> dict:
    student, train = ROWS[name]
    sets = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.every}", "train.keep_checkpoints=1000"]
    sets += [f"train.{k}={v}" for k, v in train.items()] + ["eval.max_prompts=2000", "train.device=cpu"]
    cfg = load_config("configs/demo.yaml", sets)
    cfg = cfg.model_copy(update={"student": type(cfg.student).model_validate(student)})
    student_dir = out / name.replace(" ", "_")

    def score(model) -> dict:
        m = teacher_forced(model.eval(), batches, torch.device("cpu"), cfg.train.loss_chunk_size)
        return {"kl": m["kl"], "top1_agreement": m["top1_agreement"]}

    model = build_student(cfg.student, cfg.teacher.model, seed=cfg.train.seed)
    curve = [{"step": 0, **score(model)}]
    t0 = time.perf_counter()
    train_student(cfg, dataset_dir=args.dataset, student_dir=student_dir, progress=False)
    seconds = time.perf_counter() - t0
    tied = tied_names(model)
    for path in _step_dirs(student_dir / "checkpoints"):  # every kept checkpoint
        step = int(path.name.split("-")[1])
        model.load_state_dict(read_weights(Checkpoint(path, step, {}), tied))
        curve.append({"step": step, **score(model)})
    model.load_state_dict(load_causal_lm(str(student_dir), device="cpu").state_dict())  # the final student
    curve = sorted(curve, key=lambda p: p["step"]) + [{"step": args.steps, **score(model)}]
    final = evaluate(cfg, dataset_dir=args.dataset, student_dir=student_dir, metrics_path=student_dir / "metrics.json")
    s = final["student"]
    print(f"{name}: {seconds:.0f} s, final kl {s['kl']:.4f}", flush=True)
    return {
        "params": final["student_params"],
        "train_seconds": seconds,
        "lr": cfg.train.lr,
        "curve": curve,
        "final": {k: s[k] for k in ("kl", "kl_uncertain", "kl_deterministic", "top1_agreement", "accuracy")}
        | {"greedy_accuracy": s["greedy_accuracy"]},
    }


def ranking_ablation(batches) -> dict:
    """Held-out KL of the untrained narrowed cut: channels/heads/neurons by weight norm vs simply the first ones."""
    from pipeline import prune
    from pipeline.config import StudentConfig

    cfg = StudentConfig(from_teacher=SIZES)
    out = {}
    norm_top = prune._top
    for name, top in (("weight norm", norm_top), ("first indices", lambda score, k: torch.arange(k))):
        prune._top = top
        try:
            model = build_student(cfg, "data/models/demo-teacher", seed=0)
        finally:
            prune._top = norm_top
        out[name] = teacher_forced(model.eval(), batches, torch.device("cpu"), 1024)["kl"]
    return out


THRESHOLDS = (0.1, 0.03)
"""Held-out KLs whose first crossing the table also shows (early training, mid training)."""


def steps_to(curve: list[dict], target: float) -> int | None:
    """The first scored step whose held-out KL is at most `target` (None: never)."""
    return next((p["step"] for p in curve if p["kl"] <= target), None)


def table(results: dict, settings: dict) -> None:
    """Print the rows; the target is the random student's final held-out KL."""
    target = results["random"]["curve"][-1]["kl"] if "random" in results else None
    print(f"\n{settings['steps']} steps, scored every {settings['every']}; target: the random student's final KL")
    cols = [f"steps to KL <= {t:g}" for t in THRESHOLDS] + ["steps to random's final KL"]
    print(f"| row | params | lr | KL at step 0 | {' | '.join(cols)} | final KL | top-1 | accuracy | greedy |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols) + "---:|---:|---:|---:|")
    for name, r in results.items():
        reach = [steps_to(r["curve"], t) for t in (*THRESHOLDS, target) if t is not None]
        r["steps_to"] = dict(zip([*map(str, THRESHOLDS), "random_final"], reach, strict=False))
        f = r["final"]
        cells = " | ".join("never" if s is None else str(s) for s in reach)
        print(
            f"| {name} | {r['params']:,} | {r['lr']:g} | {r['curve'][0]['kl']:.3f} | {cells} | {f['kl']:.4f} | "
            f"{f['top1_agreement']:.3f} | {f['accuracy']:.3f} | {f['greedy_accuracy']:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=Path("data/runs/demo/dataset"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/student_init"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=["random", "from_teacher"], choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a loaded machine, 1 is fastest)")
    ap.add_argument("--tag", default="", help="write results/student_init-<tag>.json (to run rows side by side)")
    ap.add_argument("--merge", nargs="+", type=Path, help="only merge these result files into student_init.json")
    args = ap.parse_args()
    results_dir = Path(__file__).parent / "results"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer("data/models/demo-teacher")
    batches = heldout_batches(args.dataset, batch_size=512, pad_id=tok.pad_token_id, max_prompts=2000)
    batches = [b for b, _ in batches]
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        results = {name: row for part in parts for name, row in part["rows"].items()}
        settings = parts[0]["settings"]
    else:
        results = {name: run_row(name, args, args.out, batches) for name in args.rows}
        settings = {"steps": args.steps, "every": args.every, "config": "configs/demo.yaml"}
        settings |= {"dataset": str(args.dataset), "heldout_prompts_scored": 2000, "threads": args.threads}
    table(results, settings)
    ablation = ranking_ablation(batches)
    print("untrained from_teacher cut, held-out KL:", ", ".join(f"{k} {v:.3f}" for k, v in ablation.items()))
    path = results_dir / f"student_init{'-' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "rows": results, "ranking_ablation": ablation}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
