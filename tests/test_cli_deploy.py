"""`eqnet export` / `eqnet eval` / `eqnet demo` end to end on a tiny digits run.

The reference for the accuracy column is the fake-quant supernet of the same run, evaluated
here directly on the test split (the deployed integer model must agree with it on >= 99.9 %
of the samples, so the accuracies differ by less than one sample in 359).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from eqnet.cli import main


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny = ["--max-steps-per-epoch", "2", "--epochs", "1", "--no-progress", "--device", "cpu"]
    assert main(["train", "--recipe", "float", "--out", str(root / "f"), *tiny]) == 0
    argv = ["train", "--recipe", "layered", "--init", str(root / "f"), "--out", str(root / "l")]
    assert main([*argv, *tiny]) == 0
    return root


def _fake_quant_accuracy(run_dir, bits):
    from eqnet.data import load_data
    from eqnet.run import load_run
    from eqnet.space import SubnetConfig

    run = load_run(run_dir)
    sn = run.model
    sn.set_config(SubnetConfig.uniform(run.space, sn, bits, bits))
    test = load_data("digits", augment=False).test
    xs = torch.stack([test[i][0] for i in range(len(test))])
    ys = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        return float((sn(xs).argmax(1) == ys).double().mean()), len(ys)


def _float_accuracy(run_dir):
    from eqnet.data import load_data
    from eqnet.run import load_run

    model = load_run(run_dir).model
    test = load_data("digits", augment=False).test
    xs = torch.stack([test[i][0] for i in range(len(test))])
    ys = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        return float((model(xs).argmax(1) == ys).double().mean())


@pytest.mark.slow
def test_export_and_eval(layered_run, capsys):
    root = layered_run
    path = root / "model.eqk"
    cfg_file = root / "halfway.json"
    from eqnet.run import load_run
    from eqnet.space import SubnetConfig

    run = load_run(root / "l")
    cfg = SubnetConfig.random(run.space, run.model, torch.Generator().manual_seed(0), forms=False)
    cfg_file.write_text(cfg.to_json())
    code = main(["export", str(root / "l"), "--out", str(path), "--bn-batches", "0",
                 "--config", str(cfg_file)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "nested" in out and path.exists()

    csv_path = root / "eval.csv"
    references = ["--reference", str(root / "f"), "--reference", str(root / "l")]
    argv = ["eval", str(path), "--latency-runs", "2", "--csv", str(csv_path), *references]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("| selection |") and "fake_quant_accuracy" in table
    with open(csv_path) as f:
        rows = {r["selection"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"float (f)", "W2", "W3", "W4", "halfway"}
    assert float(rows["float (f)"]["accuracy"]) == pytest.approx(_float_accuracy(root / "f"))
    reads = [int(rows[f"W{b}"]["bytes_read"]) for b in (2, 3, 4)]
    assert reads[0] < reads[1] < reads[2]
    planes = [int(rows[f"W{b}"]["elastic_plane_bytes"]) for b in (2, 3, 4)]
    assert planes[0] * 3 == planes[1] * 2 and planes[0] * 2 == planes[2]
    for b in (2, 3, 4):
        ref, n = _fake_quant_accuracy(root / "l", b)
        assert abs(float(rows[f"W{b}"]["accuracy"]) - ref) < 1.0 / n, b
        # --reference: the same fake-quant subnet (export kept the run's BN: --bn-batches 0)
        assert float(rows[f"W{b}"]["fake_quant_accuracy"]) == pytest.approx(ref, abs=1e-12)
        assert float(rows[f"W{b}"]["latency_ms_b1"]) > 0


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.eqk"
    bad.write_bytes(b"EQK1" + b"\xff" * 40)
    assert main(["eval", str(bad)]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.eqk")]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_errors_on_a_run(layered_run, tmp_path, capsys):
    path = tmp_path / "m.eqk"
    assert main(["export", str(layered_run / "l"), "--out", str(path), "--bn-batches", "0"]) == 0
    assert main(["eval", str(path), "--bits", "5"]) == 1
    assert "--bits 5" in capsys.readouterr().err
    # A float run has nothing to export.
    assert main(["export", str(layered_run / "f"), "--out", str(tmp_path / "f.eqk")]) == 1


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--float-epochs", "1", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--latency-runs", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| W2 |" in text and "| mixed |" in text and "pareto:" in text
    assert (out / "model.eqk").exists() and (out / "search" / "pareto.png").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["selection"] for r in rows] == ["W2", "W3", "W4", "mixed"]
    for r in rows:
        # The integer model and the fake-quant subnet agree (>= 99.9 % of 359 samples).
        assert abs(float(r["accuracy"]) - float(r["fake_quant_accuracy"])) < 1.0 / 359
    chosen = json.loads((out / "search" / "configs.json").read_text())["chosen"]
    assert chosen
