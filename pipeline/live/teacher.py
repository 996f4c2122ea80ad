"""The teacher live in the training process: loaded with transformers (eval, no grad, replicated on every rank),
run on each micro-batch for the states the live losses compare, and the loss sums built from both sides."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import RunConfig, TrainConfig
from pipeline.dataset.batch import Batch
from pipeline.live.capture import Recorder
from pipeline.live.losses import (
    attention_relation_loss_sum,
    feature_loss_sum,
    pooled,
    rkd_angle_loss,
    rkd_distance_loss,
)
from pipeline.live.plan import LivePlan, Projections
from pipeline.models import TokenizerMismatchError, load_causal_lm, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)


@dataclass
class LiveTeacher:
    """The loaded teacher (frozen, outside the wrapped module) and what the plan needs read from it."""

    model: torch.nn.Module
    plan: LivePlan


def load_live_teacher(cfg: RunConfig, manifest_fingerprint: str, device: torch.device) -> torch.nn.Module:
    """`teacher.model` with transformers on `device`: bf16 on CUDA (the student's autocast dtype), float32 elsewhere;
    its tokenizer must be the dataset's (the states are compared position by position on the same token ids)."""
    t = cfg.teacher
    trust = getattr(t, "trust_remote_code", False)
    tok = load_tokenizer(t.model, revision=t.revision, trust_remote_code=trust)
    found = tokenizer_fingerprint(tok)
    if found != manifest_fingerprint:
        raise TokenizerMismatchError(
            f"live teacher {t.model!r} has tokenizer {found}, but the dataset was made with {manifest_fingerprint}; "
            "the live losses need the dataset's token ids to mean the same to it: set teacher.model to that teacher"
        )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = load_causal_lm(t.model, revision=t.revision, dtype=dtype, device=str(device), trust_remote_code=trust)
    model.requires_grad_(False)
    log.info("live teacher %s loaded on %s (%s)", t.model, device, dtype)
    return model


@torch.no_grad()
def teacher_states(live: LiveTeacher, batch: Batch) -> dict[str, Tensor]:
    """The teacher's states the plan needs for `batch`: `hidden.<layer>` [B, T, d_t] and `qkv.<layer>.<type>`
    [B, T, width], as a flat dict of tensors (DDP and FSDP pass dicts of tensors through forward untouched)."""
    plan = live.plan
    trunk = getattr(live.model, live.model.base_model_prefix)
    with Recorder(live.model, hidden=plan.teacher_hidden(), qkv=plan.teacher_qkv()) as rec:
        trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    states = {f"hidden.{layer}": h for layer, h in rec.hidden.items()}
    for layer, vectors in rec.qkv.items():
        states.update({f"qkv.{layer}.{i}": vectors[i] for i in plan.vector_types})
    return states


def live_loss_sums(
    rec: Recorder, teacher: dict[str, Tensor], plan: LivePlan, batch: Batch, projections: Projections
) -> Tensor:
    """[3]: the feature sum and the attention sum over the batch's completion positions (each averaged over its
    layer pairs), and the relation loss of this micro-batch; 0 for a family that is off."""
    rows = batch.loss_mask
    zero = rows.new_zeros((), dtype=torch.float32)
    feature = attention = relation = zero
    if plan.feature_pairs:
        parts = [
            feature_loss_sum(
                projections(rec.hidden[s][rows], (s, t)), teacher[f"hidden.{t}"][rows], kind=plan.feature_kind
            )
            for s, t in plan.feature_pairs
        ]
        feature = torch.stack(parts).mean()
    if plan.attention_pairs:
        parts = [
            attention_relation_loss_sum(
                tuple(rec.qkv[s][i] for i in plan.vector_types),
                tuple(teacher[f"qkv.{t}.{i}"] for i in plan.vector_types),
                attention_mask=batch.attention_mask,
                rows=rows,
                heads=plan.relation_heads,
            )
            for s, t in plan.attention_pairs
        ]
        attention = torch.stack(parts).mean()
    if plan.relation_pair is not None:
        s, t = plan.relation_pair
        student_repr, keep = pooled(rec.hidden[s], rows)
        teacher_repr, _ = pooled(teacher[f"hidden.{t}"], rows)
        relation = plan.relation_distance * rkd_distance_loss(student_repr, teacher_repr)
        relation = relation + plan.relation_angle * rkd_angle_loss(student_repr, teacher_repr)
    return torch.stack([feature, attention, relation])


def combine_live(sums: Tensor, t: TrainConfig, *, n_tokens_global: int, n_batches_global: int) -> tuple[Tensor, Tensor]:
    """w_feat * feature / N + w_attn * attention / N + w_rel * relation / M, with N the step's global completion
    tokens and M its global micro-batch count (so accumulation and DDP equal one big step, as for the top-k loss).
    Returns (the weighted term [] differentiable, the three unweighted means [3] detached)."""
    per_token = 1.0 / n_tokens_global if n_tokens_global > 0 else 0.0
    scale = torch.tensor([per_token, per_token, 1.0 / max(1, n_batches_global)], device=sums.device)
    weights = torch.tensor([t.feature.weight, t.attention.weight, t.relation.weight], device=sums.device)
    means = sums * scale
    return (means * weights).sum(), means.detach()
