"""Multi-process supernet training on torch.distributed.

`eqnet train` runs unchanged under `torchrun --nproc_per_node N [--nnodes M ...]`: torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, `setup()` then initializes the process group
(nccl on CUDA, gloo on CPU, with a timeout so a dead or stuck rank ends the job) and the CLI
builds a `DistributedTrainer` instead of a `Trainer`.

What changes across ranks, and why the result equals one process:

* `--batch-size` stays the *global* batch: each rank trains `batch_size / world_size` samples
  per step. `EpochShardSampler` (a DistributedSampler) uses the single-process permutation of
  epoch e and gives rank r the r-th contiguous slice of every global batch, so the union of the
  ranks' step-i batches is exactly the single-process step-i batch.
* Every loss is a mean over the batch and DDP averages gradients over ranks, so
  mean_r(mean over B samples) = mean over world_size * B samples: the same gradient as one
  process with the global batch (BatchNorm in train mode excepted: it normalizes per rank
  unless `sync_bn`; augmentation draws differ per rank).
* Subnet sampling uses the ConfigSampler's own generator seeded from the config, identical on
  every rank, so all ranks train the same lowest/random/highest configs.
* A step's subnets run forward under `DistributedDataParallel.no_sync()` except the last, so
  their gradients accumulate locally and the last backward performs the step's one all-reduce
  (`find_unused_parameters=True`: the quantizer forms and BNs of other widths get no gradient
  in a given pass; DDP tracks params used in any accumulated pass). A backward that does not
  go through the DDP forward (the EQ-Net weight regularizer) adds a gradient that is a
  function of the weights only, identical on every rank, so it needs no reduction. The
  layered recipe's MGD computes gradients with torch.autograd.grad, which bypasses DDP's hooks:
  its passes all run under no_sync and the accumulated gradients are averaged explicitly (the
  MGD weights alpha are computed per rank from that rank's gradients).
* BN recalibration: each rank re-estimates on its share of the held-out batches and the
  cumulative statistics are combined weighted by batch counts, equal to one process on all
  batches (`recalibrate_bn`).
* The online-adaptive-label accumulator is summed over ranks at the end of each epoch; training
  metrics are averaged over ranks before logging.
* Rank 0 alone writes config.json, checkpoints (atomic, see eqnet.run.checkpoint) and
  metrics; every rank resumes by reading the checkpoint, so the run directory must be on a
  filesystem all ranks share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .process_group import (
    DEFAULT_TIMEOUT_S,
    DistEnv,
    all_reduce_sum_,
    cleanup,
    current_env,
    is_main_process,
    launched_by_torchrun,
    mean_over_ranks,
    setup,
)
from .trainer import Trainer

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistEnv",
    "DistributedTrainer",
    "EpochShardSampler",
    "cleanup",
    "current_env",
    "is_main_process",
    "launch",
    "launched_by_torchrun",
    "recalibrate_bn",
    "setup",
    "shard_batches",
    "trainer_class",
]

# -- data ----------------------------------------------------------------------------------


class EpochShardSampler(DistributedSampler):
    """DistributedSampler over the single-process permutation of each epoch (the trainer's
    EpochShuffleSampler: randperm seeded with seed * 1_000_003 + epoch). The permutation is
    cut into global batches of `global_batch` (the incomplete tail dropped, as the trainer's
    drop_last does) and rank r takes the r-th contiguous `global_batch / world_size` slice of
    each: the ranks' step-i batches together are the single-process step-i batch."""

    def __init__(self, n: int, global_batch: int, seed: int, num_replicas: int, rank: int):
        if global_batch % num_replicas:
            raise ValueError(
                f"batch_size={global_batch}: the global batch must be divisible by the world "
                f"size {num_replicas}"
            )
        super().__init__(
            range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.n = int(n)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // num_replicas
        self.num_samples = (self.n // self.global_batch) * self.local_batch
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        out = []
        for start in range(0, (self.n // self.global_batch) * self.global_batch, self.global_batch):
            lo = start + self.rank * self.local_batch
            out.extend(perm[lo : lo + self.local_batch])
        return iter(out)

    def __len__(self) -> int:
        return self.num_samples


def shard_batches(batches: Iterable, limit: int, rank: int, world_size: int) -> Iterator:
    """Batches i = rank, rank + W, ... of the first `limit` batches of `batches`."""
    for i, b in enumerate(batches):
        if i >= limit:
            break
        if i % world_size == rank:
            yield b


# -- BN statistics over ranks -----------------------------------------------------------


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader: Iterable, batches: int = 16) -> None:
    """`eqnet.convert.recalibrate_bn` on the union of the ranks' data.

    Rank r re-estimates on batches r, r + W, ... of the first `batches` batches of `loader`;
    with momentum=None a BN's running mean and variance are the plain averages of the
    per-batch mean and unbiased variance, so the global statistics are the batch-count weighted
    average of the ranks' (sum_r n_r * stat_r / sum_r n_r): the single-process result on the
    same `batches` batches. With fewer batches than ranks every rank uses all of them (nothing
    to combine). Untouched BNs (other widths) keep their statistics."""
    from eqnet.convert import recalibrate_bn as local_recalibrate

    env = current_env()
    if env.world_size == 1 or _has_sync_bn(model):
        # SyncBatchNorm already reduces inside its forward: every rank runs every batch.
        local_recalibrate(model, loader, batches=batches)
        return
    items = []
    for i, b in enumerate(loader):
        if i >= batches:
            break
        items.append(b)
    if len(items) < env.world_size:
        local_recalibrate(model, items, batches=batches)
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bns = [m for m in bns if m.track_running_stats]
    # A sentinel count marks the BNs recalibrate_bn resets (it zeroes num_batches_tracked).
    saved = [m.num_batches_tracked.clone() for m in bns]
    for m in bns:
        m.num_batches_tracked.fill_(-1)
    local_recalibrate(model, list(shard_batches(items, batches, env.rank, env.world_size)), batches)
    touched = [int(m.num_batches_tracked) >= 0 for m in bns]
    for m, s, t in zip(bns, saved, touched, strict=True):
        if not t:
            m.num_batches_tracked.copy_(s)
    active = [m for m, t in zip(bns, touched, strict=True) if t]
    if not active:
        return
    # One flat all-reduce: [n_r * mean, n_r * var] of every touched BN, then the counts.
    stats = torch.cat(
        [
            torch.cat([m.running_mean.double(), m.running_var.double()])
            * float(m.num_batches_tracked)
            for m in active
        ]
        + [torch.tensor([float(m.num_batches_tracked) for m in active], dtype=torch.float64)]
    ).cpu()
    all_reduce_sum_(stats)
    counts = stats[-len(active) :]
    offset = 0
    for m, n in zip(active, counts.tolist(), strict=True):
        c = m.running_mean.numel()
        m.running_mean.copy_((stats[offset : offset + c] / n).to(m.running_mean))
        m.running_var.copy_((stats[offset + c : offset + 2 * c] / n).to(m.running_var))
        m.num_batches_tracked.fill_(int(n))
        offset += 2 * c


def _has_sync_bn(model) -> bool:
    return any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


# -- the trainer ---------------------------------------------------------------------------


def subnets_per_step(trainer: Trainer) -> int:
    """How many forward passes through the network one optimizer step of the recipe makes
    (so that all but the last run under no_sync)."""
    c = trainer.config
    name = c.recipe
    if name in ("float", "qat"):
        return 1
    if name in ("multiquant", "eqnet"):
        return c.num_random + 2
    if name == "layered":
        return len(c.w_bits)
    if name == "limpq":
        return len(c.w_bits) + 1
    raise NotImplementedError(f"recipe {name!r}: distributed pass count unknown")


class _SyncedRecipe:
    """Wraps the recipe: counts the step's forward passes so the last one syncs, checks the
    count afterwards, and averages gradients explicitly when DDP's hooks are bypassed (MGD)."""

    def __init__(self, inner, trainer: DistributedTrainer):
        self._inner = inner
        self._trainer = trainer

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def step(self, trainer, x, y):
        t = self._trainer
        t._pass = 0
        metrics = self._inner.step(trainer, x, y)
        if t._pass != t._passes:
            raise RuntimeError(
                f"recipe {t.config.recipe!r} made {t._pass} forward passes in one step, expected "
                f"{t._passes}: the distributed gradient sync would be wrong"
            )
        if t._manual_sync:
            average_gradients(t.model)
        return mean_over_ranks(metrics) if t.reduce_step_metrics else metrics


def average_gradients(model: torch.nn.Module) -> None:
    """Average every parameter's .grad over ranks in one flat all-reduce (a missing grad
    counts as zero, so a parameter used on only some ranks is still averaged consistently)."""
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
    )
    all_reduce_sum_(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


class DistributedTrainer(Trainer):
    """The Trainer on every rank of an initialized process group (see the module docstring).

    sync_bn: convert BatchNorm to SyncBatchNorm (batch statistics over the global batch in
    training; CUDA only, since PyTorch's SyncBatchNorm has no CPU kernel)."""

    sync_bn: bool = False
    reduce_step_metrics: bool = False  # per-step metrics stay local; epoch means are reduced

    def __init__(self, config, out_dir=None, data=None, *, load_init=True):
        if not dist.is_initialized():
            setup(device=config.device)
        self.dist = current_env()
        super().__init__(config, out_dir, data, load_init=load_init)
        c = self.config
        if not self.dist.is_main:
            # Rank 0 writes the run directory; the others only read it (resume).
            self.out_dir = None
            c.progress = False
        sampler = EpochShardSampler(
            len(self.data.train), c.batch_size, c.seed, self.dist.world_size, self.dist.rank
        )
        self.train_loader = DataLoader(
            self.data.train,
            batch_size=sampler.local_batch,
            sampler=sampler,
            drop_last=True,
            num_workers=c.workers,
        )
        if len(self.train_loader) != self.steps_per_epoch and c.max_steps_per_epoch is None:
            raise RuntimeError("distributed loader length differs from the single-process one")
        if self.sync_bn:
            if self.device.type != "cuda":
                raise ValueError(
                    "sync_bn=True: SyncBatchNorm runs on CUDA devices only (device "
                    f"{self.device}); leave it off on CPU"
                )
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        device_ids = None
        if self.device.type == "cuda":
            # "cuda" without an index is this rank's GPU (setup() called set_device).
            index = self.device.index
            device_ids = [torch.cuda.current_device() if index is None else index]
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids, find_unused_parameters=True
        )
        self._passes = subnets_per_step(self) if self.space is not None else 1
        self._manual_sync = c.recipe == "layered" and c.joint == "mgd"
        self._pass = 0
        self.recipe = _SyncedRecipe(self.recipe, self)

    # The recipes call trainer.forward for every subnet: route it through DDP.
    def forward(self, cfg, x):
        if cfg is not None:
            self.model.set_config(cfg)
        self._pass += 1
        last = self._pass == self._passes and not self._manual_sync
        if last:
            return self.task.outputs(self._ddp_forward(x))
        with self.ddp.no_sync():
            return self.task.outputs(self._ddp_forward(x))

    def _ddp_forward(self, x):
        if self.scaler is not None:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.ddp(x)
        return self.ddp(x)

    def fit(self, stop_after: int | None = None) -> list[dict]:
        metrics = super().fit(stop_after)
        # Rank 0 may still be writing the last checkpoint: no rank returns (and perhaps
        # resumes from it) before it is complete.
        dist.barrier()
        return metrics

    def train_epoch(self) -> dict:
        row = super().train_epoch()
        if hasattr(self.labels, "accumulator"):  # online adaptive labels (smoothing has none)
            # fit() normalizes the accumulator right after this: sum it over ranks first.
            all_reduce_sum_(self.labels.accumulator)
        return mean_over_ranks(row)

    def recalibrate(self, loader, batches: int) -> None:
        recalibrate_bn(self.model, loader, batches=batches)


def launch(
    backend: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str | None = None,
    sync_bn: bool = False,
) -> type[Trainer]:
    """Initialize the process group when torchrun launched us (`setup`); the trainer class to
    use: DistributedTrainer under torchrun, else the plain Trainer."""
    if not launched_by_torchrun():
        if sync_bn:
            raise ValueError(
                "sync_bn=True: needs a distributed launch (torchrun --nproc_per_node N)"
            )
        return Trainer
    setup(backend, timeout_s, device or "auto")
    return trainer_class(sync_bn)


def trainer_class(sync_bn: bool = False) -> type[Trainer]:
    """DistributedTrainer (with its options) under torchrun, else the plain Trainer."""
    if not (dist.is_available() and dist.is_initialized()):
        if sync_bn:
            raise ValueError("sync_bn=True: needs a distributed launch (torchrun)")
        return Trainer
    return type("DistributedTrainer", (DistributedTrainer,), {"sync_bn": bool(sync_bn)})
