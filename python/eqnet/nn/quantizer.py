"""The elastic quantizer: one learnable (scale, zero point) per quantization form.

A *form* is (bits, granularity, symmetry). Weight quantizers hold one scale per form the space
allows (EQ-Net / MultiQuant keep the weights shared and the quantizer parameters separate), or,
in nested mode (vertical layering), one symmetric scale at the top width per granularity, the
lower widths being derived by dropping low bits (`fake_quant_layered`). Activation quantizers
are per-tensor; their integer range is unsigned when calibration saw no negative input.

Every parameter exists with its final shape at construction, so a `state_dict` loads into a
freshly converted model without a calibration pass. The quantization itself is always done by
the `eqkernels` ops; this module only selects the parameters (`params()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import eqkernels

from ..space import GRANULARITIES
from . import form_data
from .scale_search import SCALE_EPS, RowStats, quant_mse, scale_candidates

ROLES = ("weight", "activation")

# Activation values kept per quantizer for the clipping search (a fixed random subsample).
CALIB_SAMPLES = 1 << 15


@dataclass(frozen=True)
class QuantParams:
    """Exactly what the fake-quant op receives for one form (deployment and ONNX export use
    these values to reproduce the forward)."""

    scale: torch.Tensor  # positive fp32, shape [1], [C] or [C, K // group_size]
    zero_point: torch.Tensor | None  # fp32 (rounded by the op) or None for symmetric
    quant_min: int
    quant_max: int
    axis: int | None
    nested: bool
    bits: int
    top_bits: int | None = None  # nested only: the width the scale belongs to
    group_size: int | None = None  # per group: scales [C, K // group_size] (axis 0)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return eqkernels.qrange(bits, signed)


def _positive(raw: torch.Tensor) -> torch.Tensor:
    # Straight-through lower clamp: the forward never sees s < SCALE_EPS, while the gradient
    # passes unchanged. A plain clamp would zero the gradient below eps and freeze the scale
    # for good; abs() would make the stored parameter differ from the deployed step. This way
    # the parameter *is* the step size whenever it is positive (the normal case), so
    # optimizers, LSQ's gradient scaling and state_dict readers all see the real step.
    # Written as clamped + (raw - raw): the added term is exactly 0 in the forward, so the
    # value is exactly the clamped one (raw + (clamped - raw) would cancel catastrophically).
    return raw.clamp_min(SCALE_EPS).detach() + (raw - raw.detach())


def form_name(role: str, bits: int | None, granularity: str, symmetry: str) -> str:
    """Parameter suffix of one form: `w4_channel_sym`, `nested_channel`, `a8_asym`."""
    if role == "activation":
        return f"a{bits}_{symmetry}"
    if bits is None:
        return f"nested_{granularity}"
    return f"w{bits}_{granularity}_{symmetry}"


class ElasticQuantizer(nn.Module):
    """Learnable quantizer with one (scale, zero point) per allowed form.

    role: "weight" or "activation".
    bits / granularities / symmetries: the forms this quantizer can take.
    channels: output channels (the length of per-channel scales; weights only).
    nested: weights only, symmetric only: one scale at max(bits) per granularity.
    group_size / columns: weights with the "group" granularity: one scale per `group_size`
        consecutive elements of each of the `channels` rows of the weight flattened to
        [channels, columns] (a conv weight as `weight.reshape(N, -1)`); scales [N, columns/g].
    group_as_channel: a "group" request runs the "channel" form (a fixed-width layer whose
        input dimension the space's group size does not divide keeps per-channel scales);
        "group" must then be absent from `granularities`.
    """

    def __init__(
        self,
        role: str,
        bits,
        granularities=("tensor",),
        symmetries=("sym",),
        *,
        channels: int = 1,
        nested: bool = False,
        axis: int = 0,
        group_size: int | None = None,
        columns: int = 1,
        group_as_channel: bool = False,
    ):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role={role!r}: accepted values are {', '.join(ROLES)}")
        self.role = role
        self.bits = tuple(sorted(set(int(b) for b in bits)))
        if not self.bits or any(b < 1 or b > 8 for b in self.bits):
            raise ValueError(f"bits={bits!r}: every entry must be an int in 1..8")
        self.granularities = tuple(granularities)
        self.symmetries = tuple(symmetries)
        for g in self.granularities:
            if g not in GRANULARITIES:
                raise ValueError(
                    f"granularities={granularities!r}: accepted values are "
                    f"{', '.join(GRANULARITIES)}"
                )
        for s in self.symmetries:
            if s not in ("sym", "asym"):
                raise ValueError(f"symmetries={symmetries!r}: accepted values are sym, asym")
        if role == "activation" and self.granularities != ("tensor",):
            raise ValueError(
                f"granularities={granularities!r}: activation quantizers are per-tensor only "
                "(accepted value: ('tensor',))"
            )
        if nested and role != "weight":
            raise ValueError("nested=True: accepted for role='weight' only")
        if nested and self.symmetries != ("sym",):
            raise ValueError(f"nested=True takes symmetries=('sym',), got {symmetries!r}")
        if channels < 1:
            raise ValueError(f"channels={channels}: must be >= 1")
        self.channels = int(channels)
        self.group_size = _check_groups(self.granularities, group_size, columns, axis)
        self.columns = int(columns)
        self.group_as_channel = bool(group_as_channel)
        if self.group_as_channel and (
            "group" in self.granularities or "channel" not in self.granularities
        ):
            raise ValueError(
                "group_as_channel=True takes granularities with 'channel' and without 'group'"
            )
        self.nested = bool(nested)
        self.axis = int(axis)
        self.top_bits = max(self.bits)
        self.backend: str | None = None  # None: EQK_BACKEND or auto
        # Symmetric weight codes on [-(2^(b-1)-1), 2^(b-1)-1] instead of [-2^(b-1), ...]:
        # TensorRT's narrow int8 range carried to every width (eqnet.forms, `tensorrt`).
        self.narrow_range = False

        # Activation signedness is data-dependent (set by calibration). It lives in a buffer
        # so it travels with the state_dict, and is mirrored in a Python bool so the forward
        # reads it without a device sync (and torch.compile guards on it).
        self.register_buffer("signed_range", torch.tensor(True), persistent=True)
        self._signed = True  # safe until calibration shows no negative input
        self.register_load_state_dict_post_hook(_sync_signed)

        for key in self.form_keys():
            bits_, gran, sym = key
            shape = self.scale_shape(gran)
            name = form_name(role, None if self.nested else bits_, gran, sym)
            self.register_parameter(f"scale_{name}", nn.Parameter(torch.ones(shape)))
            if sym == "asym":
                self.register_parameter(f"zero_point_{name}", nn.Parameter(torch.zeros(shape)))

        # The active form, for forward(x) without a form: a Python index for eager mode and
        # the same index as a tensor for compiled graphs (form_data), so that switching forms
        # changes data, never the graph. Neither is saved: the config is not part of the state.
        self._form_list = tuple(self.forms())
        self._form_position = {form: i for i, form in enumerate(self._form_list)}
        # (scale, zero point or None) parameter names of each form, for `_bind_active_form`
        self._form_parameter_names = [self._parameter_names(*form) for form in self._form_list]
        # The forms fall into groups of one granularity and symmetry, whose parameters share
        # one shape across widths. A compiled graph takes each group's parameters at the active
        # width (`active_tensors`, bound by `select`) and picks the active form's group by
        # `group_index`: inactive widths are no graph inputs and get no gradient, as in eager
        # mode. With several groups the inactive groups' parameters are inputs, and a grad gate
        # drops the zero gradients they then receive.
        self.form_groups = tuple(dict.fromkeys((g, s) for _, g, s in self._form_list))
        self._group_of_form = [self.form_groups.index(f[1:]) for f in self._form_list]
        self.active_index = 0
        self.register_buffer("form_index", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("group_index", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("form_table", form_data.form_table(self), persistent=False)
        self.form_owners = form_data.form_owners(self)
        self._bind_active_form()

    # -- forms --------------------------------------------------------------------------------
    def scale_shape(self, granularity: str) -> tuple[int, ...]:
        if granularity == "group":
            return (self.channels, self.columns // self.group_size)
        return (self.channels,) if granularity == "channel" else (1,)

    def held_granularity(self, granularity: str) -> str:
        """The granularity whose parameters run a `granularity` request (group_as_channel)."""
        if granularity == "group" and self.group_as_channel:
            return "channel"
        return granularity

    def form_keys(self):
        """(bits, granularity, symmetry) of every parameter set (bits = top width if nested)."""
        if self.nested:
            return [(self.top_bits, g, "sym") for g in self.granularities]
        return [(b, g, s) for b in self.bits for g in self.granularities for s in self.symmetries]

    def forms(self):
        """Every (bits, granularity, symmetry) this quantizer can run."""
        return [(b, g, s) for b in self.bits for g in self.granularities for s in self.symmetries]

    @property
    def signed(self) -> bool:
        return self._signed

    @signed.setter
    def signed(self, value: bool) -> None:
        if self.role == "weight" and not value:
            raise ValueError("signed=False: weight quantizers are always signed")
        self._signed = bool(value)
        self.signed_range.fill_(bool(value))
        self._refresh_form_table()

    def _refresh_form_table(self) -> None:
        table = form_data.form_table(self)
        self.form_table.copy_(table.to(self.form_table.device))

    def select(self, bits: int, granularity: str = "tensor", symmetry: str = "sym") -> None:
        """Make one form the active one (what forward(x) without a form runs)."""
        granularity = self.held_granularity(granularity)
        index = self._form_position.get((bits, granularity, symmetry))
        if index is None:
            self._check_form(bits, granularity, symmetry)  # raises, naming the allowed values
        self.active_index = index
        self.form_index.fill_(index)
        if len(self.form_groups) > 1:
            self.group_index.fill_(self._group_of_form[index])
        self._bind_active_form()

    def _bind_active_form(self) -> None:
        """`active_tensors` = per form group, its (scale, zero point or None) at the active
        width, what a compiled graph reads. Bound again whenever a parameter may have been
        replaced: `select`, `register_parameter` (load_state_dict(assign=True)), `_apply`
        (`.to()`, `.float()` ...) and `load_state_dict`."""
        if len(self.form_groups) > 1:
            # Parameters replaced since construction (load_state_dict(assign=True), `.to()`
            # that makes new ones) get the gate's hooks too; hooked ones are skipped.
            form_data.install_grad_gate(self, form_data.quantizer_form_is_active)
        bits = self._form_list[self.active_index][0]
        params = self._parameters
        bound = []
        for gran, sym in self.form_groups:
            position = self._form_position[(bits, gran, sym)]
            scale_name, zero_point_name = self._form_parameter_names[position]
            zero_point = params[zero_point_name] if zero_point_name is not None else None
            bound.append((params[scale_name], zero_point))
        self.active_tensors = tuple(bound)

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        if "form_groups" in self.__dict__:  # a replacement after construction
            self._bind_active_form()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._bind_active_form()
        return out

    @property
    def active_form(self) -> tuple[int, str, str]:
        return self._form_list[self.active_index]

    def _check_form(self, bits, granularity, symmetry):
        if (
            bits not in self.bits
            or granularity not in self.granularities
            or symmetry not in self.symmetries
        ):
            raise ValueError(
                f"form (bits={bits}, granularity={granularity!r}, symmetry={symmetry!r}) is not "
                f"held by this {self.role} quantizer; allowed bits {list(self.bits)}, "
                f"granularities {list(self.granularities)}, symmetries {list(self.symmetries)}"
            )

    def raw_parameters(self, bits, granularity="tensor", symmetry="sym"):
        """(scale, zero_point or None) nn.Parameters backing one form."""
        scale_name, zero_point_name = self._parameter_names(bits, granularity, symmetry)
        scale = getattr(self, scale_name)
        zp = getattr(self, zero_point_name) if zero_point_name is not None else None
        return scale, zp

    def _parameter_names(self, bits, granularity, symmetry) -> tuple[str, str | None]:
        granularity = self.held_granularity(granularity)
        self._check_form(bits, granularity, symmetry)
        name = form_name(self.role, None if self.nested else bits, granularity, symmetry)
        return f"scale_{name}", (f"zero_point_{name}" if symmetry == "asym" else None)

    def params(self, bits: int, granularity: str = "tensor", symmetry: str = "sym") -> QuantParams:
        """The exact op arguments of one form, with the effective (positive) scale."""
        scale, zp = self.raw_parameters(bits, granularity, symmetry)
        granularity = self.held_granularity(granularity)
        per_channel = granularity in ("channel", "group")
        group_size = self.group_size if granularity == "group" else None
        if self.nested:
            qmin, qmax = qrange(self.top_bits, True)
            return QuantParams(
                _positive(scale),
                None,
                qmin,
                qmax,
                self.axis if per_channel else None,
                True,
                bits,
                self.top_bits,
                group_size,
            )
        qmin, qmax = qrange(bits, self._signed)
        if self.narrow_range and self.role == "weight" and symmetry == "sym" and qmax >= 1:
            qmin = -qmax
        axis = self.axis if per_channel else None
        return QuantParams(_positive(scale), zp, qmin, qmax, axis, False, bits, None, group_size)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, bits: int | None = None, granularity: str = "tensor", symmetry="sym"):
        """Fake-quantize x with the given form, or with the active one (`select`) when bits
        is None. Compiled graphs take the active form as data (form_data), so they never
        specialize on it; eager mode runs the form's own op call (the numerics of record)."""
        if bits is None:
            if torch.compiler.is_compiling():
                return form_data.forward(self, x, _positive)
            bits, granularity, symmetry = self.active_form
        p = self.params(bits, granularity, symmetry)
        grad_factor = None  # the op's default: n_s = elements sharing a scale
        if self.role == "activation":
            # LSQ's gradient scale uses the number of features of one sample, so the step
            # size's effective learning rate does not depend on the batch size.
            n_per_sample = x[0].numel() if x.dim() > 1 else x.numel()
            grad_factor = 1.0 / math.sqrt(n_per_sample * max(p.quant_max, 1))
        if p.nested:
            return eqkernels.fake_quant_layered(
                x,
                p.scale,
                p.bits,
                p.top_bits,
                axis=p.axis,
                group_size=p.group_size,
                grad_factor=grad_factor,
                backend=self.backend,
            )
        return eqkernels.fake_quant(
            x,
            p.scale,
            p.zero_point,
            p.quant_min,
            p.quant_max,
            axis=p.axis,
            group_size=p.group_size,
            grad_factor=grad_factor,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        kind = "nested " if self.nested else ""
        return (
            f"{kind}{self.role}, bits={list(self.bits)}, granularities={list(self.granularities)}, "
            f"symmetries={list(self.symmetries)}, channels={self.channels}, signed={self._signed}"
            + (f", group_size={self.group_size}" if self.group_size else "")
        )

    # -- calibration --------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, method: str = "mse", signed: bool | None = None) -> None:
        """Initialize every form from data `x` (the weight, or activation samples).

        method "lsq": s = 2 mean|x| / sqrt(qmax) (LSQ, Esser et al. 2020, sec. 2.1), z from
        the clipped range for asymmetric forms. method "mse": the candidate, among the LSQ
        value and a grid of clipping ratios of the data range, with the least quantization
        MSE (per channel for per-channel forms), evaluated with the op itself.
        For activations, `x` decides the signedness (unsigned when no value is negative)
        unless `signed` is given (the caller saw more data than the sample `x`).
        """
        if method not in ("mse", "lsq"):
            raise ValueError(f"method={method!r}: accepted values are mse, lsq")
        x = x.detach().float()
        if self.role == "activation":
            self.signed = bool((x < 0).any()) if signed is None else bool(signed)
        rows = {}  # granularity -> statistics of its rows, shared by that granularity's forms
        for bits, gran, sym in self.form_keys():
            if gran not in rows:
                if gran == "channel":
                    data = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
                elif gran == "group":
                    # each group is one row: the per-channel statistics taken per group
                    data = x.reshape(-1, self.group_size)
                else:
                    data = x.reshape(1, -1)
                rows[gran] = RowStats(data)
            scale, zp = self.raw_parameters(bits, gran, sym)
            s, z = self._search(rows[gran], bits, sym, method)
            scale.copy_(s.reshape(scale.shape))
            if zp is not None:
                zp.copy_(z.reshape(zp.shape))

    def _search(self, stats, bits, sym, method):
        """Best (scale [G], zero point [G] or None) for the rows [G, N] of `stats`."""
        data = stats.data
        cand_s, cand_z = scale_candidates(stats, bits, self._signed, sym, method)  # [K, G]
        if cand_s.shape[0] == 1:
            return cand_s[0], None if cand_z is None else cand_z[0]
        if self.nested:
            # One top-width scale serves every width: minimize the mean over widths of
            # log MSE, which weighs each width's relative error equally (a plain sum would be
            # dominated by the lowest width).
            err = torch.stack(
                [
                    quant_mse(data, cand_s, None, b, self.top_bits, True, self.backend)
                    .clamp_min(1e-30)
                    .log()
                    for b in self.bits
                ]
            ).mean(0)
        else:
            qmin, qmax = qrange(bits, self._signed)
            err = quant_mse(data, cand_s, cand_z, qmin, qmax, False, self.backend)
        best = err.argmin(0)  # [G]
        g = torch.arange(data.shape[0])
        return cand_s[best, g], None if cand_z is None else cand_z[best, g]


def _check_groups(granularities, group_size, columns, axis) -> int | None:
    """group_size when "group" is among `granularities` (it must divide `columns`), else None."""
    if "group" not in granularities:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size={group_size!r}: the 'group' granularity needs a positive int group size"
        )
    if columns % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide columns={columns} (the weight's input "
            "dimension)"
        )
    if axis != 0:
        raise ValueError(f"axis={axis}: per-group scales group the rows of axis 0 only")
    return group_size


def _sync_signed(module, incompatible_keys):
    module._signed = bool(module.signed_range.item())
    module._refresh_form_table()
    module._bind_active_form()
