"""Held-out evaluation: how close the student is to the teacher, and (for tasks with exact answers) accuracy.

Teacher-forced metrics run on the teacher's own held-out samples (prompt ids never used in training):
KL(teacher top-k || student), top-1 agreement, CE on the sampled tokens. Positions are also split into
`uncertain` (teacher top-k entropy above a threshold) and `deterministic`, where distillation matters
differently. Task accuracy samples the student at the dataset's temperature, the teacher's own setting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.dataset.reader import collate, load_samples
from pipeline.dataset.schema import DatasetError, read_manifest
from pipeline.losses import topk_divergence
from pipeline.models import load_causal_lm, load_tokenizer, resolve_device

UNCERTAIN_NATS = 0.3  # teacher entropy above this marks a position with several plausible tokens


def _checker(task: str):
    if task == "demo":
        from pipeline.demo.task import check

        return check
    return None


@torch.inference_mode()
def teacher_forced(model, samples, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Per-position KL, top-1 agreement, CE and mass on the teacher's top-k of the student on the teacher's samples."""
    kl, agree, ce, ent, mass = [], [], [], [], []
    trunk = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    for lo in range(0, len(samples), batch_size):
        batch = collate(samples, list(range(lo, min(lo + batch_size, len(samples)))), pad_id).to(device)
        hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[batch.loss_mask]
        for c in range(0, hidden.shape[0], 4096):  # chunk the head: no N x V tensor for big vocabularies
            logits = head(hidden[c:c + 4096]).float()
            ids, lp = batch.topk_ids[c:c + 4096], batch.topk_logprobs[c:c + 4096]
            kl.append(topk_divergence(logits, ids, lp, kind="forward_kl").cpu())
            agree.append((logits.argmax(-1) == ids[:, 0]).cpu())
            on_topk = logits.log_softmax(-1).gather(1, ids).exp()  # missing entries (-inf teacher logprob) do not count
            mass.append(torch.where(torch.isfinite(lp), on_topk, 0.0).sum(-1).cpu())
            ce.append(torch.nn.functional.cross_entropy(logits, batch.labels[c:c + 4096], reduction="none").cpu())
            p = torch.softmax(lp.float(), -1)
            ent.append(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).cpu())
    kl_, agree_, ce_, ent_, mass_ = (torch.cat(x).double() for x in (kl, agree, ce, ent, mass))
    unc = ent_ > UNCERTAIN_NATS
    mean = lambda x, m: float(x[m].mean()) if m.any() else None  # noqa: E731  (None: no such positions)
    return {"kl": float(kl_.mean()), "kl_uncertain": mean(kl_, unc), "kl_deterministic": mean(kl_, ~unc),
            "top1_agreement": float(agree_.mean()), "ce": float(ce_.mean()), "perplexity": float(torch.exp(ce_.mean())),
            "topk_mass": float(mass_.mean()), "positions": int(len(kl_)), "uncertain_positions": int(unc.sum())}


@torch.inference_mode()
def sample_accuracy(model, tokenizer, prompts: list[str], prompt_tokens, check, *, temperature: float,
                    max_new_tokens: int, batch_size: int, seed: int, device) -> float:
    """Fraction of prompts whose sampled completion passes the task's exact checker."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    sample = temperature > 0
    gen_cfg = GenerationConfig(do_sample=sample, temperature=temperature if sample else None, top_k=0 if sample else None,
                               top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
                               eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    correct = 0
    for lo in range(0, len(prompts), batch_size):
        chunk = [list(map(int, p)) for p in prompt_tokens[lo:lo + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, width:]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        correct += sum(check(p, c) for p, c in zip(prompts[lo:lo + batch_size], texts))
    return correct / max(1, len(prompts))


def evaluate(cfg: RunConfig, *, dataset_dir: Path | None = None, student_dir: Path | None = None,
             metrics_path: Path | None = None) -> dict:
    """Evaluate the student against the teacher's held-out samples; write metrics.json (run dir + student dir)."""
    start = time.perf_counter()
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    student_dir = Path(student_dir or cfg.student_dir)
    manifest = read_manifest(dataset_dir)
    if manifest.heldout_fraction <= 0:
        raise DatasetError(f"{dataset_dir} has no held-out prompts (prompts.heldout_fraction was 0); evaluation on "
                         "training prompts would not be honest: regenerate with heldout_fraction > 0")
    split = "heldout"
    samples = load_samples(dataset_dir, split=split, limit_prompts=cfg.eval.max_prompts)
    if len(samples) == 0:
        raise DatasetError(f"{dataset_dir}: no held-out samples to evaluate on; set prompts.heldout_fraction > 0")
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(str(student_dir))
    model = load_causal_lm(str(student_dir), device=str(device))
    student = teacher_forced(model, samples, tokenizer.pad_token_id, cfg.eval.batch_size, device)
    teacher_ce = float(-np.concatenate(samples.token_logprobs).astype(np.float64).mean())
    lp = np.concatenate(samples.topk_logprobs).astype(np.float64)
    log_mass = np.logaddexp.reduce(lp, axis=1)
    kl_floor = float(-log_mass.mean())  # the teacher itself scores -log(top-k mass)
    teacher = {"ce": teacher_ce, "perplexity": float(np.exp(teacher_ce)), "kl": kl_floor, "top1_agreement": 1.0,
               "topk_mass": float(np.exp(log_mass).mean())}
    check = _checker(cfg.eval.task)
    if check is not None:
        first = {}
        for i, pid in enumerate(samples.prompt_ids):
            first.setdefault(pid, i)
        idx = list(first.values())
        prompts, tokens = [samples.prompts[i] for i in idx], [samples.prompt_tokens[i] for i in idx]
        decoded = tokenizer.batch_decode([samples.completion_tokens[i] for i in idx], skip_special_tokens=True)
        teacher["accuracy"] = float(np.mean([check(p, c) for p, c in zip(prompts, decoded)]))
        kw = dict(max_new_tokens=manifest.sampling.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, device=device)
        student["accuracy"] = sample_accuracy(model, tokenizer, prompts, tokens, check, temperature=manifest.sampling.temperature, **kw)
        student["greedy_accuracy"] = sample_accuracy(model, tokenizer, prompts, tokens, check, temperature=0.0, **kw)
    metrics = {"split": split, "heldout_prompts": len(set(samples.prompt_ids)), "heldout_samples": len(samples),
               "teacher": teacher, "student": student, "uncertain_threshold_nats": UNCERTAIN_NATS,
               "student_params": sum(p.numel() for p in model.parameters()), "dataset": str(dataset_dir),
               "student_dir": str(student_dir), "seconds": time.perf_counter() - start}
    text = json.dumps(metrics, indent=2)
    metrics_path = Path(metrics_path or cfg.metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(text)
    (student_dir / "metrics.json").write_text(text)
    return metrics
