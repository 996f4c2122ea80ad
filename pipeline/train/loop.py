"""The loop: per step the learning rate, this rank's micro-batches, accumulated gradients, clip, step; logging and
checkpoints on their schedules."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from pipeline.checkpoint import checkpoint_root, save_checkpoint
from pipeline.dataset.batch import Batch
from pipeline.distributed import full_optimizer_state, full_weights
from pipeline.live.teacher import combine_live, teacher_states
from pipeline.losses import LossSums, combine, out_of_vocab_counts
from pipeline.progress import progress_bar
from pipeline.trackers import end_trackers, log_row
from pipeline.train.objective import lr_at
from pipeline.train.setup import Setup

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """What the loop leaves behind: the logged history (resumed runs include the earlier steps) and its throughput."""

    history: list[dict]
    tokens_seen: int  # this process's run only, all ranks together
    seconds: float
    out_of_vocab: list[int] = field(default_factory=lambda: [0, 0, 0])  # `out_of_vocab_counts`, resumed runs included


def fit(s: Setup, *, progress: bool) -> Fit:
    """The loop: per step, set the learning rate, take this rank's share of the step's micro-batches, accumulate
    their gradients, clip, step; log every `log_every` steps and checkpoint every `checkpoint_every`."""
    t, acc = s.cfg.train, s.accelerator
    history = list(s.resumed["history"]) if s.resumed else []
    batches = s.stream.batches(start=s.resumed["data"] if s.resumed else None)
    tokens_seen, start = 0, time.perf_counter()
    oov = torch.tensor(s.resumed.get("out_of_vocab", [0, 0, 0]) if s.resumed else [0, 0, 0], device=s.device)
    n_vocab, pad = s.vocab.get("student", 0), s.tokenizer.pad_token_id
    with progress_bar("train", t.max_steps, enabled=progress and acc.is_main_process) as advance:
        advance(s.start_step)
        for step in range(s.start_step, t.max_steps):
            for group in s.opt.param_groups:
                group["lr"] = lr_at(step, t)
            step_batches = [next(batches) for _ in range(acc.num_processes * t.grad_accum)]
            micro = [b.to(s.device) for b in step_batches[acc.process_index :: acc.num_processes]]
            if n_vocab:  # ids the student has no row for: counted, then left out (losses.py folds labels and top-k)
                oov += sum(out_of_vocab_counts(b.topk_ids, b.labels, n_vocab) for b in micro)
                micro = [b.within_vocab(n_vocab, pad) for b in micro]
            parts, n_global = accumulate(s, micro)
            grad_norm = float(acc.clip_grad_norm_(s.model.parameters(), t.max_grad_norm))
            s.opt.step()
            s.opt.zero_grad(set_to_none=True)
            tokens_seen += n_global
            last = step == t.max_steps - 1
            if step % t.log_every == 0 or last:
                values = (acc.reduce(parts, "sum") if acc.num_processes > 1 else parts).tolist()
                loss_v, ce_v, kd_v = values[:3]
                rate = tokens_seen / (time.perf_counter() - start)
                history.append(
                    {
                        "step": step + 1,
                        "loss": loss_v,
                        "ce": ce_v,
                        "kd": kd_v,
                        **{name: values[3 + LIVE_PARTS.index(name)] for name in t.live_families},
                        "lr": lr_at(step, t),
                        "grad_norm": grad_norm,
                        "tokens_per_s": rate,
                    }
                )
                log_row(acc, s.cfg, history[-1])
                live = "".join(f" {name} {history[-1][name]:.4f}" for name in t.live_families)
                log.info(
                    "step %d/%d loss %.4f ce %.4f kd %.4f%s %.0f tok/s",
                    step + 1, t.max_steps, loss_v, ce_v, kd_v, live, rate,
                )  # fmt: skip
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and not last:
                tokens_before = s.resumed["tokens_seen"] if s.resumed else 0
                write_checkpoint(s, step + 1, history, tokens_before + tokens_seen, _total(acc, oov, s.resumed))
            advance(1, info=f"loss {float(parts[0]):.4f} (ce {float(parts[1]):.3f} kd {float(parts[2]):.4f})")
    end_trackers(acc, s.cfg)
    oov_total = _total(acc, oov, s.resumed)
    if any(oov_total):
        log.warning(
            "%d top-k entries at %d positions and %d sampled tokens were beyond the student's %d-token vocabulary",
            *oov_total, n_vocab,
        )  # fmt: skip
    return Fit(history, tokens_seen, time.perf_counter() - start, oov_total)


def _total(acc, oov: torch.Tensor, resumed: dict | None) -> list[int]:
    """Out-of-vocabulary counts of all ranks (a collective); a resumed run's `oov` already holds the earlier ones,
    counted once (rank 0's share carries them)."""
    if acc.num_processes == 1:
        return [int(x) for x in oov.tolist()]
    earlier = torch.tensor(resumed.get("out_of_vocab", [0, 0, 0]) if resumed else [0, 0, 0], device=oov.device)
    own = oov - earlier if acc.process_index else oov
    return [int(x) for x in acc.reduce(own, "sum").tolist()]


LIVE_PARTS = ("feature", "attention", "relation")
"""The live-teacher loss parts, in the order the objective returns them (logged under these names)."""


def accumulate(s: Setup, micro: list[Batch]) -> tuple[torch.Tensor, int]:
    """Forward and backward over this rank's micro-batches of one step, each loss a share of the step's global
    per-token mean (per micro-batch mean for the relation loss). Returns (loss, ce, kd, feature, attention,
    relation) of this rank's share as a [6] tensor (the last three unweighted), and the step's global token count."""
    acc, t = s.accelerator, s.cfg.train
    world = acc.num_processes
    n_local = sum(b.n_tokens for b in micro)
    n_global = int(acc.reduce(torch.tensor(n_local, device=s.device), "sum")) if world > 1 else n_local
    batches_global = len(micro) * world  # every rank takes the same number of micro-batches per step
    parts = torch.zeros(6, device=s.device)
    for i, batch in enumerate(micro):
        # gradients are all-reduced once per step, on the last micro-batch
        with contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(s.model):
            with _autocast(s.device):
                teacher = teacher_states(s.live, batch) if s.live else None
                ce_sum, kd_sum, live_sums = s.model(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.loss_mask,
                    batch.labels,
                    batch.topk_ids,
                    batch.topk_logprobs,
                    teacher,
                )
            loss, ce, kd = combine(
                LossSums(ce_sum, kd_sum, batch.n_tokens),
                alpha=t.alpha,
                temperature=t.temperature,
                n_tokens_global=n_global,
            )
            live_loss, live_means = combine_live(
                live_sums, t, n_tokens_global=n_global, n_batches_global=batches_global
            )
            loss = loss + live_loss
            acc.backward(loss * world)  # DDP/FSDP average gradients over ranks; we want the global sum
        parts += torch.cat([torch.stack([loss.detach(), ce, kd]), live_means])
    return parts, n_global


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def write_checkpoint(
    s: Setup, step: int, history: list[dict], tokens_seen: int, out_of_vocab: list[int] | None = None
) -> None:
    """Checkpoint `step`: weights and optimizer gathered on every rank (collective under FSDP), written by rank 0."""
    acc = s.accelerator
    acc.wait_for_everyone()
    weights = full_weights(acc, s.model, s.objective)
    optim_state = full_optimizer_state(acc, s.model, s.objective, s.opt)
    if acc.is_main_process:
        save_checkpoint(
            checkpoint_root(s.student_dir),
            step,
            model_state=weights,
            optimizer_state=optim_state,
            tied=s.tied,
            keep=s.cfg.train.keep_checkpoints,
            state={
                "fingerprint": s.fingerprint,
                "data": s.stream.position,
                "history": history,
                "tokens_seen": tokens_seen,
                "out_of_vocab": out_of_vocab or [0, 0, 0],
            },
        )
    del weights, optim_state
    acc.wait_for_everyone()
