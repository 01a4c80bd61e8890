"""Non-finite activations in the low-bit linear and conv2d, the same in every backend.

Integer path: a NaN element makes every output that depends on it NaN (linear: its row; conv:
the outputs whose receptive field holds it), and +-Inf takes the end code of the range, as
`fake_quant`'s forward clamps it. The kernels see finite stand-ins (NaN -> 0, +-Inf -> a value
whose code is the range's end) and the NaN outputs are set afterwards. Float path: the result
is IEEE `x @ W^T` in fp32 (inf * 0 = NaN, inf - inf = NaN), computed on the dequantized
weights. All-finite inputs cost one `isfinite().all()` per call and take the normal path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLT_MAX = torch.finfo(torch.float32).max


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def finite_stand_in(x, act_scale, act_zero_point, qmin, qmax):
    """x in float32 with NaN -> 0 and +-Inf -> values whose codes clamp to qmax / qmin."""
    s = float(act_scale.reshape(()))
    z = 0.0 if act_zero_point is None else abs(float(act_zero_point.reshape(())))
    reach = min(2.0 * (max(abs(qmin), abs(qmax)) + z + 1.0) * s, _FLT_MAX)
    x = x.to(torch.float32)
    return torch.nan_to_num(x, nan=0.0, posinf=reach, neginf=-reach)


def nan_rows(y2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """y2 [M, N] with the rows whose input row x2 [M, K] holds a NaN set to NaN."""
    bad = torch.isnan(x2).any(dim=1, keepdim=True)
    return y2.masked_fill(bad, float("nan"))


def nan_receptive_fields(y, x, geometry) -> torch.Tensor:
    """y [B, N, OH, OW] with every output whose receptive field (its group's input channels,
    kernel window, padding excluded) holds a NaN of x set to NaN."""
    in_channels, (kh, kw), stride, padding, dilation, groups = geometry
    hits = torch.isnan(x).to(torch.float32)
    ones = torch.ones((groups, in_channels // groups, kh, kw), device=x.device)
    count = F.conv2d(hits, ones, None, stride, padding, dilation, groups)
    bad = (count > 0).repeat_interleave(y.shape[1] // groups, dim=1)
    return y.masked_fill(bad, float("nan"))
