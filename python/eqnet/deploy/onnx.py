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
import io
import json
import os
import warnings

import torch

from ..space import SubnetConfig
from .onnx_graph import PLACEHOLDER_DOMAIN, build_export_model, rewrite_placeholders
from .onnx_presets import BN_MODES, WEIGHT_FORMATS, TargetProfile, get_preset, raise_problems

__all__ = ["compare_onnx", "export_onnx", "run_onnx"]

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MAX_OPSET = 21  # the newest opset this exporter emits and tests (onnxruntime 1.31 runs it)
TORCH_MAX_OPSET = 20  # the TorchScript exporter's last opset; newer ones go through onnx
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _check_args(supernet, config, input_shape, opset, profile, fold_bn, weight_format):
    if not hasattr(supernet, "quantized_layers") or not hasattr(supernet, "set_config"):
        raise ValueError(
            f"supernet must be an eqnet Supernet (eqnet.convert), got {type(supernet).__name__}"
        )
    if not isinstance(config, SubnetConfig):
        raise ValueError(f"config must be a SubnetConfig, got {type(config).__name__}")
    shape = tuple(input_shape) if isinstance(input_shape, list | tuple | torch.Size) else None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"input_shape={input_shape!r}: must be a tuple of positive ints including the batch "
            f"dimension, e.g. (1, 3, 32, 32)"
        )
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
    return shape


def export_onnx(
    supernet,
    config: SubnetConfig,
    path: str | os.PathLike,
    input_shape,
    opset: int = 21,
    preset: str | TargetProfile = "generic",
    *,
    fold_bn: str | None = None,
    weight_format: str | None = None,
    int4: bool = True,
):
    """Export subnet `config` of `supernet` as ONNX QDQ to `path`; returns the onnx.ModelProto.

    input_shape: the input's shape including the batch dimension (exported as dynamic).
    preset: "generic", "tensorrt" or "snpe" (eqnet.deploy.onnx_presets); a config the engine
    cannot run raises ValueError naming each offending layer before anything is written.
    fold_bn: "keep" | "affine" | "scale" (default: the preset's); weight_format: "dq" (integer
    codes -> DequantizeLinear) or "qdq" (float weights -> QuantizeLinear -> DequantizeLinear).
    int4: allow int4/uint4 containers (opset >= 21). onnxruntime 1.31 runs them with graph
    optimizations up to ORT_ENABLE_BASIC; its extended QDQ transformers reject int4 (QDQ
    propagation across MaxPool, Clip->QuantizeLinear fusion), so pass int4=False for graphs
    meant for ORT's fully optimized mode.
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
    shape = _check_args(supernet, config, input_shape, opset, profile, fold_bn, weight_format)

    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)  # validates the config against the space and the model
    try:
        supernet.eval()
        with torch.no_grad():
            export, plans = build_export_model(supernet, config, profile, opset, fold_bn)
            buf = io.BytesIO()
            device = next(supernet.parameters()).device
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated but is the one that runs custom
                # symbolic placeholders offline on every torchvision model (module docstring).
                warnings.simplefilter("ignore", DeprecationWarning)
                # strided slices (ResNet-20's option-A shortcut) stay Slice nodes; harmless
                warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
                torch.onnx.export(
                    export,
                    (torch.zeros(shape, device=device),),
                    buf,
                    dynamo=False,
                    opset_version=min(opset, TORCH_MAX_OPSET),
                    custom_opsets={PLACEHOLDER_DOMAIN: 1},
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
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
    onnx.save(model, os.fspath(path))
    return model


def run_onnx(path, inputs: torch.Tensor, optimize: bool = False) -> torch.Tensor:
    """Outputs of an exported model under onnxruntime on CPU. optimize=False disables graph
    optimizations, so the graph's own semantics run (ORT's QDQ fusion would requantize conv
    outputs in integer arithmetic, which the fake-quant subnet does not do)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {INPUT_NAME: inputs.detach().float().cpu().numpy()})[0]
    return torch.from_numpy(out)


def compare_onnx(supernet, config, path, inputs, batch_size=256, optimize=False) -> dict:
    """Agreement of the exported model with the fake-quant subnet on `inputs`: max / mean
    |onnx - fake-quant|, the fraction of samples whose outputs all agree within
    1e-4 * max|output| (`samples_close`; the rest hold a flipped activation code), and top-1
    agreement."""
    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)
    supernet.eval()
    try:
        ref, got = [], []
        with torch.no_grad():
            for chunk in torch.split(inputs, batch_size):
                ref.append(supernet(chunk).float().cpu())
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
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).float().mean()),
    }
