"""`eqnet train` end to end, in process."""

import csv
import json

import pytest
from eqnet.cli import main
from eqnet.run.checkpoint import load_checkpoint

TINY = [
    "--limit-train", "96", "--limit-test", "64", "--holdout", "32", "--batch-size", "32",
    "--max-steps-per-epoch", "2", "--calib-batches", "1", "--bn-batches", "1", "--no-progress",
]  # fmt: skip


@pytest.mark.slow
def test_train_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--recipe",
        "multiquant",
        "--w-bits",
        "2,4",
        "--a-bits",
        "2-4",
        "--out",
        str(out),
    ]
    assert main([*args, "--epochs", "2", "--stop-after", "1", *TINY]) == 0
    assert "trained multiquant to epoch 1" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["recipe"] == "multiquant"
    assert config["config"]["model"] == "digits_cnn" and config["config"]["data"] == "digits"
    assert config["config"]["a_bits"] == [2, 3, 4]
    assert config["space"]["a_bits"] == [2, 3, 4]
    assert config["data"]["train"] == 96
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert {"acc_lowest", "acc_highest", "acc_random", "train_loss"} <= set(rows[0])
    # a second run into the same directory without --resume is refused
    assert main([*args, "--epochs", "2", *TINY]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(out)["epoch"] == 2
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert 0.0 <= float(table[-1]["acc_highest"]) <= 1.0


def test_bad_data_path_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "none.npz"), "--out", str(out), "--no-progress"])
    assert code == 1
    assert "no such file" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "nope", "--out", str(tmp_path)])
    assert main(["train", "--recipe", "qat", "--w-bits", "2,4", "--out", str(tmp_path)]) == 1
    assert "one width" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
