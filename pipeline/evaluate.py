"""Held-out evaluation: how close the student is to the teacher, and (for tasks with exact answers) accuracy.

Teacher-forced metrics run on the teacher's own held-out samples (prompt ids never used in training), streamed
through the training reader and collate (`TrainStream.in_order`: file order, unshuffled, the first
`eval.max_prompts` prompts) with the LM head run in chunks of `train.loss_chunk_size` (`losses.map_head_chunks`):
KL(teacher top-k || student), top-1 agreement, CE on the sampled tokens. Positions are also split into
`uncertain` and `deterministic`, where distillation matters differently: kl_uncertain / kl_deterministic split on
the teacher entropy over k+1 buckets (top-k + tail, `dataset.stats.topk_entropy`, what `distill inspect` shows)
above UNCERTAIN_NATS; before the one-reader refactor they split on the entropy of the renormalised top-k.
Task accuracy samples the student at the dataset's temperature, the teacher's own setting. On a re-scored
dataset (`generate.mode: rescore`) the reference samples are the given completions, scored by the teacher: the
`teacher` row then describes them (`reference` in metrics.json says which).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import benchmarks
from pipeline.config import RunConfig
from pipeline.dataset.batch import Batch
from pipeline.dataset.schema import DatasetError, read_manifest
from pipeline.dataset.stats import topk_entropy
from pipeline.dataset.stream import TrainStream
from pipeline.losses import fold_out_of_vocab, map_head_chunks, topk_divergence
from pipeline.models import load_causal_lm, load_tokenizer, output_head, resolve_device
from pipeline.trackers import log_eval

UNCERTAIN_NATS = 0.3  # teacher entropy (k+1 buckets) above this marks a position with several plausible tokens
EVAL_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "completion_token_ids", "token_logprobs"]
_PER_POSITION = ("kl", "agree", "ce", "entropy", "mass")


def _checker(task: str):
    if task == "demo":
        from pipeline.demo.task import check

        return check
    return None


def heldout_batches(
    dataset_dir: Path, *, batch_size: int, pad_id: int, max_prompts: int, columns: list[str] | None = None
) -> Iterator[tuple[Batch, pa.Table]]:
    """The held-out split's first `max_prompts` prompts in file order, as training collates them, with `columns`."""
    stream = TrainStream(dataset_dir, split="heldout", batch_size=batch_size, pad_id=pad_id)
    return stream.in_order(columns or [], limit_prompts=max_prompts)


def _position_metrics(model, batch: Batch, chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-position KL, top-1 agreement, CE, mass on the teacher's top-k and teacher entropy of one batch (on CPU)."""
    trunk = getattr(model, model.base_model_prefix)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    batch = batch.within_vocab(model.get_output_embeddings().out_features, pad if isinstance(pad, int) else 0)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[batch.loss_mask]

    def chunk(logits, labels, teacher_ids, teacher_lp):
        logits = logits.float()
        # ids the student lacks (a larger teacher embedding) count as missing entries; sampled ones get no CE (0)
        ids, lp = fold_out_of_vocab(teacher_ids, teacher_lp, logits.shape[-1])
        labels = labels.masked_fill(labels >= logits.shape[-1], -100)
        on_topk = logits.log_softmax(-1).gather(1, ids).exp()  # missing entries (-inf teacher logprob) do not count
        return {
            "kl": topk_divergence(logits, ids, lp, kind="forward_kl").cpu(),
            "agree": (logits.argmax(-1) == teacher_ids[:, 0]).cpu(),
            "ce": torch.nn.functional.cross_entropy(logits, labels, reduction="none").cpu(),
            "mass": torch.where(torch.isfinite(lp), on_topk, 0.0).sum(-1).cpu(),
        }

    parts = map_head_chunks(
        chunk,
        hidden,
        output_head(model),
        batch.labels,
        batch.topk_ids,
        batch.topk_logprobs,
        chunk_size=chunk_size,
    )
    out = {name: torch.cat([p[name] for p in parts]) for name in ("kl", "agree", "ce", "mass")}
    out["entropy"] = torch.from_numpy(topk_entropy(batch.topk_logprobs.cpu().numpy()))
    return out


# wrapped, not decorated: mutmut 3 does not mutate a decorated function
position_metrics = torch.inference_mode()(_position_metrics)


def summarize_positions(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The student's metrics over all positions of `position_metrics` results."""
    kl_, agree_, ce_, ent_, mass_ = (torch.cat([p[name] for p in parts]).double() for name in _PER_POSITION)
    unc = ent_ > UNCERTAIN_NATS
    mean = lambda x, m: float(x[m].mean()) if m.any() else None  # None: no such positions
    return {
        "kl": float(kl_.mean()),
        "kl_uncertain": mean(kl_, unc),
        "kl_deterministic": mean(kl_, ~unc),
        "top1_agreement": float(agree_.mean()),
        "ce": float(ce_.mean()),
        "perplexity": float(torch.exp(ce_.mean())),
        "topk_mass": float(mass_.mean()),
        "positions": int(len(kl_)),
        "uncertain_positions": int(unc.sum()),
    }


def teacher_forced(model, batches: Iterable[Batch], device, chunk_size: int) -> dict[str, float]:
    """Per-position KL, top-1 agreement, CE and mass on the teacher's top-k of the student on the teacher's samples."""
    return summarize_positions([position_metrics(model, b.to(device), chunk_size) for b in batches])


@dataclass
class TeacherSide:
    """What evaluation keeps of the teacher's samples as they stream by: per-position scalars and, per prompt,
    its first sample (for accuracy)."""

    token_logprobs: list[np.ndarray] = field(default_factory=list)
    topk_log_mass: list[np.ndarray] = field(default_factory=list)
    first: dict[str, dict] = field(default_factory=dict)  # prompt id -> its first sample's columns
    samples: int = 0

    def add(self, batch: Batch, columns: pa.Table) -> None:
        self.token_logprobs.append(pc.list_flatten(columns["token_logprobs"]).to_numpy().astype(np.float64))
        self.topk_log_mass.append(np.logaddexp.reduce(batch.topk_logprobs.cpu().numpy().astype(np.float64), axis=1))
        self.samples += columns.num_rows
        for i, pid in enumerate(columns["prompt_id"].to_pylist()):
            if pid not in self.first:
                self.first[pid] = columns.slice(i, 1).to_pylist()[0]

    def metrics(self) -> dict[str, float]:
        """The teacher scored like the student: CE of its own samples, and -log(top-k mass) as its KL floor."""
        ce = float(-np.concatenate(self.token_logprobs).mean())
        log_mass = np.concatenate(self.topk_log_mass)
        return {
            "ce": ce,
            "perplexity": float(np.exp(ce)),
            "kl": float(-log_mass.mean()),
            "top1_agreement": 1.0,
            "topk_mass": float(np.exp(log_mass).mean()),
        }


def _sample_accuracy(
    model,
    tokenizer,
    prompts: list[str],
    prompt_tokens,
    check,
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    device,
) -> float:
    """Fraction of prompts whose sampled completion passes the task's exact checker."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    sample = temperature > 0
    gen_cfg = GenerationConfig(
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    correct = 0
    for lo in range(0, len(prompts), batch_size):
        chunk = [list(map(int, p)) for p in prompt_tokens[lo : lo + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, width:]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        correct += sum(check(p, c) for p, c in zip(prompts[lo : lo + batch_size], texts, strict=True))
    return correct / max(1, len(prompts))


sample_accuracy = torch.inference_mode()(_sample_accuracy)


def _trained_steps(student_dir: Path) -> int:
    """The last logged step of the student's training (its train_log.json), 0 for a student trained elsewhere."""
    try:
        history = json.loads((student_dir / "train_log.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(history[-1]["step"]) if history else 0


def evaluate(
    cfg: RunConfig,
    *,
    dataset_dir: Path | None = None,
    student_dir: Path | None = None,
    metrics_path: Path | None = None,
) -> dict:
    """Evaluate the student against the teacher's held-out samples; write metrics.json (run dir + student dir)."""
    start = time.perf_counter()
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    student_dir = Path(student_dir or cfg.student_dir)
    manifest = read_manifest(dataset_dir)
    if manifest.heldout_fraction <= 0:
        raise DatasetError(
            f"{dataset_dir} has no held-out prompts (prompts.heldout_fraction was 0); evaluation on "
            "training prompts would not be honest: regenerate with heldout_fraction > 0"
        )
    split = "heldout"
    # a task name the harness does not know stops here, not after the held-out metrics
    manager = benchmarks.task_manager(cfg.eval.lm_eval) if cfg.eval.lm_eval is not None else None
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(str(student_dir))
    batches = heldout_batches(
        dataset_dir,
        batch_size=cfg.eval.batch_size,
        pad_id=tokenizer.pad_token_id,
        max_prompts=cfg.eval.max_prompts,
        columns=EVAL_COLUMNS,
    )
    model = load_causal_lm(str(student_dir), device=str(device))
    seen, parts = TeacherSide(), []
    for batch, columns in batches:
        parts.append(position_metrics(model, batch.to(device), cfg.train.loss_chunk_size))
        seen.add(batch, columns)
    student, teacher = summarize_positions(parts), seen.metrics()
    check = _checker(cfg.eval.task)
    if check is not None:
        firsts = list(seen.first.values())
        prompts, tokens = [r["prompt"] for r in firsts], [r["prompt_token_ids"] for r in firsts]
        decoded = tokenizer.batch_decode([r["completion_token_ids"] for r in firsts], skip_special_tokens=True)
        teacher["accuracy"] = float(np.mean([check(p, c) for p, c in zip(prompts, decoded, strict=True)]))
        kw = dict(
            max_new_tokens=manifest.sampling.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            device=device,
        )
        student["accuracy"] = sample_accuracy(
            model, tokenizer, prompts, tokens, check, temperature=manifest.sampling.temperature, **kw
        )
        student["greedy_accuracy"] = sample_accuracy(model, tokenizer, prompts, tokens, check, temperature=0.0, **kw)
    metrics = {
        "split": split,
        "reference": "given completions" if manifest.mode == "rescore" else "teacher samples",
        "heldout_prompts": len(seen.first),
        "heldout_samples": seen.samples,
        "teacher": teacher,
        "student": student,
        "uncertain_threshold_nats": UNCERTAIN_NATS,
        "student_params": sum(p.numel() for p in model.parameters()),
        "dataset": str(dataset_dir),
        "student_dir": str(student_dir),
        "seconds": time.perf_counter() - start,
    }
    if cfg.eval.lm_eval is not None:
        del model  # the harness loads its own copy of each model
        metrics["lm_eval"] = benchmarks.compare(cfg, student_dir, device.type, manager)
        metrics["seconds"] = time.perf_counter() - start
    log_eval(cfg, metrics, step=_trained_steps(student_dir))
    text = json.dumps(metrics, indent=2)
    metrics_path = Path(metrics_path or cfg.metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(text)
    (student_dir / "metrics.json").write_text(text)
    return metrics
