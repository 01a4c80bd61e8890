"""The canonical bit-plane layout written from its definition, vectorized, for the op tests.

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
