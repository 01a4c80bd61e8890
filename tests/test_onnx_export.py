"""ONNX QDQ export (eqnet.deploy.onnx): graph structure, exact weight codes, preset checks, and
agreement of onnxruntime (CPU, graph optimizations off) with the fake-quant subnet.

References written here: the weight codes from DESIGN.md's equations (v = fl32(w * fl32(1/s))
as the forward computes it, the rest in float64), the expected container and Clip of every
activation from the ONNX types' ranges, and the Q/DQ node counts from the config.

Tolerance of the end-to-end comparison: onnxruntime's convolution sums in another order than
torch's, and QuantizeLinear divides by s where the forward multiplies by fl32(1/s); both move a
pre-activation by a few ulps, which flips an activation code when it lies that close to a
rounding tie (one step of a possibly 2-bit activation, then propagated). So outputs are compared
as: top-1 agreement >= 99.9 %, >= 99 % of the samples with every output within
1e-4 * max |output|, and mean |diff| <= 5e-4 * max |output|. (For scale: switching torch's own
fp32 convolution between mkldnn and the native kernel flips codes as often, or more.)
"""

from __future__ import annotations

import json
import warnings

import eqnet
import numpy as np
import pytest
import torch
from eqnet import models
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from eqnet.deploy.onnx import compare_onnx, export_onnx  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

TYPE_RANGES = {  # ONNX integer types, smallest first (the generic preset's order)
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
}

SPACES = {
    "all": ElasticSpace(
        w_bits=(2, 3, 4, 8),
        a_bits=(2, 3, 4, 8),
        w_granularities=("tensor", "channel"),
        w_symmetries=("sym", "asym"),
        a_symmetries=("sym", "asym"),
    ),
    "trt": ElasticSpace(
        w_bits=(2, 4, 7),
        a_bits=(2, 4, 7),
        w_granularities=("channel",),
        w_symmetries=("sym",),
        a_symmetries=("sym",),
    ),
    "nested": ElasticSpace(
        w_bits=(2, 4, 8),
        a_bits=(4, 8),
        w_granularities=("tensor", "channel"),
        nested=True,
        a_symmetries=("asym",),
    ),
}


# --------------------------------------------------------------------------------------------
# Fixtures: calibrated digits supernets with non-trivial BatchNorm


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x[:1437], x[1437:]  # train / test split (360 test images)


def _make(space_key, per_bit_bn=False, model="digits_cnn", shape=None):
    torch.manual_seed(0)
    space = SPACES[space_key]
    net = models.get(model)
    train, test = _digits() if model == "digits_cnn" else (None, None)
    if train is None:
        train = torch.randn(256, *shape[1:])
        test = torch.randn(300, *shape[1:])
    sn = eqnet.convert(net, space, keep_first_last="elastic", per_bit_bn=per_bit_bn)
    loader = [(train[i : i + 128], None) for i in range(0, 256, 128)]
    eqnet.calibrate(sn, loader, batches=2, method="lsq")
    eqnet.recalibrate_bn(sn, loader, batches=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in sn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.weight[0] = -m.weight[0]  # a negative BN factor (folding flips codes)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return sn.eval(), test


@pytest.fixture(scope="module")
def nets():
    cache = {}

    def get(key, per_bit_bn=False):
        if (key, per_bit_bn) not in cache:
            cache[(key, per_bit_bn)] = _make(key, per_bit_bn)
        return cache[(key, per_bit_bn)]

    return get


# --------------------------------------------------------------------------------------------
# Independent references


def _oracle_codes(w, p):
    """Integer weight codes and the float64 value they stand for (DESIGN.md)."""
    w = w.detach().float()
    s = p.scale.detach().float()
    shape = [-1] + [1] * (w.dim() - 1) if p.axis is not None else []
    s = s.reshape(shape)
    v = (w * torch.reciprocal(s)).double()  # fl32(w * fl32(1/s)), then float64
    s64 = s.double()
    if p.nested:
        k = p.top_bits - p.bits
        q_n = torch.clamp(torch.round(v), p.quant_min, p.quant_max)
        q_b = torch.floor(q_n / 2**k)
        c = (1 - 2.0**-k) / 2
        return None, (q_b + c) * 2**k * s64
    z = (
        torch.round(p.zero_point.detach().double().reshape(shape))
        if p.zero_point is not None
        else 0
    )
    q = torch.clamp(torch.round(v) + z, p.quant_min, p.quant_max)
    return q - z, (q - z) * s64


def _inits(model):
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _onnx_weights(model):
    """layer -> float64 dequantized weight, decoded from the graph's initializers (DQ of
    integer codes, or QuantizeLinear of float weights evaluated here, then DQ)."""
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if not node.name.endswith(".weight/DequantizeLinear"):
            continue
        src, scale, zp = node.input
        s = inits[scale].astype(np.float64)
        z = inits[zp].astype(np.int64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        per_channel = [-1] + [1] * (len(model_shape := _init_shape(model, node, producers)) - 1)
        sb = s.reshape(per_channel) if s.ndim else s
        zb = z.reshape(per_channel) if z.ndim else z
        if src in inits:
            codes = inits[src].astype(np.int64)
        else:
            x = inits[producers[src].input[0]].astype(np.float64)
            lo, hi = TYPE_RANGES[_dtype_name(model, zp)]
            codes = np.clip(np.round(x / sb) + zb, lo, hi).astype(np.int64)  # half to even
        assert codes.shape == model_shape
        if s.ndim:
            assert axis == 0
        out[node.name.rsplit(".weight/", 1)[0]] = (codes - zb) * sb
    return out


def _init_shape(model, dq, producers):
    src = dq.input[0]
    if src in producers:
        src = producers[src].input[0]
    return tuple(next(t.dims for t in model.graph.initializer if t.name == src))


def _dtype_name(model, init_name):
    t = next(t for t in model.graph.initializer if t.name == init_name)
    return onnx.TensorProto.DataType.Name(t.data_type).lower()


def _expected_act(preset, layer, choice, int4=False):
    p = layer.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    z = 0 if p.zero_point is None else int(torch.round(p.zero_point).item())
    lo, hi = min(p.quant_min, z), max(p.quant_max, z)
    if preset == "snpe":
        return "uint8", p.quant_max - p.quant_min != 255
    if preset == "tensorrt":
        return "int8", (p.quant_min, p.quant_max) != (-128, 127)
    name = next(
        n
        for n, (a, b) in TYPE_RANGES.items()
        if a <= lo and hi <= b and (int4 or "4" not in n)  # int4 containers are opt-in
    )
    return name, (p.quant_min, p.quant_max) != TYPE_RANGES[name]


def _count(model, op):
    return sum(n.op_type == op for n in model.graph.node)


def _check_agreement(sn, cfg, path, inputs):
    r = compare_onnx(sn, cfg, path, inputs)
    assert r["max_abs_output"] > 1e-3, r  # a live network, so agreement means something
    assert r["top1_agreement"] >= 0.999, r
    assert r["samples_close"] >= 0.99, r
    assert r["mean_abs_diff"] <= 5e-4 * r["max_abs_output"], r
    return r


# --------------------------------------------------------------------------------------------
# End to end: every preset, uniform and mixed configs


def _config(kind, space, sn, preset, fold_bn=None):
    if kind == "uniform8":
        forms = {
            "generic": ("channel", "asym", "asym"),
            "snpe": ("tensor", "asym", "asym"),
        }[preset]
        return SubnetConfig.uniform(space, sn, 8, 8, *forms)
    if kind == "uniform4":
        return SubnetConfig.uniform(
            space, sn, 4, 4, space.w_granularities[-1], space.w_symmetries[0], "sym"
        )
    g = torch.Generator().manual_seed(7)
    cfg = SubnetConfig.random(space, sn, g)
    for name, _ in list(cfg):
        if preset == "snpe":  # per-tensor weights only
            cfg = cfg.replace(name, w_granularity="tensor")
        if fold_bn == "scale":  # BN's per-channel factor needs per-channel weight scales
            cfg = cfg.replace(name, w_granularity="channel")
    return cfg


CASES = [
    ("all", False, "generic", "uniform8", {}),
    ("all", False, "generic", "mixed", {}),
    ("all", False, "generic", "mixed", {"int4": True}),
    ("all", False, "generic", "mixed", {"fold_bn": "affine"}),
    ("all", False, "snpe", "uniform8", {}),
    ("all", False, "snpe", "mixed", {}),
    ("trt", False, "tensorrt", "uniform4", {}),
    ("trt", False, "tensorrt", "mixed", {}),
    ("trt", True, "tensorrt", "mixed", {}),
    ("trt", True, "generic", "mixed", {"fold_bn": "affine", "weight_format": "qdq"}),
    ("nested", False, "generic", "mixed", {}),
    ("nested", True, "generic", "mixed", {"fold_bn": "scale"}),
]


@pytest.mark.parametrize("space_key,per_bit_bn,preset,kind,kw", CASES)
def test_export_reproduces_fake_quant(nets, tmp_path, space_key, per_bit_bn, preset, kind, kw):
    sn, test = nets(space_key, per_bit_bn)
    cfg = _config(kind, SPACES[space_key], sn, preset, kw.get("fold_bn"))
    path = tmp_path / "m.onnx"
    model = export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset=preset, **kw)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if not kw.get("int4"):  # the default containers load under ORT's default options
        default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        default.run(None, {"input": test[:2].numpy()})

    layers = sn.quantized_layers()
    fold_bn = kw.get("fold_bn", "scale" if preset == "tensorrt" else "keep")
    qdq_weights = kw.get("weight_format", "qdq" if preset == "tensorrt" else "dq") == "qdq"
    n = len(layers)
    # Exactly one Q + DQ per input activation, one DQ (+ Q for float weights) per weight.
    assert _count(model, "QuantizeLinear") == n + (n if qdq_weights else 0)
    assert _count(model, "DequantizeLinear") == 2 * n
    assert _count(model, "BatchNormalization") == (3 if fold_bn == "keep" else 0)

    meta = {p.key: p.value for p in model.metadata_props}
    recorded = json.loads(meta["eqnet.layers"])
    assert meta["eqnet.preset"] == preset and meta["eqnet.fold_bn"] == fold_bn
    assert SubnetConfig.from_json(meta["eqnet.config"]) == cfg
    clips = {n.name.rsplit(".input/", 1)[0] for n in model.graph.node if n.op_type == "Clip"}
    for name, layer in layers.items():
        container, clip = _expected_act(preset, layer, cfg[name], kw.get("int4", False))
        assert recorded[name]["activation"]["container"] == container, name
        assert recorded[name]["activation"]["clip"] == clip, name
        assert (name in clips) == clip, name
        if preset == "tensorrt":
            assert recorded[name]["weight"]["container"] == "int8"
        if preset == "snpe":
            assert recorded[name]["weight"]["container"] == "uint8"

    # Weights: the graph's integer codes dequantize to the oracle's values (float64).
    decoded = _onnx_weights(model)
    assert set(decoded) == set(layers)
    for name, layer in layers.items():
        c = cfg[name]
        p = layer.weight_quantizer.params(c.w_bits, c.w_granularity, c.w_symmetry)
        _, expected = _oracle_codes(layer.weight, p)
        got = torch.from_numpy(decoded[name])
        bn = _bn_after(sn, name, c.w_bits)
        if fold_bn == "scale" and bn is not None:
            a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            expected = expected * a.reshape([-1] + [1] * (expected.dim() - 1))
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        else:
            assert torch.equal(got, expected), name

    _check_agreement(sn, cfg, path, test)


def _bn_after(sn, layer_name, w_bits):
    """The BN that directly follows `layer_name` in the digits CNN (features.i -> i+1)."""
    parent, _, idx = layer_name.rpartition(".")
    if not idx.isdigit():
        return None  # the classifier: no BN
    bn = sn.get_submodule(f"{parent}.{int(idx) + 1}")
    return bn.bns[str(w_bits)] if hasattr(bn, "bns") else bn


def test_low_widths_use_int4_or_clip(nets, tmp_path):
    sn, test = nets("all")
    space = SPACES["all"]
    cfg = SubnetConfig.uniform(space, sn, 3, 3, "channel", "sym", "asym")
    model = export_onnx(sn, cfg, tmp_path / "a.onnx", input_shape=(1, 1, 8, 8), int4=True)
    weights = [n for n in model.graph.node if n.name.endswith(".weight/DequantizeLinear")]
    assert {_dtype_name(model, n.input[0]) for n in weights} == {"int4"}
    # 3-bit activations: int4/uint4 containers are wider, so every layer gets its Clip.
    assert _count(model, "Clip") == len(sn.quantized_layers())
    _check_agreement(sn, cfg, tmp_path / "a.onnx", test)

    model = export_onnx(sn, cfg, tmp_path / "b.onnx", input_shape=(1, 1, 8, 8), int4=False)
    types = {_dtype_name(model, t.name) for t in model.graph.initializer if "zero_point" in t.name}
    assert types <= {"int8", "uint8"}
    _check_agreement(sn, cfg, tmp_path / "b.onnx", test)
    r = compare_onnx(sn, cfg, tmp_path / "b.onnx", test, optimize=True)
    assert r["top1_agreement"] >= 0.99, r  # ORT's own integer fusions (informational bound)


def test_opset_17_uses_8bit_containers(nets, tmp_path):
    sn, test = nets("all")
    cfg = SubnetConfig.uniform(SPACES["all"], sn, 4, 4, "tensor", "asym", "asym")
    model = export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8), opset=17)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    meta = json.loads({p.key: p.value for p in model.metadata_props}["eqnet.layers"])
    assert {v["weight"]["container"] for v in meta.values()} <= {"int8", "uint8"}
    _check_agreement(sn, cfg, tmp_path / "m.onnx", test)


def test_nested_top_width_8_uses_int16_codes(nets, tmp_path):
    sn, _ = nets("nested")
    cfg = SubnetConfig.uniform(SPACES["nested"], sn, 4, 8, "channel", "sym", "asym")
    model = export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["eqnet.layers"])
    # 4 of 8 bits: codes 2^5 q_b + 15 span [-241, 239], beyond int8.
    assert {v["weight"]["container"] for v in meta.values()} == {"int16"}
    with pytest.raises(ValueError, match="fit none of snpe's weight types"):
        cfg_t = SubnetConfig.uniform(SPACES["nested"], sn, 4, 8, "tensor", "sym", "asym")
        export_onnx(sn, cfg_t, tmp_path / "s.onnx", input_shape=(1, 1, 8, 8), preset="snpe")


# --------------------------------------------------------------------------------------------
# Clear errors


def test_bad_arguments(nets, tmp_path):
    sn, _ = nets("all")
    space = SPACES["all"]
    cfg = SubnetConfig.uniform(space, sn, 8, 8, "channel", "sym", "sym")
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"preset='coreml'.*generic"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="coreml")
    with pytest.raises(ValueError, match="opset=12"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), opset=12)
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(sn, cfg, path, input_shape=(1, 0, 8, 8))
    with pytest.raises(ValueError, match="fold_bn='fuse'"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), fold_bn="fuse")
    with pytest.raises(ValueError, match="weight_format"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), weight_format="fp")
    with pytest.raises(ValueError, match="supernet"):
        export_onnx(torch.nn.Linear(2, 2), cfg, path, input_shape=(1, 2))
    bad = cfg.replace("model.fc", w_bits=5)
    with pytest.raises(ValueError, match=r"model.fc.*w_bits=5"):
        export_onnx(sn, bad, path, input_shape=(1, 1, 8, 8))
    assert not path.exists()


def test_presets_name_what_the_engine_cannot_take(nets, tmp_path):
    sn, _ = nets("all")
    space = SPACES["all"]
    path = tmp_path / "m.onnx"
    cfg = SubnetConfig.uniform(space, sn, 8, 8, "channel", "sym", "asym")
    with pytest.raises(ValueError, match=r"(?s)snpe.*w_granularity='channel'"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="snpe")
    with pytest.raises(ValueError, match=r"(?s)tensorrt.*a_symmetry='asym'"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="tensorrt")
    cfg = SubnetConfig.uniform(space, sn, 4, 4, "tensor", "asym", "sym")
    with pytest.raises(ValueError, match=r"w_granularity='tensor'.*\n.*w_symmetry='asym'"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="tensorrt")
    # 8-bit unsigned activations (after ReLU) need uint8: TensorRT takes int8 only.
    cfg = SubnetConfig.uniform(space, sn, 4, 8, "channel", "sym", "sym")
    with pytest.raises(ValueError, match=r"(?s)activation codes \[0, 255\].*\['int8'\]"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="tensorrt")
    with pytest.raises(ValueError, match=r"fold_bn='keep'.*tensorrt"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="tensorrt", fold_bn="keep")
    cfg = SubnetConfig.uniform(space, sn, 4, 4, "tensor", "sym", "sym")
    with pytest.raises(ValueError, match="fold_bn='scale' needs per-channel"):
        export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), fold_bn="scale")
    assert not path.exists()


def test_tensorrt_rejects_weight_code_minus_128(nets, tmp_path):
    space = ElasticSpace(
        w_bits=(8,), a_bits=(4,), w_granularities=("channel",), a_symmetries=("sym",)
    )
    sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="elastic").eval()
    x = _digits()[0][:128]
    eqnet.calibrate(sn, [(x, None)], batches=1)
    layer = sn.quantized_layers()["model.fc"]
    p = layer.weight_quantizer.params(8, "channel", "sym")
    with torch.no_grad():  # put one weight exactly on code -128 (full signed 8-bit range)
        layer.weight[0, 0] = -128 * p.scale[0]
    cfg = SubnetConfig.uniform(space, sn, 8, 4, "channel", "sym", "sym")
    with pytest.raises(ValueError, match=r"model.fc.*outside tensorrt's range \[-127, 127\]"):
        export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8), preset="tensorrt")
    export_onnx(sn, cfg, tmp_path / "g.onnx", input_shape=(1, 1, 8, 8), preset="generic")


# --------------------------------------------------------------------------------------------
# Larger models (slow)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["generic", "snpe", "tensorrt"])
def test_resnet20_small_input(tmp_path, preset):
    shape = (1, 3, 8, 8)
    key = "trt" if preset == "tensorrt" else "all"
    sn, test = _make(key, model="resnet20", shape=shape)
    space = SPACES[key]
    for kind in ("uniform4" if preset == "tensorrt" else "uniform8", "mixed"):
        cfg = _config(kind, space, sn, preset)
        path = tmp_path / f"{kind}.onnx"
        model = export_onnx(sn, cfg, path, input_shape=shape, preset=preset)
        n = len(sn.quantized_layers())
        assert _count(model, "DequantizeLinear") == 2 * n
        r = compare_onnx(sn, cfg, path, test)
        print(preset, kind, r)
        assert r["max_abs_output"] > 1e-3 and r["top1_agreement"] >= 0.99, r


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_export_onnx(tmp_path, capsys):
    from eqnet.cli import main

    run = tmp_path / "run"
    tiny = [
        "--limit-train", "96", "--limit-test", "64", "--holdout", "32", "--batch-size", "32",
        "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1",
        "--no-progress", "--epochs", "1", "--device", "cpu", "--w-bits", "2,4,8",
        "--a-bits", "4,8",
    ]  # fmt: skip
    assert main(["train", "--recipe", "multiquant", "--out", str(run), *tiny]) == 0
    out = tmp_path / "m.onnx"
    args = ["export-onnx", str(run), "--out", str(out), "--uniform", "4,8", "--check", "64"]
    assert main([*args, "--check-test"]) == 0
    random, test = (json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:])
    assert random["inputs"] == "random" and random["n"] == 64
    assert test["inputs"] == "test" and test["n"] == 64  # --limit-test 64
    assert random["top1_agreement"] >= 0.999 and test["top1_agreement"] >= 0.999
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    cfg = SubnetConfig.from_json(meta["eqnet.config"])
    elastic = [c for name, c in cfg if name not in ("model.features.0", "model.fc")]
    assert {(c.w_bits, c.a_bits) for c in elastic} == {(4, 8)}
    # The default space has per-channel weights: SNPE cannot take them.
    assert (
        main(["export-onnx", str(run), "--out", str(tmp_path / "s.onnx"), "--preset", "snpe"]) == 2
    )
    assert "w_granularity='channel', snpe takes tensor weights" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


def test_cli_export_onnx_reestimates_bn(tmp_path, capsys):
    """By default the subnet's BN statistics are re-estimated on the run's held-out split
    before export: the file then reproduces the subnet recalibrated by recalibrate_bn on those
    batches, and differs from an export of the stored (training-mix) statistics."""
    from eqnet.cli import main
    from eqnet.convert import recalibrate_bn
    from eqnet.data import eval_loader
    from eqnet.run import load_run

    run = tmp_path / "run"
    tiny = [
        "--limit-train", "160", "--limit-test", "64", "--holdout", "64", "--batch-size", "32",
        "--max-steps-per-epoch", "3", "--calib-batches", "1", "--bn-batches", "2",
        "--no-progress", "--epochs", "1", "--device", "cpu", "--w-bits", "2,4",
        "--a-bits", "4,8", "--lr", "0.05",
    ]  # fmt: skip
    assert main(["train", "--recipe", "multiquant", "--out", str(run), *tiny]) == 0
    paths = {n: tmp_path / f"{n}.onnx" for n in ("default", "stored")}
    base = ["export-onnx", str(run), "--uniform", "2,4"]
    assert main([*base, "--out", str(paths["default"])]) == 0
    assert "re-estimated the subnet's BN statistics on 2 batches" in capsys.readouterr().err
    assert main([*base, "--out", str(paths["stored"]), "--bn-batches", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "x.onnx"), "--bn-batches", "-1"]) == 2
    assert "--bn-batches=-1" in capsys.readouterr().err

    trained = load_run(run)
    data = trained.load_data(augment=False)
    x = torch.stack([data.test[i][0] for i in range(32)])
    sn = trained.model.eval()
    cfg = SubnetConfig.from_json(
        {p.key: p.value for p in onnx.load(paths["default"]).metadata_props}["eqnet.config"]
    )
    sn.set_config(cfg)
    with torch.no_grad():
        stored = sn(x).double()
    recalibrate_bn(sn, eval_loader(data.holdout, 32), batches=2)
    with torch.no_grad():
        recalibrated = sn(x).double()
    outs = {}
    opts = ort.SessionOptions()  # int4 graphs: see export_onnx's docstring
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0].name
        outs[name] = torch.from_numpy(session.run(None, {inp: x.numpy()})[0]).double()
    scale = recalibrated.abs().max()
    assert (outs["default"] - recalibrated).abs().max() < 0.05 * scale
    assert (outs["stored"] - stored).abs().max() < 0.05 * stored.abs().max()
    assert (recalibrated - stored).abs().max() > 0.2 * scale  # the statistics really moved


def test_float_first_and_last_layers(tmp_path):
    """keep_first_last='fp': the float conv's BN is fused by the exporter, the float layers get
    no QDQ, and TensorRT's BN folding still leaves no BatchNormalization."""
    torch.manual_seed(0)
    space = SPACES["trt"]
    sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="fp")
    train, test = _digits()
    eqnet.calibrate(sn, [(train[:128], None)], batches=1, method="lsq")
    eqnet.recalibrate_bn(sn, [(train[:128], None)], batches=1)
    sn.eval()
    cfg = SubnetConfig.uniform(space, sn, 4, 4, "channel", "sym", "sym")
    model = export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8), preset="tensorrt")
    assert len(sn.quantized_layers()) == 2
    assert _count(model, "DequantizeLinear") == 4 and _count(model, "BatchNormalization") == 0
    assert _count(model, "Conv") == 3 and _count(model, "Gemm") == 1
    _check_agreement(sn, cfg, tmp_path / "m.onnx", test)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["generic", "tensorrt"])
def test_mobilenet_v2_small_input(tmp_path, preset):
    shape = (1, 3, 32, 32)
    key = "trt" if preset == "tensorrt" else "all"
    sn, test = _make(key, model="torchvision:mobilenet_v2", shape=shape)
    cfg = _config("mixed", SPACES[key], sn, preset)
    for name, c in list(cfg):  # >= 4 bits: a random-init mobilenet dies at 2-3 bits
        cfg = cfg.replace(name, w_bits=max(c.w_bits, 4), a_bits=max(c.a_bits, 4))
    path = tmp_path / "m.onnx"
    model = export_onnx(sn, cfg, path, input_shape=shape, preset=preset)
    n = len(sn.quantized_layers())
    assert n == 53
    assert _count(model, "DequantizeLinear") == 2 * n
    assert _count(model, "BatchNormalization") == (0 if preset == "tensorrt" else 52)
    r = compare_onnx(sn, cfg, path, test[:100])
    print(preset, r)
    assert r["max_abs_output"] > 1e-3 and r["top1_agreement"] >= 0.99, r


class _SharedConv(torch.nn.Module):
    """One conv applied twice (weight sharing), then a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).flatten(1))


def test_layer_called_twice_gets_two_qdq(tmp_path):
    space = SPACES["all"]
    sn = eqnet.convert(_SharedConv(), space, keep_first_last="elastic").eval()
    train, test = _digits()
    eqnet.calibrate(sn, [(train[:128], None)], batches=1, method="lsq")
    cfg = SubnetConfig.uniform(space, sn, 4, 4, "channel", "sym", "asym")
    model = export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8))
    assert _count(model, "QuantizeLinear") == 3 and _count(model, "DequantizeLinear") == 6
    _check_agreement(sn, cfg, tmp_path / "m.onnx", test)


def test_fixed_first_and_last_layers_export_their_chosen_form(tmp_path):
    """keep_first_last='8bit' fixes the widths only: a config in SNPE's form (per-tensor
    asymmetric weights and activations) puts the fixed W8A8 layers in that form too, and
    the graph carries their codes in it."""
    torch.manual_seed(0)
    space = SPACES["all"]
    sn = eqnet.convert(models.get("digits_cnn"), space)
    train, test = _digits()
    eqnet.calibrate(sn, [(train[:128], None)], batches=1, method="lsq")
    sn.eval()
    cfg = SubnetConfig.uniform(space, sn, 4, 4, "tensor", "asym", "asym")
    layers = sn.quantized_layers()
    fixed = [n for n, m in layers.items() if m.fixed_choice is not None]
    assert len(fixed) == 2
    for name in fixed:
        assert cfg[name] == LayerChoice(8, 8, "tensor", "asym", "asym")
    path = tmp_path / "m.onnx"
    model = export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8), preset="snpe")
    meta = {p.key: p.value for p in model.metadata_props}
    assert SubnetConfig.from_json(meta["eqnet.config"]) == cfg
    decoded = _onnx_weights(model)
    for name in fixed:
        c = cfg[name]
        p = layers[name].weight_quantizer.params(c.w_bits, c.w_granularity, c.w_symmetry)
        _, expected = _oracle_codes(layers[name].weight, p)
        assert torch.equal(torch.from_numpy(decoded[name]), expected), name
    _check_agreement(sn, cfg, path, test)
