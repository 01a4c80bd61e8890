"""Calibration of a converted model's quantizers, and BN re-estimation.

`data` may be an iterable of batches or a `forward_loop(model)` callable. A batch is a tensor
(the input), a tuple/list (its first element is the input: `(images, labels)`), or a dict (the
model's keyword arguments: `{"input_ids": ids, "attention_mask": mask}`); an input that is
itself a tuple is passed as positional arguments.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .batchnorm import SwitchableBatchNorm2d
from .coverage import Call, call_model, check_quantized_paths, to_device
from .quantizer import CALIB_SAMPLES, ElasticQuantizer

# Seconds of calibration before a progress bar appears (short runs print nothing).
PROGRESS_DELAY_S = 1.0


def _quantized_layers(model: nn.Module):
    return [m for m in _unique_modules(model) if getattr(m, "is_elastic_layer", False)]


def _unique_modules(model):
    seen = set()
    for m in model.modules():
        if id(m) not in seen:
            seen.add(id(m))
            yield m


class _ActivationObserver:
    """Keeps, per layer, a bounded random subsample of its float input values (for the
    clipping search and the LSQ mean) and the per-sample element count."""

    def __init__(self, samples: int, seed: int = 0):
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)
        self.values: dict[int, list[torch.Tensor]] = {}
        self.negative: dict[int, bool] = {}

    def __call__(self, layer, x):
        flat = x.detach().reshape(-1)
        self.negative[id(layer)] = self.negative.get(id(layer), False) or bool((flat < 0).any())
        if flat.numel() > self.samples:
            idx = torch.randint(flat.numel(), (self.samples,), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        self.values.setdefault(id(layer), []).append(flat.float().cpu())

    def data(self, layer) -> torch.Tensor | None:
        chunks = self.values.get(id(layer))
        if not chunks:
            return None
        x = torch.cat(chunks)
        if x.numel() > self.samples:
            idx = torch.randint(x.numel(), (self.samples,), generator=self.generator)
            x = x[idx]
        return x


def batch_input(item):
    """The model input of one batch: a tuple/list's first element, else the item itself."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("a batch is an empty tuple/list: expected (input, ...)")
        return item[0]
    if isinstance(item, (torch.Tensor, Mapping)):
        return item
    raise ValueError(
        f"a batch must be a tensor, a tuple/list (input first) or a dict of keyword arguments, "
        f"got {type(item).__name__}"
    )


def _run(model: nn.Module, data, batches: int, desc: str) -> None:
    """Run model over at most `batches` batches of `data` (or call data(model)), with a
    progress bar once it takes longer than PROGRESS_DELAY_S."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"batches={batches!r}: must be a positive int")
    from tqdm.auto import tqdm

    bar = tqdm(total=None if callable(data) else batches, desc=desc, delay=PROGRESS_DELAY_S)
    calls = [0]

    def count(module, args, out):
        calls[0] += 1
        bar.update(1)

    handle = model.register_forward_hook(count)
    try:
        if callable(data) and not isinstance(data, nn.Module):
            data(model)
        elif isinstance(data, Iterable):
            device = _device_of(model)
            for item in itertools.islice(data, batches):
                call_model(model, to_device(batch_input(item), device))
        else:
            raise ValueError(
                f"data must be an iterable of batches or a forward_loop(model) callable, "
                f"got {type(data).__name__}"
            )
    finally:
        handle.remove()
        bar.close()
    if calls[0] == 0:
        raise ValueError("data yielded no batches (the model was never called)")


def _device_of(model):
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


class _FirstCallCheck:
    """Forward pre-hook: on the model's first call, check with those very inputs that every
    quantized layer runs its quantized path (see eqnet.nn.coverage), then let the call go on."""

    def __init__(self, layers):
        self.layers = layers
        self.active = True

    def __call__(self, model, args, kwargs):
        if not self.active:
            return None
        self.active = False
        observers = [(layer, layer.observer) for layer in self.layers]
        for layer, _ in observers:
            layer.observer = None
        try:
            # model.forward, not model(): the check's own calls skip the hooks (this one and
            # the progress counter).
            check_quantized_paths(model, Call(args, kwargs), forward=model.forward)
        finally:
            for layer, obs in observers:
                layer.observer = obs
        model.paths_checked = True
        return None


@torch.no_grad()
def calibrate(model: nn.Module, data, batches: int = 4, method: str = "mse") -> None:
    """Initialize every form of every quantizer: weight quantizers from the weights,
    activation quantizers from the float inputs each layer sees on `batches` batches of
    `data` (an iterable of batches, see the module docstring, or a `forward_loop(model)`
    callable that runs the model itself).

    The model runs in the mode it is in, so the ranges match how it will be used: in train
    mode BN normalizes with batch statistics (as during QAT), in eval mode with its running
    statistics. BN buffers are restored afterwards, so calibration has no side effect on them.
    A Supernet that `convert` could not check (no example input) is checked on the first
    batch: every quantized layer must run its quantized path (ValueError otherwise).
    """
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: convert it with eqnet.convert first")
    observer = _ActivationObserver(CALIB_SAMPLES)
    bn_buffers = {
        id(m): {k: v.clone() for k, v in m.named_buffers(recurse=False)}
        for m in _unique_modules(model)
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    check = None
    if getattr(model, "paths_checked", True) is False:
        check = model.register_forward_pre_hook(_FirstCallCheck(layers), with_kwargs=True)
    try:
        for layer in layers:
            layer.observer = observer
        _run(model, data, batches, "calibrate")
    finally:
        if check is not None:
            check.remove()
        for layer in layers:
            layer.observer = None
        for m in _unique_modules(model):
            for k, v in bn_buffers.get(id(m), {}).items():
                getattr(m, k).copy_(v)
    from tqdm.auto import tqdm

    # The per-form clipping search over every layer is the long part on large models.
    for layer in tqdm(layers, desc="quantizer ranges", delay=PROGRESS_DELAY_S):
        layer.weight_quantizer.calibrate(layer.weight, method=method)
        values = observer.data(layer)
        if values is None:
            continue  # the layer did not run on this data; its activation forms keep defaults
        aq: ElasticQuantizer | None = layer.act_quantizer
        if aq is None:
            continue  # weight-only layer: float activations, no range to calibrate
        # Signedness follows all the data seen, not just the subsample.
        aq.calibrate(
            values.to(aq.signed_range.device), method=method, signed=observer.negative[id(layer)]
        )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, batches: int = 16) -> None:
    """Reset and re-estimate the BN running statistics of the active subnet.

    Only the BNs the active subnet uses are touched (for SwitchableBatchNorm2d, the active
    width's). Statistics are the cumulative average over the batches (momentum=None); the
    model runs in eval mode with only those BNs in train mode (so dropout and the like stay
    off), and every module's mode and momentum are restored afterwards. `data` as in calibrate.
    """
    bns = []
    skip = set()
    for m in _unique_modules(model):
        if isinstance(m, SwitchableBatchNorm2d):
            skip.update(id(b) for b in m.bns.values())
            bns.append(m.active_bn)
    for m in _unique_modules(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in skip:
            if m.track_running_stats:
                bns.append(m)
    if not bns:
        return
    modes = {id(m): m.training for m in _unique_modules(model)}
    momenta = {id(b): b.momentum for b in bns}
    model.eval()
    try:
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
            b.train()
        _run(model, data, batches, "BN statistics")
    finally:
        for b in bns:
            b.momentum = momenta[id(b)]
        for m in _unique_modules(model):
            m.training = modes[id(m)]
