"""Seeded fuzz of the .eqk loader: a few hundred CRC-valid crafted headers and value
corruptions of a real deployment file (tests/eqk_fuzzer.py), loaded by two long-lived worker
processes under an address-space limit and a per-case time limit. Every case must either raise
EqkFormatError or load a model whose outputs are bit-identical to the original file's at the
same configuration: no other exception, no hang, no memory blow-up, no silent wrong load."""

from __future__ import annotations

import os
import sys

import eqnet
import pytest
import torch
from eqk_fuzzer import campaign
from eqnet import models
from eqnet.deploy import export
from eqnet.space import ElasticSpace, SubnetConfig

CASES = 300
SEED = 20261206


@pytest.mark.slow
def test_crafted_files_are_rejected_or_load_identically(tmp_path):
    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 4, 8), nested=True)
    torch.manual_seed(0)
    sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="8bit", per_bit_bn=True)
    gen = torch.Generator().manual_seed(0)
    eqnet.calibrate(sn, [(torch.randn(8, 1, 8, 8, generator=gen), torch.zeros(8))], batches=1)
    mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(1))
    original = tmp_path / "original.eqk"
    export(sn, original, configs={"mixed": mixed}, arch="digits_cnn")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    result = campaign(str(original), str(tmp_path), seed=SEED, count=CASES, workers=2,
                      memory_bytes=1 << 30, timeout=60.0, env=env)  # fmt: skip
    counts = result["counts"]
    assert sum(counts.values()) == CASES
    bad = {k: v for k, v in result["examples"].items()}
    assert set(counts) <= {"rejected", "identical", "absent"}, (counts, bad)
    # The mutations must reach both outcomes, or the fuzzer tests nothing.
    assert counts.get("rejected", 0) > CASES // 2 and counts.get("identical", 0) > 0, counts
