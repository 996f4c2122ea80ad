"""What one training step optimises: the student and its loss in one module (so DDP/FSDP see the whole step),
the learning-rate schedule and the optimizer."""

from __future__ import annotations

import math

import torch

from pipeline.config import TrainConfig
from pipeline.dataset.batch import Batch
from pipeline.distributed import StudentWrapper
from pipeline.live.capture import Recorder
from pipeline.live.plan import LivePlan, Projections
from pipeline.live.teacher import live_loss_sums
from pipeline.losses import LossSums, chunked_distill_loss_sums
from pipeline.models import output_head


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak (a pure function of the step: nothing to checkpoint)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class DistillObjective(StudentWrapper):
    """Student + loss in one forward, so DDP/FSDP wrappers see (and synchronise) the whole step. With a live
    teacher (`plan`), the student's inner states are recorded in the same forward and compared with the teacher's
    (`teacher`, computed outside: the frozen teacher is not part of the wrapped, synchronised module); the
    projections that train beside the student are its `aux` child."""

    def __init__(self, student: torch.nn.Module, t: TrainConfig, plan: LivePlan | None = None):
        super().__init__(student)
        self.t, self.plan = t, plan
        if plan is not None:
            self.aux = Projections(plan)

    def forward(self, input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs, teacher=None):
        batch = Batch(input_ids, attention_mask, loss_mask, labels, topk_ids, topk_logprobs)
        if self.plan is None:
            sums = loss_sums(self.student, batch, self.t)
            live = sums.ce_sum.new_zeros(3)
        else:
            with Recorder(self.student, hidden=self.plan.student_hidden(), qkv=self.plan.student_qkv()) as rec:
                sums = loss_sums(self.student, batch, self.t)
            live = live_loss_sums(rec, teacher, self.plan, batch, self.aux)
        # clones, not views of one [2] tensor: FSDP2 hooks its backward on the outputs and warns about views
        return sums.ce_sum.clone(), sums.kd_sum.clone(), live


def loss_sums(model: torch.nn.Module, batch: Batch, t: TrainConfig) -> LossSums:
    """Run the trunk, gather completion positions, and compute CE/KD sums through the LM head in chunks."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return chunked_distill_loss_sums(
        hidden[batch.loss_mask],
        output_head(model),
        batch.labels,
        batch.topk_ids,
        batch.topk_logprobs,
        alpha=t.alpha,
        temperature=t.temperature,
        kind=t.kind,
        beta=t.beta,
        tail_bucket=t.tail_bucket,
        chunk_size=t.loss_chunk_size,
    )


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (the student's, and the live projections')."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
