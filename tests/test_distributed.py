"""Multi-process training on CPU with gloo: 2 ranks launched by torchrun.

One 2-rank job (this file run as a script under torchrun) trains, resumes and recalibrates;
its results are compared with a single process in the test itself: 2 ranks x batch B must give
the weights of 1 process x batch 2B (a network without BatchNorm, whose train-mode statistics
would otherwise be per rank, and the multiquant recipe: LRH sampling + online adaptive labels,
no MGD). The last pass of every step (the lowest subnet) does not use the highest subnet's
quantizer step sizes, so equal weights also show that gradients accumulated under no_sync with
find_unused_parameters=True are all-reduced.
"""

from __future__ import annotations

import functools
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 32
EQNET = dict(recipe="eqnet", epochs=1, max_steps_per_epoch=3, w_bits=[2, 4, 8], a_bits=[2, 4, 8])


def _no_bn_net(num_classes: int = 10) -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, num_classes),
    )
    net.eqnet_input_size = (1, 1, 8, 8)
    return net


def _patch_models():
    """`--model nobn` resolves to the BatchNorm-free network above (test only)."""
    from eqnet import models

    original = models.get
    if getattr(original, "_nobn_patch", False):
        return

    def get(name, num_classes=10, **kwargs):
        if name == "nobn":
            return _no_bn_net(num_classes)
        return original(name, num_classes, **kwargs)

    get._nobn_patch = True
    models.get = get


def _config(**kw):
    from eqnet.run.config import TrainConfig

    base = dict(
        recipe="multiquant",
        model="nobn",
        batch_size=GLOBAL_BATCH,
        epochs=2,
        max_steps_per_epoch=4,
        limit_train=256,
        limit_test=64,
        calib_batches=2,
        bn_batches=2,
        eval_batch_size=64,
        lr=0.05,
        device="cpu",
        deterministic=True,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _data():
    from eqnet.data import load_data

    return load_data("digits", limit_train=256, limit_test=64)


def _record_configs(trainer, log: list):
    lrh = trainer.sampler.lrh

    def recording(k):
        out = lrh(k)
        log.append([(role, cfg.to_json()) for role, cfg in out])
        return out

    trainer.sampler.lrh = recording


def _bn_model():
    from eqnet.convert import calibrate
    from eqnet.data import eval_loader
    from eqnet.run import build_model
    from eqnet.space import SubnetConfig

    torch.manual_seed(11)
    model, _ = build_model(_config(model="digits_cnn").resolved(), 10, float_init=False)
    model.set_config(SubnetConfig.highest(model.space, model))
    # calibrated quantizers (the defaults, step 1, would round every weight to 0)
    calibrate(model, (x for x, _ in eval_loader(_data().holdout, 16)), batches=2)
    return model


def _bn_stats(model) -> dict:
    return {
        n: b.clone()
        for n, b in model.named_buffers()
        if n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _dataset_configs(model):
    from eqnet.space import SubnetConfig

    g = torch.Generator().manual_seed(5)
    return [SubnetConfig.random(model.space, model, g) for _ in range(5)]


def _worker(out: Path) -> None:
    """One rank of the 2-rank job (run under torchrun)."""
    torch.set_num_threads(1)
    _patch_models()
    from eqnet.data import eval_loader
    from eqnet.search.distributed_dataset import build_dataset_distributed
    from eqnet.train import distributed
    from eqnet.train.distributed import DistributedTrainer

    env = distributed.setup("gloo", timeout_s=60, device="cpu")
    res = {"world_size": env.world_size}
    data = _data()

    configs: list = []
    full = DistributedTrainer(_config(), out / "full", data=data)
    _record_configs(full, configs)
    full.fit()
    res["full"] = {k: v.clone() for k, v in full.model.state_dict().items()}
    res["configs"] = configs
    res["soft"] = full.labels.soft.clone()
    res["metrics"] = full.metrics

    part = DistributedTrainer(_config(), out / "resume", data=data)
    part.fit(stop_after=1)
    resumed = DistributedTrainer.from_run(out / "resume", data=data)
    resumed.fit()
    res["resumed"] = {k: v.clone() for k, v in resumed.model.state_dict().items()}

    # eqnet: random forms, GPG, and the WDR backward that bypasses the DDP forward
    eq = DistributedTrainer(_config(**EQNET), None, data=data)
    eq.fit()
    res["eqnet"] = {k: v.clone() for k, v in eq.model.state_dict().items()}

    model = _bn_model()
    distributed.recalibrate_bn(model, (x for x, _ in eval_loader(data.holdout, 16)), batches=3)
    res["bn"] = _bn_stats(model)

    rank = env.rank
    res["dataset"] = build_dataset_distributed(
        out / "accuracy.jsonl",
        _dataset_configs(model),
        lambda cfg: cfg.mean_bits() / 8,
        lambda cfg: {"evaluated_by": rank},
    )
    torch.save(res, out / f"rank{env.rank}.pt")
    distributed.cleanup()


def _torchrun(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(cmd + args, env=env, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = _torchrun(
        [__file__, "worker", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, log.decode()[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


@pytest.fixture(scope="module")
def single_process():
    """The reference: one process, the global batch, the same config."""
    from eqnet.train.trainer import Trainer

    _patch_models()
    configs: list = []
    t = Trainer(_config(), None, data=_data())
    _record_configs(t, configs)
    t.fit()
    return t, configs


def test_two_ranks_equal_one_process_with_twice_the_batch(two_rank_job, single_process, init):
    _, ranks = two_rank_job
    ref, _ = single_process
    assert ranks[0]["world_size"] == 2
    ref_state = ref.model.state_dict()
    # DDP keeps the replicas identical, bit for bit.
    for k, v in ranks[0]["full"].items():
        assert torch.equal(v, ranks[1]["full"][k]), k
    changed = 0
    for k, v in ref_state.items():
        got = ranks[0]["full"][k]
        if v.is_floating_point():
            # 2 half-batch means averaged vs one mean: float32 rounding only.
            torch.testing.assert_close(got, v, rtol=1e-4, atol=2e-5, msg=k)
        else:
            assert torch.equal(got, v), k
    for k, v in ref_state.items():
        if v.is_floating_point() and not torch.equal(init[k], v):
            changed += 1
    assert changed > 0  # training moved the weights (the comparison is not vacuous)


@pytest.fixture(scope="module")
def init():
    """The calibrated weights before the first step."""
    from eqnet.train.trainer import Trainer

    _patch_models()
    t = Trainer(_config(), None, data=_data())
    t.calibrate()
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_highest_subnet_step_sizes_trained_despite_no_sync(two_rank_job, single_process, init):
    # scale_* of the 8-bit forms get gradients only in the highest pass, which runs under
    # no_sync; the synced pass (lowest) leaves them unused (find_unused_parameters=True).
    _, ranks = two_rank_job
    ref, _ = single_process
    keys = [k for k in init if ".scale_w8_" in k or ".scale_a8_" in k]
    assert keys, sorted(init)
    moved = [k for k in keys if not torch.equal(init[k], ranks[0]["full"][k])]
    assert moved, "the 8-bit step sizes never changed"
    for k in keys:
        torch.testing.assert_close(
            ranks[0]["full"][k], ref.model.state_dict()[k], rtol=1e-4, atol=2e-5
        )


def test_sampled_configs_identical_on_all_ranks(two_rank_job, single_process):
    _, ranks = two_rank_job
    _, ref_configs = single_process
    assert len(ranks[0]["configs"]) == 2 * 4  # 2 epochs x 4 steps
    assert ranks[0]["configs"] == ranks[1]["configs"] == ref_configs
    randoms = {cfgs[1][1] for cfgs in ref_configs}
    assert len(randoms) > 1  # the random subnet really varies from step to step


def test_adaptive_label_matrix_equals_single_process(two_rank_job, single_process):
    _, ranks = two_rank_job
    ref, _ = single_process
    assert ranks[0]["soft"] is not None
    torch.testing.assert_close(ranks[0]["soft"], ranks[1]["soft"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["soft"], ref.labels.soft, rtol=1e-5, atol=1e-6)
    # a per-rank (unreduced) matrix would not be the same: the epoch's rows sum to 1 over the
    # union's correctly classified samples; at least one class saw some.
    assert (ref.labels.soft.diagonal() < 1).any()


def test_metrics_reduced_and_written_by_rank0(two_rank_job, single_process):
    out, ranks = two_rank_job
    ref, _ = single_process
    for r0, r1, rr in zip(ranks[0]["metrics"], ranks[1]["metrics"], ref.metrics, strict=True):
        # the mean over ranks of half-batch mean losses = the full-batch mean loss
        assert r0["train_loss"] == pytest.approx(rr["train_loss"], rel=1e-4)
        assert r1["train_loss"] == r0["train_loss"]
        for k in rr:
            if k.startswith("acc_"):
                assert r0[k] == pytest.approx(rr[k], abs=1 / 64 + 1e-9), k
    for name in ("full", "resume"):
        files = sorted(p.name for p in (out / name).iterdir() if not p.name.startswith("."))
        assert files == ["checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]


def test_eqnet_recipe_two_ranks_equal_one_process(two_rank_job):
    from eqnet.train.trainer import Trainer

    _, ranks = two_rank_job
    _patch_models()
    ref = Trainer(_config(**EQNET), None, data=_data())
    ref.fit()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(ranks[0]["eqnet"][k], ranks[1]["eqnet"][k]), k
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0]["eqnet"][k], v, rtol=1e-4, atol=2e-5, msg=k)


def test_resume_under_two_ranks_continues_exactly(two_rank_job):
    _, ranks = two_rank_job
    for r in ranks:
        for k, v in r["full"].items():
            assert torch.equal(r["resumed"][k], v), k


def test_bn_recalibration_combines_ranks(two_rank_job):
    from eqnet.convert import recalibrate_bn
    from eqnet.data import eval_loader

    _, ranks = two_rank_job
    model = _bn_model()
    before = _bn_stats(model)
    # single process on the union: the first 3 batches (rank 0 had batches 0 and 2, rank 1 had 1)
    recalibrate_bn(model, (x for x, _ in eval_loader(_data().holdout, 16)), batches=3)
    ref = _bn_stats(model)
    touched = [k for k in ref if k.endswith("running_mean") and not torch.equal(ref[k], before[k])]
    assert touched
    for k, v in ref.items():
        assert torch.equal(ranks[0]["bn"][k], ranks[1]["bn"][k]), k
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0]["bn"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(ranks[0]["bn"][k], v), k


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker children (from /proc)."""
    out = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


@pytest.mark.slow
def test_killed_rank_ends_the_job(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(
        [
            "-m",
            "eqnet.cli",
            "train",
            "--epochs",
            "500",
            "--max-steps-per-epoch",
            "2",
            "--limit-train",
            "256",
            "--limit-test",
            "64",
            "--bn-batches",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(run),
            "--no-progress",
            "--dist-timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.5)
        workers = _worker_pids(proc.pid)
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGKILL)
        # bounded: the surviving rank fails its next collective (peer socket closed, or the
        # --dist-timeout), torchrun sees a failed worker and stops the job
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # (which rank reports first, the survivor's "distributed error" or torchrun's summary of
    # the killed worker, is a race; the exit status is not)
    assert proc.returncode != 0, err.decode()[-3000:]
    # the last checkpoint written by rank 0 is intact
    from eqnet.run.checkpoint import load_checkpoint

    assert load_checkpoint(run)["epoch"] >= 1


def test_accuracy_dataset_split_across_ranks(two_rank_job):
    from eqnet.search.accuracy_data import build_dataset, read_dataset

    out, ranks = two_rank_job
    ref = build_dataset(
        out / "reference.jsonl", _dataset_configs(_bn_model()), lambda cfg: cfg.mean_bits() / 8
    )
    written = read_dataset(out / "accuracy.jsonl")
    for rows in (ranks[0]["dataset"], ranks[1]["dataset"], written):
        assert [r["key"] for r in rows] == [r["key"] for r in ref]
        assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in ref]
    # every config evaluated once, the work shared: rank r took the r-th of each pair
    assert [r["evaluated_by"] for r in written] == [i % 2 for i in range(len(ref))]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_sampler_slices_the_single_process_batches(world):
    from eqnet.data import EpochShuffleSampler
    from eqnet.train.distributed import EpochShardSampler

    n, batch, seed = 103, 8, 7
    single = EpochShuffleSampler(n, seed)
    shards = [EpochShardSampler(n, batch, seed, world, r) for r in range(world)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        order = list(single)
        expected = [order[i : i + batch] for i in range(0, n - n % batch, batch)]
        for s in shards:
            s.set_epoch(epoch)
        local = [list(s) for s in shards]
        assert all(
            len(x) == len(s) == len(expected) * batch // world for x, s in zip(local, shards)
        )
        for step, want in enumerate(expected):
            k = batch // world
            got = functools.reduce(operator.iadd, (x[step * k : (step + 1) * k] for x in local), [])
            assert got == want


def test_shard_sampler_rejects_indivisible_batch():
    from eqnet.train.distributed import EpochShardSampler

    with pytest.raises(ValueError, match="batch_size=30"):
        EpochShardSampler(100, 30, 0, 4, 0)


def test_sync_bn_needs_torchrun(tmp_path, capsys, monkeypatch):
    from eqnet.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--out", str(tmp_path / "r"), "--sync-bn", "--no-progress"]) == 1
    assert "--sync-bn" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
