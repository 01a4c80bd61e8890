"""Multi-head attention whose projections are child modules, so they can be quantized.

`nn.MultiheadAttention` hands its packed `in_proj_weight` and `out_proj.weight` straight to
`F.multi_head_attention_forward` (and, in eval mode without grad, to a fused kernel), so a
quantized `out_proj` never runs and the input projection is never a module. `ProjectedAttention`
computes the same function with every projection a called child (`in_proj` for the packed
weight, or `q_proj`/`k_proj`/`v_proj` when key/value dims differ, and `out_proj`): any module
with the same call signature works there, the float `nn.Linear`, `QLinear` or an integer layer.
It has no fused fast path, and it reports itself to `nn.TransformerEncoderLayer` and
`nn.TransformerEncoder` in a way that keeps their fused paths off (they would read the float
weights directly).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ProjectedAttention(nn.Module):
    """Drop-in replacement of `nn.MultiheadAttention` (same forward signature and results)."""

    # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder before their fused paths;
    # False keeps those paths off, since they would run the float in_proj_weight directly.
    _qkv_same_embed_dim = False

    def __init__(
        self, embed_dim, num_heads, *, dropout=0.0, batch_first=False, kdim=None, vdim=None
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> ProjectedAttention:
        """The same attention, sharing mha's parameters (no copy: ties stay tied)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        m = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            kdim=mha.kdim,
            vdim=mha.vdim,
        )
        has_bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            m.in_proj = _linear(mha.in_proj_weight, mha.in_proj_bias)
        else:
            m.packed = False
            biases = mha.in_proj_bias.chunk(3) if has_bias else (None, None, None)
            # Separate weights are their own Parameters; the bias is one packed Parameter,
            # split into three new ones (values copied).
            m.q_proj = _linear(mha.q_proj_weight, _param(biases[0]))
            m.k_proj = _linear(mha.k_proj_weight, _param(biases[1]))
            m.v_proj = _linear(mha.v_proj_weight, _param(biases[2]))
        m.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        m.bias_k, m.bias_v = mha.bias_k, mha.bias_v
        m.add_zero_attn = mha.add_zero_attn
        m.train(mha.training)
        return m

    @property
    def in_proj_bias(self):
        # nn.TransformerEncoderLayer reads this before deciding on its fused path.
        return getattr(self.in_proj, "bias", None) if self.packed else None

    def _project(self, query, key, value):
        e = self.embed_dim
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self.in_proj(query).split(e, dim=-1)
        # Cross attention through the packed weight: each input runs the whole projection
        # and keeps its rows (the layer stays one module with one weight and one scale).
        q = self.in_proj(query)[..., :e]
        kv = self.in_proj(key)
        k = kv[..., e : 2 * e]
        v = kv[..., 2 * e :] if value is key else self.in_proj(value)[..., 2 * e :]
        return q, k, v

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (as in nn.MultiheadAttention)")
        if self.batch_first and batched:
            query, key, value = _seq_first(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        h, hd = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        q = q.reshape(tgt_len, bsz * h, hd).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * h, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * h, hd).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz * h, 1, hd)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz * h, 1, hd)], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        src_len = k.shape[1]
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1)
            kpm = kpm.reshape(bsz * h, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(1, 2)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = F.softmax(scores, dim=-1)
            if p > 0:
                probs = F.dropout(probs, p=p)  # returned dropped, as nn.MultiheadAttention does
            out = probs @ v
            weights = probs.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                # [1 or bsz*h, L or 1, S] -> broadcastable [bsz or 1, h or 1, L or 1, S]
                rows = attn_mask.shape[-2]
                attn_mask = (
                    attn_mask.view(bsz, h, rows, src_len)
                    if attn_mask.shape[0] > 1
                    else attn_mask.unsqueeze(0)
                )
            out = F.scaled_dot_product_attention(
                q.view(bsz, h, tgt_len, hd),
                k.view(bsz, h, src_len, hd),
                v.view(bsz, h, src_len, hd),
                attn_mask,
                p,
            ).view(bsz * h, tgt_len, hd)
        out = out.transpose(0, 1).reshape(tgt_len, bsz, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, packed={self.packed}, "
            f"batch_first={self.batch_first}"
        )


def disable_fused_paths(model: nn.Module) -> None:
    """Keep nn.TransformerEncoder from turning its input into a nested tensor for the fused
    path (decided once at its construction)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def _seq_first(query, key, value):
    # Keep the identity of shared inputs (self attention projects once).
    if key is value:
        if query is key:
            query = key = value = query.transpose(0, 1)
        else:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
            value = key
    else:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return query, key, value


def _pad_last(mask):
    return None if mask is None else F.pad(mask, (0, 1))


def _param(t):
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear that holds the given Parameters themselves."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = bias
    return lin
