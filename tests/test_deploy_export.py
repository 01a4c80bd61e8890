"""eqnet.export / eqnet.load: round trips, file layout, prefix loading, upgrade, corruption.

The oracles here are written from the equations (DESIGN.md "Quantization math", "Bit planes"):
weight codes in float64 from `fl32(w * fl32(1/s))`, the planes decoded bit by bit in Python,
BN in float64. The deployed model's logits are compared with the fake-quant subnet it came from.
"""

from __future__ import annotations

import copy
import os

import eqnet
import pytest
import torch
from eqnet import models
from eqnet.deploy import export, load
from eqnet.deploy.fold import bn_affine, fold_affine
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from torch import nn

from eqkernels import EqkFormatError
from eqkernels.format import read_eqk

ARCH = "digits_cnn"


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics (negative gammas included) so folding is exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 2.5 - 1)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 2 - 1)


def _supernet(space, keep_first_last="8bit", per_bit_bn=True, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = models.get(ARCH)
    sn = eqnet.convert(model, space, keep_first_last=keep_first_last, per_bit_bn=per_bit_bn)
    batches = [(torch.randn(16, 1, 8, 8, generator=gen), torch.zeros(16)) for _ in range(2)]
    eqnet.calibrate(sn, batches, batches=2, method="lsq")
    # Per-bit BN: every width its own statistics.
    for m in sn.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(nn.Sequential(m), gen)
    return sn.eval()


def _fake_quant_logits(sn, cfg, x):
    sn.set_config(cfg)
    with torch.no_grad():
        return sn(x).double()


NESTED = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 4, 8), nested=True)
FLAT = ElasticSpace(
    w_bits=(2, 4, 8),
    a_bits=(4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("sym", "asym"),
)


@pytest.fixture(scope="module")
def nested_file(tmp_path_factory):
    sn = _supernet(NESTED)
    gen = torch.Generator().manual_seed(3)
    mixed = SubnetConfig.random(NESTED, sn, gen)
    path = tmp_path_factory.mktemp("eqk") / "nested.eqk"
    export(sn, path, configs={"mixed": mixed}, arch=ARCH)
    return sn, path, mixed


def _decode_planes_oracle(planes: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """q_b = -2^(b-1) P_0 + sum_j 2^(b-1-j) P_j with bit t of word j = column 32 j + t."""
    _n, N, W = planes.shape
    out = torch.zeros(N, K, dtype=torch.int64)
    for j in range(bits):
        words = planes[j].to(torch.int64) & 0xFFFFFFFF
        bit = torch.stack([(words >> t) & 1 for t in range(32)], dim=-1).reshape(N, W * 32)[:, :K]
        out += (-(2 ** (bits - 1)) if j == 0 else 2 ** (bits - 1 - j)) * bit
    return out


def test_nested_planes_are_top_codes_and_prefix_is_floor(nested_file):
    sn, path, _ = nested_file
    f = read_eqk(path)
    for name, layer in sn.quantized_layers().items():
        if layer.fixed_choice is not None:
            continue
        p = layer.weight_quantizer.params(4, "channel", "sym")
        s = p.scale.detach().float().reshape(-1, 1, 1, 1) if p.axis == 0 else p.scale.float()
        w = layer.weight.detach().float()
        inv = (1.0 / s).float()
        v = (w * inv).double()  # fl32(w * fl32(1/s)), then exact
        q4 = torch.clamp(torch.round(v), -8, 7).reshape(w.shape[0], -1).to(torch.int64)
        planes = f.planes(f"w/{name}/nested-channel/planes")
        assert planes.shape[0] == 4
        K = q4.shape[1]
        for b in (2, 3, 4):
            expected = torch.div(q4, 2 ** (4 - b), rounding_mode="floor")
            assert torch.equal(_decode_planes_oracle(planes, b, K), expected), (name, b)


def test_nested_sections_follow_plane_order(nested_file):
    _, path, _ = nested_file
    header = read_eqk(path).header
    assert header["nested"] and header["top_bits"] == 4
    assert header["widths"] == {"2": [0], "3": [0, 1], "4": [0, 1, 2]}
    section = {t["name"]: t["section"] for t in header["tensors"]}
    for name, sec in section.items():
        if "/nested-" in name and "@plane" in name:
            plane = int(name.rsplit("@plane", 1)[1])
            assert sec == max(0, plane - 1), name  # lowest width 2: planes 0, 1 in section 0
        if name.startswith("bn/") and "/w" in name and not name.endswith(("w*/mul", "w*/add")):
            width = int(name.split("/w")[-1].split("/")[0])
            assert sec == width - 2, name  # a width's folded BN arrives with its last plane
        if name.startswith("float/"):
            assert sec == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nested_uniform_round_trip(nested_file, bits):
    sn, path, _ = nested_file
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(bits))
    deployed = load(path, bits=bits, backend="torch")
    cfg = deployed.active_config
    assert cfg == SubnetConfig.uniform(NESTED, sn, bits, bits if bits in NESTED.a_bits else 8)
    ref = _fake_quant_logits(sn, cfg, x)
    with torch.no_grad():
        got = deployed(x).double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_nested_mixed_config_any_of_the_space(nested_file):
    sn, path, mixed = nested_file
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    other = SubnetConfig.random(NESTED, sn, torch.Generator().manual_seed(11))  # not exported
    for cfg in (mixed, other, "mixed"):
        deployed = load(path, config=cfg, backend="torch")
        want = mixed if cfg == "mixed" else cfg
        with torch.no_grad():
            got = deployed(x).double()
        torch.testing.assert_close(got, _fake_quant_logits(sn, want, x), atol=1e-4, rtol=1e-4)


def test_flat_mixed_configs_each_in_own_section(tmp_path):
    sn = _supernet(FLAT, keep_first_last="fp")
    cfgs = {
        f"m{i}": SubnetConfig.random(FLAT, sn, torch.Generator().manual_seed(20 + i))
        for i in range(3)
    }
    # One layer with asymmetric per-tensor weights for sure.
    first = next(n for n, c in cfgs["m0"])
    cfgs["m0"] = cfgs["m0"].replace(first, w_symmetry="asym", w_granularity="tensor")
    path = tmp_path / "flat.eqk"
    header = export(sn, path, configs=cfgs, arch=ARCH)
    assert not header["nested"]
    assert set(header["widths"]) == set(cfgs)
    for i, name in enumerate(cfgs):
        assert i + 1 in header["widths"][name]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    for name, cfg in cfgs.items():
        deployed = load(path, config=name, backend="torch")
        with torch.no_grad():
            got = deployed(x).double()
        torch.testing.assert_close(got, _fake_quant_logits(sn, cfg, x), atol=1e-4, rtol=1e-4)
    # A config whose forms were not exported is refused with the layer named.
    missing = SubnetConfig.uniform(FLAT, sn, 2, 4, "tensor", "asym", "sym")
    if all(missing != c for c in cfgs.values()):
        with pytest.raises(ValueError, match="not in the file"):
            load(path, config=missing, backend="torch")
    with pytest.raises(ValueError, match="max_bits"):
        load(path, config="m0", max_bits=4)


def test_flat_asym_weight_codes_match_oracle(tmp_path):
    sn = _supernet(FLAT, keep_first_last="fp")
    name, layer = next(iter(sn.quantized_layers().items()))
    with torch.no_grad():
        zp = layer.weight_quantizer.raw_parameters(4, "channel", "asym")[1]
        zp.copy_(torch.linspace(-3.4, 2.6, zp.numel()))
    cfg = SubnetConfig.uniform(FLAT, sn, 4, 8, "channel", "asym", "asym")
    path = tmp_path / "asym.eqk"
    export(sn, path, configs={"c": cfg}, arch=ARCH)
    f = read_eqk(path)
    p = layer.weight_quantizer.params(4, "channel", "asym")
    w = layer.weight.detach().float()
    inv = (1.0 / p.scale.detach().float()).reshape(-1, 1, 1, 1)
    z = torch.round(p.zero_point.detach().double()).reshape(-1, 1)
    q = torch.clamp(torch.round((w * inv).double()).reshape(w.shape[0], -1) + z, -8, 7)
    planes = f.planes(f"w/{name}/w4-channel-asym/planes")
    codes = _decode_planes_oracle(planes, 4, q.shape[1]).double()
    zero = f.tensors[f"w/{name}/w4-channel-asym/zero_point"].double().reshape(-1, 1)
    # The runtime computes with (codes - zero): equal to the fake quant's (q - z).
    assert torch.equal(codes - zero, q - z)


def test_bn_fold_matches_float64_batchnorm():
    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(7, eps=1e-3)
    _randomize_bn(nn.Sequential(bn), gen)
    bn.eval()
    conv_bias = torch.randn(7, generator=gen)
    x = torch.randn(3, 7, 4, 4, generator=gen, dtype=torch.float64)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    g, b = bn.weight.detach().double(), bn.bias.detach().double()
    view = (1, -1, 1, 1)
    expected = (x + conv_bias.double().view(view) - mean.view(view)) / torch.sqrt(
        var.view(view) + 1e-3
    ) * g.view(view) + b.view(view)
    mul, add = fold_affine(*bn_affine(bn), conv_bias)
    got = x * mul.double().view(view) + add.double().view(view)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefix_file_loads_and_upgrades_in_place(nested_file, tmp_path):
    sn, path, _ = nested_file
    header = read_eqk(path).header
    data = path.read_bytes()
    # End of section 0 (width 2): the prefix a device would have received. Layout: magic,
    # u64 header length H, header, CRC32, data from align64(12 + H + 4), each section + CRC32.
    full = load(path, bits=2, backend="torch")
    H = int.from_bytes(data[4:12], "little")
    data_start = (12 + H + 4 + 63) // 64 * 64
    sec0 = header["sections"][0]
    end0 = data_start + sec0["offset"] + sec0["nbytes"] + 4
    prefix = tmp_path / "prefix.eqk"
    prefix.write_bytes(data[:end0])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    small = load(prefix, max_bits=2, backend="torch")
    assert small.bytes_read <= end0
    assert sorted(small.eqk.sections_read) == [0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), full(x), atol=0, rtol=0)
    with pytest.raises(EqkFormatError):
        load(prefix, backend="torch")  # whole file required without max_bits
    with pytest.raises(EqkFormatError):
        load(prefix, max_bits=3, backend="torch")
    with pytest.raises(ValueError, match="upgrade"):
        small.configure(SubnetConfig.uniform(NESTED, sn, 4, 4))
    layers_before = dict(small.int_layers())
    small.upgrade(bits=4, source=path)
    assert dict(small.int_layers()) == layers_before  # same modules, switched in place
    assert sorted(small.eqk.sections_read) == [0, 1, 2]
    wide = load(path, bits=4, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(small(x), wide(x), atol=0, rtol=0)


def test_plane_bytes_scale_with_width(nested_file):
    _, path, _ = nested_file
    sizes = {b: load(path, bits=b, max_bits=b, backend="torch") for b in (2, 3, 4)}
    per_plane = sizes[4].plane_bytes() / 4
    for b, d in sizes.items():
        assert d.plane_bytes() == b * per_plane
    assert sizes[2].bytes_read < sizes[3].bytes_read < sizes[4].bytes_read


def test_corrupted_file_raises_format_error(nested_file, tmp_path):
    _, path, _ = nested_file
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.eqk"
    for offset in (2, 20, len(data) // 2, len(data) - 10):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x5A
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(EqkFormatError):
            eqnet.load(bad, bits=4)
    bad.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(EqkFormatError):
        eqnet.load(bad)


def test_bad_arguments(nested_file):
    _, path, _ = nested_file
    with pytest.raises(ValueError, match="bits=5"):
        load(path, bits=5)
    with pytest.raises(ValueError, match="at most one"):
        load(path, bits=2, config="mixed")
    with pytest.raises(ValueError, match="config"):
        load(path, config="nope")


def test_export_records_the_registered_arch_or_needs_the_model(nested_file, tmp_path):
    """A network from eqnet.models.get loads by name; a user's own network needs `model=`,
    and a model with other names or shapes is refused naming them."""
    sn, _, _ = nested_file
    export(sn, tmp_path / "reg.eqk")
    assert read_eqk(tmp_path / "reg.eqk").header["model"]["arch"]["name"] == "digits_cnn"
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sn.set_config(SubnetConfig.uniform(NESTED, sn, 4, 4))
    with torch.no_grad():
        want = sn(x)
        torch.testing.assert_close(load(tmp_path / "reg.eqk", bits=4)(x), want)
    user = models.get("digits_cnn")
    del user.eqnet_arch  # as a user's own module: no registered name
    usn = copy.deepcopy(sn)
    del usn.model.eqnet_arch
    export(usn, tmp_path / "user.eqk")
    assert read_eqk(tmp_path / "user.eqk").header["model"]["arch"] is None
    with pytest.raises(ValueError, match="model="):
        load(tmp_path / "user.eqk")
    deployed = load(tmp_path / "user.eqk", bits=4, model=user)
    assert type(user.fc) is nn.Linear  # the user's module is not changed
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), want)
    wider = models.get("digits_cnn", num_classes=7)
    with pytest.raises(ValueError, match=r"model.fc: the file has \{'out_features': 10\}"):
        load(tmp_path / "user.eqk", model=wider)
    renamed = nn.Sequential(*user.children())
    with pytest.raises(ValueError, match=r"model.features.0"):
        load(tmp_path / "user.eqk", model=renamed)
    with pytest.raises(ValueError, match="registered model name"):
        export(usn, tmp_path / "x.eqk", arch="os:system")
    assert not os.path.exists(tmp_path / "x.eqk")


def test_integer_layer_weight_read_names_the_bypass(nested_file):
    """A parent that reads `.weight` of an integer layer gets an error that says why (it would
    bypass the integer layer), not nn.Module's bare missing-attribute message; the layer's
    other attributes stay readable."""
    _, path, _ = nested_file
    deployed = load(path, bits=4)
    layer = next(iter(deployed.int_layers().values()))
    with pytest.raises(AttributeError, match="holds bit planes, not a float weight"):
        _ = layer.weight
    assert not hasattr(layer, "weight")
    assert layer.out_features > 0 and layer.planes is not None


def test_fixed_layers_stored_in_full_in_section_zero(nested_file):
    sn, path, _ = nested_file
    header = read_eqk(path).header
    section = {t["name"]: t["section"] for t in header["tensors"]}
    fixed = [n for n, m in sn.quantized_layers().items() if m.fixed_choice is not None]
    assert fixed
    for name in fixed:
        planes = [k for k in section if k.startswith(f"w/{name}/") and "@plane" in k]
        assert len(planes) == 8 and all(section[k] == 0 for k in planes)
    assert LayerChoice(8, 8, "channel", "sym", "asym") == sn.get_submodule(fixed[0]).fixed_choice
