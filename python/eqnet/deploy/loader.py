"""Load a .eqk file into an integer inference model.

`load(path, bits=b | config=cfg, max_bits=None, model=None)` takes the float network from
`model` (a copy of the user's own module; the user's object is left untouched) or rebuilds a
registered architecture from the file's model record (`eqnet.models.get(name, **kwargs)`),
makes its attention projections modules as `eqnet.convert` does, replaces every quantized
layer by an `IntConv2d`/`IntLinear` and every folded BN by an identity, loads the remaining
float tensors (by module path), and configures the integer layers for the requested width or
mixed configuration. Before any network is built the file's records and the loaded values are
validated (record.py); a registered architecture is checked against the record on the meta
device first. A malformed file raises EqkFormatError naming the field; a `model` whose layers
or tensors differ from the file's is refused (ValueError) with the names and shapes that differ.

`max_bits` reads only the prefix of a nested file that width needs (a device that has received
part of the file); `DeployedModel.upgrade(...)` reads the next sections of the same file and
switches the same modules in place.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from torch import nn

from eqkernels.format import EqkFile, EqkFormatError, plane_tensor_name, read_eqk

from ..convert import make_projections_modules
from ..space import LayerChoice, SubnetConfig
from .layout import (
    act_form_key,
    bn_key,
    build_float_model,
    config_from,
    deployment_records,
    float_tensors,
    layer_geometry,
    required_tensors,
    sections_needed,
    weight_key,
)
from .record import check_network, check_record, check_values
from .runtime import IntConv2d, IntLinear, LayerTensors, int_layer
from .steps import build_program

_PREFIX = "model."
RUNTIMES = ("auto", "steps", "modules")


# ------------------------------------------------------------------------------- the model


class DeployedModel(nn.Module):
    """The integer inference network (`.model`) plus the file state it was built from.

    Module names under `.model` match the Supernet's (e.g. "model.conv1"), so a SubnetConfig of
    the Supernet addresses the integer layers directly."""

    def __init__(self, net: nn.Module, eqk: EqkFile, source, backend: str | None,
                 runtime: str = "auto"):  # fmt: skip
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime: {runtime!r}; accepted: {', '.join(RUNTIMES)}")
        self.model = net
        self.eqk = eqk
        self.source = source
        self.backend = backend
        self.runtime = runtime
        self.active_config: SubnetConfig | None = None
        self._program = self._modules_list = None
        self.runtime_reason: str | None = "not built yet"
        self.eval()

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and not self.training and not self._hooked():
            program = self.step_program()
            y = None if program is None else program(args[0])
            if y is not None:
                return y
        return self.model(*args, **kwargs)

    def step_program(self):
        """The step-list program of the current configuration (steps.py), or None when the
        per-layer module path runs (`runtime_reason` says why)."""
        if self._program is None and self.runtime != "modules":
            try:
                self._program = build_program(self.model)
                self.runtime_reason = None
            except Exception as exc:  # any failure to assemble leaves the (exact) module path
                if self.runtime == "steps":
                    raise
                reason = str(exc) if isinstance(exc, NotImplementedError) else repr(exc)
                self._program, self.runtime_reason = False, reason
        return self._program or None

    def _hooked(self) -> bool:
        """Whether a forward hook is registered on any module (the program would skip it)."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        modules = self._modules_list
        if modules is None:  # cached with the program: walking the tree cost ~30 us per call
            modules = self._modules_list = list(self.model.modules())
        return any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    def _apply(self, fn, *args, **kwargs):
        self._program = self._modules_list = None  # .to() / .float() replace its tensors
        return super()._apply(fn, *args, **kwargs)

    @property
    def header(self) -> dict:
        return self.eqk.header

    @property
    def bytes_read(self) -> int:
        """Bytes read from the file so far (header and every loaded section)."""
        return self.eqk.bytes_read

    def int_layers(self) -> dict[str, IntConv2d | IntLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, (IntConv2d, IntLinear))}

    def stored_configs(self) -> list[str]:
        return list(self.header["quant"]["configs"])

    def plane_bytes(self, elastic_only: bool = True) -> int:
        """Weight-plane bytes one forward reads (elastic layers only by default)."""
        layers = self.header["model"]["layers"]
        return sum(
            m.plane_bytes()
            for n, m in self.int_layers().items()
            if not elastic_only or layers[n]["fixed"] is None
        )

    def configure(self, config: SubnetConfig) -> None:
        """Switch every integer layer to `config` using only the loaded tensors."""
        tensors = self.eqk.tensors
        missing = [n for n in required_tensors(self.header, config) if n not in tensors]
        if missing:
            raise ValueError(
                f"config needs {missing[0]!r} which the loaded prefix does not hold (loaded "
                f"sections {self.eqk.sections_read}); call upgrade() or load with a larger "
                "max_bits"
            )
        layers = self.int_layers()
        if set(layers) != {n for n, _ in config}:
            raise ValueError("config: its layers do not match the deployed model's layers")
        for lname, choice in config:
            layers[lname].layer_name = lname
            layers[lname].set_tensors(_layer_tensors(self.header, tensors, lname, choice))
            layers[lname].backend = self.backend
            if layers[lname].group_size:
                # per-group scales: prepared now, so a kernel that cannot run them (integer
                # activations, convolutions) refuses at load, naming the layer
                layers[lname].prepare_now()
        self.active_config = config
        self._program = self._modules_list = None
        if self.runtime == "modules":
            self.runtime_reason = "runtime='modules'"
        elif self.runtime == "steps":
            self.step_program()  # raises here, not at the first forward

    def upgrade(self, bits: int | None = None, config=None, *, max_bits: int | None = None,
                source=None) -> DeployedModel:  # fmt: skip
        """Read the sections a wider width/config needs from the same file (in place) and
        switch to it. `max_bits` alone reads that prefix and runs at the widest stored width
        it completes. A `source` that is another export (other identity, or other bytes in a
        section already loaded) raises EqkFormatError; new sections' values are validated."""
        source = self.source if source is None else source
        if bits is None and config is None:
            if max_bits is None:
                raise ValueError("upgrade: give bits=, config= or max_bits=")
            bits = _widest_within(self.header, max_bits)
        cfg = config_from(self.header, bits, config)
        need = sections_needed(self.header, cfg)
        if max_bits is not None and self.header["nested"]:
            need = sorted(
                set(need) | set(self.header["widths"][str(_widest_within(self.header, max_bits))])
            )
        before = set(self.eqk.tensors)
        self.eqk.upgrade(source, sections=need)
        check_values({k: v for k, v in self.eqk.tensors.items() if k not in before})
        self.configure(cfg)
        return self


def _widest_within(header: dict, max_bits: int) -> int:
    widths = [int(k) for k in header["widths"] if k.isdecimal() and int(k) <= max_bits]
    if not widths:
        raise ValueError(
            f"max_bits={max_bits}: the file's narrowest width is {min(map(int, header['widths']))}"
        )
    return max(widths)


def _layer_tensors(header, tensors, lname, choice: LayerChoice) -> LayerTensors:
    model, quant = header["model"], header["quant"]
    ql, geometry = quant["layers"][lname], model["layers"][lname]
    wkey = weight_key(ql, choice)
    wform = ql["weights"][wkey]
    base = f"w/{lname}/{wkey}"
    n_planes = choice.w_bits if wform["nested"] else wform["stored_bits"]
    planes = torch.stack([tensors[plane_tensor_name(base + "/planes", j)] for j in range(n_planes)])
    akey = act_form_key(choice)
    aform = ql["acts"][akey]
    mul = add = None
    bn = geometry.get("bn")
    if bn is not None:
        bkey = bn_key(model, bn, choice.w_bits)
        mul, add = tensors[f"bn/{bn}/{bkey}/mul"], tensors[f"bn/{bn}/{bkey}/add"]
    elif geometry["has_bias"]:
        add = tensors[f"bias/{lname}"]
    return LayerTensors(
        planes=planes,
        scale=tensors[base + "/scale"],
        bits=choice.w_bits if wform["nested"] else wform["stored_bits"],
        top_bits=wform["stored_bits"],
        weight_zero_point=tensors.get(base + "/zero_point"),
        act_scale=tensors.get(f"a/{lname}/{akey}/scale"),  # None: float activation
        act_zero_point=tensors.get(f"a/{lname}/{akey}/zero_point"),
        act_quant_min=aform.get("quant_min", 0),
        act_quant_max=aform.get("quant_max", 0),
        mul=mul,
        add=add,
        group_size=wform.get("group_size"),
    )


def _float_model(arch: Mapping, device: str) -> nn.Module:
    try:
        with torch.device(device):
            net = build_float_model(arch)
    except (KeyError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        raise EqkFormatError(f"model.arch: cannot build {arch!r} ({exc})") from None
    make_projections_modules(net)
    return net


def _build_network(header: dict, model: nn.Module | None) -> nn.Module:
    records, _ = deployment_records(header)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        # A Supernet (or a DeployedModel) given by mistake: its network is what matches.
        net = copy.deepcopy(getattr(model, "model", model) if _is_wrapper(model) else model)
        make_projections_modules(net)
    else:
        arch = records.get("arch")
        if arch is None:
            raise ValueError(
                "this file holds a model that is not a registered architecture: pass the float "
                "network, eqnet.load(path, model=float_model)"
            )
        if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
            raise EqkFormatError("model record: 'arch' must hold the registered name and kwargs")
        # The declared network is checked on the meta device first (no memory): only a record
        # whose every layer matches the file's tensors gets a real network allocated.
        check_network(header, _float_model(arch, "meta"))
        net = _float_model(arch, "cpu")
    # Wrap so that module names match the Supernet's ("model.<path>").
    root = nn.Module()
    root.model = net
    _check_layers(root, records["layers"], given=model is not None)
    if model is not None:
        try:  # bias, BN and float state: the user's module against the validated record
            check_network(header, net)
        except EqkFormatError as exc:
            raise ValueError(f"the model does not match the file: {exc}") from None
    for lname, geometry in records["layers"].items():
        _replace(root, lname, int_layer(geometry))
    for bn in records["bn_folds"]:
        _replace(root, bn, nn.Identity())
    return root


def _is_wrapper(model) -> bool:
    return isinstance(model, DeployedModel) or (
        hasattr(model, "quantized_layers") and isinstance(getattr(model, "model", None), nn.Module)
    )


_GEOMETRY_KEYS = ("kind", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation", "groups", "in_features", "out_features")  # fmt: skip


def _check_layers(root: nn.Module, layers: Mapping, given: bool) -> None:
    """Every quantized layer of the file is a module of the same geometry in the network."""
    problems = []
    for lname, geometry in layers.items():
        try:
            module = root.get_submodule(lname)
            found = layer_geometry(module)
        except (AttributeError, NotImplementedError) as e:
            problems.append(f"{lname}: {e}")
            continue
        differ = [k for k in _GEOMETRY_KEYS if geometry.get(k) != found.get(k)]
        if differ:
            want = {k: geometry.get(k) for k in differ}
            got = {k: found.get(k) for k in differ}
            problems.append(f"{lname}: the file has {want}, the model {got}")
    if problems:
        msg = f"the model does not match the file's layers: {'; '.join(problems[:8])}"
        if len(problems) > 8:
            msg += f"; and {len(problems) - 8} more"
        raise (ValueError if given else EqkFormatError)(msg)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
        getattr(parent, child)
    except AttributeError:
        raise EqkFormatError(
            f"model record: module {name!r} is not in the rebuilt network"
        ) from None
    setattr(parent, child, new)


def _load_float_tensors(root: nn.Module, eqk: EqkFile, given: bool) -> None:
    state = {k[len("float/") :]: v for k, v in eqk.tensors.items() if k.startswith("float/")}
    expected = float_tensors(root.model, ())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{what} {names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            for what, names in (
                ("missing from the file:", missing),
                ("not in the model:", unexpected),
                ("shapes differ:", shapes),
            )
            if names
        ]
        raise (ValueError if given else EqkFormatError)(
            f"the model's float tensors do not match the file's: {'; '.join(parts)}"
        )
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)


def load(
    path: str | os.PathLike,
    bits: int | None = None,
    config=None,
    *,
    max_bits: int | None = None,
    backend: str | None = None,
    model: nn.Module | None = None,
    runtime: str = "auto",
) -> DeployedModel:
    """Load a .eqk file as an integer inference model.

    model: the float network the supernet was converted from (the user's own module, or any
        module with the same names and shapes); a copy of it gets the integer layers, the
        given module is not changed. Needed unless the file records a registered
        architecture. `deployed.model` is the network, with the user's module tree.
    bits: a stored uniform width; config: a SubnetConfig (any config of the space for a nested
        file, a stored one otherwise), its JSON or a stored config name. Default: the widest
        width loaded (nested) or the first stored config.
    max_bits: nested files only: read only the prefix of the file that width needs (a file that
        holds just that prefix loads); without it the whole file is read and must be complete.
    backend: eqkernels backend of the integer ops (None = auto).
    runtime: "auto" runs the forward as one step-list program in C++ (steps.py) when the
        network can be expressed as one, else the per-layer modules (`runtime_reason` says
        why); "steps" requires the program (NotImplementedError naming the node otherwise);
        "modules" always runs the per-layer modules. Both give the same outputs; inputs the
        program does not take (non-finite values, graph capture, other dtypes or devices,
        training mode) run the modules.
    Malformed files raise eqkernels.EqkFormatError; bad arguments raise ValueError.
    """
    eqk = read_eqk(path, max_bits=max_bits) if max_bits is not None else read_eqk(path)
    header = eqk.header
    check_record(header)
    check_values(eqk.tensors)
    if bits is None and config is None:
        if header["nested"]:
            bits = eqk.bits
        else:
            config = next(iter(deployment_records(header)[1]["configs"]))
    cfg = config_from(header, bits, config)
    root = _build_network(header, model)
    _load_float_tensors(root, eqk, given=model is not None)
    deployed = DeployedModel(root.model, eqk, path, backend, runtime)
    deployed.configure(cfg)
    return deployed
