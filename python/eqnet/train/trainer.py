"""The supernet trainer: one loop for every recipe and task, checkpoints, resume, evaluation.

The data decide the task (`eqnet.run.tasks`): image classification, or a causal language model
trained on next-token cross-entropy, one row of logits per token, so every recipe's losses
apply per token. Its checkpointed state and resuming are in `state.py` (reproducibility: the
data order of epoch e depends on (seed, e) only, and every RNG state is saved, so a resumed
run continues exactly); the evaluation of the subnets in `evaluation.py`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from eqnet.data import (
    DataBundle,
    bn_split,
    eval_loader,
    fixed_batches,
    load_data,
    train_loader,
)
from eqnet.run import TrainConfig, build_model, get_task, init_is_quantized
from eqnet.run import checkpoint as ckpt
from eqnet.run.tasks import summary
from eqnet.space import SubnetConfig

from .evaluation import evaluate_subnets
from .labels import make_labels
from .losses import soft_cross_entropy
from .recipes import get_recipe
from .sampler import ConfigSampler
from .schedule import WarmupCosine
from .state import TrainerState


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss: training stopped, the last good checkpoint is kept."""


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return ckpt.check_device(name)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto)") from None


class Trainer(TrainerState):
    """Trains `config.recipe` and writes checkpoints and metrics to `out_dir` (if given)."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        data: DataBundle | None = None,
        *,
        load_init: bool = True,
    ):
        self.config = config.resolved()
        c = self.config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if c.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(c.seed)
        self.device = _resolve_device(c.device)
        self.recipe = get_recipe(c.recipe)
        # Data first: a bad path or an empty set fails before any model is built.
        self.data = data or load_data(
            c.data,
            holdout=c.holdout,
            limit_train=c.limit_train,
            limit_test=c.limit_test,
            seq_len=c.seq_len,
            text_bytes=c.text_bytes,
        )
        self.task = get_task(self.data.task)
        self.train_loader = train_loader(self.data.train, c.batch_size, c.seed, c.workers)
        self.holdout_loader = eval_loader(self.data.holdout, c.batch_size, c.workers)
        self.test_loader = eval_loader(self.data.test, c.eval_batch_size, c.workers)
        if c.input_shape is None:
            c.input_shape = list(self.data.input_shape)
        # On resume the checkpoint holds the weights: the float init need not exist any more.
        model, self.space = build_model(c, self.data.num_classes, float_init=load_init)
        self.model = model.to(self.device)
        # BN re-estimation before every evaluation: the same augmented held-out batches, moved
        # to the device once
        self.bn_images = [
            x.to(self.device)
            for x in fixed_batches(bn_split(self.data), c.batch_size, c.bn_batches)
        ]
        if self.space is not None:
            self.sampler = ConfigSampler(
                self.space,
                self.model,
                c.seed + 1,
                self.recipe.forms,
                c.uniform_prob,
                extreme_forms=c.lrh_forms,
            )
            # The fixed random subnet evaluated every epoch comes from its own seed, so it does
            # not depend on how many subnets training has drawn.
            self.eval_random = SubnetConfig.random(
                self.space,
                self.model,
                torch.Generator().manual_seed(c.seed + 2),
                forms=self.recipe.forms,
            )
        else:
            self.sampler = None
            self.eval_random = None
        self.labels = make_labels(c.labels, self.data.num_classes, c.zeta, c.label_smoothing)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(self.train_loader)
        if c.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, c.max_steps_per_epoch)
        self.schedule = WarmupCosine(
            c.epochs * self.steps_per_epoch, round(c.warmup_epochs * self.steps_per_epoch)
        )
        use_amp = c.amp and self.device.type == "cuda"
        if c.amp and not use_amp:
            warnings.warn(
                f"amp=True ignored: mixed precision runs on CUDA only (device {self.device})",
                stacklevel=2,
            )
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        self.epoch = 0
        self.metrics: list[dict] = []
        # a quantized init (a supernet whose policy is fine-tuned) brings its own steps
        self.needs_calibration = self.space is not None and not (
            load_init and c.init and c.policy is not None and init_is_quantized(c.init)
        )
        self._role = None

    # -- setup -----------------------------------------------------------------------------
    def _make_optimizer(self):
        c = self.config
        if hasattr(self.model, "parameter_groups"):
            groups = self.model.parameter_groups()
        else:
            groups = {"weight": [], "no_decay": []}
            for p in self.model.parameters():
                groups["weight" if p.dim() > 1 else "no_decay"].append(p)
        param_groups = []
        for name, params in groups.items():
            params = [p for p in params if p.requires_grad]
            if not params:
                continue
            mult = c.scale_lr_mult if name == "scale" else 1.0
            decay = c.weight_decay if name == "weight" else 0.0
            param_groups.append(
                {"params": params, "weight_decay": decay, "lr": c.lr * mult, "base_lr": c.lr * mult}
            )
        if c.optimizer == "sgd":
            return torch.optim.SGD(param_groups, lr=c.lr, momentum=c.momentum)
        return torch.optim.Adam(param_groups, lr=c.lr)

    def calibrate(self) -> None:
        """Initialize every quantizer form from held-out data (MultiQuant: PTQ init)."""
        if self.needs_calibration:
            from eqnet.convert import calibrate

            calibrate(
                self.model,
                self._device_batches(self.holdout_loader),
                batches=self.config.calib_batches,
            )
            if self.config.vl_paper_init:
                self._vl_paper_init()
            self.needs_calibration = False

    def _vl_paper_init(self) -> None:
        """The vertical-layering paper's steps, over the calibration's: weights from their
        mean |w|, activations from the first training batch at the top width (eval mode, so the
        float model's BN statistics normalize it and none is changed)."""
        from .paper_init import vl_activation_steps, vl_weight_steps

        vl_weight_steps(self.model)
        x, _ = next(iter(self.train_loader))
        was_training = self.model.training
        self.model.eval()
        self.model.set_config(self.sampler.highest())
        vl_activation_steps(self.model, x.to(self.device))
        self.model.train(was_training)

    def _device_batches(self, loader):
        return ((x.to(self.device), y.to(self.device)) for x, y in loader)

    # -- helpers for recipes ---------------------------------------------------------------
    def forward(self, cfg: SubnetConfig | None, x: torch.Tensor) -> torch.Tensor:
        """The logits of subnet `cfg` on `x`, one row per sample (per token for a causal LM)."""
        if cfg is not None:
            self.model.set_config(cfg)
        if self.scaler is not None:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.task.outputs(self.model(x))
        return self.task.outputs(self.model(x))

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE with the hard label, or with the online adaptive label (eq. 4) when enabled."""
        if self.labels is not None:
            return soft_cross_entropy(logits, self.labels.targets(y))
        return soft_cross_entropy(logits, y)

    def update_labels(self, probs, y) -> None:
        if self.labels is not None:
            self.labels.update(probs, y)

    def _kept(self) -> str:
        if self.out_dir is not None and (self.out_dir / ckpt.CHECKPOINT_NAME).is_file():
            return f"the last good checkpoint {self.out_dir / ckpt.CHECKPOINT_NAME} is kept"
        return "no checkpoint was written yet"

    def check_finite(self, loss: torch.Tensor, role: str) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            where = f"epoch {self.epoch + 1}, step {self.schedule.step_count + 1}, subnet {role}"
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach())}) at {where}; training stopped, "
                f"{self._kept()}. Try a lower --lr, --grad-clip or a float --init."
            )

    def check_model_finite(self) -> None:
        """Every parameter and buffer finite, or stop before the checkpoint is overwritten
        (a finite loss can come from a model whose BN statistics already overflowed)."""
        bad = ckpt.first_non_finite(self.model.state_dict())
        if bad is not None:
            raise NonFiniteLossError(
                f"model tensor {bad!r} holds NaN or Inf after epoch {self.epoch + 1}; training "
                f"stopped, {self._kept()}. Try a lower --lr, --grad-clip or a float --init."
            )

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor, role: str) -> None:
        self.check_finite(loss, role)
        self.scale_loss(loss).backward()

    # -- training --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One optimizer step of the recipe on one batch."""
        self.calibrate()
        self.model.train()
        x, y = x.to(self.device), self.task.targets(y.to(self.device))
        factor = self.schedule.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.recipe.step(self, x, y)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step_count += 1
        metrics["lr"] = self.config.lr * factor
        return metrics

    def train_epoch(self) -> dict:
        from tqdm.auto import tqdm

        self.train_loader.sampler.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"{self.config.recipe} epoch {self.epoch + 1}/{self.config.epochs}",
            disable=not self.config.progress,
            leave=False,
        )
        for x, y in self.train_loader:
            if n >= self.steps_per_epoch:
                break
            m = self.train_step(x, y)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        bar.close()
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items() if k != "lr"}

    def recalibrate(self, loader, batches: int) -> None:
        """BN recalibration of the active subnet (a hook: the distributed trainer combines
        the ranks' statistics)."""
        from eqnet.convert import recalibrate_bn

        recalibrate_bn(self.model, loader, batches=batches)

    def evaluate_subnets(self) -> dict:
        """The task's test metrics of the recipe's evaluation subnets (`evaluation.py`)."""
        return evaluate_subnets(self)

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train up to `config.epochs` (or stop after epoch `stop_after`, to resume later);
        evaluate and checkpoint after every epoch. Returns the metric rows."""
        c = self.config
        last = c.epochs if stop_after is None else min(stop_after, c.epochs)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.out_dir)
            ckpt.save_json(self.out_dir / ckpt.CONFIG_NAME, self.run_record())
            if self.metrics:  # resumed: the metric files follow the checkpoint it resumed
                ckpt.write_metrics(self.out_dir, self.metrics)
        self.calibrate()
        while self.epoch < last:
            t0 = time.perf_counter()
            row = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            if self.labels is not None:
                self.labels.end_epoch()
            row["train_time_s"] = time.perf_counter() - t0
            row.update(self.evaluate_subnets())
            row["step"] = self.schedule.step_count
            row["time_s"] = time.perf_counter() - t0
            self.check_model_finite()
            self.epoch += 1
            self.metrics.append(row)
            if self.out_dir is not None:
                ckpt.save_checkpoint(self.out_dir, self.state_dict())
                ckpt.write_metrics(self.out_dir, self.metrics)
            if c.progress:
                print(
                    f"epoch {row['epoch']}/{c.epochs} loss={row.get('train_loss', 0):.4f} "
                    f"{summary(row)}",
                    flush=True,
                )
        return self.metrics
