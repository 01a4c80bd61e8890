"""Per-group weights deployed: `.eqk` export -> load -> forward against a float64 reference
written here from DESIGN.md's equations, hostile `groups` fields, a file of the previous format
version, the layers the kernels cannot run yet (a clear NotImplementedError naming the layer),
and ONNX blocked DequantizeLinear under onnxruntime."""

from __future__ import annotations

import struct

import eqnet
import numpy as np
import pytest
import torch
from eqk_fuzzer import craft
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace, SubnetConfig
from torch import nn

from eqkernels import EqkFormatError
from eqkernels.format import read_eqk

G = 32
MID = "model.2"  # the elastic layer, weight [96, 64]: two groups per row


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(27, 64), nn.ReLU(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 5)
    )


def _supernet(space):
    net = eqnet.convert(_mlp(), space, example_input=torch.randn(2, 27))
    gen = torch.Generator().manual_seed(1)
    eqnet.calibrate(net, [(torch.randn(32, 27, generator=gen), None)], batches=1)
    return net.eval()


NESTED = ElasticSpace(
    w_bits=(2, 3, 4), a_bits=(None,), w_granularities=("channel", "group"), group_size=G,
    nested=True,
)  # fmt: skip
ASYM = ElasticSpace(
    w_bits=(3, 4), a_bits=(None,), w_granularities=("group",), w_symmetries=("asym",),
    group_size=G,
)  # fmt: skip


# -- float64 reference ----------------------------------------------------------------------------
def _codes(w, s, z, qmin, qmax):
    """clamp(rne(fl32(w * fl32(1/s))) + rne(z)) per row (s, z broadcast over w's columns)."""
    v = (w.float() * torch.reciprocal(s.float())).double()
    return torch.clamp(torch.round(v) + torch.round(z.double()), qmin, qmax)


def reference_weight(layer, choice) -> torch.Tensor:
    """The float64 dequantized weight [N, K] of one layer at `choice`, from the equations: per
    group of G columns (per channel for a layer that keeps channel scales), nested widths from
    the top-width codes (q_b = floor(q_n / 2^k), (q_b + c_k) 2^k s)."""
    wq = layer.weight_quantizer
    scale, zp = wq.raw_parameters(choice.w_bits, choice.w_granularity, choice.w_symmetry)
    n = layer.weight.shape[0]
    w = layer.weight.detach().reshape(n, -1)
    s = scale.detach().reshape(n, -1)  # [N, K/g] or [N, 1]
    cols = w.shape[1] // s.shape[1]
    wg = w.reshape(n, s.shape[1], cols)
    s3 = s[..., None]
    if wq.nested:
        top = wq.top_bits
        q = _codes(wg, s3, torch.zeros(()), -(2 ** (top - 1)), 2 ** (top - 1) - 1)
        k = top - choice.w_bits
        q_b = torch.floor(q / 2**k)
        deq = (q_b + (1 - 2.0**-k) / 2) * 2**k * s3.double()
    else:
        b = choice.w_bits
        z = torch.zeros(()) if zp is None else zp.detach().reshape(n, -1)[..., None]
        q = _codes(wg, s3, z, -(2 ** (b - 1)), 2 ** (b - 1) - 1)
        deq = (q - torch.round(z.double())) * s3.double()
    return deq.reshape(n, -1)


def reference_forward(net, cfg, x) -> torch.Tensor:
    """The MLP at `cfg` in float64 (float activations: no activation quantizer)."""
    h = x.double()
    for i in (0, 2, 4):
        layer = net.model[i]
        h = h @ reference_weight(layer, cfg[f"model.{i}"]).T + layer.bias.detach().double()
        if i < 4:
            h = torch.relu(h)
    return h


# -- export -> load -> forward --------------------------------------------------------------------
@pytest.mark.parametrize("space", [NESTED, ASYM], ids=["nested", "asym"])
def test_per_group_export_load_forward_equals_reference(space, tmp_path):
    net = _supernet(space)
    path = tmp_path / "g.eqk"
    header = export(net, path)
    assert header["version"] == [1, 2]
    assert set(header["groups"]) == {f"w/{MID}/{k}/planes" for k in _group_keys(space)} | {
        f"w/model.4/{k}/planes" for k in _group_keys(space, fixed=True)
    }
    x = torch.randn(6, 27, generator=torch.Generator().manual_seed(2))
    for bits in space.w_bits:
        cfg = SubnetConfig.uniform(space, net, bits, None, "group", space.w_symmetries[0])
        deployed = load(path, config=cfg, model=_mlp())
        layer = deployed.int_layers()[MID]
        assert layer.group_size == G and tuple(layer.scale.shape) == (96, 2)
        # the first layer (K = 27) keeps per-channel scales for its group form
        assert deployed.int_layers()["model.0"].group_size is None
        net.set_config(cfg)
        with torch.no_grad():
            got, fake = deployed(x), net(x)
        want = reference_forward(net, cfg, x)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, fake, rtol=1e-5, atol=1e-5)
        reference_op = load(path, config=cfg, model=_mlp(), backend="torch")
        with torch.no_grad():
            torch.testing.assert_close(reference_op(x).double(), want, rtol=1e-5, atol=1e-5)


def _group_keys(space, fixed=False):
    if fixed:  # the fixed last layer (K = 96) stores its group forms at 8 bits
        return [f"w8-group-{s}" for s in space.w_symmetries]
    if space.nested:
        return ["nested-group"]
    return [f"w{b}-group-{s}" for b in space.w_bits for s in space.w_symmetries]


def test_nested_prefix_load_reads_group_scales_in_section_0(tmp_path):
    net = _supernet(NESTED)
    path = tmp_path / "n.eqk"
    export(net, path)
    f = read_eqk(path, max_bits=2)
    scale, zp, g = f.group_scales(f"w/{MID}/nested-group/planes")
    assert g == G and zp is None and tuple(scale.shape) == (96, 2)
    want = net.model[2].weight_quantizer.raw_parameters(4, "group", "sym")[0].detach()
    assert torch.equal(scale, want)
    assert f.planes(f"w/{MID}/nested-group/planes").shape == (2, 96, 2)


# -- what the kernels cannot run yet ---------------------------------------------------------------
def test_integer_activation_or_conv_group_layers_refuse_at_load(tmp_path):
    space = ElasticSpace(w_bits=(4,), a_bits=(8,), w_granularities=("group",), group_size=G)
    path = tmp_path / "int.eqk"
    export(_supernet(space), path)
    try:
        deployed = load(path, bits=4, model=_mlp())
    except NotImplementedError as exc:
        assert "'model.2'" in str(exc) and "per-group" in str(exc)
    else:  # the kernel runs integer activations with group scales: it must be exact
        net = _supernet(space)
        x = torch.randn(4, 27)
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), net(x), rtol=1e-4, atol=1e-4)
    space = ElasticSpace(w_bits=(4,), a_bits=(None,), w_granularities=("group",), group_size=G)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 2), nn.Flatten(), nn.Linear(64, 4))
    sn = eqnet.convert(conv, space, example_input=torch.randn(1, 3, 7, 7))
    eqnet.calibrate(sn, [(torch.randn(4, 3, 7, 7), None)], batches=1)
    export(sn.eval(), tmp_path / "conv.eqk")
    try:
        deployed = load(tmp_path / "conv.eqk", bits=4, model=conv)
    except NotImplementedError as exc:
        assert "'model.1'" in str(exc) and "per-group" in str(exc)
    else:  # the conv kernel takes per-group scales: it must match the fake-quant subnet
        x = torch.randn(2, 3, 7, 7)
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), sn(x), rtol=1e-5, atol=1e-5)


# -- hostile group fields ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asym_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("groups") / "a.eqk"
    export(_supernet(ASYM), path)
    return path


def _craft(path, tmp_path, edit_header=None, edit_data=None):
    return craft(path, tmp_path / "crafted.eqk", edit_header, edit_data)


PLANES = f"w/{MID}/w4-group-asym/planes"


def _group(header):
    return header["groups"][PLANES]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: _group(h).update(group_size=48), r"group_size.*multiple of 32"),
        (lambda h: _group(h).update(group_size=96), r"group_size.*dividing K=64"),
        (lambda h: _group(h).update(group_size=16), r"group_size.*expected an int in \[32"),
        (lambda h: _group(h).update(group_size=True), r"group_size"),
        (lambda h: _group(h).update(K=128), r"\.K.*int32\[N, 4\]"),
        (lambda h: _group(h).update(K=2**40), r"\.K"),
        (lambda h: _group(h).update(scale="nope"), r"\.scale.*names no tensor"),
        (lambda h: _group(h).update(scale=f"bias/{MID}"), r"\.scale.*float32\[96, 2\]"),
        (lambda h: _group(h).update(zero_point=_group(h)["scale"]), r"zero_point.*int32"),
        (lambda h: _group(h).pop("scale"), r"missing key 'scale'"),
        (lambda h: h["groups"].update({"ghost/planes": _group(h)}), r"no tensor 'ghost/planes@"),
        (lambda h: h.update(groups=[1]), r"header.groups"),
        (lambda h: h.update(version=[1, 1]), r"groups.*version 1.2"),
        (lambda h: h["groups"].pop(PLANES), r"groups record"),
        (
            lambda h: h["quant"]["layers"][MID]["weights"]["w4-group-asym"].update(group_size=64),
            r"w4-group-asym",
        ),
        (
            lambda h: h["quant"]["layers"][MID]["weights"]["w4-group-asym"].pop("group_size"),
            r"needs 'group_size'",
        ),
        (  # the fixed first layer (K = 27) stores per-channel scales under its group key
            lambda h: h["quant"]["layers"]["model.0"]["weights"]["w8-group-asym"].update(
                group_size=32
            ),
            r"group_size: 32 does not divide K=27",
        ),
    ],
)  # fmt: skip
def test_hostile_group_fields_are_refused(asym_file, tmp_path, edit, match):
    crafted = _craft(asym_file, tmp_path, edit)
    with pytest.raises(EqkFormatError, match=match):
        load(crafted, model=_mlp())


def _set(name, value, fmt="<f", index=1):
    def edit(header, data):
        entry = next(t for t in header["tensors"] if t["name"] == name)
        start = header["sections"][entry["section"]]["offset"] + entry["offset"] + 4 * index
        struct.pack_into(fmt, data, start, value)

    return edit


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0, 1e-40])
def test_hostile_group_scale_values_are_refused(asym_file, tmp_path, value):
    name = f"w/{MID}/w4-group-asym/scale"
    crafted = _craft(asym_file, tmp_path, edit_data=_set(name, value))
    with pytest.raises(EqkFormatError, match=name):
        read_eqk(crafted)  # the format itself checks the group scales it reads


def test_hostile_group_zero_point_is_refused(asym_file, tmp_path):
    name = f"w/{MID}/w4-group-asym/zero_point"
    crafted = _craft(asym_file, tmp_path, edit_data=_set(name, 1 << 20, "<i"))
    with pytest.raises(EqkFormatError, match=name):
        read_eqk(crafted)


def test_previous_version_file_still_loads(tmp_path):
    """A 1.1 file (what the previous writer wrote: the same bytes, version [1, 1], no groups)
    loads and runs exactly as its 1.2 twin."""
    space = ElasticSpace(w_bits=(2, 4), a_bits=(None,), group_size=G)
    new = tmp_path / "new.eqk"
    export(_supernet(space), new)

    def to_1_1(h):
        assert "groups" not in h
        h["version"] = [1, 1]

    old = _craft(new, tmp_path, to_1_1)
    assert read_eqk(old).header["version"] == [1, 1]
    x = torch.randn(3, 27)
    with torch.no_grad():
        assert torch.equal(load(old, bits=2, model=_mlp())(x), load(new, bits=2, model=_mlp())(x))


# -- ONNX -------------------------------------------------------------------------------------------
def test_onnx_blocked_dequantize_linear_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from eqnet.deploy.onnx import export_onnx, run_onnx

    net = _supernet(ASYM)
    cfg = SubnetConfig.uniform(ASYM, net, 3, None, "group", "asym")
    path = tmp_path / "g.onnx"
    model = export_onnx(net, cfg, path, input_shape=(1, 27), int4=True)
    blocked = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and {a.name: a.i for a in n.attribute}.get("block_size") == G
    ]
    assert len(blocked) == 2  # the elastic layer and the fixed last layer (K = 96)
    assert all({a.name: a.i for a in n.attribute}["axis"] == 1 for n in blocked)
    x = torch.randn(7, 27, generator=torch.Generator().manual_seed(4))
    got = run_onnx(path, x)
    net.set_config(cfg)
    want = reference_forward(net, cfg, x)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"per-group weights .* opset >= 21; got opset 20"):
        export_onnx(net, cfg, tmp_path / "old.onnx", input_shape=(1, 27), opset=20)
