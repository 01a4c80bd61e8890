"""`eqnet search --target-form`: bit widths searched with every elastic layer in one deployment
form, per form, on a tiny eqnet digits supernet; the chosen configs export under their preset."""

import json

import pytest
import torch
from eqnet.cli import main
from eqnet.forms import FORMS
from eqnet.run import load_run
from eqnet.search.limpq import importance_indicators
from eqnet.search.pipeline import OptionError, SearchOptions
from eqnet.space import LayerChoice, SubnetConfig

TINY_TRAIN = [
    "--limit-train", "96", "--limit-test", "64", "--holdout", "32", "--batch-size", "32",
    "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1", "--no-progress",
    "--epochs", "1", "--device", "cpu", "--w-bits", "2,4,8", "--a-bits", "2,4,8",
    "--keep-first-last", "elastic",
]  # fmt: skip
TINY_GA = [
    "--dataset-size", "12", "--population", "8", "--elites", "3", "--mutations", "4",
    "--crossovers", "4", "--iterations", "3", "--val-fraction", "0.5", "--holdout-images", "16",
    "--rerank", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def eqnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "eqnet"
    assert main(["train", "--recipe", "eqnet", "--out", str(out), *TINY_TRAIN]) == 0
    return out


@pytest.mark.slow
def test_ga_searches_each_target_form(eqnet_run, tmp_path, capsys):
    out = tmp_path / "s"
    budget = "bitops<=5000000"
    args = ["search", str(eqnet_run), "--method", "ga", "--constraint", budget, "--out", str(out)]
    args += ["--target-form", "tensorrt", "--target-form", "snpe", "--no-progress", *TINY_GA]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["target_form"] for s in summary] == ["tensorrt", "snpe"]
    data = json.loads((out / "configs.json").read_text())
    assert [f["name"] for f in data["target_forms"]] == ["tensorrt", "snpe"]
    trained = load_run(eqnet_run)
    for entry in data["chosen"]:
        form = FORMS[entry["target_form"]["name"]]
        cfg = SubnetConfig.from_file(out / "configs.json", data["chosen"].index(entry))
        cfg.validate(trained.space, trained.model)
        assert all(form.holds(c) for _, c in cfg)  # every layer in the form
        assert entry["uniform_at_budget"] in (None, "W2A2", "W4A4", "W8A8")
    # the accuracy dataset holds both forms, half each, every config in one form
    rows = [json.loads(line) for line in (out / "accuracy.jsonl").read_text().splitlines()]
    kinds = [
        next(
            n
            for n, f in FORMS.items()
            if all(f.holds(LayerChoice(**v)) for v in r["config"].values())
        )
        for r in rows
    ]
    assert sorted(kinds) == ["snpe"] * 6 + ["tensorrt"] * 6
    labels = (out / "pareto.csv").read_text()
    assert "W4A4 tensorrt" in labels and "W4A4 snpe" in labels
    # each chosen config exports under its own ONNX preset
    pytest.importorskip("onnx")
    for i, name in enumerate(["tensorrt", "snpe"]):
        onnx_path = tmp_path / f"{name}.onnx"
        cmd = ["export-onnx", str(eqnet_run), "--config", str(out / "configs.json")]
        cmd += ["--pick", str(i), "--preset", name, "--out", str(onnx_path), "--bn-batches", "1"]
        assert main(cmd) == 0, name
        assert onnx_path.exists()


def test_limpq_target_form_and_bad_options(eqnet_run, tmp_path, capsys):
    out = tmp_path / "l"
    args = ["search", str(eqnet_run), "--method", "limpq", "--constraint", "bitops<=5000000"]
    args += ["--target-form", "snpe", "--out", str(out), "--no-progress", "--no-uniform"]
    assert main(args) == 0
    data = json.loads((out / "configs.json").read_text())
    assert data["alpha"] == 1.0  # digits_cnn: not in the supplementary's table
    cfg = SubnetConfig.from_file(out / "configs.json")
    assert all(FORMS["snpe"].holds(c) for _, c in cfg)
    base = dict(run=str(eqnet_run), constraints=("bitops<=1",))
    with pytest.raises(OptionError, match="layered"):
        SearchOptions(method="layered", target_forms=("snpe",), **base)
    with pytest.raises(OptionError, match="tpu"):
        SearchOptions(method="ga", target_forms=("tpu",), **base)
    with pytest.raises(OptionError, match="search them separately"):
        SearchOptions(method="ga", target_forms=("tensorrt",), w_form="channel/sym",
                      a_form="tensor/asym", **base)  # fmt: skip
    with pytest.raises(OptionError, match="drop forms"):
        SearchOptions(method="ga", target_forms=("snpe",), forms=True, **base)
    cmd = ["search", str(eqnet_run), "--method", "ga", "--constraint", "bitops<=1"]
    assert main([*cmd, "--target-form", "tpu"]) == 1
    assert "--target-form=" in capsys.readouterr().err


def test_limpq_indicators_in_a_per_tensor_form(eqnet_run):
    sn = load_run(eqnet_run).model
    ind = importance_indicators(sn, FORMS["snpe"])
    name, layer = next((n, m) for n, m in sn.quantized_layers().items() if m.fixed_choice is None)
    for b in (2, 4, 8):
        # the layer-wise (per-tensor) step itself
        step = layer.weight_quantizer.params(b, "tensor", "asym").scale
        assert step.numel() == 1 and ind[name][("w", b)] == pytest.approx(float(step))
        astep = layer.act_quantizer.params(b, "tensor", "asym").scale
        assert ind[name][("a", b)] == pytest.approx(float(astep))
    default = importance_indicators(sn)
    chan = layer.weight_quantizer.params(4, "channel", "sym").scale
    assert default[name][("w", 4)] == pytest.approx(float(chan.mean()))
    assert chan.numel() > 1 and not torch.equal(chan, chan.mean().expand_as(chan))
