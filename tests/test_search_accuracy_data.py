"""The accuracy dataset: JSONL cache, resumable, tolerant of a torn last line."""

import json

import pytest
from eqnet.search.accuracy_data import build_dataset, read_dataset, row_config
from eqnet.space import LayerChoice, SubnetConfig


def configs(n):
    return [
        SubnetConfig([("a", LayerChoice(2 + i % 7, 8)), ("b", LayerChoice(8, 2 + i // 7))])
        for i in range(n)
    ]


def test_resume_skips_done_and_survives_torn_line(tmp_path):
    path = tmp_path / "acc.jsonl"
    calls = []

    def evaluate(cfg):
        calls.append(cfg)
        return cfg["a"].w_bits / 10 + cfg["b"].a_bits / 100

    rows = build_dataset(path, configs(5), evaluate, lambda c: {"bits": c.mean_bits()})
    assert len(rows) == 5 and len(calls) == 5
    # an interrupted write leaves half a line
    with open(path, "a") as f:
        f.write('{"key": "x", "conf')
    assert len(read_dataset(path)) == 5
    rows = build_dataset(path, configs(8) + configs(8), evaluate)  # duplicates evaluated once
    assert len(calls) == 8 and len(rows) == 8
    assert [row_config(r) for r in read_dataset(path)] == configs(8)
    for r, cfg in zip(read_dataset(path), configs(8)):
        assert r["accuracy"] == cfg["a"].w_bits / 10 + cfg["b"].a_bits / 100
    assert json.loads(path.read_text().splitlines()[0])["bits"] == configs(1)[0].mean_bits()


def test_imap_measures_only_the_missing_configs_and_keeps_their_order(tmp_path):
    def accuracy(cfg):
        return cfg["a"].w_bits / 10 + cfg["b"].a_bits / 100

    seq, par = tmp_path / "seq.jsonl", tmp_path / "par.jsonl"
    build_dataset(seq, configs(9), accuracy)
    build_dataset(par, configs(4), accuracy)  # an interrupted parallel run, resumed
    batches = []

    def imap(cfgs):  # results come back in the list's order, as Pool.imap yields them
        batches.append(list(cfgs))
        return iter([accuracy(c) for c in cfgs])

    def never(cfg):
        raise AssertionError("evaluate is not called when imap is given")

    rows = build_dataset(par, configs(9), never, imap=imap)
    assert batches == [configs(9)[4:]]
    assert par.read_text() == seq.read_text() and len(rows) == 9
    build_dataset(par, configs(9), never, imap=imap)  # nothing left: imap is not called
    assert len(batches) == 1


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "acc.jsonl"
    path.write_text('not json\n{"key": 1, "config": {}, "accuracy": 0.5}\n')
    with pytest.raises(ValueError, match=r"acc.jsonl:1"):
        read_dataset(path)


def test_supernet_correctness_is_per_image_and_matches_a_direct_forward():
    """The rerank's per-image correctness, against the subnet run by hand: same BN
    re-estimation (recalibrate_bn on a copy), then one forward per image in eval mode."""
    import copy

    import eqnet
    import torch
    from eqnet import models
    from eqnet.search.accuracy_data import (
        fraction_correct,
        supernet_correctness,
        supernet_evaluator,
    )
    from eqnet.space import ElasticSpace

    torch.manual_seed(0)
    space = ElasticSpace(w_bits=(2, 4), a_bits=(4, 8), w_granularities=("channel",))
    sn = eqnet.convert(models.get("digits_cnn"), space)
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 10, (48,))
    bn = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    ev = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 48, 20)]  # uneven last batch
    eqnet.calibrate(sn, bn, batches=1)
    cfg = SubnetConfig.lowest(space, sn)

    ref_model = copy.deepcopy(sn)
    ref_model.set_config(cfg)
    eqnet.recalibrate_bn(ref_model, bn, batches=2)
    ref_model.eval()
    with torch.no_grad():
        expected = torch.tensor(
            [int(ref_model(x[i : i + 1]).argmax()) == int(y[i]) for i in range(48)]
        )

    sn.train()
    got = supernet_correctness(sn, bn, ev, bn_batches=2)(cfg)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert sn.training  # the mode the caller had is restored
    assert fraction_correct(got) == int(expected.sum()) / 48
    assert supernet_evaluator(sn, bn, ev, bn_batches=2)(cfg) == int(expected.sum()) / 48
    with pytest.raises(ValueError, match="yielded no samples"):
        supernet_correctness(sn, bn, [], bn_batches=1)(cfg)
