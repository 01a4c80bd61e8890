"""QConv2d and QLinear: torch layers that fake-quantize their input activation and weight.

Both are subclasses of the torch layers (so isinstance checks, weight init and state_dict keys
stay), with two `ElasticQuantizer`s and an active `LayerChoice`. Switching the form changes only
Python attributes: no parameter is reallocated and every kernel takes the range at run time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..space import ElasticSpace, LayerChoice, check_choice, group_size_error
from .quantizer import ElasticQuantizer


class _QuantizedLayer:
    """Mixin: quantizers, the active choice and (optionally) BNs switched by the weight width."""

    is_elastic_layer = True

    def _attach(
        self, space: ElasticSpace, fixed_choice: LayerChoice | None, fixed_form: bool = False
    ) -> None:
        if not isinstance(space, ElasticSpace):
            raise ValueError(f"space must be an ElasticSpace, got {type(space).__name__}")
        if fixed_choice is not None and not isinstance(fixed_choice, LayerChoice):
            raise ValueError(
                f"fixed_choice must be a LayerChoice or None, got {type(fixed_choice).__name__}"
            )
        self.space = space
        self.fixed_choice = fixed_choice
        self.fixed_form = False  # True: a fixed-width layer that also holds one form only
        channels = self.weight.shape[0]
        if fixed_choice is None:
            if self.group_as_channel(space):
                raise ValueError(
                    group_size_error(type(self).__name__, self.reduction, space.group_size)
                )
            self.weight_quantizer = ElasticQuantizer(
                "weight",
                space.w_bits,
                space.w_granularities,
                space.w_symmetries,
                channels=channels,
                nested=space.nested,
                **self._group_args(space),
            )
            self.act_quantizer = _act_quantizer(space.int_a_bits, space.a_symmetries)
            first = LayerChoice(
                max(space.w_bits),
                space.highest_a_bits,
                *space.preferred_forms(),
            )
        else:
            # A fixed-width layer fixes its widths only: its quantizers hold every form of the
            # space at those widths, as EQ-Net's first and last layers (never nested: a fixed
            # layer is stored in full, see DESIGN.md "The .eqk file").
            self._fixed_quantizers(space, fixed_choice, fixed_form=bool(fixed_form))
            first = fixed_choice
        # Plain Python list (not submodules): the BNs are registered where they live in the
        # model; this only lets set_choice() switch them.
        self.switched_bns: list = []
        self.observer = None  # set by eqnet.calibrate while it records activations
        # A set while eqnet checks which layers run their quantized path (see coverage.py).
        self.path_recorder: set | None = None
        self.set_choice(first)
        self.register_load_state_dict_pre_hook(_load_fixed_form_state)

    def _fixed_quantizers(self, space, c: LayerChoice, fixed_form: bool) -> None:
        """Quantizers of a fixed-width layer: every form of the space at its widths, or
        (fixed_form) its one LayerChoice, the layout of state saved before forms were elastic
        on fixed layers."""
        w_forms = ((c.w_granularity,), (c.w_symmetry,))
        a_syms = (c.a_symmetry,)
        if not fixed_form:
            w_forms = (space.w_granularities, space.w_symmetries)
            a_syms = space.a_symmetries
        self.fixed_form = fixed_form
        as_channel = self.group_as_channel(space)
        if as_channel:
            # The space's group size does not divide this fixed layer's input dimension (a
            # first conv's 3*3*3 = 27, say): its group form keeps per-channel scales.
            grans = tuple(dict.fromkeys("channel" if g == "group" else g for g in w_forms[0]))
            w_forms = (grans, w_forms[1])
        self.weight_quantizer = ElasticQuantizer(
            "weight",
            (c.w_bits,),
            *w_forms,
            channels=self.weight.shape[0],
            group_as_channel=as_channel,
            **self._group_args(space),
        )
        self.act_quantizer = _act_quantizer(() if c.a_bits is None else (c.a_bits,), a_syms)

    @property
    def reduction(self) -> int:
        """K, the input dimension of the weight flattened to [N, K] (`weight.reshape(N, -1)`):
        in_features, or in_channels / groups * kh * kw."""
        return self.weight[0].numel()

    def group_as_channel(self, space: ElasticSpace) -> bool:
        """True when the space has per-group weights but its group size does not divide K."""
        return "group" in space.w_granularities and self.reduction % space.group_size != 0

    def _group_args(self, space: ElasticSpace) -> dict:
        if "group" not in space.w_granularities or self.group_as_channel(space):
            return {}
        return {"group_size": space.group_size, "columns": self.reduction}

    def set_choice(self, choice: LayerChoice) -> None:
        if not isinstance(choice, LayerChoice):
            raise ValueError(f"choice must be a LayerChoice, got {type(choice).__name__}")
        fixed = self.fixed_choice
        if fixed is not None:
            if self.fixed_form:
                if choice != fixed:
                    raise ValueError(f"this layer is fixed at {fixed}; got {choice}")
            elif (choice.w_bits, choice.a_bits) != (fixed.w_bits, fixed.a_bits):
                raise ValueError(
                    f"this layer is fixed at W{fixed.w_bits}A{fixed.a_bits} (any form of the "
                    f"space); got {choice}"
                )
            else:
                check_choice(self.space, type(self).__name__, choice, widths=False)
        else:
            check_choice(self.space, type(self).__name__, choice)
        self.active = choice
        self.weight_quantizer.select(choice.w_bits, choice.w_granularity, choice.w_symmetry)
        # a_bits=None: float activation, the activation quantizer is skipped.
        self.float_activation = choice.a_bits is None
        if not self.float_activation:
            self.act_quantizer.select(choice.a_bits, "tensor", choice.a_symmetry)
        for bn in self.switched_bns:
            bn.active_bits = choice.w_bits

    # The quantizers hold the active form (set_choice selects it), so the forward reads no
    # Python attribute that changes with the config: a compiled graph serves every config.
    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_activation:
            return x
        return self.act_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quantized_args(self, x):
        if self.path_recorder is not None:
            self.path_recorder.add(id(self))
        if self.observer is not None:
            # Calibration pass: record the float input and run the float layer, so the
            # statistics do not depend on whichever subnet happens to be active.
            self.observer(self, x)
            return x, self.weight
        return self.quantized_input(x), self.quantized_weight()

    def extra_repr(self) -> str:
        kind = f"fixed={self.fixed_choice}" if self.fixed_choice is not None else "elastic"
        return f"{super().extra_repr()}, {kind}, active={self.active}"


def _one_form_saved(module, state_dict, prefix) -> str | None:
    """The one weight form (e.g. `w8_channel_sym`) that `state_dict` holds for fixed-width
    layer `module` when that differs from the forms the layer holds; else None."""
    if getattr(module, "fixed_choice", None) is None or module.fixed_form:
        return None
    wq = prefix + "weight_quantizer.scale_"
    saved = {k[len(wq) :] for k in state_dict if k.startswith(wq)}
    own = {k[len("scale_") :] for k in module.weight_quantizer.state_dict() if "scale_" in k}
    if len(saved) != 1 or saved == own:
        return None
    return next(iter(saved))


def saved_with_one_form(model: nn.Module, state_dict) -> bool:
    """True when `state_dict` (of `model`) was saved when fixed-width layers held one form:
    rebuild the model with keep_first_last="8bit-fixed-form" before making an optimizer."""
    return any(
        _one_form_saved(m, state_dict, f"{name}." if name else "") is not None
        for name, m in model.named_modules()
        if isinstance(m, _QuantizedLayer)
    )


def _load_fixed_form_state(module, state_dict, prefix, *args) -> None:
    """State saved when a fixed-width layer held one form (its weight quantizer has a single
    scale): load it into that layout, so older runs keep their fixed layers' one form (which
    may be outside the space: it was per-channel symmetric whatever the space)."""
    name = _one_form_saved(module, state_dict, prefix)
    if name is None:
        return
    _, granularity, symmetry = name.split("_")
    aq = prefix + "act_quantizer.scale_a"
    a_sym = "asym" if any(k.startswith(aq) and k.endswith("_asym") for k in state_dict) else "sym"
    c = module.fixed_choice
    old = LayerChoice(c.w_bits, c.a_bits, granularity, symmetry, a_sym)
    previous = (module.weight_quantizer, module.act_quantizer)
    module.fixed_choice = old
    module._fixed_quantizers(module.space, old, fixed_form=True)
    for before, after in zip(previous, (module.weight_quantizer, module.act_quantizer)):
        if after is None:  # float activations (weight-only): no activation quantizer
            continue
        after.to(module.weight.device)
        after.backend, after.narrow_range = before.backend, before.narrow_range
    module.set_choice(old)


def _act_quantizer(bits: tuple[int, ...], symmetries) -> ElasticQuantizer | None:
    """The activation quantizer over the integer widths; None in a weight-only layer (every
    activation float), so no activation scale exists to learn or export."""
    if not bits:
        return None
    return ElasticQuantizer("activation", bits, ("tensor",), symmetries)


class QConv2d(_QuantizedLayer, nn.Conv2d):
    """nn.Conv2d with elastic fake quantization of its input and weight."""

    def __init__(
        self,
        *args,
        space: ElasticSpace,
        fixed_choice: LayerChoice | None = None,
        fixed_form: bool = False,
        **kw,
    ):
        super().__init__(*args, **kw)
        self._attach(space, fixed_choice, fixed_form)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, space: ElasticSpace, fixed_choice=None, fixed_form=False
    ) -> QConv2d:
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"module must be an nn.Conv2d, got {type(module).__name__}")
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
            space=space,
            fixed_choice=fixed_choice,
            fixed_form=fixed_form,
        )
        return _share_state(module, q)

    def to_float(self) -> nn.Conv2d:
        """A plain nn.Conv2d with the float (unquantized) weights."""
        m = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return _copy_state(self, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized_args(x)
        return self._conv_forward(x, w, self.bias)


class QLinear(_QuantizedLayer, nn.Linear):
    """nn.Linear with elastic fake quantization of its input and weight."""

    def __init__(
        self,
        *args,
        space: ElasticSpace,
        fixed_choice: LayerChoice | None = None,
        fixed_form: bool = False,
        **kw,
    ):
        super().__init__(*args, **kw)
        self._attach(space, fixed_choice, fixed_form)

    @classmethod
    def from_float(
        cls, module: nn.Linear, space: ElasticSpace, fixed_choice=None, fixed_form=False
    ) -> QLinear:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module must be an nn.Linear, got {type(module).__name__}")
        q = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            space=space,
            fixed_choice=fixed_choice,
            fixed_form=fixed_form,
        )
        return _share_state(module, q)

    def to_float(self) -> nn.Linear:
        m = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return _copy_state(self, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized_args(x)
        return F.linear(x, w, self.bias)


def _share_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give dst (built on the meta device) src's weight and bias Parameters themselves, so a
    weight tied to another module (GPT-2's lm_head and wte) stays tied; and src's mode."""
    dst.weight = src.weight
    dst.bias = src.bias
    dst.train(src.training)
    return dst


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy weight, bias and train/eval mode from src to dst (same layer geometry); dst."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.train(src.training)
    return dst
