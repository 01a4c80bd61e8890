"""The canonical bit-plane layout and the nested weight values, written from their definitions
(vectorized) for the low-bit op tests.

int32[bits, N, ceil(K/32)]: plane 0 holds the sign bit (two's complement in `bits` bits), bit t of
word j is column 32 j + t, padding columns are zero. `tests/test_bitplanes.py` checks this
function against the per-bit loop of the definition.
"""

import torch
import torch.nn.functional as F


def pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical planes of the signed codes q[N, K]."""
    N, K = q.shape
    W = (K + 31) // 32
    code = F.pad(q.to(torch.int64) % (1 << bits), (0, 32 * W - K)).view(N, W, 32)
    planes = [(((code >> (bits - 1 - j)) & 1) << torch.arange(32)).sum(-1) for j in range(bits)]
    out = torch.stack(planes)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def nested_weights(q, n, b, scale, zw, g, compensate):
    """float64 [N, K] weights of the top-b of n-bit codes q: floor(q / 2^k) + c_k - z_w scaled by
    2^k s (k = n - b, c_k = (1 - 2^-k) / 2 when compensated); `scale` [N, K/g] or per channel,
    `zw` None, [N] or [N, K/g]."""
    k = n - b
    c = 0.5 * (1 - 2.0**-k) if (compensate and k > 0) else 0.0
    w = torch.floor(q.to(torch.float64) / 2.0**k) + c
    if zw is not None:
        z = zw.to(torch.float64)
        w = w - (z.repeat_interleave(g, dim=1) if z.dim() == 2 else z.reshape(-1, 1))
    s = (2.0**k * scale.to(torch.float64)).reshape(q.shape[0], -1)
    return w * (s.repeat_interleave(g, dim=1) if s.shape[1] > 1 else s)


def random_group_weights(gen, N, K, n, g, zero_point=None):
    """Random n-bit codes q[N, K], per-group scales [N, K/g] and weight zero points (None,
    "group": [N, K/g] or "channel": [N]) drawn from `gen` in that order."""
    q = torch.randint(-(1 << (n - 1)), 1 << (n - 1), (N, K), generator=gen)
    scale = torch.rand(N, K // g, generator=gen) * 0.05 + 0.01
    zw = None
    if zero_point == "group":
        zw = torch.randint(-3, 4, (N, K // g), generator=gen).to(torch.float32)
    elif zero_point == "channel":
        zw = torch.randint(-3, 4, (N,), generator=gen).to(torch.float32)
    return q, scale, zw
