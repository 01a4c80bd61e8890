"""torchvision's Swin window attention with its projections called as modules.

torchvision's `ShiftedWindowAttention(V2)` passes `self.qkv.weight` and `self.proj.weight` to a
functional implementation, so quantized `qkv`/`proj` layers would never run. The subclasses
here compute the same shifted-window attention (Liu et al. 2021, sec. 3.2: windows of M x M
patches, a cyclic shift by M/2 in alternate blocks with a mask between regions that were not
adjacent, relative position bias; V2: cosine attention with a learned logit scale) and call
`self.qkv(x)` and `self.proj(x)`. They keep the parent's attributes and state_dict keys: convert
switches the class of the existing module.

Importing this module imports torchvision.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torchvision.models import swin_transformer as tvs

# The mask value torchvision uses between regions that were not adjacent before the shift.
_SHIFT_MASK = -100.0


def _window_attention(module, x, relative_position_bias, logit_scale=None):
    b, h, w, c = x.shape
    ws = module.window_size
    heads = module.num_heads
    pad_r, pad_b = (ws[1] - w % ws[1]) % ws[1], (ws[0] - h % ws[0]) % ws[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = x.shape[1], x.shape[2]
    # No shift along an axis the window already covers.
    shift = [s if ws[i] < (ph, pw)[i] else 0 for i, s in enumerate(module.shift_size)]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // ws[0], pw // ws[1]
    n = ws[0] * ws[1]
    x = x.view(b, nh, ws[0], nw, ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)

    qkv = module.qkv(x)
    if logit_scale is not None and module.qkv.bias is not None:
        # V2 has no key bias: the forward zeroes that third of the packed bias.
        k_bias = module.qkv.bias[c : 2 * c]
        qkv = qkv - F.pad(k_bias, (c, c))
    q, k, v = qkv.reshape(x.shape[0], n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if shifted:
        mask = _shift_mask(x, ph, pw, ws, shift)
        attn = attn.view(b, nh * nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], n, c)
    x = F.dropout(module.proj(x), p=module.dropout, training=module.training)
    x = x.view(b, nh, nw, ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _shift_mask(x, ph, pw, ws, shift):
    """[windows, n, n] additive mask: 0 within a region, _SHIFT_MASK across regions."""
    region = x.new_zeros((ph, pw))
    bounds = [((0, -ws[i]), (-ws[i], -shift[i]), (-shift[i], None)) for i in range(2)]
    label = 0
    for hs in bounds[0]:
        for wsl in bounds[1]:
            region[hs[0] : hs[1], wsl[0] : wsl[1]] = label
            label += 1
    region = region.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, ws[0] * ws[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.where(diff != 0, _SHIFT_MASK, 0.0).to(x.dtype)


class ProjectedShiftedWindowAttention(tvs.ShiftedWindowAttention):
    def forward(self, x):
        return _window_attention(self, x, self.get_relative_position_bias())


class ProjectedShiftedWindowAttentionV2(tvs.ShiftedWindowAttentionV2):
    def forward(self, x):
        return _window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)


REPLACEMENTS = {
    tvs.ShiftedWindowAttention: ProjectedShiftedWindowAttention,
    tvs.ShiftedWindowAttentionV2: ProjectedShiftedWindowAttentionV2,
}
