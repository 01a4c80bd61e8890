"""Crafted .eqk files with valid CRCs: every hostile header value and every bad tensor value
is refused with EqkFormatError naming the field, layer or tensor; upgrade refuses another
export. Files are re-packed from the specification (tests/eqk_fuzzer.py), not by the writer."""

from __future__ import annotations

import hashlib
import struct

import eqnet
import pytest
import torch
from eqk_fuzzer import craft, repack, reseal, split
from eqnet import models
from eqnet.deploy import export, load
from eqnet.space import ElasticSpace
from torch import nn

from eqkernels import EqkFormatError
from eqkernels.format import read_eqk

SPACE = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 4, 8), nested=True)
CONV = "model.features.3"  # an elastic conv followed by a per-bit BN
BN = "model.features.4"


def _supernet(bn_seed: int):
    torch.manual_seed(0)
    sn = eqnet.convert(models.get("digits_cnn"), SPACE, keep_first_last="8bit", per_bit_bn=True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen), torch.zeros(8))]
    eqnet.calibrate(sn, batches, batches=1)
    gen = torch.Generator().manual_seed(bn_seed)
    for m in sn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return sn.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    a, b = root / "a.eqk", root / "b.eqk"
    export(_supernet(1), a, arch="digits_cnn")
    export(_supernet(2), b, arch="digits_cnn")
    return a, b


def _craft(path, tmp_path, edit_header=None, edit_data=None, name="crafted.eqk"):
    return craft(path, tmp_path / name, edit_header, edit_data)


def _set_value(name: str, value: float, index: int = 0):
    def edit(header, data):
        entry = next(t for t in header["tensors"] if t["name"] == name)
        start = header["sections"][entry["section"]]["offset"] + entry["offset"] + 4 * index
        struct.pack_into("<f", data, start, value)

    return edit


def test_unmodified_craft_loads_identically(files, tmp_path):
    a, _ = files
    crafted = _craft(a, tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(load(crafted, bits=3)(x), load(a, bits=3)(x))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("stored_bits", 2**40, "stored_bits"),
        ("stored_bits", 3, "stored_bits"),
        ("stored_bits", 1, "stored_bits"),
        ("K", 10**9, "K"),
        ("N", 10**7, "N"),
        ("has_zero_point", True, "zero_point"),
    ],
)
def test_weight_form_fields(files, tmp_path, field, value, match):
    a, _ = files

    def edit(h):
        h["quant"]["layers"][CONV]["weights"]["nested-channel"][field] = value

    with pytest.raises(EqkFormatError, match=match):
        load(_craft(a, tmp_path, edit))


@pytest.mark.parametrize(
    "field, value",
    [
        ("kernel_size", [1, 1]),
        ("kernel_size", [5, 5]),
        ("stride", [2, 2]),
        ("padding", [10**6, 10**6]),
        ("padding", [2, 2]),
        ("dilation", [2, 2]),
        ("groups", 2),
        ("has_bias", True),
        ("bn", None),
        ("in_channels", 10**7),
    ],
)
def test_layer_geometry_must_equal_the_module(files, tmp_path, field, value):
    a, _ = files

    def edit(h):
        h["model"]["layers"][CONV][field] = value

    with pytest.raises(EqkFormatError, match=field if field != "bn" else "bn|BN"):
        load(_craft(a, tmp_path, edit))


@pytest.mark.parametrize("classes", [10**7, 2 * 10**8, 11, 0])
def test_declared_class_count_must_match_tensors(files, tmp_path, classes):
    a, _ = files

    def edit(h):
        h["model"]["arch"]["kwargs"]["num_classes"] = classes

    with pytest.raises(EqkFormatError, match=r"num_classes|out_features"):
        load(_craft(a, tmp_path, edit))


def test_overflowing_shape_is_refused_by_the_reader(files, tmp_path):
    a, _ = files

    def edit(h):
        h["tensors"][0]["shape"], h["tensors"][0]["nbytes"] = [2**62, 2**62, 0], 0

    with pytest.raises(EqkFormatError, match="shape"):
        read_eqk(_craft(a, tmp_path, edit))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "tensor",
    [f"bn/{BN}/w2/mul", f"bn/{BN}/w3/add", "bias/model.fc", f"a/{CONV}/a4-asym/zero_point",
     f"w/{CONV}/nested-channel/scale", "a/model.fc/a8-asym/scale"],
)  # fmt: skip
def test_non_finite_values_are_refused(files, tmp_path, tensor, value):
    a, _ = files
    crafted = _craft(a, tmp_path, edit_data=_set_value(tensor, value))
    with pytest.raises(EqkFormatError, match=tensor.replace("*", r"\*")):
        load(crafted)


@pytest.mark.parametrize("value", [0.0, -0.5, 1e-45, 1e-40])
def test_scales_must_be_positive_normal(files, tmp_path, value):
    a, _ = files
    name = f"w/{CONV}/nested-channel/scale"
    with pytest.raises(EqkFormatError, match=name):
        load(_craft(a, tmp_path, edit_data=_set_value(name, value, index=3)))


def test_activation_range_must_be_the_bit_range(files, tmp_path):
    a, _ = files

    def edit(h):
        h["quant"]["layers"][CONV]["acts"]["a2-asym"]["quant_max"] = 2

    with pytest.raises(EqkFormatError, match="a2-asym"):
        load(_craft(a, tmp_path, edit))


def test_width_must_hold_its_config(files, tmp_path):
    a, _ = files

    def edit(h):
        h["widths"]["3"] = [0]

    with pytest.raises(EqkFormatError, match="widths"):
        load(_craft(a, tmp_path, edit), max_bits=3)


def test_prefix_load_checks_the_section_digest(files, tmp_path):
    a, _ = files
    header, data = split(a.read_bytes())
    data = bytearray(data)
    data[8] ^= 1  # section 0, then only its CRC is recomputed
    digests = header["digests"]
    reseal(header, data)
    header["digests"] = digests  # the stored digest of section 0 is the original one
    header["identity"] = hashlib.sha256(":".join(digests).encode()).hexdigest()
    crafted = tmp_path / "digest.eqk"
    crafted.write_bytes(repack(header, bytes(data)))
    with pytest.raises(EqkFormatError, match=r"section 0.*digest"):
        load(crafted, max_bits=2)


def test_identity_must_match_the_digests(files, tmp_path):
    a, _ = files
    header, data = split(a.read_bytes())
    header["identity"] = "0" * 64
    crafted = tmp_path / "identity.eqk"
    crafted.write_bytes(repack(header, data))
    with pytest.raises(EqkFormatError, match="identity"):
        read_eqk(crafted)


def test_upgrade_refuses_another_export(files):
    a, b = files
    assert read_eqk(a).header["model"] == read_eqk(b).header["model"]  # same run, other BN
    small = load(a, max_bits=2)
    with pytest.raises(EqkFormatError, match="another export"):
        small.upgrade(bits=4, source=b)
    small.upgrade(bits=4, source=a)
    assert sorted(small.eqk.sections_read) == [0, 1, 2]


def test_version_1_0_file_loads_whole_but_does_not_upgrade(files, tmp_path):
    a, _ = files
    header, data = split(a.read_bytes())
    del header["digests"], header["identity"]
    header["version"] = [1, 0]
    old = tmp_path / "old.eqk"
    old.write_bytes(repack(header, data))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(old, bits=4)(x), load(a, bits=4)(x))
    small = load(old, max_bits=2)
    with pytest.raises(EqkFormatError, match=r"1.0"):
        small.upgrade(bits=4, source=old)


def test_a_1_1_file_without_digests_is_refused(files, tmp_path):
    a, _ = files
    header, data = split(a.read_bytes())
    del header["digests"]
    crafted = tmp_path / "nodigest.eqk"
    crafted.write_bytes(repack(header, data))
    with pytest.raises(EqkFormatError, match="digests"):
        read_eqk(crafted)


def _forge(header_bytes: bytes) -> bytes:
    import zlib

    head = b"EQK1" + struct.pack("<Q", len(header_bytes)) + header_bytes
    return head + struct.pack("<I", zlib.crc32(header_bytes))


def test_header_object_count_is_bounded_before_parsing(tmp_path):
    from eqkernels.eqk.layout import MAX_JSON_CONTAINERS

    body = b'{"format":"eqk","extra":[' + b"[]," * MAX_JSON_CONTAINERS + b"[]]}"  # valid JSON
    path = tmp_path / "nested.eqk"
    path.write_bytes(_forge(body))
    with pytest.raises(EqkFormatError, match="JSON objects and arrays"):
        read_eqk(path)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda h: h.update(top_bits=9), "top_bits"),
        (lambda h: h["sections"].extend([{"offset": 0, "nbytes": 0}] * 4096), "sections"),
        (lambda h: h["tensors"][0].update(shape=[1] * 9, nbytes=4), "shape"),
        (lambda h: h["tensors"][0].update(name="x" * 2000), "name"),
        (lambda h: h.update(version=[1, "1"]), "version"),
        (lambda h: h["tensors"][0].update(dtype="complex64"), "dtype"),
        (lambda h: h["sections"][0].update(nbytes=-1), "nbytes"),
        (lambda h: h["widths"].update({"9": [0]}), "widths"),
        (lambda h: h["digests"].pop(), "digests"),
    ],
)
def test_out_of_bound_header_fields_name_the_field(files, tmp_path, edit, field):
    a, _ = files
    header, data = split(a.read_bytes())
    edit(header)
    crafted = tmp_path / "bound.eqk"
    crafted.write_bytes(repack(header, data))
    with pytest.raises(EqkFormatError, match=field):
        read_eqk(crafted)
