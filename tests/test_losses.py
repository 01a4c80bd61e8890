"""Losses of the supernet recipes against float64 formulas written out here."""

import math

import pytest
import torch
from eqnet.train.losses import (
    cosine_distill,
    gpg_loss,
    gpg_losses,
    kl_distill,
    min_norm_weights,
    soft_cross_entropy,
    wdr_loss,
)


def _moments64(w):
    """Skewness and kurtosis with plain float64 sums (population moments)."""
    v = [float(t) for t in w.flatten().tolist()]
    n = len(v)
    mu = sum(v) / n
    var = sum((t - mu) ** 2 for t in v) / n
    sd = math.sqrt(var)
    skew = sum(((t - mu) / sd) ** 3 for t in v) / n
    kurt = sum(((t - mu) / sd) ** 4 for t in v) / n
    return skew, kurt


def _log_softmax64(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(t - m) for t in z))
    return [t - lse for t in z]


def _ce64(z, y):
    return -_log_softmax64(z)[y]


def _kl64(t, s):
    lt, ls = _log_softmax64(t), _log_softmax64(s)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def test_wdr_matches_hand_moments():
    g = torch.Generator().manual_seed(1)
    weights = [
        torch.randn(4, 3, 3, 3, generator=g),
        torch.rand(10, 7, generator=g) ** 2,  # skewed
        torch.randn(5, generator=g).exp(),  # heavy tailed
    ]
    moments = [_moments64(w) for w in weights]
    expected = (
        0.015 * sum((k - 1.8) ** 2 for _, k in moments) / 3
        + 1.0 * sum(s**2 for s, _ in moments) / 3
    )
    got = wdr_loss(weights)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    got64 = wdr_loss([w.double() for w in weights])
    assert float(got64) == pytest.approx(expected, rel=1e-9)


def test_wdr_weights_and_gradient():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    _s, k = _moments64(w.detach())
    got = wdr_loss([w], lambda_kurt=0.3, lambda_skew=0.0)
    assert float(got.detach()) == pytest.approx(0.3 * (k - 1.8) ** 2, rel=1e-9)
    assert torch.autograd.gradcheck(lambda t: wdr_loss([t]), (w,))


def test_wdr_uniform_weights_are_near_zero():
    # a large uniform sample has skew ~0 and kurtosis ~1.8: the regularizer's optimum
    w = torch.rand(200_000, generator=torch.Generator().manual_seed(3))
    assert float(wdr_loss([w])) < 1e-4


def test_wdr_rejects_empty():
    with pytest.raises(ValueError, match="weights"):
        wdr_loss([])


def test_soft_cross_entropy_hard_and_soft():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 3, 1, 1, 2])
    hard = sum(_ce64(logits[i].tolist(), int(y[i])) for i in range(5)) / 5
    assert float(soft_cross_entropy(logits, y)) == pytest.approx(hard, rel=1e-6)
    target = torch.softmax(torch.randn(5, 4, generator=g), dim=1)
    soft = (
        sum(
            -sum(float(target[i, n]) * _log_softmax64(logits[i].tolist())[n] for n in range(4))
            for i in range(5)
        )
        / 5
    )
    assert float(soft_cross_entropy(logits, target)) == pytest.approx(soft, rel=1e-6)


def test_gpg_three_subnets_match_hand_values():
    g = torch.Generator().manual_seed(5)
    high, rand, low = (torch.randn(3, 5, generator=g) for _ in range(3))
    y = torch.tensor([4, 0, 2])
    rows = [[t.tolist() for t in z] for z in (high, rand, low)]

    def ce_ref(z):
        return sum(_ce64(z[i], int(y[i])) for i in range(3)) / 3

    def kl_ref(t, s):
        return sum(_kl64(t[i], s[i]) for i in range(3)) / 3

    expected = [
        ce_ref(rows[0]),
        0.5 * kl_ref(rows[0], rows[1]) + 0.5 * ce_ref(rows[1]),
        0.5 * kl_ref(rows[1], rows[2]) + 0.5 * ce_ref(rows[2]),
    ]
    got = gpg_losses([high, rand, low], lambda z: soft_cross_entropy(z, y))
    assert [float(t) for t in got] == pytest.approx(expected, rel=1e-5)


def test_gpg_teacher_is_detached():
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(4, 3, generator=g, requires_grad=True)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = gpg_loss(teacher, student, lambda z: soft_cross_entropy(z, y))
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_kl_is_zero_for_equal_and_positive_otherwise():
    z = torch.randn(3, 6)
    assert float(kl_distill(z, z)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_distill(z, z.flip(1))) > 0


def test_cosine_distill_matches_hand_values():
    g = torch.Generator().manual_seed(7)
    t, s = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    expected = 0.0
    for i in range(4):
        pt = [math.exp(v) for v in _log_softmax64(t[i].tolist())]
        ps = [math.exp(v) for v in _log_softmax64(s[i].tolist())]
        dot = sum(a * b for a, b in zip(pt, ps))
        cos = dot / math.sqrt(sum(a * a for a in pt) * sum(b * b for b in ps))
        expected += (1 - cos) / 4
    assert float(cosine_distill(t, s)) == pytest.approx(expected, rel=1e-5)


def test_min_norm_two_gradients_closed_form():
    g1 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    g2 = torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64)
    # min_a ||a g1 + (1-a) g2||^2  =>  a = (g2 - g1).g2 / ||g1 - g2||^2, clipped to [0, 1]
    a = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))
    a = min(max(a, 0.0), 1.0)
    alpha = min_norm_weights([g1, g2])
    assert alpha.tolist() == pytest.approx([a, 1 - a], abs=1e-9)


def test_min_norm_dominated_gradient_picks_vertex():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([3.0, 0.0], dtype=torch.float64)  # same direction, longer
    assert min_norm_weights([g1, g2]).tolist() == pytest.approx([1.0, 0.0], abs=1e-9)


def test_min_norm_orthogonal_gradients():
    # orthogonal g_i with norms c_i: minimizing sum a_i^2 c_i^2 on the simplex gives
    # a_i proportional to 1 / c_i^2
    c = [1.0, 2.0, 0.5, 3.0]
    grads = [torch.eye(4, dtype=torch.float64)[i] * c[i] for i in range(4)]
    inv = [1 / v**2 for v in c]
    expected = [v / sum(inv) for v in inv]
    assert min_norm_weights(grads).tolist() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_three_gradients_beats_simplex_grid(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 4, generator=g, dtype=torch.float64)
    alpha = min_norm_weights(grads)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((alpha >= 0).all())
    steps = 400
    i, j = torch.meshgrid(torch.arange(steps + 1.0), torch.arange(steps + 1.0), indexing="ij")
    keep = (i + j) <= steps
    grid = torch.stack([i[keep], j[keep], steps - i[keep] - j[keep]], dim=1).double() / steps
    best = float(((grid @ grads) ** 2).sum(dim=1).min())
    got = float(((alpha @ grads) ** 2).sum())
    assert got <= best + 1e-12
