"""Does distillation help? CE-only vs CE+forward KL vs CE+reverse KL vs forward KL+tail at k=4 on the demo task.

Every config trains on the same demo dataset (k=4 variant: the first 4 of each sorted top-20, written as a
validated copy) with the same steps, batch, lr and seeds. One full run per (config, seed) writes checkpoints
every `--eval-every` steps (the lr schedule depends on max_steps, so one run gives the whole curve); each checkpoint is
evaluated like `distill eval` on the k=20 held-out split: teacher-forced KL, top-1 agreement, sampled and
greedy task accuracy.

"Steps to reach CE-only's final accuracy" on one run's curve mostly measures that run's lr schedule (the
cosine decays at its end), so the KD configs in `--short-configs` also train runs of their own at
`--short-fraction` of the steps (warmup + cosine over the shorter run, same data and seeds), evaluated at
their end: does KD with 60% of the steps reach what CE-only reaches with all of them?

    .venv/bin/python bench/quality.py [--steps 600] [--seeds 0 1 2] [--eval-every 60] [--eval-prompts 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.core import stable_id  # noqa: E402
from pipeline.dataset.schema import StorageRecord, read_manifest  # noqa: E402
from pipeline.dataset.validate import validate_dataset  # noqa: E402
from pipeline.dataset.writer import commit_shard, write_manifest, write_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> (train overrides, top-k entries the student trains on); the KD configs use the demo's alpha
CONFIGS: dict[str, tuple[list[str], int]] = {
    "ce_only": (["train.alpha=1.0"], 20),
    "ce+fkl": (["train.alpha=0.2", "train.kind=forward_kl"], 20),
    "ce+rkl": (["train.alpha=0.2", "train.kind=reverse_kl"], 20),
    "ce+fkl+tail_k4": (["train.alpha=0.2", "train.kind=forward_kl", "train.tail_bucket=true"], 4),
    # reverse KL with the outside-top-k mass as a bucket: does constraining it fix ce+rkl? (see bench/README.md)
    "ce+rkl+tail": (["train.alpha=0.2", "train.kind=reverse_kl", "train.tail_bucket=true"], 20),
    # the live-teacher families (the teacher runs beside the student in training), each on top of ce+fkl, weight 1
    "ce+fkl+feature": (["train.alpha=0.2", "train.live_teacher=true", "train.feature.weight=1.0"], 20),
    "ce+fkl+attention": (["train.alpha=0.2", "train.live_teacher=true", "train.attention.weight=1.0"], 20),
    "ce+fkl+relation": (["train.alpha=0.2", "train.live_teacher=true", "train.relation.weight=1.0"], 20),
}
LIVE_CONFIGS = ["ce_only", "ce+fkl", "ce+fkl+feature", "ce+fkl+attention", "ce+fkl+relation"]
"""`--configs` for the live-teacher comparison (bench/README.md)."""
BASELINE = "ce_only"


def _topk_prefix(col: pa.ChunkedArray, k: int) -> pa.Array:
    """list<list<x>> with every inner list cut to its first k entries (the top-k of a sorted top-K)."""
    arr = col.combine_chunks()
    inner = pc.list_slice(arr.flatten(), 0, k)
    return pa.ListArray.from_arrays(arr.offsets, inner.cast(arr.type.value_type), type=arr.type)


def write_topk_subset(src: Path, dst: Path, k: int) -> Path:
    """A validated copy of dataset `src` keeping only the first k top-k entries per token."""
    manifest = read_manifest(src)
    if k > manifest.k:
        raise ValueError(f"{src} has k={manifest.k}; cannot keep {k} entries")
    if (dst / "manifest.json").is_file() and read_manifest(dst).k == k and read_manifest(dst).complete:
        validate_dataset(dst)
        return dst
    out = manifest.model_copy(deep=True)
    out.k, out.shards, out.complete = k, [], False
    out.storage = StorageRecord(logprobs_step=0)  # values are copied, not re-rounded
    out.generate_fingerprint = stable_id(manifest.generate_fingerprint, "topk-prefix", k)
    out.config_hash = stable_id(manifest.config_hash, "topk-prefix", k)
    dst.mkdir(parents=True, exist_ok=True)
    write_manifest(dst, out)
    for shard in manifest.shards:
        table = pq.read_table(src / shard.file)
        for name in ("topk_token_ids", "topk_logprobs"):
            table = table.set_column(
                table.schema.get_field_index(name), table.schema.field(name), _topk_prefix(table[name], k)
            )
        out = commit_shard(
            dst,
            out,
            write_shard(
                dst,
                shard.index,
                table,
                prompts=shard.prompts,
                storage=out.storage,
                heldout_fraction=out.heldout_fraction,
            ),
        )
    validate_dataset(dst)
    return dst


def _eval_model(model_dir: Path, cfg, samples, sampling, device, dataset: Path) -> dict:
    """The metrics `pipeline.evaluate.evaluate` computes, on held-out samples already loaded (sampling: the manifest's;
    the teacher-forced ones stream `dataset`'s held-out split as evaluate does)."""
    from pipeline.demo.task import check
    from pipeline.evaluate import heldout_batches, sample_accuracy, teacher_forced
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), device=str(device))
    batches = heldout_batches(
        dataset, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, max_prompts=cfg.eval.max_prompts
    )
    out = teacher_forced(model, (b for b, _ in batches), device, cfg.train.loss_chunk_size)
    first: dict[str, int] = {}
    for i, pid in enumerate(samples.prompt_ids):
        first.setdefault(pid, i)
    idx = list(first.values())
    prompts, tokens = [samples.prompts[i] for i in idx], [samples.prompt_tokens[i] for i in idx]
    kw = dict(max_new_tokens=sampling.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, device=device)
    out["accuracy"] = sample_accuracy(model, tokenizer, prompts, tokens, check, temperature=sampling.temperature, **kw)
    out["greedy_accuracy"] = sample_accuracy(model, tokenizer, prompts, tokens, check, temperature=0.0, **kw)
    return out


def _run_file(job: dict) -> Path:
    """Full-length runs keep their original names (finished ones are reused); short-budget runs name their steps."""
    suffix = f"-steps{job['steps']}" if job.get("short") else ""
    return Path(job["work"]) / "runs" / f"{job['config']}-seed{job['seed']}{suffix}.json"


def _cached(job: dict) -> dict | None:
    """The finished result of an identical job in the work dir (a rerun skips it), else None."""
    path = _run_file(job)
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    same = all(
        run["job"].get(k) == job.get(k) for k in ("config", "seed", "steps", "eval_every", "eval_prompts", "short")
    )
    return run if same else None


def run_one(job: dict) -> dict:
    """Train one (config, seed) with checkpoints every eval_every steps, then evaluate every checkpoint."""
    import torch
    from safetensors.torch import load_model
    from transformers.utils import logging as hf_logging

    from pipeline.dataset.reader import load_samples
    from pipeline.models import build_student, load_tokenizer, resolve_device
    from pipeline.train import train_student

    torch.set_num_threads(job["threads"])
    hf_logging.disable_progress_bar()  # one bar per checkpoint save/load would drown the table
    overrides, _ = CONFIGS[job["config"]]
    n_ckpt = job["steps"] // job["eval_every"] + 1
    cfg = load_config(
        job["config_path"],
        overrides
        + [
            f"train.max_steps={job['steps']}",
            f"train.seed={job['seed']}",
            f"train.checkpoint_every={job['eval_every']}",
            f"train.keep_checkpoints={n_ckpt}",
            f"eval.max_prompts={job['eval_prompts']}",
            "train.device=cpu",
        ],
    )
    student_dir = _run_file(job).with_suffix("")
    t0 = time.perf_counter()
    result = train_student(cfg, dataset_dir=Path(job["train_dataset"]), student_dir=student_dir, progress=False)
    train_s = time.perf_counter() - t0
    device = resolve_device("cpu")
    eval_dataset = Path(job["eval_dataset"])
    heldout = load_samples(eval_dataset, split="heldout", limit_prompts=job["eval_prompts"])
    sampling = read_manifest(Path(job["eval_dataset"])).sampling
    tokenizer = load_tokenizer(str(student_dir))
    points, t1 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(job["eval_every"], job["steps"], job["eval_every"]):
            # an HF dir per checkpoint, so every point goes through the same loading path as `distill eval`
            student = build_student(cfg.student, cfg.teacher.model, seed=job["seed"])
            load_model(student, student_dir / "checkpoints" / f"step-{step:07d}" / "model.safetensors")
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            points.append({"step": step, **_eval_model(Path(tmp), cfg, heldout, sampling, device, eval_dataset)})
    points.append({"step": job["steps"], **_eval_model(student_dir, cfg, heldout, sampling, device, eval_dataset)})
    run = {
        "config": job["config"],
        "seed": job["seed"],
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
        "train_tokens_per_s": result.tokens_per_s,
        "final_loss": result.final_loss,
        "points": points,
        "job": job,
    }
    _run_file(job).write_text(json.dumps(run, indent=2))
    return run


# --- summary ----------------------------------------------------------------------------------------


def curves(runs: list[dict], config: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and a [seeds, steps] array of metric `key` for one config."""
    mine = sorted((r for r in runs if r["config"] == config), key=lambda r: r["seed"])
    steps = np.array([p["step"] for p in mine[0]["points"]])
    return steps, np.array(
        [[p.get(key, np.nan) for p in r["points"]] for r in mine], dtype=float
    )  # nan: not measured then


def first_reach(steps: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """First evaluated step whose value is >= target (None: never)."""
    hit = np.nonzero(values >= target)[0]
    return int(steps[hit[0]]) if len(hit) else None


def summarise(runs: list[dict], total_steps: int) -> dict:
    """Per config: final metrics mean/sd over seeds and steps to reach the CE-only final accuracy; for the
    short-budget runs, their final metrics against that target."""
    short = [r for r in runs if r["job"].get("short")]
    runs = [r for r in runs if not r["job"].get("short")]
    _, base = curves(runs, BASELINE, "accuracy")
    target = float(base[:, -1].mean())
    out = {"target_accuracy": target, "configs": {}, "short": {}}
    for name in CONFIGS:
        mine = [r for r in short if r["config"] == name]
        if not mine:
            continue
        row = {"seeds": len(mine), "steps": mine[0]["job"]["steps"], "fraction": mine[0]["job"]["steps"] / total_steps}
        for key in ("accuracy", "greedy_accuracy", "kl", "top1_agreement", "topk_mass"):
            final = np.array([r["points"][-1][key] for r in sorted(mine, key=lambda r: r["seed"])])
            row[key] = {
                "mean": float(final.mean()),
                "sd": float(final.std(ddof=1)) if len(final) > 1 else None,
                "per_seed": final.tolist(),
            }
        row["reaches_target"] = row["accuracy"]["mean"] >= target
        row["per_seed_reaches_target"] = [a >= target for a in row["accuracy"]["per_seed"]]
        out["short"][name] = row
    for name in CONFIGS:
        if not any(r["config"] == name for r in runs):
            continue
        steps, acc = curves(runs, name, "accuracy")
        row = {"seeds": int(acc.shape[0])}
        for key in ("accuracy", "greedy_accuracy", "kl", "top1_agreement", "topk_mass", "ce"):
            final = curves(runs, name, key)[1][:, -1]
            row[key] = {
                "mean": float(final.mean()),
                "sd": float(final.std(ddof=1)) if len(final) > 1 else None,
                "per_seed": final.tolist(),
            }
        reach = first_reach(steps, acc.mean(0), target)
        row["steps_to_target"] = reach
        row["fraction_to_target"] = None if reach is None else reach / total_steps
        row["per_seed_steps_to_target"] = [first_reach(steps, a, target) for a in acc]
        out["configs"][name] = row
    return out


def format_table(summary: dict, total_steps: int) -> str:
    """Markdown table of the summary."""
    pm = lambda m: f"{m['mean']:.4f} ± " + ("—" if m["sd"] is None else f"{m['sd']:.4f}")
    lines = [
        f"CE-only final sampled accuracy (the target): {summary['target_accuracy']:.4f}; {total_steps} steps; "
        "steps to target = first evaluated step at or above it",
        "",
        "| config | seeds | accuracy (T=1) | greedy accuracy | held-out KL | top-1 agreement | mass on teacher "
        "top-20 | "
        "steps to target (mean curve) | per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in summary["configs"].items():
        reach = (
            "never" if row["steps_to_target"] is None else f"{row['steps_to_target']} ({row['fraction_to_target']:.0%})"
        )
        per = ", ".join("never" if s is None else str(s) for s in row["per_seed_steps_to_target"])
        lines.append(
            f"| {name} | {row['seeds']} | {pm(row['accuracy'])} | {pm(row['greedy_accuracy'])} | {pm(row['kl'])} | "
            f"{pm(row['top1_agreement'])} | {pm(row['topk_mass'])} | {reach} | {per} |"
        )
    if summary.get("short"):
        lines += [
            "",
            "Runs of their own at a fraction of the steps (warmup + cosine over the shorter run), final metrics:",
            "",
            "| config | steps | seeds | accuracy (T=1) | greedy accuracy | held-out KL | top-1 agreement | "
            "reaches CE-only's final accuracy (mean) | per seed |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for name, row in summary["short"].items():
            per = ", ".join("yes" if ok else "no" for ok in row["per_seed_reaches_target"])
            lines.append(
                f"| {name} | {row['steps']} ({row['fraction']:.0%}) | {row['seeds']} | {pm(row['accuracy'])} | "
                f"{pm(row['greedy_accuracy'])} | {pm(row['kl'])} | {pm(row['top1_agreement'])} | "
                f"{'yes' if row['reaches_target'] else 'no'} | {per} |"
            )
    return "\n".join(lines)


def plot(runs: list[dict], summary: dict, teacher_accuracy: float, path: Path) -> None:
    """Sampled accuracy, greedy accuracy and held-out KL against steps: seed mean with a ±sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", "task accuracy (sampled, T=1)"),
        ("greedy_accuracy", "task accuracy (greedy)"),
        ("kl", "held-out KL(teacher top-20 ‖ student)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    runs = [r for r in runs if not r["job"].get("short")]
    for ax, (key, title) in zip(axes, panels):
        for name in summary["configs"]:
            steps, vals = curves(runs, name, key)
            mean, sd = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(vals.shape[1])
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=name)
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        for name, row in summary.get("short", {}).items():  # the short runs' final points, with their sd
            ax.errorbar(
                [row["steps"]],
                [row[key]["mean"]],
                yerr=[row[key]["sd"] or 0.0],
                fmt="*",
                ms=10,
                capsize=3,
                label=f"{name}, own {row['steps']}-step run",
            )
        if key == "accuracy":
            ax.axhline(summary["target_accuracy"], color="grey", ls="--", lw=1, label="CE-only final")
            ax.axhline(teacher_accuracy, color="black", ls=":", lw=1, label="teacher")
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "runs" / "demo" / "dataset"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=60, help="60 of 600 puts the target's 60%% mark on the grid")
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument(
        "--short-configs",
        nargs="*",
        default=["ce+fkl", "ce+fkl+tail_k4"],
        choices=list(CONFIGS),
        help="configs that also train runs of their own at --short-fraction of the steps",
    )
    ap.add_argument("--short-fraction", type=float, default=0.6)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, each with cores/workers threads")
    ap.add_argument("--work-dir", default=None, help="students and the k=4 dataset (default: a temporary dir)")
    ap.add_argument(
        "--summarise-only",
        action="store_true",
        help="no training: table, JSON and PNG from the runs already finished in --work-dir",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--tag", default="", help="results go to quality-TAG.json/png (another step budget beside the default)"
    )
    args = ap.parse_args()
    if args.summarise_only and args.work_dir is None:
        raise SystemExit("--summarise-only needs --work-dir (where the finished runs are)")
    if BASELINE not in args.configs:
        raise SystemExit(f"--configs must include {BASELINE} (the target comes from it)")
    if args.eval_every < 1 or args.steps < args.eval_every:
        raise SystemExit("--eval-every must be between 1 and --steps")
    os.chdir(ROOT)  # the config's relative paths (teacher model) resolve from the project root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = Path(args.dataset).resolve()
    tmp = tempfile.TemporaryDirectory(prefix="quality-") if args.work_dir is None else None
    work = Path(args.work_dir or tmp.name).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    datasets = {
        k: (dataset if k == read_manifest(dataset).k else write_topk_subset(dataset, work / f"dataset-k{k}", k))
        for k in {CONFIGS[c][1] for c in args.configs}
    }
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [
        {
            "config": c,
            "seed": s,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "eval_prompts": args.eval_prompts,
            "config_path": str(Path(args.config).resolve()),
            "train_dataset": str(datasets[CONFIGS[c][1]]),
            "eval_dataset": str(dataset),
            "work": str(work),
            "threads": threads,
        }
        for s in args.seeds
        for c in args.configs
    ]
    short_steps = round(args.short_fraction * args.steps)
    if args.short_configs and not 0 < short_steps < args.steps:
        raise SystemExit("--short-fraction must leave between 1 and --steps - 1 steps")
    jobs += [
        job | {"steps": short_steps, "eval_every": short_steps, "short": True}  # evaluated at its end only
        for job in jobs
        if job["config"] in args.short_configs
    ]
    runs = [r for r in map(_cached, jobs) if r is not None]
    todo = [] if args.summarise_only else [j for j in jobs if _cached(j) is None]
    print(f"{len(runs)} runs already finished in {work}, {len(todo)} to do", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for run in pool.map(run_one, todo):
            fin = run["points"][-1]
            print(
                f"{run['config']:>16} seed {run['seed']}: acc {fin['accuracy']:.4f} greedy "
                f"{fin['greedy_accuracy']:.4f} "
                f"kl {fin['kl']:.4f} (train {run['train_seconds']:.0f}s, eval {run['eval_seconds']:.0f}s)",
                flush=True,
            )
            runs.append(run)
    if not any(r["config"] == BASELINE for r in runs):
        raise SystemExit(f"no finished {BASELINE} run in {work}: nothing to compare against")
    _backfill_final_topk_mass(runs, dataset, args.eval_prompts)
    summary = summarise(runs, args.steps)
    from pipeline.dataset.reader import load_samples
    from pipeline.demo.task import check

    held = load_samples(dataset, split="heldout", limit_prompts=args.eval_prompts)
    teacher_acc = float(np.mean([check(p, c) for p, c in zip(held.prompts, _decode(held, args.config))]))
    table = format_table(summary, args.steps)
    print()
    print(
        f"teacher accuracy on the same {len(set(held.prompt_ids))} held-out prompts (its own samples): "
        f"{teacher_acc:.4f}"
    )
    print(table)
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "seconds": time.time() - start,
        "args": {k: v for k, v in vars(args).items() if k != "work_dir"},
        "workers": args.workers,
        "threads": threads,
        "configs": {c: {"overrides": CONFIGS[c][0], "k": CONFIGS[c][1]} for c in args.configs},
        "teacher_accuracy": teacher_acc,
        "heldout_prompts": len(set(held.prompt_ids)),
    }
    stem = out_dir / ("quality-" + args.tag if args.tag else "quality")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    plot(runs, summary, teacher_acc, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')} in {time.time() - start:.0f}s")
    if tmp is not None:
        tmp.cleanup()


def _backfill_final_topk_mass(runs: list[dict], dataset: Path, eval_prompts: int) -> None:
    """Runs finished before `topk_mass` was an evaluation metric get it for their final student (saved in the run
    file)."""
    missing = [r for r in runs if "topk_mass" not in r["points"][-1]]
    if not missing:
        return
    import torch

    from pipeline.evaluate import heldout_batches, teacher_forced
    from pipeline.models import load_causal_lm, load_tokenizer

    for run in missing:
        student_dir = _run_file(run["job"]).with_suffix("")
        tok = load_tokenizer(str(student_dir))
        held = heldout_batches(dataset, batch_size=64, pad_id=tok.pad_token_id, max_prompts=eval_prompts)
        tf = teacher_forced(
            load_causal_lm(str(student_dir), device="cpu"), (b for b, _ in held), torch.device("cpu"), chunk_size=4096
        )
        run["points"][-1]["topk_mass"] = tf["topk_mass"]
        _run_file(run["job"]).write_text(json.dumps(run, indent=2))


def _decode(samples, config_path: str) -> list[str]:
    """The teacher's own completions as text, decoded with the teacher's tokenizer."""
    from pipeline.models import load_tokenizer

    cfg = load_config(config_path)
    tok = load_tokenizer(cfg.teacher.model)
    return tok.batch_decode([list(map(int, c)) for c in samples.completion_tokens], skip_special_tokens=True)


if __name__ == "__main__":
    main()
