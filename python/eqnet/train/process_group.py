"""The torch.distributed process group of a torchrun launch: the rank environment, setup and
teardown, and the few collectives training needs (sums and means over ranks)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables (RANK, WORLD_SIZE) are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_from_os() -> DistEnv:
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise ValueError(f"environment: {missing} not set (launch with torchrun)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return DistEnv(rank, world, local)


def current_env() -> DistEnv:
    """The initialized process group's rank/world size (1 process when none)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    return DistEnv(0, 1, 0)


def setup(
    backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "auto"
) -> DistEnv:
    """Initialize the default process group from torchrun's environment (idempotent).

    backend: "auto" (nccl when CUDA is used, else gloo), "nccl" or "gloo". `timeout_s` bounds
    every collective: a rank that died or hangs makes the others fail after it instead of
    waiting forever (gloo also fails at once when a peer's socket closes)."""
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend={backend!r}: accepted values are auto, nccl, gloo")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}: must be > 0")
    env = env_from_os()
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # "cuda" then means this rank's GPU everywhere the trainer calls .to(device).
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=float(timeout_s)),
        )
    return env


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return current_env().is_main


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor on any device (moved to the backend's device and
    back: gloo reduces CPU tensors, nccl CUDA ones)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    dev = comm_device()
    buf = t.detach().to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        t.copy_(buf.to(t.device))
    return t


def comm_device() -> torch.device:
    """The device the backend reduces on: this rank's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each float averaged over ranks (keys must be identical on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum_(t)
    world = dist.get_world_size()
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}
