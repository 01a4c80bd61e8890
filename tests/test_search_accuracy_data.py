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


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "acc.jsonl"
    path.write_text('not json\n{"key": 1, "config": {}, "accuracy": 0.5}\n')
    with pytest.raises(ValueError, match="acc.jsonl:1"):
        read_dataset(path)
