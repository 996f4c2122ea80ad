"""The live-teacher losses (pipeline/live/losses.py) against plain NumPy references on tiny tensors, with different
widths and head counts on the two sides, the causal mask, and gradient checks in float64."""

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.live.losses import (
    attention_relation_loss_sum,
    causal_mask,
    feature_loss_sum,
    pooled,
    rkd_angle_loss,
    rkd_distance_loss,
)


def _huber(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.where(d < 1.0, 0.5 * d**2, d - 0.5).mean())


def test_feature_losses_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    # mse: mean over d per position, summed over positions: (0 + 4) / 2 + (0 + 9) / 2
    assert feature_loss_sum(s, t, kind="mse").item() == pytest.approx(6.5)
    # cosine: 1 - cos per position: 1 - 1/sqrt(5), then 1 - (-1)
    assert feature_loss_sum(s, t, kind="cosine").item() == pytest.approx(1 - 1 / math.sqrt(5) + 2.0)
    assert feature_loss_sum(3 * t, t, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    with pytest.raises(ValueError, match="unknown feature loss kind"):
        feature_loss_sum(s, t, kind="l1")


def _relations_np(x: np.ndarray, heads: int, allowed: np.ndarray) -> np.ndarray:
    """[B, T, D] -> [B, R, T, T] relation probabilities, with explicit loops."""
    b, t, d = x.shape
    dr = d // heads
    out = np.zeros((b, heads, t, t))
    for bi, r, i in itertools.product(range(b), range(heads), range(t)):
        xi = x[bi, i, r * dr : (r + 1) * dr]
        scores = np.array([xi @ x[bi, j, r * dr : (r + 1) * dr] / math.sqrt(dr) for j in range(t)])
        scores = np.where(allowed[bi, i], scores, -np.inf)
        e = np.exp(scores - scores[allowed[bi, i]].max())
        out[bi, r, i] = e / e.sum()
    return out


def _attention_np(student, teacher, mask: np.ndarray, rows: np.ndarray, heads: int) -> float:
    b, t = mask.shape
    allowed = np.array([[[j <= i and mask[bi, j] for j in range(t)] for i in range(t)] for bi in range(b)])
    total = 0.0
    for xs, xt in zip(student, teacher, strict=True):
        ps, pt = _relations_np(xs, heads, allowed), _relations_np(xt, heads, allowed)
        for bi, i in zip(*np.nonzero(rows), strict=True):
            kl = [
                sum(
                    pt[bi, r, i, j] * math.log(pt[bi, r, i, j] / ps[bi, r, i, j]) for j in range(t) if allowed[bi, i, j]
                )
                for r in range(heads)
            ]
            total += float(np.mean(kl))
    return total / len(student)


@pytest.fixture
def qkv():
    """Student: query width 8, key/value width 4 (GQA-like); teacher: widths 12 and 6. Two sequences, the second
    right-padded; rows count three completion positions."""
    g = torch.Generator().manual_seed(0)
    student = tuple(torch.randn(2, 5, w, generator=g, dtype=torch.float64) for w in (8, 4, 4))
    teacher = tuple(torch.randn(2, 5, w, generator=g, dtype=torch.float64) for w in (12, 6, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rows = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    return student, teacher, mask, rows


def test_attention_relation_loss_matches_a_loop_reference_across_widths(qkv):
    student, teacher, mask, rows = qkv
    got = attention_relation_loss_sum(student, teacher, attention_mask=mask, rows=rows, heads=2)
    want = _attention_np(
        [x.numpy() for x in student], [x.numpy() for x in teacher], mask.numpy(), rows.numpy(), heads=2
    )
    assert got.item() == pytest.approx(want, rel=1e-5)
    # equal relations on both sides: 0, whatever the widths (the teacher's vectors scaled to the student's width)
    same = attention_relation_loss_sum(student, student, attention_mask=mask, rows=rows, heads=2)
    assert same.item() == pytest.approx(0.0, abs=1e-9)


def test_attention_relation_loss_respects_the_causal_and_padding_masks(qkv):
    student, teacher, mask, rows = qkv
    base = attention_relation_loss_sum(student, teacher, attention_mask=mask, rows=rows, heads=2)
    # a key after every counted query row of sequence 0 (position 4) and padded keys of sequence 1 change nothing
    changed = tuple(x.clone() for x in student)
    for x in changed:
        x[0, 4] += 10.0
        x[1, 3:] -= 7.0
    after = attention_relation_loss_sum(changed, teacher, attention_mask=mask, rows=rows, heads=2)
    assert after.item() == pytest.approx(base.item(), rel=1e-12)
    # a key the rows do see changes it
    seen = tuple(x.clone() for x in student)
    seen[0][0, 1] += 1.0
    assert attention_relation_loss_sum(seen, teacher, attention_mask=mask, rows=rows, heads=2).item() != pytest.approx(
        base.item(), rel=1e-6
    )
    assert causal_mask(mask)[1].tolist()[4] == [True, True, True, False, False]


def test_relation_heads_must_divide_the_widths(qkv):
    student, teacher, mask, rows = qkv
    with pytest.raises(ValueError, match="does not split into 3 relation heads"):
        attention_relation_loss_sum(student, teacher, attention_mask=mask, rows=rows, heads=3)


def test_rkd_losses_match_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sn, tn = s.numpy(), t.numpy()
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    ds = np.array([np.linalg.norm(sn[i] - sn[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(tn[i] - tn[j]) for i, j in pairs])
    assert rkd_distance_loss(s, t).item() == pytest.approx(_huber(ds / ds.mean(), dt / dt.mean()), rel=1e-9)

    def cosines(x):
        out = []
        for i, j, k in itertools.permutations(range(4), 3):
            a, b = x[j] - x[i], x[k] - x[i]
            out.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        return np.array(out)

    assert rkd_angle_loss(s, t).item() == pytest.approx(_huber(cosines(sn), cosines(tn)), rel=1e-9)


def test_rkd_losses_ignore_scale_and_rotation_and_need_enough_samples():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    y = 4.0 * x @ rotation + 1.5
    assert rkd_distance_loss(x, y).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle_loss(x, y).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_distance_loss(x[:1], y[:1]).item() == 0.0
    assert rkd_angle_loss(x[:2], y[:2]).item() == 0.0


def test_pooled_averages_counted_positions_and_drops_sequences_without_any():
    h = torch.arange(12.0).view(3, 2, 2)
    rows = torch.tensor([[1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    mean, keep = pooled(h, rows)
    assert keep.tolist() == [True, True, False]
    assert mean.tolist() == [[1.0, 2.0], [6.0, 7.0]]


def test_gradients_are_right(qkv):
    student, teacher, mask, rows = qkv
    s_attn = tuple(x.clone().requires_grad_() for x in student)
    assert torch.autograd.gradcheck(
        lambda *xs: attention_relation_loss_sum(xs, teacher, attention_mask=mask, rows=rows, heads=2), s_attn
    )
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for fn in (rkd_distance_loss, rkd_angle_loss):
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(x, b), (a,))
    c = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for kind in ("mse", "cosine"):
        assert torch.autograd.gradcheck(
            lambda x, kind=kind: feature_loss_sum(x, c, kind=kind).double(), (b.clone().requires_grad_(),)
        )
