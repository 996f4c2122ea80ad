"""The train stage: fit the student on the cached teacher top-k with alpha*CE + (1-alpha)*T^2*D.

An explicit loop (nanoGPT-style): AdamW, warmup + cosine, gradient accumulation with a global token
denominator, clipping, optional gradient checkpointing, and resumable checkpoints. The LM head runs
only on completion positions, in chunks (see losses.py), so no B x T x V logits tensor exists. The same
function runs single-process or under `accelerate launch` / `torchrun` (DDP: each rank takes every
world-th micro-batch of one seeded, resumable stream (pipeline/dataset/stream.py), so N ranks equal one rank with N-times the accumulation).
FSDP2 (accelerate's `--use_fsdp --fsdp_version 2`, or ACCELERATE_USE_FSDP=true FSDP_VERSION=2 under torchrun)
shards the student; checkpoints and the saved student are then gathered to full state dicts, so they
are the same files a single process writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import CheckpointMismatchError, checkpoint_root, clear, latest_checkpoint, save_checkpoint
from pipeline.compat import share_no_split_modules, tied_names
from pipeline.config import RunConfig, StudentConfig, TrainConfig
from pipeline.dataset.stream import Batch, TrainStream
from pipeline.core import stable_id
from pipeline.dataset.schema import read_manifest
from pipeline.distributed import full_optimizer_state, full_weights, is_fsdp, load_checkpoint, make_accelerator
from pipeline.losses import LossSums, chunked_distill_loss_sums, combine
from pipeline.models import ModelLoadError, TokenizerMismatchError, load_tokenizer, resolve_device, tokenizer_fingerprint
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)


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
    resumed_from_step: int = 0


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
    """Linear warmup then cosine decay to 10% of the peak (a pure function of the step: nothing to checkpoint)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class DistillObjective(torch.nn.Module):
    """Student + loss in one forward, so DDP/FSDP wrappers see (and synchronise) the whole step."""

    def __init__(self, student: torch.nn.Module, t: TrainConfig):
        super().__init__()
        self.student, self.t = student, t
        share_no_split_modules(self, student)  # FSDP shards each decoder layer on its own

    def forward(self, input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs):
        sums = loss_sums(self.student, Batch(input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs), self.t)
        # clones, not views of one [2] tensor: FSDP2 hooks its backward on the outputs and warns about views
        return sums.ce_sum.clone(), sums.kd_sum.clone()


def loss_sums(model, batch: Batch, t):
    """Run the trunk, gather completion positions, and compute CE/KD sums through the LM head in chunks."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return chunked_distill_loss_sums(
        hidden[batch.loss_mask], model.get_output_embeddings(), batch.labels, batch.topk_ids, batch.topk_logprobs,
        alpha=t.alpha, temperature=t.temperature, kind=t.kind, beta=t.beta, tail_bucket=t.tail_bucket,
        chunk_size=t.loss_chunk_size)


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _resume_point(root: Path, fingerprint: str, load) -> dict | None:
    """State of the newest good checkpoint, restored by `load(ckpt)`; None to start fresh."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        log.warning("no usable checkpoint under %s; training starts from step 0", root)
        return None
    if ckpt.state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoints in {root} come from a run with other student/training settings or another dataset; "
            "train without --resume (they are replaced) or restore the original config")
    load(ckpt)
    log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
    return ckpt.state


def train_student(cfg: RunConfig, *, dataset_dir: Path | None = None, student_dir: Path | None = None,
                  progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the student on the dataset's training split and save it as an HF model directory.

    With `resume`, continue from the newest good checkpoint in `<student_dir>/checkpoints` (weights,
    optimizer, RNG and data position), giving the same result as an uninterrupted run.
    """
    t = cfg.train
    dataset_dir = Path(dataset_dir or cfg.dataset_dir)
    student_dir = Path(student_dir or cfg.student_dir)
    manifest = read_manifest(dataset_dir)
    tokenizer = student_tokenizer(cfg, manifest.tokenizer_fingerprint)
    # streamed one row group at a time: memory does not grow with the dataset
    stream = TrainStream(dataset_dir, split="train", batch_size=t.batch_size, pad_id=tokenizer.pad_token_id, seed=t.seed)
    # picks up `accelerate launch` / torchrun's environment; a plain call is one process
    accelerator = make_accelerator(t)
    device = accelerator.device if t.device == "auto" else resolve_device(t.device)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    seed_everything(t.seed)
    student = build_student(cfg.student, cfg.teacher.model, seed=t.seed)
    if t.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5.18 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    student = student.to(device).train()
    tied, shapes = tied_names(student), {k: tuple(v.shape) for k, v in student.state_dict().items()}
    # optimizer and model prepared together: FSDP replaces the parameters with sharded ones (DDP keeps them)
    model, opt = accelerator.prepare(DistillObjective(student, t), make_optimizer(student, t, device))
    fingerprint = stable_id(cfg.train_fingerprint(), manifest.generate_fingerprint)
    root = checkpoint_root(student_dir)
    load = lambda ckpt: load_checkpoint(ckpt, accelerator, model, student, opt, tied=tied, shapes=shapes)  # noqa: E731
    state = _resume_point(root, fingerprint, load) if resume else None
    if state is None and main:
        clear(root)  # checkpoints of an earlier run must not be resumed into this one
    start_step = state["step"] if state else 0
    history = state["history"] if state else []
    tokens_before = state["tokens_seen"] if state else 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    batch_iter = stream.batches(start=state["data"] if state else None)
    tokens_seen, start = 0, time.perf_counter()
    with progress_bar("train", t.max_steps, enabled=progress and main) as advance:
        advance(start_step)
        for step in range(start_step, t.max_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            step_batches = [next(batch_iter) for _ in range(world * t.grad_accum)]
            micro = [b.to(device) for b in step_batches[rank::world]]
            n_local = sum(b.n_tokens for b in micro)
            n_global = int(accelerator.reduce(torch.tensor(n_local, device=device), "sum")) if world > 1 else n_local
            parts = torch.zeros(3, device=device)  # loss, ce, kd of this rank's share
            for i, batch in enumerate(micro):
                # gradients are all-reduced once per step, on the last micro-batch
                with contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model):
                    with amp:
                        ce_sum, kd_sum = model(batch.input_ids, batch.attention_mask, batch.loss_mask, batch.labels,
                                               batch.topk_ids, batch.topk_logprobs)
                    loss, ce, kd = combine(LossSums(ce_sum, kd_sum, batch.n_tokens), alpha=t.alpha,
                                           temperature=t.temperature, n_tokens_global=n_global)
                    accelerator.backward(loss * world)  # DDP/FSDP average gradients over ranks; we want the global sum
                parts += torch.stack([loss.detach(), ce, kd])
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += n_global
            last = step == t.max_steps - 1
            if step % t.log_every == 0 or last:
                loss_v, ce_v, kd_v = (accelerator.reduce(parts, "sum") if world > 1 else parts).tolist()
                rate = tokens_seen / (time.perf_counter() - start)
                history.append({"step": step + 1, "loss": loss_v, "ce": ce_v, "kd": kd_v, "lr": lr_at(step, t),
                                "grad_norm": grad_norm, "tokens_per_s": rate})
                log.info("step %d/%d loss %.4f ce %.4f kd %.4f %.0f tok/s", step + 1, t.max_steps, loss_v, ce_v, kd_v, rate)
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and not last:
                accelerator.wait_for_everyone()
                # gathered on every rank (collective under FSDP), written by rank 0
                weights, optim_state = full_weights(accelerator, model, student), full_optimizer_state(accelerator, model, opt)
                if main:
                    save_checkpoint(root, step + 1, model_state=weights, optimizer_state=optim_state, tied=tied,
                                    keep=t.keep_checkpoints, state={
                                        "fingerprint": fingerprint, "data": stream.position, "history": history,
                                        "tokens_seen": tokens_before + tokens_seen})
                del weights, optim_state
                accelerator.wait_for_everyone()
            advance(1, info=f"loss {float(parts[0]):.4f} (ce {float(parts[1]):.3f} kd {float(parts[2]):.4f})")
    seconds = time.perf_counter() - start
    last_log = history[-1]
    result = TrainResult(str(student_dir), t.max_steps, last_log["loss"], last_log["ce"], last_log["kd"],
                         tokens_seen / seconds if seconds > 0 else 0.0, seconds, stream.num_samples, start_step)
    distributed = {"type": accelerator.distributed_type.value, "processes": world,
                   "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if is_fsdp(accelerator) else None}
    weights = full_weights(accelerator, model, student, tied) if is_fsdp(accelerator) else None  # collective
    if main:
        student.eval()
        student_dir.mkdir(parents=True, exist_ok=True)
        # under FSDP the module holds shards: save the gathered full weights (same files as one process)
        student.save_pretrained(student_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)
        (student_dir / "train_log.json").write_text(json.dumps({"result": asdict(result), "history": history,
                                                                "config": cfg.train.model_dump(),
                                                                "distributed": distributed}, indent=2))
        plot_curves(history, student_dir / "loss_curves.png")
    accelerator.wait_for_everyone()
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
