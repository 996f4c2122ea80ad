"""Distillation losses on a cached teacher top-k: pure tensor functions (docs/design.md).

Shapes: N active (completion) positions, V student vocabulary, k cached teacher entries, d hidden.
The caller selects the active positions; every function here treats all N rows as active and
returns sums, so the mean is taken once over a global token count (see `combine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
T = TypeVar("T")

# Finite stand-in for log(0): a true -inf gives NaN gradients through logsumexp and where.
_NEG = -1e30
# Tail buckets hold at least this mass on both sides: below it, 1 - sum(probs) is float32 rounding
# noise, and a floor shared by teacher and student keeps every kind finite (an empty tail is 0 - 0).
_LOG_TAIL_FLOOR = math.log(1e-6)


class _GatheredLogSoftmax(torch.autograd.Function):
    """log_softmax(z / T) at the given ids, with a backward that needs one [N, V] buffer.

    Autograd through `log_softmax(z).gather(ids)` (or `logsumexp` and `gather`) keeps two or three
    [N, V] tensors alive in backward; with a 150k vocabulary that is what bounds the batch. Here the
    gradient softmax(z/T) * (-sum_j g_j) / T + scatter(g / T) is built in place in a single buffer.
    """

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, temperature: float) -> Tensor:
        lse = torch.logsumexp(z / temperature if temperature != 1.0 else z, dim=-1, keepdim=True)  # [N, 1]
        ctx.save_for_backward(z, ids, lse)
        ctx.temperature = temperature
        return z.gather(-1, ids) / temperature - lse  # [N, m]

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, ids, lse = ctx.saved_tensors
        t = ctx.temperature
        g = z / t if t != 1.0 else z.clone()
        g.sub_(lse).exp_().mul_(-grad.sum(-1, keepdim=True) / t)
        g.scatter_add_(-1, ids, grad / t)
        return g, None, None


def gathered_log_softmax(z: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(z / temperature, -1) gathered at ids: z [N, V] float, ids [N, m] -> [N, m]."""
    return _GatheredLogSoftmax.apply(z, ids.long(), float(temperature))


def fold_out_of_vocab(topk_ids: Tensor, topk_logprobs: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Top-k entries the student cannot score (id >= vocab_size: a teacher with a larger embedding matrix) become
    missing entries: logprob -inf (so their teacher mass goes to the tail bucket, or is renormalised away) and
    id 0 (a safe gather index). ids, logprobs: [N, k] -> the same, without a host sync."""
    beyond = topk_ids >= vocab_size
    return topk_ids.masked_fill(beyond, 0), topk_logprobs.masked_fill(beyond, float("-inf"))


def out_of_vocab_counts(topk_ids: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """What `fold_out_of_vocab` and the CE mask touch: [top-k entries, positions with any such entry, sampled
    tokens] with id >= vocab_size, as an int64 [3] tensor on the ids' device (no host sync).
    topk_ids: [N, k]; labels: [N]."""
    beyond = topk_ids >= vocab_size
    return torch.stack([beyond.sum(), beyond.any(-1).sum(), (labels >= vocab_size).sum()])


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)), stable at both ends (Maechler 2012); x >= 0 (no mass left) gives _NEG.

    x: [...] -> [...]. Each branch gets an input clamped to where it is finite, so the unused
    branch never puts inf * 0 into the gradient.
    """
    near0 = torch.log(-torch.expm1(x.clamp(-math.log(2.0), -1e-30)))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    out = torch.where(x > -math.log(2.0), near0, far)
    return torch.where(x < 0, out, torch.full_like(out, _NEG))


def _kl(log_a: Tensor, log_b: Tensor, valid: Tensor) -> Tensor:
    """Sum over valid buckets of a * (log a - log b). log_a, log_b: [N, B] finite; valid: [N, B] -> [N]."""
    return (log_a.exp() * (log_a - log_b)).masked_fill(~valid, 0.0).sum(-1)


def _buckets(
    log_q_topk: Tensor, vocab_size: int, topk_logprobs: Tensor, temperature: float, tail_bucket: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher log p, student log q and a validity mask over the buckets.

    Returns three [N, B] tensors, B = k (or k + 1 with the tail bucket last). Without the tail, log p
    is normalized over the valid top-k and log q is NOT renormalized (full-vocab student logprobs).
    Entries with topk_logprobs == -inf (a teacher that returned fewer than k) are invalid: they are
    left out of the support on both sides.
    """
    valid = topk_logprobs > float("-inf")  # [N, k]
    ell = topk_logprobs.to(log_q_topk.dtype).masked_fill(~valid, _NEG)  # [N, k] raw teacher logprobs, T = 1
    log_q = log_q_topk.masked_fill(~valid, _NEG)  # [N, k] student log_softmax(z / T) at the teacher's ids
    if not tail_bucket:
        return F.log_softmax(ell / temperature, dim=-1), log_q, valid
    q_tail = _log1mexp(torch.logsumexp(log_q, dim=-1, keepdim=True))  # [N, 1] log(1 - sum q_i)
    p_tail = _log1mexp(torch.logsumexp(ell, dim=-1, keepdim=True))  # [N, 1] log(1 - sum p_i), T = 1
    if temperature != 1.0:
        # The teacher's outside mass r is taken as spread evenly over the n = V - k' other tokens
        # (k' valid entries), each with logprob log(r / n); their tempered weights sum to
        # n (r / n)^(1/T). No other tokens (k' = V): the tail is empty.
        n_other = vocab_size - valid.sum(-1, keepdim=True)  # [N, 1]
        log_n = n_other.clamp(min=1).to(log_q_topk.dtype).log()
        p_tail = torch.where(n_other > 0, log_n + (p_tail - log_n) / temperature, _NEG)
    log_p = F.log_softmax(torch.cat([ell / temperature, p_tail], dim=-1), dim=-1)  # [N, k + 1]
    log_p = torch.cat([log_p[:, :-1], log_p[:, -1:].clamp(min=_LOG_TAIL_FLOOR)], dim=-1)
    log_q = torch.cat([log_q, q_tail.clamp(min=_LOG_TAIL_FLOOR)], dim=-1)  # [N, k + 1]
    return log_p, log_q, torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)


def topk_divergence(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    kind: Kind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    tail_bucket: bool = False,
) -> Tensor:
    """Per-position divergence D(teacher top-k ‖ student), unreduced.

    Args:
        student_logits: [N, V] student logits (any float dtype; computed in float32, or float64 if given).
        topk_ids: [N, k] teacher top-k token ids; ids >= V (rows of a larger teacher embedding) are folded
            into the tail like missing entries (`fold_out_of_vocab`).
        topk_logprobs: [N, k] raw teacher logprobs at T = 1; -inf marks a missing entry (p = 0, dropped
            from the support on both sides).
        kind: "forward_kl" = sum_i p_i (log p_i - log q_i), p = softmax(topk_logprobs / T) over the k
            entries, log q = log_softmax(student_logits / T) over V gathered at topk_ids, NOT renormalized.
            "reverse_kl" = KL(q~ ‖ p) with q~ the student renormalized over the top-k.
            "jsd" = TRL's generalized JSD on p and q~: beta=0 -> KL(p ‖ q~), beta=1 -> KL(q~ ‖ p), else
            m = beta p + (1 - beta) q~ and beta KL(p ‖ m) + (1 - beta) KL(q~ ‖ m) (note: tends to 0, not
            to KL(p ‖ q~), as beta -> 0; that is TRL's convention).
        temperature: T, applied to both sides.
        beta: JSD interpolation weight, used by kind="jsd" only.
        tail_bucket: add a (k+1)-th bucket with the mass outside the top-k on both sides and compute
            every kind on the k+1 buckets, without renormalization. Student tail: 1 - sum_i q_i at T.
            Teacher tail: 1 - sum_i exp(topk_logprobs_i) at T = 1; at T != 1 it is computed as if that
            mass were spread evenly over the other V - k' tokens, k' = non-missing entries (the cache
            does not say how it is spread; with T > 1 a tiny outside mass grows, as a flat tail's
            would). Both tail masses are floored at 1e-6 (below it, 1 - sum is rounding noise).

    Returns:
        [N] divergence per position, float32 (float64 for float64 logits), differentiable wrt
        student_logits.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    topk_ids, topk_logprobs = fold_out_of_vocab(topk_ids, topk_logprobs, student_logits.shape[-1])
    log_q_topk = gathered_log_softmax(student_logits.to(dtype), topk_ids, temperature)
    return _divergence(
        log_q_topk,
        student_logits.shape[-1],
        topk_logprobs,
        kind=kind,
        temperature=temperature,
        beta=beta,
        tail_bucket=tail_bucket,
    )


def _divergence(
    log_q_topk: Tensor,
    vocab_size: int,
    topk_logprobs: Tensor,
    *,
    kind: Kind,
    temperature: float,
    beta: float,
    tail_bucket: bool,
) -> Tensor:
    """`topk_divergence` from the student's gathered full-vocabulary logprobs log_q_topk [N, k] -> [N]."""
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"unknown divergence kind {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_p, log_q, valid = _buckets(log_q_topk, vocab_size, topk_logprobs, temperature, tail_bucket)
    if kind != "forward_kl" and not tail_bucket:  # renormalize the student over the valid top-k
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_p, log_q, valid)
    if kind == "reverse_kl" or beta == 1.0:
        return _kl(log_q, log_p, valid)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m, valid) + (1.0 - beta) * _kl(log_q, log_m, valid)


@dataclass
class LossSums:
    """Loss sums over n_tokens active positions (not yet divided by any count)."""

    ce_sum: Tensor
    """[] sum of the cross-entropy of the sampled tokens (0 when alpha == 0: skipped)."""
    kd_sum: Tensor
    """[] sum of topk_divergence, without the T² factor (0 when alpha == 1: skipped)."""
    n_tokens: int
    """Number of positions summed over."""

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(self.ce_sum + other.ce_sum, self.kd_sum + other.kd_sum, self.n_tokens + other.n_tokens)


def distill_loss_sums(
    student_logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
) -> LossSums:
    """CE and KD sums over N active positions.

    Args:
        student_logits: [N, V]; labels: [N] sampled token ids, all active (no -100 ignore index: every row
            counts in n_tokens); a label >= V (the student has no such token) adds 0 to CE, its position
            keeps its KD term; topk_ids, topk_logprobs: [N, k], ids >= V folded into the tail as in
            `topk_divergence`.
        alpha: weight of CE (CE at T = 1 on the sampled tokens); alpha == 1 skips the KD term and
            alpha == 0 skips CE (the skipped sum is a constant 0).
        temperature, kind, beta, tail_bucket: as in `topk_divergence`.

    Returns:
        LossSums with ce_sum = sum_t CE_t, kd_sum = sum_t D_t (both [] tensors), n_tokens = N.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    zero = student_logits.new_zeros((), dtype=dtype)
    z = student_logits.to(dtype)
    vocab = z.shape[-1]
    topk_ids, topk_logprobs = fold_out_of_vocab(topk_ids, topk_logprobs, vocab)
    beyond = labels >= vocab  # [N] sampled tokens the student cannot score: left out of CE
    labels = labels.masked_fill(beyond, 0)
    ce_sum = kd_sum = zero
    # One gathered log_softmax (one [N, V] buffer in backward; F.cross_entropy alone keeps another [N, V])
    # serves both terms at T = 1: column 0 is the sampled token, the rest the teacher's top-k.
    shared = 0.0 < alpha < 1.0 and temperature == 1.0
    if shared:
        lq = gathered_log_softmax(z, torch.cat([labels.long()[:, None], topk_ids.long()], dim=-1))
        ce_sum, log_q_topk = -lq[:, 0].masked_fill(beyond, 0.0).sum(), lq[:, 1:]
    elif alpha > 0.0:  # sum over an empty N is 0, still attached to the graph
        ce_sum = -gathered_log_softmax(z, labels[:, None])[:, 0].masked_fill(beyond, 0.0).sum()
    if alpha < 1.0:
        if not shared:
            log_q_topk = gathered_log_softmax(z, topk_ids, temperature)
        kd_sum = _divergence(
            log_q_topk,
            z.shape[-1],
            topk_logprobs,
            kind=kind,
            temperature=temperature,
            beta=beta,
            tail_bucket=tail_bucket,
        ).sum()
    return LossSums(ce_sum=ce_sum, kd_sum=kd_sum, n_tokens=int(student_logits.shape[0]))


def combine(sums: LossSums, *, alpha: float, temperature: float, n_tokens_global: int) -> tuple[Tensor, Tensor, Tensor]:
    """The training loss (alpha CE + (1 - alpha) T² D) / n_tokens_global, and the two means.

    n_tokens_global is the active-token count of the whole gradient-accumulation step (all
    micro-batches, and all ranks if the caller all-reduces it), so that summing the micro-batch
    gradients gives the gradient of the big batch's per-token mean. n_tokens_global == 0 gives a
    loss of exactly 0 that still backprops (zero gradients), not NaN.

    Returns:
        (loss [] differentiable, ce_mean [] detached, kd_mean [] detached, without the T² factor).
    """
    if n_tokens_global < 0:
        raise ValueError(f"n_tokens_global must be >= 0, got {n_tokens_global}")
    scale = 1.0 / n_tokens_global if n_tokens_global > 0 else 0.0  # empty step: 0, never 0/0
    total = alpha * sums.ce_sum + (1.0 - alpha) * temperature**2 * sums.kd_sum
    return total * scale, (sums.ce_sum * scale).detach(), (sums.kd_sum * scale).detach()


def chunked_distill_loss_sums(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
    chunk_size: int = 1024,
) -> LossSums:
    """`distill_loss_sums` on lm_head(hidden), chunk_size positions at a time (`map_head_chunks`).

    Each chunk's logits ([chunk_size, V]) are computed inside a non-reentrant activation checkpoint
    and recomputed in backward, so at most one chunk's logits are alive at once and no [N, V]
    tensor is ever saved for backward. Same values and gradients (wrt hidden and lm_head's
    parameters) as the unchunked loss, up to float summation order.

    Args:
        hidden: [N, d] final hidden states of the N active positions; lm_head: maps [n, d] -> [n, V].
        labels: [N]; topk_ids, topk_logprobs: [N, k]; the rest as in `distill_loss_sums`.

    Returns:
        LossSums over all N positions.
    """

    def chunk_sums(logits: Tensor, y: Tensor, ids: Tensor, lps: Tensor) -> Tensor:
        s = distill_loss_sums(
            logits, y, ids, lps,
            alpha=alpha, temperature=temperature, kind=kind, beta=beta, tail_bucket=tail_bucket,
        )  # fmt: skip
        return torch.stack([s.ce_sum, s.kd_sum])  # [2]

    parts = map_head_chunks(
        chunk_sums, hidden, lm_head, labels, topk_ids, topk_logprobs, chunk_size=chunk_size, checkpointed=True
    )
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return LossSums(ce_sum=total[0], kd_sum=total[1], n_tokens=int(hidden.shape[0]))


def map_head_chunks(
    fn: Callable[..., T],
    hidden: Tensor,
    lm_head: torch.nn.Module,
    *rows: Tensor,
    chunk_size: int,
    checkpointed: bool = False,
) -> list[T]:
    """[fn(lm_head(hidden[c]), *(r[c] for r in rows)) for each chunk c of chunk_size positions], in order.

    The LM head over N positions without an [N, V] logits tensor: only one chunk's logits exist at once.
    Training and evaluation both run the head through here. `checkpointed` puts each chunk in a
    non-reentrant activation checkpoint, so its logits are recomputed in backward instead of saved.
    N == 0 still runs one (empty) chunk, so a training step keeps its graph.

    Args:
        hidden: [N, d]; lm_head: maps [n, d] -> [n, V]; rows: tensors whose first dim is N, sliced alongside.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    def chunk(h: Tensor, *r: Tensor) -> T:
        return fn(lm_head(h), *r)

    out = []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], *(r[sl] for r in rows))
        out.append(checkpoint(chunk, *args, use_reentrant=False) if checkpointed else chunk(*args))
    return out
