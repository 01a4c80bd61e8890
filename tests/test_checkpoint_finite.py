"""Training keeps only finite checkpoints, `--init` refuses a non-finite source, and a resumed
run rewrites its metric files to match the checkpoint it resumed."""

from __future__ import annotations

import json

import pytest
import torch
from eqnet.data import load_data
from eqnet.run import TrainConfig
from eqnet.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from eqnet.train import NonFiniteLossError, Trainer
from torch import nn


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", holdout=64, limit_train=96, limit_test=64)


def _tiny(recipe="float", **kw):
    base = dict(recipe=recipe, epochs=2, batch_size=32, lr=0.05, calib_batches=1, bn_batches=1,
                max_steps_per_epoch=2, progress=False, holdout=64, limit_train=96,
                limit_test=64)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_non_finite_buffer_with_finite_loss_stops_and_keeps_checkpoint(digits, tmp_path):
    trainer = Trainer(_tiny(), tmp_path, data=digits)
    trainer.fit(stop_after=1)
    saved = (tmp_path / CHECKPOINT_NAME).read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    bn = next(m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var[3] = float("inf")  # training mode uses batch statistics: the loss stays finite
    name = next(n for n, b in trainer.model.named_buffers() if b is bn.running_var)
    with pytest.raises(NonFiniteLossError, match=rf"'{name}'.*epoch 2.*checkpoint.*kept") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == saved
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_checkpoint_writer_refuses_non_finite_model(tmp_path):
    with pytest.raises(ValueError, match=r"'b'.*NaN or Inf"):
        save_checkpoint(
            tmp_path, {"model": {"a": torch.ones(2), "b": torch.tensor([float("nan")])}}
        )
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_init_refuses_non_finite_source(digits, tmp_path):
    Trainer(_tiny(epochs=1, max_steps_per_epoch=1), tmp_path / "f", data=digits).fit()
    state = load_checkpoint(tmp_path / "f")
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)
    state["model"][key][0] = float("-inf")
    torch.save(state, tmp_path / "f" / CHECKPOINT_NAME)  # as a crafted or older file would be
    with pytest.raises(ValueError, match=rf"init=.*'{key}'.*NaN or Inf"):
        Trainer(_tiny("qat", init=str(tmp_path / "f")), data=digits)
    plain = {k: v for k, v in state["model"].items()}
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Trainer(_tiny("qat", init=str(tmp_path / "plain.pt")), data=digits)


def test_unreadable_init_and_resume_sources_are_one_line_errors(digits, tmp_path):
    eqk = tmp_path / "model.eqk"
    eqk.write_bytes(b"EQK1" + bytes(100))
    with pytest.raises(ValueError, match="deployment file"):
        Trainer(_tiny("qat", init=str(eqk)), data=digits)
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable checkpoint") as info:
        Trainer.from_run(bad, data=digits)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def test_resume_rewrites_metrics_to_match_the_checkpoint(digits, tmp_path):
    Trainer(_tiny(), tmp_path, data=digits).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # A kill between the last checkpoint and the metric files leaves them one epoch short.
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    resumed = Trainer.from_run(tmp_path, data=digits)
    resumed.fit()  # nothing left to train
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert again == json.loads(json.dumps(rows))
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
