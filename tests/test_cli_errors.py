"""One-line CLI errors: counts out of range are usage errors at parse time (exit 2), runtime
failures are one line on stderr (exit 1) without a traceback unless --debug, and no message
suggests weights_only=False."""

from __future__ import annotations

import datetime

import pytest
import torch
from eqnet import cli
from eqnet.run.checkpoint import CHECKPOINT_NAME, FORMAT


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--out", "x", "--stop-after", "-1"], "--stop-after"),
        (["train", "--out", "x", "--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
        (["train", "--out", "x", "--batch-size", "two"], "--batch-size"),
        (["eval", "f.eqk", "--latency-runs", "0"], "--latency-runs"),
        (["demo", "--epochs", "-1"], "--epochs"),
        (["search", "run", "--population", "0"], "--population"),
    ],
)
def test_counts_out_of_range_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert option in err and "expected an integer >=" in err


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "weights_only" not in err
    return err


@pytest.mark.parametrize(
    "device, match", [("tpu", "accepted values are cpu, cuda"), ("cuda:7", "CUDA")]
)
def test_bad_device_is_one_line(tmp_path, capsys, device, match):
    argv = ["train", "--out", str(tmp_path / "r"), "--device", device, "--no-progress"]
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight CUDA devices")
    assert match in _one_line_error(argv, capsys)


def test_bad_map_location_is_one_line_naming_the_device(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": FORMAT}, run / CHECKPOINT_NAME)
    argv = ["search", str(run), "--method", "layered", "--constraint", "avg_w_bits<=3",
            "--device", "tpu", "--out", str(tmp_path / "s")]  # fmt: skip
    assert "device='tpu'" in _one_line_error(argv, capsys)


def test_eqk_and_broken_checkpoints_are_one_line(tmp_path, capsys):
    eqk = tmp_path / "m.eqk"
    eqk.write_bytes(b"EQK1" + bytes(60))
    err = _one_line_error(["train", "--out", str(eqk), "--resume", "--no-progress"], capsys)
    assert "deployment file" in err
    err = _one_line_error(
        ["train", "--out", str(tmp_path / "q"), "--recipe", "qat", "--init", str(eqk)], capsys
    )
    assert "deployment file" in err
    assert "deployment file" in _one_line_error(["export", str(eqk), "--out", "x.eqk"], capsys)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": FORMAT, "when": datetime.date(2020, 1, 1)}, run / CHECKPOINT_NAME)
    err = _one_line_error(["train", "--out", str(run), "--resume"], capsys)
    assert "objects other than tensors" in err
    data = (run / CHECKPOINT_NAME).read_bytes()
    (run / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in _one_line_error(["export", str(run), "--out", "x.eqk"],
                                                          capsys)  # fmt: skip


def test_unexpected_failure_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    import eqnet.commands.eval as command

    def broken(args):
        raise RuntimeError("first line\nsecond line of a long report")

    monkeypatch.setattr(command, "run", broken)
    err = _one_line_error(["eval", "f.eqk"], capsys)
    assert err == "eqnet eval: error: RuntimeError: first line"
    with pytest.raises(RuntimeError, match="second line"):
        cli.main(["eval", "f.eqk", "--debug"])


def test_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    import eqnet.commands.eval as command

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "out.csv")

    monkeypatch.setattr(command, "run", full)
    assert _one_line_error(["eval", "f.eqk"], capsys).endswith("No space left on device: out.csv")
