"""Feature, attention-relation and sample-relation losses against a live teacher: pure tensor functions.

Each returns a sum over its counting unit (completion positions for feature and attention, one value per
micro-batch for relations), so the train loop divides once by the step's global count, as it does for the
top-k loss (pipeline/losses.py `combine`). docs/design.md, "Live-teacher losses", has the definitions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

FeatureKind = Literal["mse", "cosine"]


def _f(x: Tensor) -> Tensor:
    """At least float32 (bf16 states under autocast are compared in float32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def feature_loss_sum(student: Tensor, teacher: Tensor, *, kind: FeatureKind = "mse") -> Tensor:
    """Sum over N positions of the per-position distance between (projected) student and teacher states.

    student, teacher: [N, d] (the student already mapped to the teacher's width). `mse`: mean over d of the
    squared difference (FitNets); `cosine`: 1 - cosine similarity (scale-free).
    Returns [] (float32, or float64 for float64 inputs).
    """
    s, t = _f(student), _f(teacher)
    if kind == "mse":
        return (s - t).pow(2).mean(-1).sum()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum()
    raise ValueError(f"unknown feature loss kind {kind!r}")


def causal_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] padding mask -> [B, T, T] bool: query i may look at key j when j <= i and j is not padding."""
    t = attention_mask.shape[-1]
    lower = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    return lower[None] & attention_mask.bool()[:, None, :]


def relation_logprobs(x: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """MiniLMv2 self-attention relation of one vector type: log softmax_j(x_i,r . x_j,r / sqrt(d_r)).

    x: [B, T, D], split along D into `heads` relation heads of D / heads each; allowed: [B, T, T] bool.
    Returns [B, R, T, T] log-probabilities (at least float32); disallowed keys hold the dtype's lowest value (p = 0).
    """
    b, t, d = x.shape
    if d % heads:
        raise ValueError(f"width {d} does not split into {heads} relation heads")
    xr = _f(x).view(b, t, heads, d // heads).transpose(1, 2)  # [B, R, T, d_r]
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d // heads)  # [B, R, T, T]
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss_sum(
    student: tuple[Tensor, ...],
    teacher: tuple[Tensor, ...],
    *,
    attention_mask: Tensor,
    rows: Tensor,
    heads: int,
) -> Tensor:
    """MiniLMv2 relation distillation: sum over query rows of the mean over vector types and relation heads of
    KL(teacher relation row || student relation row).

    student, teacher: the same number of vector types (e.g. queries, keys, values), each [B, T, D_s] / [B, T, D_t];
    widths may differ between the models (and between types) as long as each splits into `heads`.
    attention_mask: [B, T]; rows: [B, T] bool, the query positions counted (the completion positions).
    Keys are the non-padding positions up to the query (causal). Returns [] (float32, or float64 for float64 inputs).
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student vector types vs {len(teacher)} teacher ones")
    allowed = causal_mask(attention_mask)
    total = None
    for xs, xt in zip(student, teacher, strict=True):
        ls, lt = relation_logprobs(xs, heads, allowed), relation_logprobs(xt, heads, allowed)
        kl = (lt.exp() * (lt - ls)).masked_fill(~allowed[:, None], 0.0).sum(-1)  # [B, R, T]
        per_row = kl.mean(1)[rows]  # [N]
        total = per_row.sum() if total is None else total + per_row.sum()
    return total / len(student)


def pooled(hidden: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of each sequence's states over its counted positions: hidden [B, T, d], rows [B, T] bool ->
    ([B', d] for the B' sequences with at least one counted position, [B] bool saying which)."""
    counts = rows.sum(-1)  # [B]
    keep = counts > 0
    sums = (_f(hidden) * rows[..., None]).sum(1)  # [B, d]
    return (sums[keep] / counts[keep, None]), keep


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of the B(B-1)/2 unordered pairs i < j of x [B, d] (no sqrt at 0: finite gradients)."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return (x[i] - x[j]).pow(2).sum(-1).clamp(min=1e-12).sqrt()


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss (Park et al. 2019): Huber between the pairwise distances of the student's and teacher's
    sample representations, each divided by its mean, averaged over the pairs i < j.

    student: [B, d_s]; teacher: [B, d_t] (widths may differ: only distances are compared). Fewer than two
    samples: 0. Returns [] (float32, or float64 for float64 inputs).
    """
    if student.shape[0] < 2:
        return _f(student).sum() * 0.0
    ds, dt = _pair_distances(_f(student)), _pair_distances(_f(teacher))
    return F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean().clamp(min=1e-12))


def _angles(x: Tensor) -> Tensor:
    """cos of the angle at apex i between samples j and k, for ordered triples of distinct i, j, k: x [B, d] -> [M]."""
    b = x.shape[0]
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=-1, eps=1e-12)  # [B, B, d]: e[i, j] = unit(x_j - x_i)
    cos = e @ e.transpose(-1, -2)  # [B, B, B]: cos[i, j, k]
    idx = torch.arange(b, device=x.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :])
    distinct &= idx[None, :, None] != idx[None, None, :]
    return cos[distinct]


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss: Huber between the cosines of the angles the student's and the teacher's sample
    representations form at each apex, over ordered triples of distinct samples. Fewer than three: 0."""
    if student.shape[0] < 3:
        return _f(student).sum() * 0.0
    return F.smooth_l1_loss(_angles(_f(student)), _angles(_f(teacher)))
