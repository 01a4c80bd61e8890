"""Per-bit-width BatchNorm (one set of statistics and affine parameters per weight width).

Quantizing the weights at different widths shifts the statistics of the layer's output, so
sharing one BN across widths mis-normalizes every width but the one it was last estimated for
(the per-bit BN of vertical layering / "switchable" BN). The BN to use is selected by the weight
width of the quantized layer that feeds it; `eqnet.convert` finds that layer from the model's
dataflow (a hooked forward), and the layer's `set_choice` sets `active_bits`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import form_data


class SwitchableBatchNorm2d(nn.Module):
    """One nn.BatchNorm2d per weight bit width in `bits`; `.bns[str(b)]`, `.active_bits`."""

    def __init__(self, num_features: int, bits, **bn_kwargs):
        super().__init__()
        bits = tuple(sorted(set(int(b) for b in bits)))
        if not bits:
            raise ValueError("bits must not be empty")
        self.bits = bits
        self.num_features = num_features
        self.bns = nn.ModuleDict({str(b): nn.BatchNorm2d(num_features, **bn_kwargs) for b in bits})
        self._active_bits = bits[-1]
        self._bind_active_width()
        self.register_load_state_dict_post_hook(_rebind_after_load)

    @property
    def active_bits(self) -> int:
        return self._active_bits

    @active_bits.setter
    def active_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"active_bits={bits}: accepted values are {list(self.bits)}")
        self._active_bits = bits
        self._bind_active_width()

    def _bind_active_width(self) -> None:
        """`active_tensors` = the active width's (weight, bias, running_mean, running_var,
        num_batches_tracked), what a compiled graph reads (form_data.switchable_batchnorm):
        the other widths are not graph inputs, so they get no gradient and keep their
        statistics, as in eager mode. Bound again by each width switch, `_apply` (`.to()` ...)
        and `load_state_dict`."""
        bn = self.bns[str(self._active_bits)]
        self.active_tensors = (
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            bn.num_batches_tracked,
        )

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._bind_active_width()
        return out

    @property
    def active_bn(self) -> nn.BatchNorm2d:
        return self.bns[str(self._active_bits)]

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, bits) -> SwitchableBatchNorm2d:
        """Every width starts as a copy of `bn` (statistics and affine parameters)."""
        m = cls(
            bn.num_features,
            bits,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=_device_of(bn),
        )
        for b in m.bns.values():
            b.load_state_dict(bn.state_dict())
        m.train(bn.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return form_data.switchable_batchnorm(self, x)
        return self.bns[str(self._active_bits)](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bits={list(self.bits)}, active_bits={self._active_bits}"


def _rebind_after_load(module, incompatible_keys):
    module._bind_active_width()  # load_state_dict(assign=True) may have replaced the tensors


def _device_of(bn):
    for t in bn.state_dict().values():
        return t.device
    return None
