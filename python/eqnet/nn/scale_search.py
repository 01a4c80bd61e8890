"""Scale initialization of the elastic quantizer: candidate step sizes (LSQ's value and a
grid of clipping ratios) per row of the data, and their quantization error computed by the
fake-quant op itself. A row is a tensor, an output channel or a group of a weight row."""

from __future__ import annotations

import functools
import math

import torch

import eqkernels

# Smallest step size the forward ever sees. Far below any useful step (8-bit steps of real
# weights are ~1e-4..1e-2) and far above fp32 underflow, so 1/s stays finite.
SCALE_EPS = 1e-8
# Clipping-search grid: fraction of the data's max |x| (or of [min, max] for asymmetric forms).
CLIP_RATIOS = torch.linspace(0.25, 1.0, 16).tolist()
# Largest number of elements one calibration call of the op works on (memory bound).
CALIB_CHUNK_ELEMS = 1 << 23


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return eqkernels.qrange(bits, signed)


class RowStats:
    """Per-row statistics of data [G, N], computed once and shared by every form."""

    def __init__(self, data):
        self.data = data

    @functools.cached_property
    def abs_mean(self):
        return self.data.abs().mean(1)

    @functools.cached_property
    def lo(self):
        return self.data.amin(1)

    @functools.cached_property
    def hi(self):
        return self.data.amax(1)

    @functools.cached_property
    def abs_max(self):
        return torch.maximum(self.hi, -self.lo)


def scale_candidates(stats, bits, signed, sym, method):
    """Candidate (scales [K, G], zero points [K, G] or None) for each row of data [G, N]."""
    data = stats.data
    qmin, qmax = qrange(bits, signed)
    lsq = 2.0 * stats.abs_mean / math.sqrt(max(qmax, 1))  # [G]
    if sym == "sym":
        if signed:
            # signed symmetric grid [-2^(b-1), 2^(b-1)-1]: scale the larger half-range
            top = stats.abs_max
            denom = max(-qmin, 1) if qmax < 1 else max(qmax, 1)
        else:
            top = stats.hi.clamp_min(0)
            denom = max(qmax, 1)
        if method == "lsq":
            return lsq.clamp_min(SCALE_EPS)[None], None
        ratios = torch.tensor(CLIP_RATIOS, dtype=data.dtype, device=data.device)
        grid = ratios[:, None] * top[None] / denom
        return torch.cat([grid, lsq[None]]).clamp_min(SCALE_EPS), None
    # Asymmetric forms cover [ratio*min, ratio*max]; "lsq" uses ratio 1, the min/max
    # initialization of LSQ+ (Bhalgat et al. 2020) for a learnable offset.
    lo = stats.lo.clamp_max(0)  # keep real zero representable
    hi = stats.hi.clamp_min(0)
    ratios = [1.0] if method == "lsq" else CLIP_RATIOS
    ratios = torch.tensor(ratios, dtype=data.dtype, device=data.device)
    s = (ratios[:, None] * (hi - lo)[None] / (qmax - qmin)).clamp_min(SCALE_EPS)
    z = qmin - torch.round(ratios[:, None] * lo[None] / s)
    return s, z


def quant_mse(data, cand_s, cand_z, qmin_or_bits, qmax_or_top, nested, backend):
    """MSE [K, G] of quantizing each row of data [G, N] with each candidate [K, G], computed
    by the fake-quant op itself: candidates x rows become the channels of one per-channel call.
    """
    k, g = cand_s.shape
    n = data.shape[1]
    per_call = max(1, CALIB_CHUNK_ELEMS // max(g * n, 1))
    out = []
    for start in range(0, k, per_call):
        s = cand_s[start : start + per_call]
        kk = s.shape[0]
        rep = data[None].expand(kk, g, n).reshape(kk * g, n)
        if nested:
            y = eqkernels.fake_quant_layered(
                rep, s.reshape(-1), qmin_or_bits, qmax_or_top, axis=0, backend=backend
            )
        else:
            z = None if cand_z is None else cand_z[start : start + per_call].reshape(-1)
            y = eqkernels.fake_quant(
                rep, s.reshape(-1), z, qmin_or_bits, qmax_or_top, axis=0, backend=backend
            )
        out.append((y - rep).pow(2).mean(1).reshape(kk, g))
    return torch.cat(out)
