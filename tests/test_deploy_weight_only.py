"""Weight-only (a_bits=None) export: the .eqk file holds no activation form tensors, the
integer runtime runs the float-activation path and agrees with the fake-quant subnet; hostile
float-activation records are refused."""

from __future__ import annotations

import eqnet
import pytest
import torch
from eqk_fuzzer import repack, reseal, split
from eqnet import models
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from torch import nn

from eqkernels import EqkFormatError
from eqkernels.format import read_eqk

SPACE = ElasticSpace(w_bits=(2, 3, 4), a_bits=(None,), nested=True)
CONV = "model.features.3"


def _supernet(space):
    torch.manual_seed(0)
    sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="8bit", per_bit_bn=True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen), torch.zeros(8))]
    eqnet.calibrate(sn, batches, batches=1)
    for m in sn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return sn.eval()


@pytest.fixture(scope="module")
def weight_only_file(tmp_path_factory):
    sn = _supernet(SPACE)
    path = tmp_path_factory.mktemp("wonly") / "w.eqk"
    export(sn, path, arch="digits_cnn")
    return sn, path


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_runtime_matches_fake_quant(weight_only_file, bits):
    sn, path = weight_only_file
    header = read_eqk(path).header
    assert not any(t["name"].startswith("a/") for t in header["tensors"])
    assert all(set(ql["acts"]) == {"float"} for ql in header["quant"]["layers"].values())
    deployed = load(path, bits=bits)
    cfg = deployed.active_config
    assert {c.a_bits for _, c in cfg} == {None}
    assert cfg["model.features.0"] == LayerChoice(8, None)  # fixed edge layer: W8, float A
    sn.set_config(cfg)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = deployed(x).double(), sn(x).double()
    # no activation rounding: only fp32 summation order differs
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_mixed_float_and_integer_activations(tmp_path):
    space = ElasticSpace(w_bits=(3, 4), a_bits=(8, None))
    sn = _supernet(space)
    layers = list(sn.quantized_layers())
    cfg = SubnetConfig.uniform(space, sn, 4, 8)
    cfg = cfg.replace(layers[1], a_bits=None)
    path = tmp_path / "mixed.eqk"
    export(sn, path, configs={"mix": cfg}, arch="digits_cnn")
    deployed = load(path, config="mix")
    assert deployed.active_config == cfg
    sn.set_config(cfg)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, ref = deployed(x).double(), sn(x).double()
    # 8-bit activations: a float tie may flip one code; logits stay within a few steps
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)
    assert (got.argmax(1) == ref.argmax(1)).all()


def _craft(path, tmp_path, edit_header):
    header, data = split(path.read_bytes())
    edit_header(header)
    data = bytearray(data)
    reseal(header, data)
    out = tmp_path / "crafted.eqk"
    out.write_bytes(repack(header, bytes(data)))
    return out


def test_unmodified_craft_loads(weight_only_file, tmp_path):
    _, path = weight_only_file
    load(_craft(path, tmp_path, lambda h: None), bits=2)


@pytest.mark.parametrize(
    "form", [{"float": False}, {"float": 1}, {"quant_min": 0, "quant_max": 3}, "float"]
)
def test_malformed_float_form_is_refused(weight_only_file, tmp_path, form):
    _, path = weight_only_file

    def edit(h):
        h["quant"]["layers"][CONV]["acts"]["float"] = form

    with pytest.raises(EqkFormatError, match="float"):
        load(_craft(path, tmp_path, edit))


def test_float_form_under_an_integer_key_is_refused(weight_only_file, tmp_path):
    _, path = weight_only_file

    def edit(h):
        acts = h["quant"]["layers"][CONV]["acts"]
        acts["a4-asym"] = acts.pop("float")

    with pytest.raises(EqkFormatError, match="a4-asym"):
        load(_craft(path, tmp_path, edit))


@pytest.mark.parametrize("space", [SPACE, ElasticSpace(w_bits=(3, 4), a_bits=(None,))])
def test_onnx_writes_weight_dq_only_and_matches_fake_quant(space, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from eqnet.deploy.onnx import export_onnx

    sn = _supernet(space)
    cfg = SubnetConfig.random(space, sn, torch.Generator().manual_seed(5))
    path = tmp_path / "w.onnx"
    export_onnx(sn, cfg, path, input_shape=(1, 1, 8, 8))
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 0  # no activation Q/DQ
    assert ops.count("DequantizeLinear") == len(cfg)  # one weight DQ per quantized layer
    session = ort.InferenceSession(str(path), ort.SessionOptions())
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    sn.set_config(cfg)
    with torch.no_grad():
        ref = sn(x).double()
    got = torch.from_numpy(got).double()
    # float activations: only the summation order (and optimizer fusions) differ
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
