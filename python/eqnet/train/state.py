"""The Trainer's checkpointed state: what a run directory records (`run_record`), the
checkpoint's contents (`state_dict` / `load_state_dict`) and resuming (`from_run`).

Reproducibility: the data order of epoch e depends on (seed, e) only; augmentation draws from
the global torch RNG and subnet sampling from the ConfigSampler's own generator, and both
states are saved at the end of every epoch; so `Trainer.from_run(dir).fit()` continues a run
exactly as if it had never stopped.
"""

from __future__ import annotations

import json

import torch

from eqnet.data import DataBundle
from eqnet.nn import saved_with_one_form
from eqnet.run import TrainConfig
from eqnet.run import checkpoint as ckpt
from eqnet.space import SubnetConfig


class TrainerState:
    """Mixed into the Trainer: its checkpoint and run record."""

    def run_record(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "data": {
                "name": self.data.name,
                "task": self.data.task,
                "num_classes": self.data.num_classes,
                "input_shape": list(self.data.input_shape),
                "train": len(self.data.train),
                "holdout": len(self.data.holdout),
                "test": len(self.data.test),
            },
            "space": None if self.space is None else self.space.to_dict(),
            "eval_random": None
            if self.eval_random is None
            else json.loads(self.eval_random.to_json()),
        }

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.sampler is not None:
            rng["sampler"] = self.sampler.state_dict()["generator"]
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "labels": None if self.labels is None else self.labels.state_dict(),
            "rng": rng,
            "config": self.config.to_json(),
            "num_classes": self.data.num_classes,
            "space": None if self.space is None else json.dumps(self.space.to_dict()),
            "eval_random": None if self.eval_random is None else self.eval_random.to_json(),
            "metrics": json.dumps(self.metrics),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.labels is not None and state.get("labels") is not None:
            self.labels.load_state_dict(state["labels"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.sampler is not None:
            self.sampler.load_state_dict({"generator": state["rng"]["sampler"]})
        if state.get("eval_random"):
            self.eval_random = SubnetConfig.from_json(state["eval_random"])
        self.epoch = int(state["epoch"])
        self.metrics = json.loads(state["metrics"])
        self.needs_calibration = False

    @classmethod
    def from_run(
        cls, out_dir, epochs: int | None = None, data: DataBundle | None = None, **overrides
    ):
        """Resume the run in `out_dir` from its last checkpoint; `epochs` extends (or keeps)
        the run length (a different length changes the cosine schedule from here on);
        `overrides` may change settings that do not alter the result (progress, device,
        workers)."""
        state = ckpt.load_checkpoint(out_dir)
        d = json.loads(state["config"])
        allowed = {"progress", "device", "workers"}
        bad = set(overrides) - allowed
        if bad:
            raise ValueError(f"cannot override {sorted(bad)} on resume; allowed: {sorted(allowed)}")
        d.update(overrides)
        if epochs is not None:
            if epochs < int(state["epoch"]):
                raise ValueError(
                    f"epochs={epochs}: the run in {out_dir} already completed {state['epoch']} epochs"
                )
            d["epochs"] = epochs
        trainer = cls(TrainConfig.from_dict(d), out_dir, data=data, load_init=False)
        if d.get("keep_first_last") == "8bit" and saved_with_one_form(
            trainer.model, state["model"]
        ):
            # saved when fixed layers held one form: rebuild in that layout, so the optimizer
            # holds the parameters the checkpoint has
            d["keep_first_last"] = "8bit-fixed-form"
            trainer = cls(TrainConfig.from_dict(d), out_dir, data=trainer.data, load_init=False)
        trainer.load_state_dict(state)
        return trainer
