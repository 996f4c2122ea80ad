"""On-policy rounds (`rounds` > 1): the student samples, the teacher scores, the student learns again.

Round 0 is the run's own stages (teacher samples -> student). Round r >= 1 lives under
`<output_dir>/rounds/<r>/`:

    prompts.jsonl   a share of the training prompts (`on_policy.share`), drawn per round, the same on a rerun
    samples/        the previous round's student's completions: a sampled dataset, of which only the tokens count
    pairs.jsonl     those completions as token ids beside their prompts
    dataset/        the teacher's top-k along them (`generate.mode: rescore`); its manifest names the student
    student/        the student, trained on from the previous round's on this round's (and earlier) data
    round.json      the fingerprint of the finished student: a rerun with the same inputs does not retrain it
    metrics.json    evaluation as in round 0, plus the on-policy metrics (below)

Each step is one library call that is already cached and resumable (a complete dataset is not regenerated, a
killed training run resumes from its checkpoint), so a rerun after a kill in any round picks up where it
stopped. The student is served by the same backend code as the teacher (a managed vLLM server of the teacher's
environment, or transformers in process when the teacher is `hf`).

On-policy metrics (`evaluate_on_policy`) sample the student on the held-out prompts and have the teacher score
those samples: task accuracy, and the per-token reverse KL, the mean of log p_student - log p_teacher over the
student's own tokens (a Monte Carlo estimate of KL(student || teacher) when the student samples at T = 1).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, latest_checkpoint
from pipeline.config import GenerateConfig, HFTeacherConfig, MixConfig, RunConfig, StudentConfig
from pipeline.core import atomic_write_bytes, is_heldout, path_fingerprint, stable_id
from pipeline.dataset.schema import MANIFEST, read_manifest
from pipeline.evaluate import evaluate
from pipeline.generate import GenerateResult, generate_dataset, generate_key
from pipeline.models import load_tokenizer
from pipeline.shards import load_prompts
from pipeline.train import TrainResult, lr_at, train_student


@dataclass
class RoundResult:
    """What one round did: its datasets, its student, and its metrics."""

    round: int
    samples: GenerateResult | None
    dataset: GenerateResult | None
    train: TrainResult | None
    trained: bool
    """False when a finished student with the same inputs was kept."""
    metrics: dict | None


def round_dir(cfg: RunConfig, r: int) -> Path:
    return Path(cfg.output_dir) / "rounds" / str(r)


def student_of(cfg: RunConfig, r: int) -> Path:
    """Round r's student directory (round 0: the run's own student)."""
    return cfg.student_dir if r == 0 else round_dir(cfg, r) / "student"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return path


def _drawn(r: int, pid: str, share: float) -> bool:
    return int(stable_id("round", r, pid)[:8], 16) / 0x100000000 < share


def round_prompts(cfg: RunConfig, r: int, out: Path, *, heldout: bool) -> Path:
    """Write the prompts the student samples in round r, as the source gave them: a share of the training
    prompts, or (`heldout`) the first `eval.max_prompts` held-out ones (evaluation)."""
    _, prompts = load_prompts(cfg)
    frac, field = cfg.prompts.heldout_fraction, cfg.prompts.field
    rows = []
    for pid, item in zip(prompts.ids, prompts.items, strict=True):
        if heldout and is_heldout(pid, frac) and len(rows) < cfg.eval.max_prompts:
            rows.append({field: item})
        elif not heldout and not is_heldout(pid, frac) and _drawn(r, pid, cfg.on_policy.share):
            rows.append({field: item})
    return _write_jsonl(out, rows)


def _served(cfg: RunConfig, model: Path):
    """The teacher's backend settings, serving `model` instead (a managed server of its own, or in process)."""
    t = cfg.teacher
    if t.backend == "hf":
        return HFTeacherConfig(model=str(model), dtype=t.dtype, device=t.device, batch_size=t.batch_size)
    update = {"model": str(model), "revision": None, "url": None, "urls": [], "num_servers": 1}
    update |= {"served_model_name": None, "api_key_env": None, "tensor_parallel_size": 1}
    return t.model_copy(update={k: v for k, v in update.items() if k in type(t).model_fields})


def sample_config(cfg: RunConfig, student: Path, prompts_path: Path, out: Path, seed: int, n: int) -> RunConfig:
    """The generate config with which `student` samples `n` completions of each prompt at `prompts_path` into
    `out`/dataset."""
    op = cfg.on_policy
    return cfg.model_copy(
        update={
            "output_dir": str(out),
            "teacher": _served(cfg, student),
            "prompts": cfg.prompts.model_copy(update={"path": str(prompts_path), "limit": None}),
            "generate": GenerateConfig(
                k=1,  # only the sampled tokens (and their logprobs) are used
                n=n,
                temperature=op.temperature,
                max_new_tokens=op.max_new_tokens or cfg.generate.max_new_tokens,
                seed=seed,
                shard_size=cfg.generate.shard_size,
            ),
        }
    )


def write_pairs(cfg: RunConfig, samples: Path, out: Path) -> Path:
    """The sampled dataset's completions as token ids beside their prompts (as the source gave them)."""
    _, prompts = load_prompts(cfg)
    item = dict(zip(prompts.ids, prompts.items, strict=True))
    manifest = read_manifest(samples)
    rows = []
    for shard in manifest.shards:
        table = pq.read_table(samples / shard.file, columns=["prompt_id", "completion_token_ids"])
        for pid, ids in zip(table["prompt_id"].to_pylist(), table["completion_token_ids"].to_pylist(), strict=True):
            rows.append({cfg.prompts.field: item[pid], "completion": ids})
    return _write_jsonl(out, rows)


def rescore_config(cfg: RunConfig, pairs: Path, out: Path, made_by: str, seed: int) -> RunConfig:
    """The generate config with which the teacher scores the completions in `pairs` into `out`/dataset (`seed`:
    the sampling run's, so each scored row keeps its sample's id)."""
    return cfg.model_copy(
        update={
            "output_dir": str(out),
            "prompts": cfg.prompts.model_copy(
                update={"path": str(pairs), "limit": None, "completion_field": "completion", "completions_by": made_by}
            ),
            "generate": cfg.generate.model_copy(update={"mode": "rescore", "n": 1, "seed": seed}),
        }
    )


def student_label(student: Path) -> str:
    """A student checkpoint as a manifest records it: its path and content fingerprint."""
    return f"{student} ({path_fingerprint(str(student))})"


def _generate_derived(rcfg: RunConfig) -> GenerateResult:
    """generate_dataset for a round's own data: a dataset left by other inputs (an earlier student, say) is
    derived data of this run, so it is replaced rather than refused."""
    if (rcfg.dataset_dir / MANIFEST).is_file() and read_manifest(rcfg.dataset_dir).generate_fingerprint != generate_key(
        rcfg
    ):
        shutil.rmtree(rcfg.dataset_dir)
    return generate_dataset(rcfg, progress=False)


def score_student_samples(cfg: RunConfig, student: Path, work: Path, *, r: int, heldout: bool):
    """The student samples the round's prompts, the teacher scores them: (samples result, scored result)."""
    prompts = round_prompts(cfg, r, work / "prompts.jsonl", heldout=heldout)
    seed = cfg.generate.seed + r
    n = 1 if heldout else cfg.on_policy.n  # evaluation: one sample per prompt, as the accuracy counts them
    sampled = _generate_derived(sample_config(cfg, student, prompts, work / "samples", seed=seed, n=n))
    pairs = write_pairs(cfg, Path(sampled.dataset_dir), work / "pairs.jsonl")
    scored = _generate_derived(rescore_config(cfg, pairs, work, student_label(student), seed))
    return sampled, scored


def round_lr(cfg: RunConfig) -> float:
    """A round's peak lr: `on_policy.lr`, or where round 0's warmup + cosine ended (a round starts warm)."""
    return cfg.on_policy.lr if cfg.on_policy.lr is not None else lr_at(cfg.train.max_steps, cfg.train)


def round_train_config(cfg: RunConfig, r: int) -> RunConfig:
    """Round r's training: from round r-1's student, on the round's dataset and the earlier ones."""
    op = cfg.on_policy
    own = round_dir(cfg, r) / "dataset"
    earlier = {"all": range(r), "teacher": range(1), "none": range(0)}[op.earlier]
    mix = [{"path": str(own), "repeat": op.repeat - 1}] if op.repeat > 1 else []
    mix += [{"path": str(cfg.dataset_dir if e == 0 else round_dir(cfg, e) / "dataset"), "repeat": 1} for e in earlier]
    train = cfg.train.model_copy(
        update={
            "max_steps": op.steps,
            "kind": op.kind,
            "tail_bucket": op.tail_bucket,
            "alpha": op.alpha,
            "lr": round_lr(cfg),
            "warmup_steps": min(cfg.train.warmup_steps, op.steps // 10),
            "mix": [MixConfig(**m) for m in mix],
            "seed": cfg.train.seed + r,
        }
    )
    student = StudentConfig(model=str(student_of(cfg, r - 1)))
    return cfg.model_copy(update={"output_dir": str(round_dir(cfg, r)), "student": student, "train": train})


def _round_fingerprint(rcfg: RunConfig) -> str:
    datasets = [rcfg.dataset_dir] + [Path(m.path) for m in rcfg.train.mix]
    return stable_id(
        rcfg.train_fingerprint(),
        path_fingerprint(str(rcfg.student.model)),
        *(read_manifest(d).generate_fingerprint for d in datasets),
    )


def train_round(cfg: RunConfig, r: int, *, progress: bool = False) -> tuple[TrainResult | None, bool]:
    """Train round r's student unless a finished one with the same inputs is there; (result, trained)."""
    rcfg = round_train_config(cfg, r)
    marker = round_dir(cfg, r) / "round.json"
    fingerprint = _round_fingerprint(rcfg)
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return None, False
    # a round killed mid-training resumes from its checkpoint; checkpoints of other inputs are replaced
    resume = latest_checkpoint(checkpoint_root(rcfg.student_dir)) is not None
    try:
        result = train_student(rcfg, progress=progress, resume=resume)
    except CheckpointMismatchError:
        result = train_student(rcfg, progress=progress, resume=False)
    atomic_write_bytes(marker, json.dumps({"fingerprint": fingerprint, "student": result.student_dir}).encode())
    return result, True


def evaluate_on_policy(cfg: RunConfig, r: int) -> dict:
    """Round r's student sampled on held-out prompts and scored by the teacher: accuracy, per-token reverse KL."""
    student = student_of(cfg, r)
    work = round_dir(cfg, r) / "eval"
    _, scored = score_student_samples(cfg, student, work, r=r, heldout=True)
    samples = work / "samples" / "dataset"
    own = _column_by_sample(samples, ["prompt", "completion_token_ids", "token_logprobs"])
    teacher = _column_by_sample(Path(scored.dataset_dir), ["token_logprobs"])
    if own.keys() != teacher.keys():
        raise RuntimeError(f"{work}: the teacher scored other samples than the student wrote")
    gap = np.concatenate([own[s]["token_logprobs"] - teacher[s]["token_logprobs"] for s in own])
    out = {"reverse_kl": float(gap.mean()), "samples": len(teacher), "tokens": int(len(gap))}
    if cfg.eval.task == "demo":
        from pipeline.demo.task import check

        tok = load_tokenizer(str(student))
        texts = {s: tok.decode(v["completion_token_ids"], skip_special_tokens=True) for s, v in own.items()}
        out["accuracy"] = float(np.mean([check(own[s]["prompt"], texts[s]) for s in own]))
    return out


def _column_by_sample(dataset: Path, columns: list[str]) -> dict[str, dict]:
    manifest = read_manifest(dataset)
    rows: dict[str, dict] = {}
    for shard in manifest.shards:
        table = pq.read_table(dataset / shard.file, columns=["sample_id", *columns])
        for row in table.to_pylist():
            rows[row.pop("sample_id")] = {
                k: np.asarray(v, np.float64) if k == "token_logprobs" else v for k, v in row.items()
            }
    return rows


def evaluate_round(cfg: RunConfig, r: int) -> dict:
    """Round r's metrics.json: the usual held-out evaluation against the teacher's samples, plus `on_policy`."""
    metrics_path = Path(cfg.output_dir) / "metrics.json" if r == 0 else round_dir(cfg, r) / "metrics.json"
    metrics = evaluate(cfg, student_dir=student_of(cfg, r), metrics_path=metrics_path)
    metrics["round"] = r
    metrics["on_policy"] = evaluate_on_policy(cfg, r)
    text = json.dumps(metrics, indent=2)
    metrics_path.write_text(text)
    (student_of(cfg, r) / "metrics.json").write_text(text)
    return metrics


def run_round(cfg: RunConfig, r: int, stages: list[str], *, progress: bool = False) -> RoundResult:
    """One later round (r >= 1): sample + score (`generate`), train, evaluate, as far as `stages` asks."""
    samples = dataset = train = metrics = None
    trained = False
    if "generate" in stages:
        samples, dataset = score_student_samples(cfg, student_of(cfg, r - 1), round_dir(cfg, r), r=r, heldout=False)
    if "train" in stages:
        train, trained = train_round(cfg, r, progress=progress)
    if "eval" in stages:
        metrics = evaluate_round(cfg, r)
    return RoundResult(r, samples, dataset, train, trained, metrics)
