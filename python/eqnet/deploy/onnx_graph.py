"""The ONNX graph of an export: a float copy of the supernet whose quantized layers mark their
input and weight with placeholder nodes (traced by torch.onnx), then each placeholder rewritten
into QuantizeLinear / DequantizeLinear nodes from its TensorQDQ plan."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .fold import bn_affine, bn_for_width, find_foldable_bn, fold_affine
from .onnx_presets import check_layers, raise_problems
from .onnx_qdq import TensorQDQ, plan_activation, plan_weight

PLACEHOLDER_DOMAIN = "eqnet_export"


class _Mark(torch.autograd.Function):
    """Identity in torch; one placeholder node (domain eqnet_export, attribute key) in ONNX."""

    @staticmethod
    def forward(ctx, x, key):
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{PLACEHOLDER_DOMAIN}::Mark", x, key_i=key)
        out.setType(x.type())  # the exporter needs the shape for the conv that follows
        return out


class _ExportLayer(nn.Module):
    """Float stand-in of one quantized layer: marked input and weight, then conv/linear and an
    optional output-side per-channel affine (folded BN)."""

    def __init__(self, layer, act_key, weight_key, weight, bias, affine):
        super().__init__()
        self.layer = layer  # the QConv2d / QLinear, for its conv hyper-parameters only
        self.act_key = act_key
        self.weight_key = weight_key
        self.register_buffer("w", weight)
        self.register_buffer("b", bias)
        self.mul = None if affine is None else nn.Parameter(affine[0], requires_grad=False)
        self.add = None if affine is None else nn.Parameter(affine[1], requires_grad=False)

    def forward(self, x):
        if self.act_key is not None:  # None: a float activation (weight-only), no QDQ
            x = _Mark.apply(x, self.act_key)
        w = _Mark.apply(self.w, self.weight_key)
        if isinstance(self.layer, nn.Conv2d):
            y = nn.Conv2d._conv_forward(self.layer, x, w, self.b)
        else:
            y = F.linear(x, w, self.b)
        if self.mul is not None:
            shape = [-1] + [1] * (y.dim() - 2)
            y = y * self.mul.reshape(shape) + self.add.reshape(shape)
        return y


# --------------------------------------------------------------------------------------------
# The export model (float graph with placeholders)


def _bn_pairs(supernet, fold_bn):
    if fold_bn == "keep":
        return {}
    # Traced on .model (the Supernet's forward takes *args); names made Supernet-relative.
    pairs = find_foldable_bn(supernet.model)
    return {f"model.{bn}": f"model.{layer}" for bn, layer in pairs.items()}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_export_model(supernet, config, profile, opset, fold_bn):
    """A float copy of the supernet at `config` whose quantized layers are stand-ins with
    placeholder marks, and the QDQ plan of every mark (key -> TensorQDQ)."""
    problems: list[str] = []
    layers = supernet.quantized_layers()
    check_layers(profile, dict(config.layers))
    pairs = _bn_pairs(supernet, fold_bn)  # bn name -> layer name
    bn_of = {layer: bn for bn, layer in pairs.items()}
    export = copy.deepcopy(supernet)
    plans: dict[int, TensorQDQ] = {}
    for i, (name, layer) in enumerate(layers.items()):
        choice = config[name]
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise NotImplementedError(
                f"layer {name!r}: ONNX export handles QConv2d and QLinear, not "
                f"{type(layer).__name__}"
            )
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        affine = None
        bn_mul = None
        if name in bn_of:
            bn = bn_for_width(supernet.get_submodule(bn_of[name]), choice.w_bits)
            a, b = bn_affine(bn)
            mul, add = fold_affine(a, b, layer.bias)
            if fold_bn == "affine":
                affine, bias = (mul, add), None
            else:
                bn_mul, bias = mul, add
            _set_module(export, bn_of[name], nn.Identity())
        act = None
        if choice.a_bits is not None:
            act = plan_activation(name, layer, choice, profile, opset, problems)
        wt = plan_weight(name, layer, choice, profile, opset, bn_mul, problems)
        if (act is None and choice.a_bits is not None) or wt is None:
            continue
        plans[2 * i + 1] = wt
        if act is not None:
            plans[2 * i] = act
        stand_in = _ExportLayer(
            export.get_submodule(name),
            None if act is None else 2 * i,
            2 * i + 1,
            torch.from_numpy(wt.dequantized),
            bias,
            affine,
        )
        _set_module(export, name, stand_in)
    raise_problems(profile, problems)
    return export.eval(), plans


# --------------------------------------------------------------------------------------------
# Graph rewriting: placeholders -> QDQ


def _numpy_type(container):
    if container in ("int4", "uint4"):
        import ml_dtypes

        return getattr(ml_dtypes, container)
    return np.dtype(container)


def _tensor(name, values, container=None):
    from onnx import numpy_helper

    values = np.asarray(values)
    if container is None:
        return numpy_helper.from_array(values.astype(np.float32), name)
    # Raw little-endian bytes; int4/uint4 (ml_dtypes, an onnx dependency) packed two per byte.
    return numpy_helper.from_array(values.astype(_numpy_type(container)), name)


def _qdq_nodes(plan: TensorQDQ, src: str, dst: str, prefix: str, weight_format: str):
    """(nodes, initializers) computing dst from src (activations) or from constants."""
    from onnx import helper, numpy_helper

    axis = {} if plan.axis is None else {"axis": plan.axis}
    final = dst
    if plan.block_size:  # per group: blocked DQ of the [N, K] codes, reshaped to the weight's
        axis["block_size"] = plan.block_size
        dst = f"{prefix}.blocked"
    inits = [
        _tensor(f"{prefix}.scale", plan.scale),
        _tensor(f"{prefix}.zero_point", plan.zero_point, plan.container),
    ]
    nodes = []
    if plan.role == "weight":
        if weight_format == "dq":
            inits.append(_tensor(f"{prefix}.codes", plan.codes, plan.container))
            q = f"{prefix}.codes"
        else:
            flat = plan.dequantized.reshape(plan.codes.shape)
            inits.append(_tensor(f"{prefix}.float", flat))
            q = f"{prefix}.q"
            nodes.append(
                helper.make_node(
                    "QuantizeLinear",
                    [f"{prefix}.float", f"{prefix}.scale", f"{prefix}.zero_point"],
                    [q],
                    name=f"{prefix}/QuantizeLinear",
                    **axis,
                )
            )
    else:
        x = src
        if plan.clip is not None:
            inits += [
                _tensor(f"{prefix}.clip_min", plan.clip[0]),
                _tensor(f"{prefix}.clip_max", plan.clip[1]),
            ]
            x = f"{prefix}.clipped"
            nodes.append(
                helper.make_node(
                    "Clip",
                    [src, f"{prefix}.clip_min", f"{prefix}.clip_max"],
                    [x],
                    name=f"{prefix}/Clip",
                )
            )
        q = f"{prefix}.q"
        nodes.append(
            helper.make_node(
                "QuantizeLinear",
                [x, f"{prefix}.scale", f"{prefix}.zero_point"],
                [q],
                name=f"{prefix}/QuantizeLinear",
            )
        )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [q, f"{prefix}.scale", f"{prefix}.zero_point"],
            [dst],
            name=f"{prefix}/DequantizeLinear",
            **axis,
        )
    )
    if plan.block_size:
        shape = np.asarray(plan.dequantized.shape, dtype=np.int64)
        inits.append(numpy_helper.from_array(shape, f"{prefix}.shape"))
        nodes.append(
            helper.make_node("Reshape", [dst, f"{prefix}.shape"], [final], name=f"{prefix}/Reshape")
        )
    return nodes, inits


def rewrite_placeholders(model, plans, weight_format) -> None:
    """Replace every placeholder node of the traced graph by its QDQ nodes, in place."""
    from onnx import helper

    graph = model.graph
    new_nodes, new_inits = [], []
    uses: dict[int, int] = {}
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        plan = plans[key]
        prefix = f"{plan.layer}.{'input' if plan.role == 'activation' else 'weight'}"
        uses[key] = uses.get(key, 0) + 1
        if uses[key] > 1:  # a layer called more than once: unique names per call
            prefix = f"{prefix}.call{uses[key]}"
        nodes, inits = _qdq_nodes(plan, node.input[0], node.output[0], prefix, weight_format)
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    opsets = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    # The exporter's value_info predates the rewrite; shape inference in the checker redoes it.
    del graph.value_info[:]
