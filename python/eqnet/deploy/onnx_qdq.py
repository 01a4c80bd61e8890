"""What each quantized tensor of an ONNX QDQ export becomes: its integer codes computed exactly
as the fake-quant forward computes them, and its container type, offset, scale, zero point and
clip, checked against the target preset (see onnx.py for why this reproduces the forward)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import eqkernels

from .onnx_presets import CONTAINERS, allowed_containers, pick_container

# --------------------------------------------------------------------------------------------
# What each quantized tensor becomes


@dataclasses.dataclass
class TensorQDQ:
    """The QDQ of one tensor: container type, code offset, scale/zero point (offset applied)."""

    layer: str
    role: str  # "activation" or "weight"
    bits: int
    container: str
    offset: int
    scale: np.ndarray  # float32, 0-d (per-tensor), [C] (per-channel) or [C, K/g] (per-group)
    zero_point: np.ndarray  # int64, same shape as scale, offset applied
    axis: int | None
    clip: tuple[float, float] | None = None  # activations narrower than the container
    codes: np.ndarray | None = None  # weights: int64 codes, offset applied
    dequantized: np.ndarray | None = None  # weights: float32 (q - z) * s
    notes: list = dataclasses.field(default_factory=list)
    # per-group weights: blocked DequantizeLinear (opset 21) of the codes as [C, K], axis 1
    block_size: int | None = None

    def record(self) -> dict:
        granularity = "tensor" if self.axis is None else "channel"
        return {
            "bits": self.bits,
            "container": self.container,
            "offset": self.offset,
            "granularity": "group" if self.block_size else granularity,
            **({"block_size": self.block_size} if self.block_size else {}),
            "clip": self.clip is not None,
            **({"notes": self.notes} if self.notes else {}),
        }


# --------------------------------------------------------------------------------------------
# Codes, exactly as the fake-quant forward computes them


def _per_axis(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    t = t.detach().float()
    if axis is None:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _qdq_weight(w: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(codes, scale, zero point, notes) of a weight's QDQ pair, with (codes - zero point) *
    scale == the forward. The codes are `eqkernels.quantize_codes`' (as the .eqk export's
    `weight_codes`), rewritten for a nested width.

    Codes are float tensors holding integers; scale / zero point are per-tensor 0-d or [C]."""
    w = w.detach().float()
    s = _per_axis(p.scale, w, p.axis)
    zp = None if p.nested or p.zero_point is None else p.zero_point.detach()
    q = eqkernels.quantize_codes(w, p.scale.detach(), zp, p.quant_min, p.quant_max, axis=p.axis)
    if not p.nested:
        zr = torch.zeros_like(s) if zp is None else torch.round(_per_axis(zp, w, p.axis))
        return q, s, zr + torch.zeros_like(s), []
    k = p.top_bits - p.bits
    q_n = q
    q_b = torch.floor(q_n * 2.0**-k)  # arithmetic shift by k
    if k == 0:
        return q_b, s, torch.zeros_like(s), []
    # (q_b + c_k) 2^k s with c_k = (2^k - 1) / 2^(k+1)  ==  (2^(k+1) q_b + 2^k - 1) (s / 2)
    codes = q_b * 2.0 ** (k + 1) + (2.0**k - 1.0)
    note = f"nested {p.bits} of {p.top_bits} bits: codes 2^{k + 1} q_b + {2**k - 1}, step s/2"
    return codes, s * 0.5, torch.zeros_like(s), [note]


def _weight_code_range(p, k_nested: int) -> tuple[int, int]:
    """Every code a weight of this form can take (data-independent, so containers are too)."""
    if not p.nested:
        return p.quant_min, p.quant_max
    lo, hi = -(1 << (p.bits - 1)), (1 << (p.bits - 1)) - 1
    if k_nested == 0:
        return lo, hi
    m, c = 1 << (k_nested + 1), (1 << k_nested) - 1
    return lo * m + c, hi * m + c


# --------------------------------------------------------------------------------------------
# Planning: every tensor's QDQ, checked against the preset


def plan_activation(name, layer, choice, profile, opset, problems):
    p = layer.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    s = p.scale.detach().float().reshape(())
    z = 0 if p.zero_point is None else int(torch.round(p.zero_point.detach().float()).item())
    lo, hi = min(p.quant_min, z), max(p.quant_max, z)
    names = allowed_containers(profile.act_containers, opset)
    picked = pick_container(lo, hi, names, shift=profile.shift_codes)
    if picked is None:
        problems.append(
            f"layer {name!r}: activation codes [{p.quant_min}, {p.quant_max}] with zero point "
            f"{z} ({choice.a_bits}-bit, {'signed' if p.quant_min < 0 else 'unsigned'}) fit none "
            f"of {profile.name}'s activation types {list(names)} at opset {opset}"
        )
        return None
    container, offset = picked
    tmin, tmax, _ = CONTAINERS[container]
    clip = None
    if (p.quant_min + offset, p.quant_max + offset) != (tmin, tmax):
        # QuantizeLinear saturates to the type's range; clip to the code range first (fp32).
        lo_f = (torch.tensor(float(p.quant_min - z)) * s).item()
        hi_f = (torch.tensor(float(p.quant_max - z)) * s).item()
        clip = (lo_f, hi_f)
    return TensorQDQ(
        layer=name,
        role="activation",
        bits=choice.a_bits,
        container=container,
        offset=offset,
        scale=s.numpy().astype(np.float32),
        zero_point=np.array(z + offset, dtype=np.int64),
        axis=None,
        clip=clip,
    )


# Blocked QuantizeLinear / DequantizeLinear (the `block_size` attribute) arrived in opset 21.
BLOCKED_OPSET = 21


def _grouped(weight, p):
    """Per-group weights as the per-channel form of the weight viewed [N * K / g, g] (what the
    op computes); (weight view, params of that view, groups per row)."""
    n, g = weight.shape[0], p.group_size
    groups = weight[0].numel() // g
    zp = None if p.zero_point is None else p.zero_point.reshape(-1)
    view = dataclasses.replace(p, scale=p.scale.reshape(-1), zero_point=zp, group_size=None)
    return weight.reshape(n * groups, g), view, groups


def plan_weight(name, layer, choice, profile, opset, bn_mul, problems):
    p = layer.weight_quantizer.params(choice.w_bits, choice.w_granularity, choice.w_symmetry)
    weight, block, groups = layer.weight, p.group_size, 1
    if block:
        if opset < BLOCKED_OPSET:
            problems.append(
                f"layer {name!r}: per-group weights (group_size={block}) need blocked "
                f"DequantizeLinear, opset >= {BLOCKED_OPSET}; got opset {opset}"
            )
            return None
        weight, p, groups = _grouped(weight, p)
    codes, s, z, notes = _qdq_weight(weight, p)
    # The codes must reproduce the quantizer's own output bit for bit (whatever backend runs).
    with torch.no_grad():
        expected = layer.weight_quantizer(
            layer.weight, choice.w_bits, choice.w_granularity, choice.w_symmetry
        ).float()
    expected = expected.reshape(weight.shape)
    if not torch.equal((codes - z) * s, expected):
        raise RuntimeError(
            f"layer {name!r}: the exporter's weight codes do not reproduce the fake-quant "
            f"weight ({choice}); the quantizer's forward differs from DESIGN.md's formula"
        )
    k = (p.top_bits - p.bits) if p.nested else 0
    lo, hi = _weight_code_range(p, k)
    axis = p.axis
    if bn_mul is not None:
        # Fold BN's a into the per-channel step: (q - z) s a. A negative a flips the codes.
        if axis is None:
            problems.append(
                f"layer {name!r}: fold_bn='scale' needs per-channel weights (BN's factor is "
                f"per channel); got w_granularity='tensor' (use fold_bn='keep' or 'affine')"
            )
            return None
        a = bn_mul.detach().double().repeat_interleave(groups).reshape(s.shape)
        if bool((a == 0).any()):
            problems.append(f"layer {name!r}: BN factor gamma/sqrt(var+eps) is 0 for a channel")
            return None
        sign = torch.sign(a).float()
        if bool((sign < 0).any()):
            if p.zero_point is not None:
                problems.append(
                    f"layer {name!r}: fold_bn='scale' with a negative BN factor needs "
                    f"symmetric weights (codes are negated); got asymmetric"
                )
                return None
            codes = codes * sign
            lo, hi = min(lo, -hi), max(hi, -lo)
            notes.append("codes negated where the BN factor is negative")
        s = (s.double() * a.abs()).float()
    if profile.weight_code_range is not None:
        rmin, rmax = profile.weight_code_range
        bad = int(((codes < rmin) | (codes > rmax)).sum())
        if bad:
            problems.append(
                f"layer {name!r}: {bad} weight codes lie outside {profile.name}'s range "
                f"[{rmin}, {rmax}] (the {choice.w_bits}-bit codes span [{int(codes.min())}, "
                f"{int(codes.max())}]); {profile.name} takes narrow-range weights only"
            )
            return None
        lo, hi = max(lo, rmin), min(hi, rmax)
    zero = z.reshape(-1)
    lo, hi = min(lo, int(zero.min())), max(hi, int(zero.max()))
    names = allowed_containers(profile.weight_containers, opset)
    picked = pick_container(lo, hi, names, shift=profile.shift_codes)
    if picked is None:
        problems.append(
            f"layer {name!r}: weight codes [{lo}, {hi}] ({choice.w_bits}-bit"
            f"{', nested' if p.nested else ''}) fit none of {profile.name}'s weight types "
            f"{list(names)} at opset {opset}"
        )
        return None
    container, offset = picked
    scale = s.reshape(-1) if axis is not None else s.reshape(())
    zp = z.reshape(-1) if axis is not None else z.reshape(())
    deq = ((codes - z) * s).reshape(layer.weight.shape)
    if block:  # codes [N, K] with scales [N, K / g]: blocks of g along axis 1
        n = layer.weight.shape[0]
        scale, zp, codes, axis = (
            scale.reshape(n, groups),
            zp.reshape(n, groups),
            codes.reshape(n, -1),
            1,
        )
    return TensorQDQ(
        layer=name,
        role="weight",
        bits=choice.w_bits,
        container=container,
        offset=offset,
        scale=scale.numpy().astype(np.float32),
        zero_point=(zp.numpy().astype(np.int64) + offset),
        axis=axis,
        codes=codes.numpy().astype(np.int64) + offset,
        dequantized=deq.numpy().astype(np.float32),
        notes=notes,
        block_size=block,
    )
