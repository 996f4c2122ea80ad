"""The train stage: fit the student on the cached teacher top-k with alpha*CE + (1-alpha)*T^2*D.

An explicit loop (nanoGPT-style): AdamW, warmup + cosine, gradient accumulation with a global token
denominator, clipping. The LM head runs only on completion positions, in chunks (see losses.py), so
no B x T x V logits tensor exists.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RunConfig, StudentConfig
from pipeline.dataset.reader import Batch, Samples, collate, load_samples
from pipeline.dataset.schema import read_manifest
from pipeline.losses import chunked_distill_loss_sums, combine
from pipeline.models import ModelLoadError, load_tokenizer, resolve_device, tokenizer_fingerprint
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers differ: top-k ids would point at the wrong tokens."""


@dataclass
class TrainResult:
    student_dir: str
    steps: int
    final_loss: float
    final_ce: float
    final_kd: float
    tokens_per_s: float
    seconds: float
    train_samples: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_student(cfg: StudentConfig, teacher_model: str, *, seed: int):
    """A pretrained student, or a randomly initialised one with the teacher's config shrunk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model is not None:
        from pipeline.models import load_causal_lm

        return load_causal_lm(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, device="cpu",
                              dtype="float32").train()
    try:
        config = AutoConfig.from_pretrained(teacher_model, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot read the teacher config {teacher_model!r} to shrink it: {str(err).splitlines()[0]}") from None
    for key, value in cfg.shrink.model_dump(exclude_none=True).items():
        setattr(config, key, value)
    if cfg.shrink.hidden_size and cfg.shrink.head_dim is None and hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    if cfg.shrink.num_attention_heads and cfg.shrink.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    # float32 master weights even when the teacher's config says bf16 (autocast handles speed on GPU)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)


def student_tokenizer(cfg: RunConfig, manifest_fingerprint: str):
    """The tokenizer saved with the student; it must be the teacher's (checked by fingerprint)."""
    source = cfg.student.model or cfg.teacher.model
    tok = load_tokenizer(source, revision=cfg.student.revision if cfg.student.model else cfg.teacher.revision)
    found = tokenizer_fingerprint(tok)
    if found != manifest_fingerprint:
        raise TokenizerMismatchError(
            f"student tokenizer {source!r} ({found}) differs from the dataset's teacher tokenizer ({manifest_fingerprint}); "
            "distillation on top-k ids needs the same tokenizer: pick a student of the teacher's family")
    return tok


def lr_at(step: int, cfg) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(samples: Samples, batch_size: int, pad_id: int, seed: int):
    """Endless seeded shuffled micro-batches (a new permutation every epoch)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(samples))
        for lo in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate(samples, order[lo:lo + batch_size], pad_id)


def loss_sums(model, batch: Batch, t):
    """Run the trunk, gather completion positions, and compute CE/KD sums through the LM head in chunks."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return chunked_distill_loss_sums(
        hidden[batch.loss_mask], model.get_output_embeddings(), batch.labels, batch.topk_ids, batch.topk_logprobs,
        alpha=t.alpha, temperature=t.temperature, kind=t.kind, beta=t.beta, tail_bucket=t.tail_bucket,
        chunk_size=t.loss_chunk_size)


def train_student(cfg: RunConfig, *, dataset_dir: Path | None = None, student_dir: Path | None = None,
                  progress: bool = True) -> TrainResult:
    """Train the student on the dataset's training split and save it as an HF model directory."""
    t = cfg.train
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    student_dir = Path(student_dir or cfg.student_dir)
    manifest = read_manifest(dataset_dir)
    tokenizer = student_tokenizer(cfg, manifest.tokenizer_fingerprint)
    samples = load_samples(dataset_dir, split="train")
    if len(samples) == 0:
        raise ValueError(f"{dataset_dir}: no training samples (all prompts are held out?)")
    seed_everything(t.seed)
    device = resolve_device(t.device)
    model = build_student(cfg.student, cfg.teacher.model, seed=t.seed).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    stream = batches(samples, min(t.batch_size, len(samples)), tokenizer.pad_token_id, t.seed)
    history, start, tokens_seen = [], time.perf_counter(), 0
    with progress_bar("train", t.max_steps, enabled=progress) as advance:
        for step in range(t.max_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            micro = [next(stream).to(device) for _ in range(t.grad_accum)]
            n_global = sum(b.n_tokens for b in micro)
            ce_tot = kd_tot = loss_tot = 0.0
            for batch in micro:
                with amp:
                    sums = loss_sums(model, batch, t)
                loss, ce, kd = combine(sums, alpha=t.alpha, temperature=t.temperature, n_tokens_global=n_global)
                loss.backward()
                loss_tot, ce_tot, kd_tot = loss_tot + loss.item(), ce_tot + ce.item(), kd_tot + kd.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += n_global
            if step % t.log_every == 0 or step == t.max_steps - 1:
                elapsed = time.perf_counter() - start
                history.append({"step": step + 1, "loss": loss_tot, "ce": ce_tot, "kd": kd_tot, "lr": lr_at(step, t),
                                "grad_norm": grad_norm, "tokens_per_s": tokens_seen / elapsed})
                log.info("step %d/%d loss %.4f ce %.4f kd %.4f %.0f tok/s", step + 1, t.max_steps, loss_tot, ce_tot,
                         kd_tot, tokens_seen / elapsed)
            advance(1, info=f"loss {loss_tot:.4f} (ce {ce_tot:.3f} kd {kd_tot:.4f})")
    seconds = time.perf_counter() - start
    model.eval()
    student_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(student_dir, safe_serialization=True)
    tokenizer.save_pretrained(student_dir)
    last = history[-1]
    result = TrainResult(str(student_dir), t.max_steps, last["loss"], last["ce"], last["kd"], tokens_seen / seconds,
                         seconds, len(samples))
    (student_dir / "train_log.json").write_text(json.dumps({"result": asdict(result), "history": history,
                                                            "config": cfg.train.model_dump()}, indent=2))
    plot_curves(history, student_dir / "loss_curves.png")
    return result


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss parts against steps, written as a PNG beside the student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in ("loss", "ce", "kd"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("student training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
