"""Cost model of a quantized network at a mixed-precision configuration.

One forward pass at the input size records, for every quantized layer (a module with
`is_elastic_layer = True`), its multiply-accumulates, weight count, output channels and input
activation size. Every metric is then a sum over layers of a per-layer term, so each is linear
in a one-hot choice per layer (which is what the integer program in `ilp.py` needs):

- `bitops`: sum_l MACs_l * b_w * b_a (per input sample).
- `size` (bytes) of what the quantized layers store to run:
    * weight codes at b_w bits each, bit-packed (N_params * b_w / 8, fractional bytes allowed);
    * weight quantizer parameters in fp32: one scale per output channel for per-channel
      weights, one per group of g input elements of each output row for per-group weights
      (N * K / g scales for a weight [N, K], K = in_features or in_channels/groups*kh*kw;
      what the .eqk file stores), one per tensor otherwise, plus as many zero points when the
      weights are asymmetric. A fixed layer whose K the group size does not divide keeps
      per-channel scales and is counted so;
    * the activation quantizer's fp32 scale, plus an fp32 zero point when asymmetric;
    * the bias in fp32 if the layer has one.
  BatchNorm and layers that are not quantized are not counted (BN folds into the scales and
  bias at deployment; float layers are the same for every config).

Average bit widths come in two kinds. The papers' (MultiQuant's tau_w / tau_a, EQ-Net's and
LIMPQ's "3-bit MP"): a plain mean over the *elastic* layers, so the fixed 8-bit first and last
layers do not count (over every layer when none is elastic); with E the elastic layers,

- `avg_w_bits` = (1/|E|) sum_{l in E} b_w,l,  `avg_a_bits` = (1/|E|) sum_{l in E} b_a,l,
- `avg_bits` = (avg_w_bits + avg_a_bits) / 2.

The package's weighted averages, over every quantized layer (fixed ones included), with P_l the
layer's weight count and A_l its input elements per sample:

- `weighted_w_bits` = sum_l P_l b_w,l / sum_l P_l (bits per stored weight),
- `weighted_a_bits` = sum_l A_l b_a,l / sum_l A_l (bits per activation element read),
- `weighted_bits` = (weighted_w_bits + weighted_a_bits) / 2.

A float activation (`a_bits=None`, weight-only quantization) counts as b_a = 16 bits in every
metric: BitOPs multiply by 16 (the fp16/bf16 activations a weight-only kernel reads), and the
activation averages add 16 for that layer. A float activation stores no activation scale or
zero point, so `size` adds none for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eqnet.space import LayerChoice, SubnetConfig, a_bits_width

METRICS = (
    "bitops",
    "size",
    "avg_bits",
    "avg_w_bits",
    "avg_a_bits",
    "weighted_bits",
    "weighted_w_bits",
    "weighted_a_bits",
)
FP32_BYTES = 4


@dataclass(frozen=True)
class LayerCost:
    """What one quantized layer costs, independent of its widths."""

    name: str
    macs: int  # multiply-accumulates per input sample
    params: int  # weight elements (bias not included)
    out_channels: int  # number of per-channel weight scales
    act_numel: int  # input activation elements per sample
    bias: int  # bias elements (0 if none)
    elastic: bool = True  # False for fixed-width layers (excluded from the papers' averages)
    # elements per weight scale of the "group" granularity; None: the layer has no group form
    # (a "group" choice then runs, and costs, per-channel scales)
    group_size: int | None = None

    def n_weight_scales(self, granularity: str) -> int:
        if granularity == "group" and self.group_size:
            return self.params // self.group_size
        return self.out_channels if granularity in ("channel", "group") else 1

    def size_bytes(self, choice: LayerChoice) -> float:
        n_scales = self.n_weight_scales(choice.w_granularity)
        w_qparams = n_scales * (2 if choice.w_symmetry == "asym" else 1)
        a_qparams = 0 if choice.a_bits is None else (2 if choice.a_symmetry == "asym" else 1)
        fp32_values = w_qparams + a_qparams + self.bias
        return self.params * choice.w_bits / 8.0 + FP32_BYTES * fp32_values

    def bitops(self, choice: LayerChoice) -> float:
        return float(self.macs) * choice.w_bits * a_bits_width(choice.a_bits)


def _layer_cost(name: str, module: torch.nn.Module, inp: torch.Tensor, out: torch.Tensor):
    batch = inp.shape[0]
    if isinstance(module, torch.nn.Conv2d):
        # each output element needs (C_in / groups) * kh * kw MACs
        per_out = module.weight[0].numel()
        macs = out.numel() // batch * per_out
        out_channels = module.out_channels
    elif isinstance(module, torch.nn.Linear):
        macs = out.numel() // batch * module.in_features
        out_channels = module.out_features
    else:
        raise ValueError(
            f"layer {name!r}: cost model knows nn.Conv2d and nn.Linear subclasses, "
            f"got {type(module).__name__}"
        )
    bias = 0 if module.bias is None else module.bias.numel()
    return LayerCost(
        name=name,
        macs=int(macs),
        params=int(module.weight.numel()),
        out_channels=int(out_channels),
        act_numel=int(inp.numel() // batch),
        bias=int(bias),
        elastic=getattr(module, "fixed_choice", None) is None,
        group_size=getattr(getattr(module, "weight_quantizer", None), "group_size", None),
    )


class CostModel:
    """Per-layer costs of a converted model, traced once at one input size."""

    def __init__(self, layers: Sequence[LayerCost]):
        self.layers: OrderedDict[str, LayerCost] = OrderedDict((lc.name, lc) for lc in layers)
        if not self.layers:
            raise ValueError("CostModel needs at least one layer")
        self.total_params = sum(lc.params for lc in self.layers.values())
        self.total_act = sum(lc.act_numel for lc in self.layers.values())
        # the papers' averages run over the elastic layers (every layer when none is elastic)
        n_elastic = sum(lc.elastic for lc in self.layers.values())
        self._averaged = {n: (lc.elastic or n_elastic == 0) for n, lc in self.layers.items()}
        self.n_averaged = n_elastic or len(self.layers)

    @classmethod
    def trace(cls, model: torch.nn.Module, input_size: Sequence[int]) -> CostModel:
        """Run one forward on zeros of shape `input_size` (batch first, e.g. (1, 3, 32, 32))
        and record every quantized layer. A layer called more than once is counted per call."""
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) < 2 or any(s <= 0 for s in input_size):
            raise ValueError(
                f"input_size={input_size}: expected a batch-first shape of positive sizes, "
                "e.g. (1, 3, 32, 32)"
            )
        records: dict[str, LayerCost] = {}
        hooks = []
        for name, module in model.named_modules():
            if getattr(module, "is_elastic_layer", False):

                def hook(mod, args, out, name=name):
                    lc = _layer_cost(name, mod, args[0], out)
                    if name in records:  # shared layer: accumulate its compute
                        prev = records[name]
                        lc = LayerCost(
                            name,
                            prev.macs + lc.macs,
                            lc.params,
                            lc.out_channels,
                            prev.act_numel + lc.act_numel,
                            lc.bias,
                            lc.elastic,
                            lc.group_size,
                        )
                    records[name] = lc

                hooks.append(module.register_forward_hook(hook))
        if not hooks:
            raise ValueError("the model has no quantized layers: convert it with eqnet.convert")
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros(input_size, device=device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        order = [n for n, m in model.named_modules() if getattr(m, "is_elastic_layer", False)]
        unused = [n for n in order if n not in records]
        if unused:
            raise ValueError(f"quantized layers {unused} were not called in the forward pass")
        return cls([records[n] for n in order])

    # -- metrics of one config ------------------------------------------------------------
    def _check(self, config: SubnetConfig):
        if list(config.layers) != list(self.layers):
            raise ValueError(
                f"config layers {list(config.layers)} differ from the cost model's "
                f"{list(self.layers)}"
            )

    def bitops(self, config: SubnetConfig) -> float:
        self._check(config)
        return sum(self.layers[n].bitops(c) for n, c in config)

    def size_bytes(self, config: SubnetConfig) -> float:
        self._check(config)
        return sum(self.layers[n].size_bytes(c) for n, c in config)

    def avg_w_bits(self, config: SubnetConfig) -> float:
        self._check(config)
        return sum(self.layer_term("avg_w_bits", n, c) for n, c in config)

    def avg_a_bits(self, config: SubnetConfig) -> float:
        self._check(config)
        return sum(self.layer_term("avg_a_bits", n, c) for n, c in config)

    def weighted_w_bits(self, config: SubnetConfig) -> float:
        self._check(config)
        return sum(self.layers[n].params * c.w_bits for n, c in config) / self.total_params

    def weighted_a_bits(self, config: SubnetConfig) -> float:
        self._check(config)
        total = sum(self.layers[n].act_numel * a_bits_width(c.a_bits) for n, c in config)
        return total / self.total_act

    def metrics(self, config: SubnetConfig) -> dict[str, float]:
        w, a = self.avg_w_bits(config), self.avg_a_bits(config)
        ww, wa = self.weighted_w_bits(config), self.weighted_a_bits(config)
        return {
            "bitops": self.bitops(config),
            "size": self.size_bytes(config),
            "avg_bits": 0.5 * (w + a),
            "avg_w_bits": w,
            "avg_a_bits": a,
            "weighted_bits": 0.5 * (ww + wa),
            "weighted_w_bits": ww,
            "weighted_a_bits": wa,
        }

    # -- per-layer terms (the linear form the search uses) --------------------------------
    def layer_term(self, metric: str, name: str, choice: LayerChoice) -> float:
        """Layer `name`'s additive contribution to `metric` under `choice`."""
        lc = self.layers[name]
        if metric == "bitops":
            return lc.bitops(choice)
        if metric == "size":
            return lc.size_bytes(choice)
        if metric in ("avg_w_bits", "avg_a_bits", "avg_bits"):
            if not self._averaged[name]:
                return 0.0
            w = choice.w_bits / self.n_averaged
            a = a_bits_width(choice.a_bits) / self.n_averaged
            return {"avg_w_bits": w, "avg_a_bits": a, "avg_bits": 0.5 * (w + a)}[metric]
        if metric == "weighted_w_bits":
            return lc.params * choice.w_bits / self.total_params
        if metric == "weighted_a_bits":
            return lc.act_numel * a_bits_width(choice.a_bits) / self.total_act
        if metric == "weighted_bits":
            return 0.5 * (
                lc.params * choice.w_bits / self.total_params
                + lc.act_numel * a_bits_width(choice.a_bits) / self.total_act
            )
        raise ValueError(f"metric={metric!r}: accepted values are {', '.join(METRICS)}")

    def to_dict(self) -> dict:
        return {n: vars(lc) for n, lc in self.layers.items()}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: accepted values are {', '.join(METRICS)}")
    return metric


def as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
