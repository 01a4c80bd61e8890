"""`eqnet ptq`: post-training quantization of a float run, checked against the same steps
composed here from the public primitives (convert, calibrate, recalibrate_bn, evaluate)."""

import json

import pytest
from eqnet.cli import main
from eqnet.convert import calibrate, convert, recalibrate_bn
from eqnet.data import bn_split, eval_loader, fixed_batches, load_data
from eqnet.run import evaluate, load_run
from eqnet.space import ElasticSpace, SubnetConfig

TINY = [
    "--limit-train", "160", "--limit-test", "96", "--holdout", "64", "--batch-size", "32",
    "--calib-batches", "1", "--bn-batches", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq") / "float"
    args = ["train", "--recipe", "float", "--epochs", "3", "--lr", "0.1", "--out", str(out)]
    assert main(args + TINY) == 0
    return out


def _reference(float_run, space, make_cfg):
    """Convert the float model, calibrate on the first held-out batch, re-estimate BN on the
    trainer's augmented held-out batches, evaluate on the test split."""
    trained = load_run(float_run)
    data = load_data("digits", holdout=64, limit_train=160, limit_test=96, augment=False)
    sn = convert(trained.model, space, keep_first_last="8bit")
    sn.train()
    calibrate(sn, eval_loader(data.holdout, 32), batches=1)
    sn.set_config(make_cfg(sn))
    recalibrate_bn(sn, fixed_batches(bn_split(data), 32, 2), batches=2)
    return evaluate(sn, eval_loader(data.test, 256))


def test_ptq_uniform_matches_the_composed_steps(float_run, tmp_path, capsys):
    out = tmp_path / "w8a8"
    assert main(["ptq", str(float_run), "--uniform", "8,8", "--out", str(out)]) == 0
    assert "post-training quantized" in capsys.readouterr().out
    run = load_run(out)
    assert run.config.recipe == "qat" and run.epoch == 0
    acc = run.metrics[-1]["acc_ptq"]
    space = ElasticSpace(w_bits=(8,), a_bits=(8,))
    ref = _reference(float_run, space, lambda sn: SubnetConfig.uniform(space, sn, 8, 8))
    assert acc == pytest.approx(ref, abs=1e-9)
    low = tmp_path / "w2a2"
    assert main(["ptq", str(float_run), "--uniform", "2,2", "--out", str(low)]) == 0
    assert load_run(low).metrics[-1]["acc_ptq"] < acc  # 2-bit PTQ is worse (MultiQuant Tab. 2)


def test_ptq_config_file_and_errors(float_run, tmp_path, capsys):
    run = load_run(float_run)
    space = ElasticSpace(w_bits=(4, 8), a_bits=(4, 8))
    sn = convert(run.model, space, keep_first_last="8bit")
    cfg = SubnetConfig.uniform(space, sn, 4, 8)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    out = tmp_path / "mixed"
    assert main(["ptq", str(float_run), "--config", str(path), "--out", str(out)]) == 0
    loaded = load_run(out)
    assert loaded.config.policy_config() == cfg
    ref = _reference(float_run, space, lambda _: cfg)
    assert loaded.metrics[-1]["acc_ptq"] == pytest.approx(ref, abs=1e-9)
    assert main(["ptq", str(out), "--uniform", "4,4", "--out", str(tmp_path / "x")]) == 1
    assert "ptq quantizes a float run" in capsys.readouterr().err
    assert main(["ptq", str(float_run), "--uniform", "4", "--out", str(tmp_path / "y")]) == 1
    assert "--uniform='4': expected two ints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["ptq", str(float_run), "--out", str(tmp_path / "z")]
        )  # neither --uniform nor --config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chosen": []}))
    assert main(["ptq", str(float_run), "--config", str(bad), "--out", str(tmp_path / "w")]) == 1
    assert "pick=0" in capsys.readouterr().err
