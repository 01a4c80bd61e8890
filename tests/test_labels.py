"""Online adaptive labels (MultiQuant eq. 3-4) against a literal float64 transcription."""

import pytest
import torch
from eqnet.train.labels import OnlineAdaptiveLabels


def _reference_soft(probs, targets, n):
    """Eq. 3 and the per-epoch normalization, sample by sample; None for unseen classes."""
    acc = [[0.0] * n for _ in range(n)]
    for i, y in enumerate(targets):
        preds = [max(range(n), key=lambda c: p[i][c]) for p in probs]
        if any(pred == y for pred in preds):
            for c in range(n):
                acc[y][c] += sum(p[i][c] for p in probs) / len(probs)
    soft = []
    for y in range(n):
        total = sum(acc[y])
        soft.append([v / total for v in acc[y]] if total > 0 else None)
    return soft


def _batch(seed, b, n):
    g = torch.Generator().manual_seed(seed)
    probs = [torch.softmax(3 * torch.randn(b, n, generator=g), dim=1) for _ in range(3)]
    targets = torch.randint(0, n, (b,), generator=g)
    return probs, targets


def test_first_epoch_is_hard_then_soft_mix():
    n = 4
    oal = OnlineAdaptiveLabels(n, zeta=0.5)
    probs, targets = _batch(0, 12, n)
    # class 3 never appears, so it keeps its one-hot label
    targets[targets == 3] = 0
    y = torch.arange(n)
    assert torch.equal(oal.targets(y), torch.eye(n))
    oal.update([p[:6] for p in probs], targets[:6])
    oal.update([p[6:] for p in probs], targets[6:])
    assert torch.equal(oal.targets(y), torch.eye(n))  # still epoch 1
    oal.end_epoch()
    ref = _reference_soft([p.double().tolist() for p in probs], targets.tolist(), n)
    got = oal.targets(y)
    for c in range(n):
        one_hot = [1.0 if k == c else 0.0 for k in range(n)]
        expected = (
            one_hot if ref[c] is None else [0.5 * a + 0.5 * b for a, b in zip(one_hot, ref[c])]
        )
        assert got[c].tolist() == pytest.approx(expected, abs=1e-6)
    assert ref[3] is None
    assert torch.equal(got[3], torch.eye(n)[3])


def test_sample_correct_under_one_subnet_only_counts():
    n = 3
    oal = OnlineAdaptiveLabels(n, zeta=0.25)
    lowest = torch.tensor([[0.6, 0.3, 0.1]])  # correct (class 0)
    random = torch.tensor([[0.1, 0.8, 0.1]])  # wrong
    highest = torch.tensor([[0.2, 0.2, 0.6]])  # wrong
    wrong_everywhere = [torch.tensor([[0.1, 0.1, 0.8]])] * 3
    oal.update([lowest, random, highest], torch.tensor([0]))
    oal.update(wrong_everywhere, torch.tensor([1]))
    oal.end_epoch()
    mean = [(0.6 + 0.1 + 0.2) / 3, (0.3 + 0.8 + 0.2) / 3, (0.1 + 0.1 + 0.6) / 3]
    total = sum(mean)
    expected0 = [0.75 * (k == 0) + 0.25 * m / total for k, m in enumerate(mean)]
    got = oal.targets(torch.tensor([0, 1]))
    assert got[0].tolist() == pytest.approx(expected0, abs=1e-6)
    assert got[1].tolist() == [0.0, 1.0, 0.0]  # no correct sample of class 1


def test_each_epoch_starts_from_zero():
    n = 3
    oal = OnlineAdaptiveLabels(n)
    p1, t1 = _batch(1, 20, n)
    p2, t2 = _batch(2, 20, n)
    oal.update(p1, t1)
    oal.end_epoch()
    oal.update(p2, t2)
    oal.end_epoch()
    ref = _reference_soft([p.double().tolist() for p in p2], t2.tolist(), n)
    for c in range(n):
        if ref[c] is not None:
            assert oal.soft[c].tolist() == pytest.approx(ref[c], abs=1e-9)


def test_state_round_trip_and_validation():
    n = 5
    oal = OnlineAdaptiveLabels(n)
    probs, targets = _batch(3, 16, n)
    oal.update(probs, targets)
    oal.end_epoch()
    oal.update(probs, targets)
    other = OnlineAdaptiveLabels(n)
    other.load_state_dict(oal.state_dict())
    assert torch.equal(other.accumulator, oal.accumulator)
    assert torch.equal(other.soft, oal.soft)
    with pytest.raises(ValueError, match="classes"):
        OnlineAdaptiveLabels(4).load_state_dict(oal.state_dict())
    with pytest.raises(ValueError, match="zeta"):
        OnlineAdaptiveLabels(3, zeta=1.5)
    with pytest.raises(ValueError, match="classes"):
        oal.update([torch.rand(2, 3)], torch.tensor([0, 1]))


def test_label_smoothing_targets_and_loss():
    from eqnet.train.labels import SmoothedLabels, make_labels

    n, eps = 4, 0.1
    ls = make_labels("smooth", n)
    assert isinstance(ls, SmoothedLabels) and ls.smoothing == eps
    y = torch.tensor([0, 3, 2])
    t = ls.targets(y)
    for i, c in enumerate(y.tolist()):
        want = [eps / n + (1 - eps) * (k == c) for k in range(n)]
        assert t[i].tolist() == pytest.approx(want, abs=1e-7)
    # static: updates change nothing
    ls.update([torch.rand(3, n)], y)
    ls.end_epoch()
    assert torch.equal(ls.targets(y), t)
    other = SmoothedLabels(n, 0.3)
    other.load_state_dict(ls.state_dict())
    assert other.smoothing == eps
    assert make_labels("hard", n) is None
    assert isinstance(make_labels("oal", n, zeta=0.25), OnlineAdaptiveLabels)
    with pytest.raises(ValueError, match="labels='soft': accepted values are hard, oal, smooth"):
        make_labels("soft", n)
    with pytest.raises(ValueError, match="smoothing"):
        SmoothedLabels(n, 1.0)
