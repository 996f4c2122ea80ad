"""Tests for pipeline/losses.py: relations to dense references and hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    LossSums,
    chunked_distill_loss_sums,
    combine,
    distill_loss_sums,
    topk_divergence,
)

KINDS = ("forward_kl", "reverse_kl", "jsd")
F64 = torch.float64


def _teacher(n: int, v: int, k: int, seed: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full teacher logprobs [n, v] and its sorted top-k (ids [n, k], logprobs [n, k])."""
    g = torch.Generator().manual_seed(seed)
    full = F.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * 2.0, dim=-1).to(dtype)
    lps, ids = full.topk(k, dim=-1)
    return full, ids, lps


def _logits(n: int, v: int, seed: int, dtype=F64, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=F64) * scale).to(dtype)


def _on_support(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student logits [N, V] with everything outside ids set to -inf (so q is renormalized on ids)."""
    return torch.full_like(z, float("-inf")).scatter(-1, ids, z.gather(-1, ids))


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Dense KL(a ‖ b) per row through F.kl_div (input = log b, target = log a)."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def _trl_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL generalized_jsd_loss (reduction none, summed over the vocab), written out by hand."""
    if beta == 0:
        return _kl_rows(log_p, log_q)
    if beta == 1:
        return _kl_rows(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
    return beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind: str, temperature: float, tail: bool) -> None:
    z = _logits(6, 11, seed=0)
    lps, ids = F.log_softmax(z, dim=-1).sort(dim=-1, descending=True)  # k = V, teacher == student
    d = topk_divergence(z, ids, lps, kind=kind, temperature=temperature, tail_bucket=tail)
    assert d.shape == (6,) and d.dtype == F64
    torch.testing.assert_close(d, torch.zeros_like(d), atol=1e-9, rtol=0)
    d32 = topk_divergence(z.float(), ids, lps.float(), kind=kind, temperature=temperature, tail_bucket=tail)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32, torch.zeros_like(d32), atol=1e-5, rtol=0)


def test_identical_below_full_k() -> None:
    """k < V, teacher == student: forward (q not renormalized) = -log sum_topk q; the others are 0."""
    z = _logits(5, 16, seed=1)
    lps, ids = F.log_softmax(z, dim=-1).topk(6, dim=-1)
    fwd = topk_divergence(z, ids, lps, kind="forward_kl")
    torch.testing.assert_close(fwd, -torch.logsumexp(lps, dim=-1))
    assert (fwd > 0).all()
    for kind in ("reverse_kl", "jsd"):
        torch.testing.assert_close(topk_divergence(z, ids, lps, kind=kind), torch.zeros(5, dtype=F64))
    for kind in KINDS:  # at T = 1 the tail buckets match exactly too
        d = topk_divergence(z, ids, lps, kind=kind, tail_bucket=True)
        torch.testing.assert_close(d, torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_dense_kl(temperature: float) -> None:
    full, ids, lps = _teacher(7, 13, 13, seed=2)
    z = _logits(7, 13, seed=3)
    log_q = F.log_softmax(z / temperature, dim=-1)
    log_p = F.log_softmax(full / temperature, dim=-1)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))  # order of the k is free
    for i, lp in ((ids, lps), (ids[:, perm], lps[:, perm])):
        fwd = topk_divergence(z, i, lp, kind="forward_kl", temperature=temperature)
        rev = topk_divergence(z, i, lp, kind="reverse_kl", temperature=temperature)
        torch.testing.assert_close(fwd, _kl_rows(log_p, log_q))
        torch.testing.assert_close(rev, _kl_rows(log_q, log_p))
        for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
            jsd = topk_divergence(z, i, lp, kind="jsd", beta=beta, temperature=temperature)
            torch.testing.assert_close(jsd, _trl_jsd(log_q, log_p, beta))


def test_jsd_ends_and_middle_on_support() -> None:
    _, ids, lps = _teacher(8, 20, 5, seed=4)
    z = _logits(8, 20, seed=5)
    zs = _on_support(z, ids)
    fwd_support = topk_divergence(zs, ids, lps, kind="forward_kl")
    torch.testing.assert_close(topk_divergence(z, ids, lps, kind="jsd", beta=0.0), fwd_support)
    rev = topk_divergence(z, ids, lps, kind="reverse_kl")
    torch.testing.assert_close(topk_divergence(z, ids, lps, kind="jsd", beta=1.0), rev)
    torch.testing.assert_close(topk_divergence(zs, ids, lps, kind="reverse_kl"), rev)
    log_q = F.log_softmax(z.gather(-1, ids), dim=-1)  # renormalized student on the top-k
    log_p = F.log_softmax(lps, dim=-1)
    for beta in (0.5, 0.25):
        d = topk_divergence(z, ids, lps, kind="jsd", beta=beta)
        torch.testing.assert_close(d, _trl_jsd(log_q, log_p, beta))
    # symmetric at beta = 0.5 and bounded by log 2
    d = topk_divergence(z, ids, lps, kind="jsd", beta=0.5)
    assert (d >= 0).all() and (d <= math.log(2)).all()


def test_hand_computed_v4_k2() -> None:
    """q = (.4, .3, .2, .1); teacher top-2 ids (1, 0) with probs (.5, .3), so teacher tail .2."""
    z = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=F64).log()
    ids = torch.tensor([[1, 0]])
    lps = torch.tensor([[0.5, 0.3]], dtype=F64).log()
    ln = math.log
    # top-k only: p = (.5, .3) / .8 = (.625, .375); student at ids = (.3, .4), renormalized (3/7, 4/7)
    fwd = 0.625 * ln(0.625 / 0.3) + 0.375 * ln(0.375 / 0.4)
    rev = 3 / 7 * ln((3 / 7) / 0.625) + 4 / 7 * ln((4 / 7) / 0.375)
    m = (0.5 * (0.625 + 3 / 7), 0.5 * (0.375 + 4 / 7))
    jsd = 0.5 * (0.625 * ln(0.625 / m[0]) + 0.375 * ln(0.375 / m[1])) + 0.5 * (
        3 / 7 * ln((3 / 7) / m[0]) + 4 / 7 * ln((4 / 7) / m[1])
    )
    # tail bucket at T = 1: p = (.5, .3, .2), q = (.3, .4, .3)
    p3, q3 = (0.5, 0.3, 0.2), (0.3, 0.4, 0.3)
    fwd_t = sum(a * ln(a / b) for a, b in zip(p3, q3, strict=True))
    rev_t = sum(b * ln(b / a) for a, b in zip(p3, q3, strict=True))
    # tail at T = 2: the teacher's .2 taken as .1 + .1, every weight square-rooted, then normalized
    wp = (0.5**0.5, 0.3**0.5, 2 * 0.1**0.5)
    wq = (0.3**0.5, 0.4**0.5, 0.2**0.5 + 0.1**0.5)
    p2 = [w / sum(wp) for w in wp]
    q2 = [w / sum(wq) for w in wq]
    fwd_t2 = sum(a * ln(a / b) for a, b in zip(p2, q2, strict=True))
    cases = [
        (dict(kind="forward_kl"), fwd),
        (dict(kind="reverse_kl"), rev),
        (dict(kind="jsd", beta=0.5), jsd),
        (dict(kind="forward_kl", tail_bucket=True), fwd_t),
        (dict(kind="reverse_kl", tail_bucket=True), rev_t),
        (dict(kind="forward_kl", tail_bucket=True, temperature=2.0), fwd_t2),
    ]
    for kwargs, want in cases:
        got = topk_divergence(z, ids, lps, **kwargs)
        assert got.item() == pytest.approx(want, rel=1e-12), kwargs


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_is_scaling_then_renormalizing(kind: str) -> None:
    _, ids, lps = _teacher(6, 30, 8, seed=6)
    z = _logits(6, 30, seed=7)
    t = 2.0
    got = topk_divergence(z, ids, lps, kind=kind, temperature=t, beta=0.3)
    want = topk_divergence(z / t, ids, F.log_softmax(lps / t, dim=-1), kind=kind, temperature=1.0, beta=0.3)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [7, 9], ids=["3-others", "1-other"])
def test_tail_bucket_equals_grouped_dense(kind: str, temperature: float, k: int) -> None:
    """V = 10, k = 7 or 9; the teacher's other tokens share their mass equally, so the tail-at-T
    assumption is exact and the buckets equal the dense tempered distributions grouped by hand."""
    v = 10
    g = torch.Generator().manual_seed(8)
    top = torch.rand(4, k, generator=g, dtype=F64) * 5 + 0.5  # above the others' 0
    full = F.log_softmax(torch.cat([top, torch.zeros(4, v - k, dtype=F64)], dim=-1), dim=-1)
    perm = torch.randperm(v, generator=g)
    full = full[:, perm]  # scatter the top-k over the vocabulary
    lps, ids = full.topk(k, dim=-1)
    z = _logits(4, v, seed=9)

    def grouped(log_full: torch.Tensor) -> torch.Tensor:  # [4, V] -> [4, k + 1] log buckets
        probs = F.softmax(log_full / temperature, dim=-1)
        inside = probs.gather(-1, ids)
        return torch.cat([inside, 1 - inside.sum(-1, keepdim=True)], dim=-1).log()

    log_p, log_q = grouped(full), grouped(z)
    want = {"forward_kl": _kl_rows(log_p, log_q), "reverse_kl": _kl_rows(log_q, log_p)}
    want["jsd"] = _trl_jsd(log_q, log_p, 0.4)
    got = topk_divergence(z, ids, lps, kind=kind, temperature=temperature, beta=0.4, tail_bucket=True)
    torch.testing.assert_close(got, want[kind])


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_missing_entries_are_dropped(kind: str, tail: bool) -> None:
    """-inf teacher entries (fewer than k returned) = those entries absent; all-missing row = 0."""
    _, ids, lps = _teacher(5, 25, 6, seed=10)
    z = _logits(5, 25, seed=11).requires_grad_()
    padded_ids, padded_lps = ids.clone(), lps.clone()
    padded_ids[:, 4:] = 0  # junk (valid) ids under the -inf entries, duplicates included
    padded_lps[:, 4:] = float("-inf")
    padded_lps[4] = float("-inf")  # row 4: the teacher returned nothing
    for t in (1.0, 2.0):
        kw = dict(kind=kind, temperature=t, tail_bucket=tail)
        got = topk_divergence(z, padded_ids, padded_lps, **kw)
        want = topk_divergence(z, ids[:, :4], lps[:, :4], **kw)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:4], want[:4])
        assert got[4].item() == 0.0
        (grad,) = torch.autograd.grad(got.sum(), z)
        assert torch.isfinite(grad).all() and (grad[4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_give_finite_grads(dtype: torch.dtype) -> None:
    _, ids, lps = _teacher(16, 64, 8, seed=12, dtype=dtype)
    lps[:3, 6:] = float("-inf")
    for scale in (2.0, 40.0):  # 40: near one-hot students, far from the teacher
        z = _logits(16, 64, seed=13, dtype=dtype, scale=scale).requires_grad_()
        for kind in KINDS:
            for tail in (False, True):
                for t in (1.0, 2.0):
                    d = topk_divergence(z, ids, lps, kind=kind, temperature=t, tail_bucket=tail)
                    assert d.dtype == torch.float32 and torch.isfinite(d).all()
                    (grad,) = torch.autograd.grad(d.sum(), z)
                    assert grad.dtype == dtype and torch.isfinite(grad).all(), (kind, tail, t, scale)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_forward_kl_gradient_closed_form(temperature: float) -> None:
    """d/dz sum_i p_i (log p_i - log q_i) = (softmax(z / T) - p scattered on ids) / T."""
    _, ids, lps = _teacher(4, 12, 5, seed=14)
    z = _logits(4, 12, seed=15).requires_grad_()
    d = topk_divergence(z, ids, lps, kind="forward_kl", temperature=temperature)
    (grad,) = torch.autograd.grad(d.sum(), z)
    p = torch.zeros(4, 12, dtype=F64).scatter(-1, ids, F.softmax(lps / temperature, dim=-1))
    torch.testing.assert_close(grad, (F.softmax(z.detach() / temperature, dim=-1) - p) / temperature)


def test_gradcheck_all_kinds() -> None:
    _, ids, lps = _teacher(3, 7, 3, seed=16)
    lps[0, 2] = float("-inf")
    z = _logits(3, 7, seed=17).requires_grad_()
    for kind in KINDS:
        for tail in (False, True):
            kw = dict(kind=kind, temperature=1.5, beta=0.3, tail_bucket=tail)
            assert torch.autograd.gradcheck(lambda x, kw=kw: topk_divergence(x, ids, lps, **kw), (z,))


def _batch(n: int, v: int = 17, k: int = 4, seed: int = 20):
    _, ids, lps = _teacher(n, v, k, seed=seed)
    z = _logits(n, v, seed=seed + 1).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed + 2))
    return z, labels, ids, lps


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_scaled_kd() -> None:
    z, labels, ids, lps = _batch(9)
    s = distill_loss_sums(z, labels, ids, lps, alpha=1.0, temperature=2.0)
    assert s.n_tokens == 9 and s.kd_sum.item() == 0.0  # KD skipped
    loss, ce_mean, kd_mean = combine(s, alpha=1.0, temperature=2.0, n_tokens_global=9)
    torch.testing.assert_close(loss, F.cross_entropy(z, labels))
    torch.testing.assert_close(ce_mean, F.cross_entropy(z, labels).detach())
    assert not ce_mean.requires_grad and kd_mean.item() == 0.0
    s = distill_loss_sums(z, labels, ids, lps, alpha=0.0, temperature=2.0, kind="reverse_kl")
    assert s.ce_sum.item() == 0.0  # CE skipped
    loss, _, kd_mean = combine(s, alpha=0.0, temperature=2.0, n_tokens_global=9)
    d = topk_divergence(z, ids, lps, kind="reverse_kl", temperature=2.0)
    torch.testing.assert_close(loss, 4.0 * d.mean())
    torch.testing.assert_close(kd_mean, d.mean().detach())


def test_mixed_alpha_and_accumulation_matches_one_big_batch() -> None:
    z, labels, ids, lps = _batch(10)
    kw = dict(alpha=0.3, temperature=2.0, kind="jsd", beta=0.5, tail_bucket=True)
    s = distill_loss_sums(z, labels, ids, lps, **kw)
    loss, _, _ = combine(s, alpha=0.3, temperature=2.0, n_tokens_global=10)
    want = (
        0.3 * F.cross_entropy(z, labels)
        + 0.7 * 4.0 * topk_divergence(z, ids, lps, kind="jsd", temperature=2.0, tail_bucket=True).mean()
    )
    torch.testing.assert_close(loss, want)
    (g_big,) = torch.autograd.grad(loss, z)
    g_acc = torch.zeros_like(z)
    for sl in (slice(0, 4), slice(4, 10)):  # two micro-batches, one global count
        part = distill_loss_sums(z[sl], labels[sl], ids[sl], lps[sl], **kw)
        (g,) = torch.autograd.grad(combine(part, alpha=0.3, temperature=2.0, n_tokens_global=10)[0], z)
        g_acc += g
    torch.testing.assert_close(g_acc, g_big)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_empty_batch_gives_zero_and_backprops(alpha: float) -> None:
    z = torch.zeros(0, 17, dtype=F64, requires_grad=True)
    ids, lps = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=F64)
    labels = torch.zeros(0, dtype=torch.long)
    s = distill_loss_sums(z, labels, ids, lps, alpha=alpha, temperature=2.0, tail_bucket=True)
    loss, ce_mean, kd_mean = combine(s, alpha=alpha, temperature=2.0, n_tokens_global=0)
    assert s.n_tokens == 0 and loss.item() == 0.0 and ce_mean.item() == 0.0 and kd_mean.item() == 0.0
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, 17)
    head = torch.nn.Linear(8, 17, dtype=F64)
    h = torch.zeros(0, 8, dtype=F64, requires_grad=True)
    s = chunked_distill_loss_sums(h, head, labels, ids, lps, alpha=alpha, temperature=2.0, chunk_size=4)
    loss, _, _ = combine(s, alpha=alpha, temperature=2.0, n_tokens_global=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_loss_sums_add() -> None:
    a = LossSums(torch.tensor(1.0), torch.tensor(2.0), 3)
    b = a + LossSums(torch.tensor(0.5), torch.tensor(0.25), 2)
    assert (b.ce_sum.item(), b.kd_sum.item(), b.n_tokens) == (1.5, 2.25, 5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(alpha=0.5, temperature=2.0, kind="forward_kl", beta=0.5, tail_bucket=False),
        dict(alpha=0.2, temperature=1.0, kind="jsd", beta=0.3, tail_bucket=True),
        dict(alpha=0.0, temperature=0.8, kind="reverse_kl", beta=0.5, tail_bucket=True),
        dict(alpha=1.0, temperature=1.0, kind="forward_kl", beta=0.5, tail_bucket=False),
    ],
)
def test_chunked_equals_unchunked(kw: dict) -> None:
    n, d, v = 23, 8, 40
    torch.manual_seed(30)
    head = torch.nn.Linear(d, v, dtype=F64)
    hidden = torch.randn(n, d, dtype=F64, requires_grad=True)
    _, ids, lps = _teacher(n, v, 6, seed=31)
    lps[::5, 4:] = float("-inf")
    labels = torch.randint(0, v, (n,))
    params = (hidden, head.weight, head.bias)

    def record(saved: list[int]):  # numel of each tensor autograd keeps for backward, outside checkpoints
        return torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t)

    ref_saved: list[int] = []
    with record(ref_saved):
        ref = distill_loss_sums(head(hidden), labels, ids, lps, **kw)
    ref_loss = combine(ref, alpha=kw["alpha"], temperature=kw["temperature"], n_tokens_global=n)[0]
    ref_grads = torch.autograd.grad(ref_loss, params)
    saved: list[int] = []
    with record(saved):
        got = chunked_distill_loss_sums(hidden, head, labels, ids, lps, chunk_size=5, **kw)
    got_loss = combine(got, alpha=kw["alpha"], temperature=kw["temperature"], n_tokens_global=n)[0]
    # unchunked keeps [N, V] tensors; chunked keeps less than one [N, V] in all (logits are recomputed)
    assert max(ref_saved) >= n * v and sum(saved) < n * v
    assert got.n_tokens == n
    torch.testing.assert_close(got.ce_sum, ref.ce_sum)
    torch.testing.assert_close(got.kd_sum, ref.kd_sum)
    for g, r in zip(torch.autograd.grad(got_loss, params), ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_bad_arguments_raise() -> None:
    z, labels, ids, lps = _batch(3)
    with pytest.raises(ValueError):
        topk_divergence(z, ids, lps, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        topk_divergence(z, ids, lps, kind="jsd", beta=1.5)
    with pytest.raises(ValueError):
        distill_loss_sums(z, labels, ids, lps, alpha=-0.1)


def test_gathered_log_softmax_matches_autograd_and_passes_gradcheck():
    from pipeline.losses import gathered_log_softmax

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.randint(0, 11, (5, 4), generator=g)
    for t in (1.0, 0.7, 2.5):
        ref = torch.log_softmax(z / t, -1).gather(-1, ids)
        out = gathered_log_softmax(z, ids, t)
        torch.testing.assert_close(out, ref)
        w = torch.randn(5, 4, generator=g, dtype=torch.float64)
        (gz,) = torch.autograd.grad((out * w).sum(), z)
        (gref,) = torch.autograd.grad((ref * w).sum(), z)
        torch.testing.assert_close(gz, gref)
        assert torch.autograd.gradcheck(lambda x, t=t: gathered_log_softmax(x, ids, t), (z,))
    empty = gathered_log_softmax(torch.zeros(0, 11, requires_grad=True), torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_on_student_samples_the_tail_bucket_is_what_keeps_the_mass_on_the_teacher_topk(kind):
    """A student whose mass sits outside the teacher's top-k (as on its own samples), trained to convergence on one
    position: with the tail bucket it reaches the teacher's probabilities and tail exactly; without it, the
    renormalised divergence is satisfied while the mass drifts off the top-k (the recommended on-policy setting is
    therefore tail_bucket: true, docs/design.md)."""
    p = torch.tensor([[0.6, 0.39]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    found = {}
    for tail in (True, False):
        z = torch.zeros(1, 10, dtype=torch.float64)
        z[0, 5] = 3.0  # 0.69 of the student's mass on a token the teacher does not rank
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(600):
            opt.zero_grad()
            topk_divergence(z, ids, p.log(), kind=kind, tail_bucket=tail).sum().backward()
            opt.step()
        found[tail] = z.detach().softmax(-1)[0, :2]
    torch.testing.assert_close(found[True], p[0], atol=2e-3, rtol=0)
    assert float(found[False].sum()) < 0.2, "without the tail the student's mass leaves the teacher's top-k"


# ---- the numbers a training run logs: both CE paths, the T² weighting, the count, the defaults -----------------


@pytest.mark.parametrize(
    "alpha,temperature",
    [(0.3, 1.0), (0.3, 0.5), (0.0, 1.0), (1.0, 1.0), (0.7, 3.0)],
    ids=["shared-gather", "tempered", "kd-only", "ce-only", "T=3"],
)
def test_loss_sums_and_combine_equal_their_references(alpha: float, temperature: float) -> None:
    """CE from the shared gather (0 < alpha < 1 at T = 1) or its own, the skipped sum exactly 0, and the loss
    alpha CE + (1 - alpha) T² D over the global count, at temperatures where T² and 2T differ."""
    z, labels, ids, lps = _batch(7)
    s = distill_loss_sums(z, labels, ids, lps, alpha=alpha, temperature=temperature)
    ce = F.cross_entropy(z, labels, reduction="sum") if alpha > 0 else torch.zeros((), dtype=F64)
    kd = topk_divergence(z, ids, lps, temperature=temperature).sum() if alpha < 1 else torch.zeros((), dtype=F64)
    torch.testing.assert_close(s.ce_sum, ce)
    torch.testing.assert_close(s.kd_sum, kd)
    assert s.ce_sum.dtype == s.kd_sum.dtype == F64 and s.n_tokens == 7
    loss, ce_mean, kd_mean = combine(s, alpha=alpha, temperature=temperature, n_tokens_global=7)
    torch.testing.assert_close(loss, (alpha * ce + (1 - alpha) * temperature**2 * kd) / 7)
    torch.testing.assert_close(ce_mean, ce.detach() / 7)
    torch.testing.assert_close(kd_mean, kd.detach() / 7)


def test_combine_divides_by_the_global_count_and_an_empty_step_is_zero() -> None:
    s = LossSums(torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64), 1)
    assert [t.item() for t in combine(s, alpha=0.25, temperature=3.0, n_tokens_global=1)] == [0.5 + 0.75 * 9 * 3, 2, 3]
    assert [t.item() for t in combine(s, alpha=0.25, temperature=3.0, n_tokens_global=4)] == pytest.approx(
        [(0.5 + 0.75 * 9 * 3) / 4, 0.5, 0.75]
    )
    assert [t.item() for t in combine(s, alpha=0.25, temperature=3.0, n_tokens_global=0)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="n_tokens_global must be >= 0, got -1"):
        combine(s, alpha=0.25, temperature=3.0, n_tokens_global=-1)


def test_defaults_are_the_documented_ones() -> None:
    """T = 1, forward KL, beta 0.5, no tail bucket: what a caller that sets none of them gets."""
    z, labels, ids, lps = _batch(6)
    explicit = dict(temperature=1.0, kind="forward_kl", beta=0.5, tail_bucket=False)
    torch.testing.assert_close(topk_divergence(z, ids, lps), topk_divergence(z, ids, lps, **explicit))
    for alpha in (0.0, 0.4):
        got, want = (
            distill_loss_sums(z, labels, ids, lps, alpha=alpha),
            distill_loss_sums(z, labels, ids, lps, alpha=alpha, **explicit),
        )
        torch.testing.assert_close((got.ce_sum, got.kd_sum), (want.ce_sum, want.kd_sum))
    torch.manual_seed(1)
    head, hidden = torch.nn.Linear(5, 17, dtype=F64), torch.randn(6, 5, dtype=F64)
    got = chunked_distill_loss_sums(hidden, head, labels, ids, lps, alpha=0.4)
    want = distill_loss_sums(head(hidden), labels, ids, lps, alpha=0.4, **explicit)
    torch.testing.assert_close((got.ce_sum, got.kd_sum), (want.ce_sum, want.kd_sum))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_are_computed_in_float32(dtype: torch.dtype) -> None:
    """The sums of half-precision logits are those of the same logits upcast (exactly), in float32."""
    z, labels, ids, lps = _batch(8)
    half = z.detach().to(dtype)
    for alpha in (0.0, 0.5, 1.0):
        got = distill_loss_sums(half, labels, ids, lps.float(), alpha=alpha, temperature=1.0)
        want = distill_loss_sums(half.float(), labels, ids, lps.float(), alpha=alpha, temperature=1.0)
        assert got.ce_sum.dtype == got.kd_sum.dtype == torch.float32
        assert torch.equal(got.ce_sum, want.ce_sum) and torch.equal(got.kd_sum, want.kd_sum)


def test_map_head_chunks_calls_once_per_chunk_and_once_when_empty() -> None:
    from pipeline.losses import map_head_chunks

    head = torch.nn.Linear(3, 4)

    def rows(n: int, size: int) -> list:
        return map_head_chunks(
            lambda lg, r: (lg.shape[0], r.tolist()), torch.zeros(n, 3), head, torch.arange(n), chunk_size=size
        )

    assert rows(5, 2) == [(2, [0, 1]), (2, [2, 3]), (1, [4])]
    assert rows(1, 1) == [(1, [0])]
    assert rows(0, 1) == [(0, [])]  # one empty chunk: a training step keeps its graph
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        map_head_chunks(lambda logits: logits, torch.zeros(2, 3), head, chunk_size=0)


def test_bad_arguments_name_the_argument() -> None:
    z, labels, ids, lps = _batch(3)
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 1.5"):
        distill_loss_sums(z, labels, ids, lps, alpha=1.5)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        topk_divergence(z, ids, lps, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\], got 1.5"):
        topk_divergence(z, ids, lps, kind="jsd", beta=1.5)
