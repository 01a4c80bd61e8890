"""A tiny Llama (transformers, from a config, random init) trained with the layered recipe in
weight-only mode (float activations) at W2-W4 with per-group weight steps (group 32) on
byte-level text of the standard library's own sources, exported to one .eqk, loaded at 2, 3 and
4 bits, perplexity per width from `eqnet eval`.

References: the untrained supernet's perplexity at each width (training must lower it: a
learning check that fails when training does not learn), the fake-quant subnet of the trained
run at each width (the deployed logits must equal its logits within fp32 summation error), and
a float64 log-softmax written here over the deployed logits (the perplexity eval prints).
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "max_positions": 32}  # fmt: skip
# per-group weights: one LSQ step per 32 consecutive weights of each row (top width, nested)
GRANULARITY = {"group_size": 32}
TEXT = {"data": "stdlib-source", "seq_len": 32, "text_bytes": 120_000, "limit_test": 48}


def _float64_perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    z = logits.double().reshape(-1, logits.shape[-1])
    m = z.max(dim=1, keepdim=True).values
    lse = m.squeeze(1) + (z - m).exp().sum(dim=1).log()
    nll = lse - z.gather(1, targets.reshape(-1, 1)).squeeze(1)
    return math.exp(float(nll.mean()))


@pytest.mark.slow
def test_tiny_llama_layered_weight_only_end_to_end(tmp_path, capsys):
    import eqnet
    from eqnet.cli import main
    from eqnet.commands.export import export_run
    from eqnet.data import load_data
    from eqnet.run import TrainConfig, load_run
    from eqnet.train import Trainer

    torch.set_num_threads(1)
    config = TrainConfig(
        recipe="layered", model="llama-tiny", model_kwargs=SIZE, a_bits=[None], w_bits=[2, 3, 4],
        optimizer="adam", lr=4e-3, weight_decay=0.0, batch_size=16, epochs=1,
        max_steps_per_epoch=40, eval_batch_size=48, calib_batches=1, bn_batches=1,
        progress=False, **GRANULARITY, **TEXT,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir)
    trainer.calibrate()
    untrained = trainer.evaluate_subnets()
    trainer.fit()
    trained = trainer.metrics[-1]
    widths = (2, 3, 4)
    for b in widths:
        key = f"ppl_w{b}afloat"
        # a byte model that learned nothing stays near 256; a few dozen steps learn the
        # byte statistics of source code
        assert untrained[key] > 100 and trained[key] < 0.5 * untrained[key], (b, untrained, trained)

    path = tmp_path / "lm.eqk"
    header = export_run(run_dir, path)
    assert header["nested"] and header["top_bits"] == 4
    assert header["model"]["arch"]["name"] == "llama-tiny"
    # every layer's weights stored with per-group steps: one scale per 32 weights of a row
    groups = header["groups"]
    assert len(groups) == 15 and {g["group_size"] for g in groups.values()} == {32}
    csv_path = tmp_path / "eval.csv"
    args = ["eval", str(path), "--bits", "2,3,4", "--latency-runs", "1", "--csv", str(csv_path),
            "--limit-test", str(TEXT["limit_test"]),
            "--reference", str(run_dir)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| perplexity |" in printed.replace("| selection | mean_w_bits ", "")
    with open(csv_path) as f:
        rows = {r["selection"]: r for r in csv.DictReader(f)}

    supernet = load_run(run_dir).model
    test = load_data(**{k: v for k, v in TEXT.items() if k != "data"}, spec=TEXT["data"]).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    for b in widths:
        deployed = eqnet.load(path, bits=b, max_bits=b)
        ints = [m for m in deployed.modules() if type(m).__name__ == "IntLinear"]
        assert len(ints) == len(supernet.quantized_layers()) == 15
        supernet.set_config(deployed.active_config)
        with torch.no_grad():
            ref, got = supernet(x), deployed(x)
        assert ref.shape == got.shape == (len(test), 32, 256)
        assert torch.isfinite(got).all()
        # fp32 summation-order differences only (the same weights and float activations)
        err = float((got - ref).abs().max())
        assert err <= 1e-4 * float(ref.abs().max()), (b, err)
        ppl = _float64_perplexity(got, y)
        row = rows[f"W{b}"]
        assert math.isfinite(ppl) and float(row["perplexity"]) == pytest.approx(ppl, rel=1e-9)
        assert float(row["fake_quant_perplexity"]) == pytest.approx(ppl, rel=1e-4)
        assert float(row["perplexity"]) < 0.5 * untrained[f"ppl_w{b}afloat"]
    # a lower width reads a shorter prefix of the one file
    read = [int(rows[f"W{b}"]["bytes_read"]) for b in widths]
    assert read[0] < read[1] < read[2] <= path.stat().st_size
