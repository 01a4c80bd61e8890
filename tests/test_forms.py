"""Deployment forms (eqnet.forms) and the narrow symmetric weight range of the tensorrt form."""

from __future__ import annotations

import eqnet
import numpy as np
import pytest
import torch
from eqnet import models
from eqnet.deploy.onnx_presets import PRESETS
from eqnet.forms import FORMS, get_form, parse_form, resolve_form, set_narrow_weights
from eqnet.nn import ElasticQuantizer
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig

ALL_FORMS = ElasticSpace(
    w_bits=(2, 3, 4, 8),
    a_bits=(2, 3, 4, 8),
    w_granularities=("channel", "tensor"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("asym", "sym"),
)


def test_named_forms_are_the_engines_forms():
    trt, snpe = FORMS["tensorrt"], FORMS["snpe"]
    assert (trt.w_granularity, trt.w_symmetry, trt.a_symmetry) == ("channel", "sym", "sym")
    assert trt.narrow_weights and trt.onnx_preset == "tensorrt"
    assert (snpe.w_granularity, snpe.w_symmetry, snpe.a_symmetry) == ("tensor", "asym", "asym")
    assert not snpe.narrow_weights and snpe.onnx_preset == "snpe"
    # every named form is one its ONNX preset accepts
    for form in FORMS.values():
        p = PRESETS[form.onnx_preset]
        assert form.w_granularity in p.w_granularities
        assert form.w_symmetry in p.w_symmetries and form.a_symmetry in p.a_symmetries
    assert PRESETS["tensorrt"].weight_code_range == (-127, 127)


def test_explicit_forms_and_errors():
    f = parse_form("channel/sym", "tensor/asym")
    assert (f.w_granularity, f.w_symmetry, f.a_symmetry) == ("channel", "sym", "asym")
    assert resolve_form(None, "tensor/asym", "tensor/sym").a_symmetry == "sym"
    assert resolve_form("snpe", None, None) is FORMS["snpe"]
    assert resolve_form(None, None, None) is None
    with pytest.raises(ValueError, match="w_form='channel'"):
        parse_form("channel", "tensor/asym")
    with pytest.raises(ValueError, match=r"a_form='channel/sym'.*tensor"):
        parse_form("channel/sym", "channel/sym")
    with pytest.raises(ValueError, match="go together"):
        resolve_form(None, "channel/sym", None)
    with pytest.raises(ValueError, match="not both"):
        resolve_form("tensorrt", "channel/sym", "tensor/sym")
    with pytest.raises(ValueError, match="target form 'tpu': accepted values are tensorrt, snpe"):
        get_form("tpu")


def test_apply_and_check_space():
    cfg = SubnetConfig(
        [
            ("a", LayerChoice(8, 8, "channel", "sym", "asym")),
            ("b", LayerChoice(3, 2, "channel", "asym", "sym")),
        ]
    )
    out = FORMS["snpe"].apply(cfg, elastic={"b"})
    assert out["a"] == cfg["a"]
    assert out["b"] == LayerChoice(3, 2, "tensor", "asym", "asym")
    assert all(FORMS["tensorrt"].holds(c) for _, c in FORMS["tensorrt"].apply(cfg))
    FORMS["tensorrt"].check_space(ALL_FORMS)
    narrow_space = ElasticSpace(a_symmetries=("asym",))
    with pytest.raises(ValueError, match=r"a_symmetry='sym'.*the space has \['asym'\]"):
        FORMS["tensorrt"].check_space(narrow_space)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_narrow_range_fake_quant_against_oracle(bits):
    torch.manual_seed(bits)
    q = ElasticQuantizer("weight", (bits,), ("channel",), ("sym", "asym"), channels=4)
    w = torch.randn(4, 6, dtype=torch.float32) * 2
    w[0, 0] = -(2 ** (bits - 1)) * 0.3  # exactly on the code the narrow range excludes
    with torch.no_grad():
        q.raw_parameters(bits, "channel", "sym")[0].copy_(torch.tensor([0.3, 0.5, 0.7, 1.1]))
    full = q(w, bits, "channel", "sym")
    q.narrow_range = True
    got = q(w, bits, "channel", "sym")
    # float64 reference: round half to even of w * fl32(1/s), clamped to the narrow range
    s = torch.tensor([0.3, 0.5, 0.7, 1.1], dtype=torch.float32)
    v = (w * torch.reciprocal(s)[:, None]).double()
    qmax = 2 ** (bits - 1) - 1
    expected = torch.clamp(torch.round(v), -qmax, qmax) * s.double()[:, None]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert float(full[0, 0]) == pytest.approx(-(2 ** (bits - 1)) * 0.3)
    p = q.params(bits, "channel", "sym")
    assert (p.quant_min, p.quant_max) == (-qmax, qmax)
    # asymmetric forms keep their range
    assert q.params(bits, "channel", "asym").quant_min == -(2 ** (bits - 1))


def test_set_narrow_weights_lets_tensorrt_export_code_minus_128(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from eqnet.deploy.onnx import export_onnx
    from onnx import numpy_helper

    space = ElasticSpace(
        w_bits=(8,), a_bits=(4,), w_granularities=("channel",), a_symmetries=("sym",)
    )
    torch.manual_seed(0)
    sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="elastic").eval()
    x = torch.randn(64, 1, 8, 8)
    eqnet.calibrate(sn, [(x, None)], batches=1)
    layer = sn.quantized_layers()["model.fc"]
    step = float(layer.weight_quantizer.params(8, "channel", "sym").scale[0])
    with torch.no_grad():
        layer.weight[0, 0] = -128 * step
    cfg = SubnetConfig.uniform(space, sn, 8, 4, "channel", "sym", "sym")
    with pytest.raises(ValueError, match="outside tensorrt's range"):
        export_onnx(sn, cfg, tmp_path / "full.onnx", input_shape=(1, 1, 8, 8), preset="tensorrt")
    assert set_narrow_weights(sn, True) == len(sn.quantized_layers())
    model = export_onnx(sn, cfg, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8), preset="tensorrt")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name.startswith("model.fc.weight/Quantize"))
    w, s = inits[node.input[0]], inits[node.input[1]]
    codes = torch.round(torch.from_numpy(w).double() / torch.from_numpy(s).double()[:, None])
    assert int(codes.min()) >= -127 and int(codes[0, 0]) == -127
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))


def test_choice_table_in_one_target_form():
    from eqnet.search.genome import ChoiceTable, layer_options

    for name, form in FORMS.items():
        opts = layer_options(ALL_FORMS, form=form)
        assert len(opts) == len(ALL_FORMS.w_bits) * len(ALL_FORMS.a_bits), name
        assert all(form.holds(c) for c in opts)
        assert {(c.w_bits, c.a_bits) for c in opts} == {
            (w, a) for w in ALL_FORMS.w_bits for a in ALL_FORMS.a_bits
        }
    sn = eqnet.convert(models.get("digits_cnn"), ALL_FORMS, keep_first_last="8bit")
    table = ChoiceTable.from_model(ALL_FORMS, sn, form=FORMS["snpe"])
    fixed = [n for n, f in zip(table.names, table.choices) if len(f) == 1]
    assert len(fixed) == 2  # first and last keep their fixed choice
    rng = np.random.default_rng(0)
    for g in table.uniform(rng, 20):
        cfg = table.decode(g)
        assert all(FORMS["snpe"].holds(c) for n, c in cfg if n not in fixed)
    with pytest.raises(ValueError, match="target form 'tensorrt' needs a_symmetry='sym'"):
        layer_options(ElasticSpace(a_symmetries=("asym",)), form=FORMS["tensorrt"])


def test_tensorrt_form_excludes_unsigned_8bit_activations():
    from eqnet.search.genome import ChoiceTable

    trt = FORMS["tensorrt"]
    assert trt.allows(LayerChoice(4, 8), act_signed=True)  # [-128, 127] fits int8
    assert not trt.allows(LayerChoice(4, 8), act_signed=False)  # [0, 255] does not
    assert trt.allows(LayerChoice(4, 7), act_signed=False)  # [0, 127] does
    assert FORMS["snpe"].allows(LayerChoice(4, 8), act_signed=False)
    sn = eqnet.convert(models.get("digits_cnn"), ALL_FORMS, keep_first_last="elastic")
    layers = sn.quantized_layers()
    first, rest = next(iter(layers)), list(layers)[1:]
    for name in rest:  # as calibration leaves them after a ReLU
        layers[name].act_quantizer.signed = False
    table = ChoiceTable.from_model(ALL_FORMS, sn, form=trt)
    opts = dict(zip(table.names, table.choices))
    assert 8 in {c.a_bits for c in opts[first]}
    for name in rest:
        assert {c.a_bits for c in opts[name]} == {2, 3, 4}
    snpe_table = ChoiceTable.from_model(ALL_FORMS, sn, form=FORMS["snpe"])
    snpe = dict(zip(snpe_table.names, snpe_table.choices))
    assert all(8 in {c.a_bits for c in snpe[n]} for n in rest)
    w8 = SubnetConfig.uniform(ALL_FORMS, sn, 8, 8, "channel", "sym", "sym")
    assert not trt.runs(w8, sn) and trt.runs(
        SubnetConfig.uniform(ALL_FORMS, sn, 4, 4, "channel", "sym", "sym"), sn
    )
