"""The search's view of a trained run: its supernet, splits, cost model and real evaluator, and
the worker processes that measure the accuracy dataset."""

from __future__ import annotations

import multiprocessing
import sys

import torch

from eqnet.data import bn_split, data_task, eval_loader, fixed_batches, load_data
from eqnet.forms import set_narrow_weights
from eqnet.run import load_run
from eqnet.search.accuracy_data import fraction_correct, supernet_correctness
from eqnet.search.cost import CostModel
from eqnet.space import SubnetConfig

from .options import SearchOptions


def log(msg: str) -> None:
    """A progress line on stderr (stdout is left to the caller's results)."""
    print(msg, file=sys.stderr, flush=True)


class SearchContext:
    """The trained run, its data, the cost model and the real evaluator."""

    def __init__(self, options: SearchOptions):
        self.run = load_run(options.run, map_location=options.device)
        if self.run.space is None:
            raise ValueError(f"{options.run}: a float run has no quantization space to search")
        c = self.run.config
        if data_task(c.data) != "classification":
            raise NotImplementedError(
                f"{options.run}: a {data_task(c.data)} run; the search ranks subnets by top-1 "
                "accuracy on held-out images, so it searches classification runs only"
            )
        self.supernet = self.run.model.to(options.device)
        self.space = self.run.space
        self.device = torch.device(options.device)
        self.bn_batches = c.bn_batches if options.bn_batches is None else options.bn_batches
        # the run's own held-out / test split; BN statistics from the augmented held-out images
        self.data = load_data(
            c.data,
            holdout=c.holdout,
            limit_train=c.limit_train,
            limit_test=c.limit_test,
            augment=False,
        )
        # on the device once: every config's re-estimation reads the same batches
        self.bn_images = [
            x.to(self.device)
            for x in fixed_batches(bn_split(self.data), c.batch_size, self.bn_batches)
        ]
        holdout = self.data.holdout
        self.holdout_loader = eval_loader(
            _first(holdout, options.holdout_images), c.eval_batch_size
        )
        self.rerank_loader = eval_loader(_first(holdout, options.rerank_images), c.eval_batch_size)
        self.test_loader = eval_loader(self.data.test, c.eval_batch_size)
        self.cost = CostModel.trace(self.supernet, (1, *self.data.input_shape))
        self.forms = options.form_list()
        for form in self.forms:
            form.check_space(self.space)
        # a narrow-range form (tensorrt) is measured as it deploys: every symmetric weight code
        # on [-(2^(b-1)-1), 2^(b-1)-1] for the whole search (options forbid a clashing form)
        self.narrow = any(f.narrow_weights for f in self.forms)
        if self.narrow:
            set_narrow_weights(self.supernet, True)

    def correct(self, cfg, loader):
        """Per-image correctness (bool [N]) of subnet cfg on loader, after its BN
        re-estimation; `accuracy` reduces it to top-1."""
        return supernet_correctness(
            self.supernet, self.bn_images, loader, self.bn_batches, self.device
        )(cfg)

    def accuracy(self, cfg, loader) -> float:
        return fraction_correct(self.correct(cfg, loader))

    def uniform_widths(self, form=None):
        """[(label 'WbAb', config)] of every width both weights and activations take, narrowest
        first: the baselines the rerank and the final comparison measure; in the default forms,
        or with every elastic layer in target form `form`."""
        widths = [(b, b) for b in sorted(set(self.space.w_bits) & set(self.space.int_a_bits))]
        if None in self.space.a_bits:  # weight-only baselines: float activations
            widths += [(b, None) for b in self.space.w_bits]
        labels = [f"W{w}A{'float' if a is None else a}" for w, a in widths]
        if form is None:
            return [
                (label, SubnetConfig.uniform(self.space, self.supernet, w, a))
                for label, (w, a) in zip(labels, widths)
            ]
        g, ws, as_ = form.w_granularity, form.w_symmetry, form.a_symmetry
        configs = [
            (label, SubnetConfig.uniform(self.space, self.supernet, w, a, g, ws, as_))
            for label, (w, a) in zip(labels, widths)
        ]
        # only what the engine runs (TensorRT: no unsigned 8-bit activation in int8)
        return [(label, c) for label, c in configs if form.runs(c, self.supernet)]


def _first(dataset, n: int | None):
    """The first n items of `dataset` (all of them when n is None)."""
    if n is None:
        return dataset
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


class DatasetWorkers:
    """`dataset_workers` > 1: a pool of spawned processes that measure configs' held-out
    accuracy.

    Every worker builds its own `SearchContext` from the same options, so it re-estimates BN
    on the same fixed batches and measures the same images as the main process: a config's
    accuracy does not depend on which process measured it. Workers split the configs where
    intra-op threads split each forward; they help where the threads stop scaling (on 2 cores
    both give the same rate, docs/search.md). Spawned rather than forked, because a forked
    child of a process that has used OpenMP threads may hang. `imap` is None with one worker
    (the main process evaluates)."""

    def __init__(self, options: SearchOptions):
        self.options, self.pool = options, None
        self.imap = self._imap if options.dataset_workers > 1 else None

    def _imap(self, configs):
        if self.pool is None:  # started only when there is something to measure
            n = self.options.dataset_workers
            threads = self.options.threads or max(1, torch.get_num_threads() // n)
            log(f"accuracy dataset: {n} worker processes, {threads} thread(s) each")
            self.pool = multiprocessing.get_context("spawn").Pool(
                n, initializer=_worker_start, initargs=(self.options, threads)
            )
        return self.pool.imap(_worker_accuracy, [c.to_json() for c in configs])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()  # on an error too: no orphaned workers
            self.pool.join()
        return False


_worker_ctx = None


def _worker_start(options: SearchOptions, threads: int) -> None:
    global _worker_ctx
    torch.set_num_threads(threads)
    _worker_ctx = SearchContext(options)


def _worker_accuracy(config_json: str) -> float:
    return _worker_ctx.accuracy(SubnetConfig.from_json(config_json), _worker_ctx.holdout_loader)
