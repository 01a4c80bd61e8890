"""ONNX QDQ export of one subnet of an elastic supernet (QuantizeLinear / DequantizeLinear).

How the graph is built: the supernet is deep-copied with the chosen subnet active, and every
quantized layer is replaced by a float layer whose input activation and weight pass through a
placeholder autograd function. `torch.onnx.export(dynamo=False)` (the TorchScript exporter,
which runs offline and handles every torchvision model) traces it to a float ONNX graph in which
each placeholder is one node of a private domain; `onnx.version_converter` lifts the graph to
the requested opset when it is above 20 (the TorchScript exporter's last), and each placeholder
is then replaced by its QDQ nodes, built from the exact `QuantParams` the fake-quant forward
uses. No placeholder survives; `onnx.checker.check_model(full_check=True)` runs before saving.

Why this reproduces the fake-quant forward (DESIGN.md "Quantization math"):
- Weights: the integer codes are computed here with the forward's own fp32 arithmetic and
  checked bit for bit against the quantizer's output before export. Stored as the
  DequantizeLinear initializer ("dq" format) they dequantize to exactly `(q - z_r) * s`; in the
  "qdq" format (TensorRT) the initializer holds those dequantized floats and QuantizeLinear
  recovers the same codes (|x/s - (q - z_r)| is ~1e-7 relative, far below the 0.5 rounding step).
- Activations: QuantizeLinear computes `saturate(round_half_even(x / s) + z)`. The forward
  computes `clamp(round_half_even(x * fl32(1/s)) + z_r, qmin, qmax)`. Saturation is to the
  container type's range, so a code range narrower than the type (widths below the container,
  e.g. 3-bit codes in int4, or 7-bit codes in int8) gets a float `Clip` to
  `[(qmin - z_r) s, (qmax - z_r) s]` before QuantizeLinear, which gives the same codes.
  `x / s` and `x * fl32(1/s)` can differ by one ulp, which changes a code only when x / s lies
  within an ulp of a rounding tie: rare, and each such flip moves one activation by one step.
- Nested weights (vertical layering) at width b < top width n dequantize to
  `(q_b + c_k) 2^k s` with c_k = (2^k - 1) / 2^(k+1); an integer zero point cannot add c_k, so
  the codes are stored as q' = 2^(k+1) q_b + 2^k - 1 with step s / 2 (the same real number,
  rounded once: bit-exact). q' needs n + 1 bits, so n = 8 lands in int16 (generic preset).
- BatchNorm: "keep" leaves BatchNormalization after the conv (exact: the same eval formula);
  "affine" replaces it by an output-side per-channel Mul + Add (a, b computed in float64, equal
  to BN up to fp32 rounding); "scale" folds a into the per-channel weight scale and b into the
  bias (TensorRT). Folding into the float weight before quantization is never done: it would
  change the codes, and the fake-quant subnet quantizes the unfolded weight.

The choice of container, offset and clip of every tensor is recorded in the model's
metadata_props (`eqnet.layers`, JSON), with the preset, the config and the BN mode.

onnx_qdq.py holds the codes and each tensor's QDQ plan, onnx_graph.py the placeholder model and
the graph rewrite; this module the public API.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from eqkernels import atomic

from ..space import SubnetConfig
from .onnx_graph import PLACEHOLDER_DOMAIN, build_export_model, rewrite_placeholders
from .onnx_presets import BN_MODES, WEIGHT_FORMATS, TargetProfile, get_preset, raise_problems

__all__ = ["compare_onnx", "export_onnx", "run_onnx"]

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MAX_OPSET = 21  # the newest opset this exporter emits and tests (onnxruntime 1.31 runs it)
TORCH_MAX_OPSET = 20  # the TorchScript exporter's last opset; newer ones go through onnx
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _check_args(supernet, config, opset, profile, fold_bn, weight_format):
    if not hasattr(supernet, "quantized_layers") or not hasattr(supernet, "set_config"):
        raise ValueError(
            f"supernet must be an eqnet Supernet (eqnet.convert), got {type(supernet).__name__}"
        )
    if not isinstance(config, SubnetConfig):
        raise ValueError(f"config must be a SubnetConfig, got {type(config).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset={opset!r}: accepted values are integers {MIN_OPSET}..{MAX_OPSET}")
    if fold_bn not in BN_MODES:
        raise ValueError(f"fold_bn={fold_bn!r}: accepted values are {', '.join(BN_MODES)}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"weight_format={weight_format!r}: accepted values are {', '.join(WEIGHT_FORMATS)}"
        )
    if profile.name == "tensorrt" and fold_bn == "keep":
        raise ValueError(
            "fold_bn='keep': the tensorrt preset needs BN folded ('scale' or 'affine'): its "
            "QDQ convolution takes no BatchNormalization"
        )


def graph_inputs(example_inputs=None, input_shape=None, device=None):
    """(names, tensors, as_kwargs) of the exported graph's inputs: a tensor is "input", a
    tuple/list of tensors "input_0", "input_1", ..., a dict keeps its keys (the model's keyword
    arguments); without example inputs, a zero tensor of `input_shape`."""
    if (example_inputs is None) == (input_shape is None):
        raise ValueError(
            "give exactly one of example_inputs (a tensor, a tuple of tensors or a dict of "
            "keyword arguments) and input_shape= (e.g. (1, 3, 32, 32))"
        )
    if input_shape is not None:
        shape = tuple(input_shape) if isinstance(input_shape, list | tuple | torch.Size) else None
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(
                f"input_shape={input_shape!r}: must be a tuple of positive ints including the "
                f"batch dimension, e.g. (1, 3, 32, 32)"
            )
        return [INPUT_NAME], [torch.zeros(shape, device=device)], False
    if isinstance(example_inputs, torch.Tensor):
        return [INPUT_NAME], [example_inputs], False
    if isinstance(example_inputs, Mapping):
        names, values, as_kwargs = list(example_inputs), list(example_inputs.values()), True
    elif isinstance(example_inputs, list | tuple):
        values, as_kwargs = list(example_inputs), False
        names = [f"{INPUT_NAME}_{i}" for i in range(len(values))]
    else:
        raise ValueError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}"
        )
    bad = [n for n, v in zip(names, values, strict=True) if not isinstance(v, torch.Tensor)]
    if not values or bad:
        raise ValueError(f"example_inputs: every input must be a tensor (not: {bad})")
    return [str(n) for n in names], values, as_kwargs


class _Graph(nn.Module):
    """The traced function: positional tensors in, one tensor out (a transformers output's
    logits, or the first element of a tuple)."""

    def __init__(self, net, names, as_kwargs):
        super().__init__()
        self.net = net
        self.names = names
        self.as_kwargs = as_kwargs
        params = _parameters(net.model if hasattr(net, "model") else net)
        # A KV cache is no graph output; transformers builds one unless told not to.
        self.extra = (
            {"use_cache": False} if "use_cache" in params and "use_cache" not in names else {}
        )

    def forward(self, *tensors):
        if self.as_kwargs:
            out = self.net(**dict(zip(self.names, tensors, strict=True)), **self.extra)
        else:
            out = self.net(*tensors, **self.extra)
        return output_tensor(out)


def _parameters(module) -> set:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def output_tensor(out):
    """The tensor a model returns: itself, a transformers output's logits, or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"the model returned {type(out).__name__}; ONNX export needs a tensor")


def export_onnx(
    supernet,
    config: SubnetConfig,
    path: str | os.PathLike,
    example_inputs=None,
    *,
    input_shape=None,
    opset: int = 21,
    preset: str | TargetProfile = "generic",
    fold_bn: str | None = None,
    weight_format: str | None = None,
    int4: bool = False,
):
    """Export subnet `config` of `supernet` as ONNX QDQ to `path`; returns the onnx.ModelProto.

    example_inputs: as torch.onnx.export takes them: a tensor (graph input "input"), a tuple
    of tensors ("input_0", ...) or a dict of keyword arguments (inputs named by the keys;
    transformers models: pass attention_mask and position_ids explicitly). The graph has one
    output, "output" (a transformers output's logits). The batch dimension is dynamic.
    input_shape: instead of example_inputs, one image-like input's shape with the batch
    dimension (a zero tensor is traced).
    preset: "generic", "tensorrt" or "snpe" (eqnet.deploy.onnx_presets); a config the engine
    cannot run raises ValueError naming each offending layer before anything is written.
    fold_bn: "keep" | "affine" | "scale" (default: the preset's); weight_format: "dq" (integer
    codes -> DequantizeLinear) or "qdq" (float weights -> QuantizeLinear -> DequantizeLinear).
    int4: opt in to int4/uint4 containers (opset >= 21). By default codes below 8 bits sit in
    int8/uint8 containers with a Clip to their range, which every onnxruntime optimization
    level accepts; onnxruntime 1.31 runs int4 graphs only up to ORT_ENABLE_BASIC (its extended
    QDQ transformers reject int4: QDQ propagation across MaxPool, Clip->QuantizeLinear fusion).
    """
    import onnx

    profile = get_preset(preset)
    if not isinstance(int4, bool):
        raise ValueError(f"int4={int4!r}: accepted values are True, False")
    if not int4:
        profile = dataclasses.replace(
            profile,
            weight_containers=tuple(c for c in profile.weight_containers if "4" not in c),
            act_containers=tuple(c for c in profile.act_containers if "4" not in c),
        )
    fold_bn = profile.fold_bn if fold_bn is None else fold_bn
    weight_format = profile.weight_format if weight_format is None else weight_format
    _check_args(supernet, config, opset, profile, fold_bn, weight_format)
    device = next(supernet.parameters()).device
    names, tensors, as_kwargs = graph_inputs(example_inputs, input_shape, device)

    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)  # validates the config against the space and the model
    try:
        supernet.eval()
        with torch.no_grad():
            export, plans = build_export_model(supernet, config, profile, opset, fold_bn)
            buf = io.BytesIO()
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated but is the one that runs custom
                # symbolic placeholders offline on every torchvision model (module docstring).
                warnings.simplefilter("ignore", DeprecationWarning)
                # strided slices (ResNet-20's option-A shortcut) stay Slice nodes; harmless
                warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
                torch.onnx.export(
                    _Graph(export, names, as_kwargs),
                    tuple(t.to(device) for t in tensors),
                    buf,
                    dynamo=False,
                    opset_version=min(opset, TORCH_MAX_OPSET),
                    custom_opsets={PLACEHOLDER_DOMAIN: 1},
                    input_names=names,
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT_NAME]},
                    do_constant_folding=True,
                )
    finally:
        supernet.set_config(previous)
        supernet.train(was_training)

    model = onnx.load_from_string(buf.getvalue())
    if opset > TORCH_MAX_OPSET:
        model = onnx.version_converter.convert_version(model, opset)
    rewrite_placeholders(model, plans, weight_format)
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if fold_bn != "keep" and left:
        # Float convs' BNs are fused by the exporter itself; these follow something else.
        raise_problems(
            profile,
            [
                f"fold_bn={fold_bn!r}: {len(left)} BatchNorm op(s) do not directly follow a "
                f"conv/linear and cannot be folded ({', '.join(left[:4])}); use fold_bn='keep'"
            ],
        )
    model.producer_name = "eqnet"
    layers = {}
    for plan in plans.values():
        layers.setdefault(plan.layer, {})[plan.role] = plan.record()
    meta = {
        "eqnet.preset": profile.name,
        "eqnet.opset": str(opset),
        "eqnet.fold_bn": fold_bn,
        "eqnet.weight_format": weight_format,
        "eqnet.int4": str(int4),
        "eqnet.config": config.to_json(),
        "eqnet.layers": json.dumps(layers),
        "eqnet.containers": (
            "weights: integer codes in the smallest allowed type; activations below the type's "
            "width: float Clip to the code range before QuantizeLinear (it saturates to the "
            "type's range); offset != 0: codes and zero point shifted into an unsigned type"
        ),
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    with atomic.atomic_output(path) as tmp:
        onnx.save(model, tmp)
    return model


def run_onnx(path, inputs, optimize: bool = False, session_options=None) -> torch.Tensor:
    """Outputs of an exported model under onnxruntime on CPU; `inputs` as export_onnx's
    example_inputs. optimize=False disables graph optimizations, so the graph's own semantics
    run (ORT's QDQ fusion would requantize conv outputs in integer arithmetic, which the
    fake-quant subnet does not do); session_options, when given, is used as is."""
    import onnxruntime as ort

    opts = session_options
    if opts is None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        opts.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    names, tensors, _ = graph_inputs(inputs)
    feeds = dict(zip(names, tensors, strict=True))
    wanted = [i.name for i in session.get_inputs()]  # the exporter drops unused inputs
    out = session.run(None, {n: _numpy(feeds[n]) for n in wanted})[0]
    return torch.from_numpy(out)


def _numpy(t: torch.Tensor):
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def _chunks(inputs, batch_size):
    if isinstance(inputs, torch.Tensor):
        return list(torch.split(inputs, batch_size))
    if isinstance(inputs, Mapping):
        parts = {k: torch.split(v, batch_size) for k, v in inputs.items()}
        return [dict(zip(parts, vs, strict=True)) for vs in zip(*parts.values(), strict=True)]
    parts = [torch.split(v, batch_size) for v in inputs]
    return [tuple(vs) for vs in zip(*parts, strict=True)]


def _call(supernet, inputs):
    if isinstance(inputs, torch.Tensor):
        return output_tensor(supernet(inputs))
    if isinstance(inputs, Mapping):
        return output_tensor(supernet(**inputs))
    return output_tensor(supernet(*inputs))


def compare_onnx(supernet, config, path, inputs, batch_size=256, optimize=False) -> dict:
    """Agreement of the exported model with the fake-quant subnet on `inputs` (as export_onnx's
    example_inputs, batched along dim 0): max / mean |onnx - fake-quant|, the fraction of
    samples whose outputs all agree within 1e-4 * max|output| (`samples_close`; the rest hold
    a flipped activation code), and top-1 agreement over the last dimension (per sample, or
    per token for a language model)."""
    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)
    supernet.eval()
    try:
        ref, got = [], []
        with torch.no_grad():
            for chunk in _chunks(inputs, batch_size):
                ref.append(_call(supernet, chunk).float().cpu())
                got.append(run_onnx(path, chunk, optimize))
    finally:
        supernet.set_config(previous)
        supernet.train(was_training)
    ref, got = torch.cat(ref), torch.cat(got)
    diff = (ref - got).abs()
    scale = float(ref.abs().max())
    return {
        "n": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_output": scale,
        "samples_close": float((diff.flatten(1).amax(1) <= 1e-4 * scale).float().mean()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
    }
