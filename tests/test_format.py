"""Tests of the .eqk file format (eqkernels/format.py, docs/eqk-format.md).

The byte layout is re-derived here from the specification (magic, u64 header length, JSON, CRC,
64-byte aligned sections each followed by a CRC) so that prefix bounds and corruptions are
computed independently of the reader under test.
"""

import io
import json
import os
import random
import struct
import zlib

import pytest
import torch

from eqkernels import EqkFormatError
from eqkernels.format import (
    MAX_HEADER_BYTES,
    read_eqk,
    read_eqk_header,
    split_planes,
    write_eqk,
)

TOP_BITS = 4


def _spec_layout(blob: bytes):
    """(header, data_start, [(start, end_including_crc)]) from the spec, not from the reader."""
    (length,) = struct.unpack_from("<Q", blob, 4)
    header = json.loads(blob[12 : 12 + length])
    data_start = -(-(12 + length + 4) // 64) * 64
    spans = [
        (data_start + s["offset"], data_start + s["offset"] + s["nbytes"] + 4)
        for s in header["sections"]
    ]
    return header, data_start, spans


def _nested_model():
    """A small nested model: float tensors and scales in section 0 with plane 0, planes 1..3 in
    sections 1..3, per-width extras (BN statistics) beside the plane that width adds."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (5, 70), generator=g, dtype=torch.int32)
    words = (70 + 31) // 32
    # Canonical planes built here directly from the definition (bit t of word j = column 32j+t).
    planes = torch.zeros(TOP_BITS, 5, words, dtype=torch.int64)
    u = q & 0xF
    for p in range(TOP_BITS):
        bit = (u >> (TOP_BITS - 1 - p)) & 1
        for k in range(70):
            planes[p, :, k // 32] |= bit[:, k].to(torch.int64) << (k % 32)
    planes = (planes - ((planes >> 31) & 1) * (1 << 32)).to(torch.int32)  # wrap to int32
    per_plane = split_planes("fc.weight", planes)
    sections = [
        {
            "stem.weight": torch.randn(3, 4, 3, 3, generator=g),
            "stem.bias": torch.randn(3, generator=g).to(torch.bfloat16),
            "fc.scale": torch.rand(5, generator=g, dtype=torch.float64).to(torch.float16),
            "fc.bias": torch.tensor([], dtype=torch.float32),
            "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3) - 3,
            "scalar": torch.tensor(7, dtype=torch.int8),
            **per_plane[0],
        }
    ]
    for p in range(1, TOP_BITS):
        sections.append({**per_plane[p], f"bn{p + 1}.mean": torch.randn(5, generator=g)})
    sections[2]["codes_u8"] = torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8)
    return sections, planes, q


def _write_nested(path):
    sections, planes, q = _nested_model()
    write_eqk(
        path,
        sections=sections,
        model={"arch": "tiny", "kwargs": {"width": 5}},
        quant={"fc": {"top_bits": TOP_BITS}},
        nested=True,
        top_bits=TOP_BITS,
    )
    return sections, planes, q


def _all_tensors(sections):
    return {k: v for sec in sections for k, v in sec.items()}


def _assert_same(loaded: dict, expected: dict):
    assert set(loaded) == set(expected)
    for name, t in expected.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        # Byte equality (NaN-safe, exact for every dtype).
        a = got.contiguous().reshape(-1).view(torch.uint8)
        b = t.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


def _expected_for_sections(sections, indices):
    return {k: v for i in indices for k, v in sections[i].items()}


class CountingFile(io.RawIOBase):
    """A seekable file over bytes that records the furthest byte read and the bytes read."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.pos = 0
        self.furthest = 0
        self.total = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self.pos, 2: len(self.blob)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = len(self.blob) if n is None or n < 0 else min(len(self.blob), self.pos + n)
        data = self.blob[self.pos : end]
        self.pos = max(self.pos, end)
        self.furthest = max(self.furthest, end)
        self.total += len(data)
        return data


def test_round_trip_all_dtypes(tmp_path):
    path = tmp_path / "m.eqk"
    sections, planes, _ = _write_nested(path)
    f = read_eqk(path)
    _assert_same(f.tensors, _all_tensors(sections))
    assert f.model == {"arch": "tiny", "kwargs": {"width": 5}}
    assert f.quant == {"fc": {"top_bits": TOP_BITS}}
    assert f.nested and f.top_bits == TOP_BITS and f.bits == TOP_BITS
    assert f.sections_read == [0, 1, 2, 3]
    assert f.bytes_read <= os.path.getsize(path)
    assert torch.equal(f.planes("fc.weight"), planes)
    # Loaded tensors are owned and writable.
    f.tensors["stem.weight"].add_(1)


def test_header_layout_matches_spec(tmp_path):
    path = tmp_path / "m.eqk"
    _write_nested(path)
    blob = path.read_bytes()
    assert blob[:4] == b"EQK1"
    (length,) = struct.unpack_from("<Q", blob, 4)
    (crc,) = struct.unpack_from("<I", blob, 12 + length)
    assert crc == zlib.crc32(blob[12 : 12 + length])
    header, _, spans = _spec_layout(blob)
    assert header["version"][0] == 1 and header["nested"] is True
    assert header["widths"] == {"1": [0], "2": [0, 1], "3": [0, 1, 2], "4": [0, 1, 2, 3]}
    for start, end in spans:
        assert start % 64 == 0
        (stored,) = struct.unpack_from("<I", blob, end - 4)
        assert stored == zlib.crc32(blob[start : end - 4])
        for t in header["tensors"]:
            assert t["offset"] % 64 == 0
    assert spans[-1][1] == len(blob)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prefix_reads_no_byte_past_prefix(tmp_path, bits):
    path = tmp_path / "m.eqk"
    sections, _planes, q = _write_nested(path)
    blob = path.read_bytes()
    _, _, spans = _spec_layout(blob)
    prefix_end = spans[bits - 1][1]
    counter = CountingFile(blob)
    f = read_eqk(counter, max_bits=bits)
    assert counter.furthest <= prefix_end
    assert counter.total == f.bytes_read
    _assert_same(f.tensors, _expected_for_sections(sections, range(bits)))
    assert f.bits == bits
    # The loaded prefix decodes to floor(q / 2^(n-b)) (checked from the definition).
    got = f.planes("fc.weight")
    assert got.shape[0] == bits
    codes = torch.zeros(5, 70, dtype=torch.int64)
    for p in range(bits):
        bit = torch.stack(
            [(got[p, :, k // 32].to(torch.int64) >> (k % 32)) & 1 for k in range(70)], dim=1
        )
        codes = codes * 2 + bit
    codes = torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
    assert torch.equal(
        codes, torch.div(q.to(torch.int64), 2 ** (TOP_BITS - bits), rounding_mode="floor")
    )
    # The prefix alone (everything after it cut off) is a complete lower-width model.
    g = read_eqk(io.BytesIO(blob[:prefix_end]), max_bits=bits)
    _assert_same(g.tensors, f.tensors)


def test_max_bits_above_top_loads_everything_and_below_min_raises(tmp_path):
    path = tmp_path / "m.eqk"
    sections, _, _ = _write_nested(path)
    _assert_same(read_eqk(path, max_bits=8).tensors, _all_tensors(sections))
    with pytest.raises(ValueError, match="max_bits"):
        read_eqk(path, max_bits=0)


def test_upgrade_reads_only_new_sections(tmp_path):
    path = tmp_path / "m.eqk"
    sections, planes, _ = _write_nested(path)
    blob = path.read_bytes()
    _, _, spans = _spec_layout(blob)
    f = read_eqk(CountingFile(blob), max_bits=2)
    counter = CountingFile(blob)
    f.upgrade(counter, max_bits=3)
    (length,) = struct.unpack_from("<Q", blob, 4)
    # The header is re-read to check identity, then only section 2.
    assert counter.total == 12 + length + 4 + (spans[2][1] - spans[2][0])
    assert counter.furthest <= spans[2][1]
    assert f.sections_read == [0, 1, 2] and f.bits == 3
    _assert_same(f.tensors, _expected_for_sections(sections, range(3)))
    f.upgrade(path)
    assert torch.equal(f.planes("fc.weight"), planes)


def test_upgrade_from_another_file_raises(tmp_path):
    a, b = tmp_path / "a.eqk", tmp_path / "b.eqk"
    _write_nested(a)
    sections, _, _ = _nested_model()
    write_eqk(b, sections=sections, model={"arch": "other"}, nested=True, top_bits=TOP_BITS)
    f = read_eqk(a, max_bits=2)
    with pytest.raises(EqkFormatError, match="header differs"):
        f.upgrade(b, max_bits=4)


def test_non_nested_configs(tmp_path):
    path = tmp_path / "n.eqk"
    t = {
        "shared": {"emb": torch.randn(4, 3)},
        "w2": {"fc@2": torch.randint(-2, 2, (3, 3), dtype=torch.int8)},
        "w8": {"fc@8": torch.randint(-128, 128, (3, 3), dtype=torch.int8)},
    }
    write_eqk(
        path,
        sections=[t["shared"], t["w2"], t["w8"]],
        model={"layers": [{"type": "linear", "in": 3, "out": 3}]},
        nested=False,
        widths={"w2a8": [0, 1], "w8a8": [0, 2]},
    )
    blob = path.read_bytes()
    _, _, spans = _spec_layout(blob)
    counter = CountingFile(blob)
    f = read_eqk(counter, config="w8a8")
    assert not f.nested and f.bits is None
    assert f.sections_read == [0, 2]
    _assert_same(f.tensors, {**t["shared"], **t["w8"]})
    # Section 1 (the other configuration) is never touched.
    assert counter.total == f.bytes_read
    (length,) = struct.unpack_from("<Q", blob, 4)
    header_total = 12 + length + 4
    assert counter.total == header_total + (spans[0][1] - spans[0][0]) + (spans[2][1] - spans[2][0])
    with pytest.raises(ValueError, match="not nested"):
        read_eqk(path, max_bits=2)
    with pytest.raises(ValueError, match="config"):
        read_eqk(path, config="w4a4")


# ------------------------------------------------------------------------ robustness


def _load_or_format_error(blob: bytes, **kw):
    try:
        return read_eqk(io.BytesIO(blob), **kw)
    except EqkFormatError:
        return None


def test_truncation_at_every_boundary_and_random_offsets(tmp_path):
    path = tmp_path / "m.eqk"
    sections, _, _ = _write_nested(path)
    blob = path.read_bytes()
    _, data_start, spans = _spec_layout(blob)
    (length,) = struct.unpack_from("<Q", blob, 4)
    cuts = {0, 3, 4, 11, 12, 12 + length, 12 + length + 4, data_start}
    for start, end in spans:
        cuts |= {start, start + 1, end - 4, end - 1, end, end + 1}
    rng = random.Random(0)
    cuts |= {rng.randrange(len(blob)) for _ in range(50)}
    cuts = sorted(c for c in cuts if c < len(blob))
    for cut in cuts:
        cut_blob = blob[:cut]
        # The whole-file load of a truncated file always fails, asking for max_bits.
        with pytest.raises(EqkFormatError, match=r"truncated|max_bits|magic"):
            read_eqk(io.BytesIO(cut_blob))
        for bits in range(1, TOP_BITS + 1):
            complete = cut >= spans[bits - 1][1]
            got = _load_or_format_error(cut_blob, max_bits=bits)
            if complete:
                assert got is not None, (cut, bits)
                _assert_same(got.tensors, _expected_for_sections(sections, range(bits)))
            else:
                assert got is None, (cut, bits)


def test_random_byte_flips(tmp_path):
    path = tmp_path / "m.eqk"
    sections, _, _ = _write_nested(path)
    blob = path.read_bytes()
    _, _, spans = _spec_layout(blob)
    (length,) = struct.unpack_from("<Q", blob, 4)
    covered = [(0, 12 + length + 4), *spans]  # every byte a CRC or the preamble covers
    rng = random.Random(1)
    positions = [rng.randrange(len(blob)) for _ in range(50)]
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        got = _load_or_format_error(bytes(bad))
        in_padding = not any(s <= pos < e for s, e in covered)
        if got is not None:
            # Only a flip in alignment padding (covered by no CRC, read by nobody) may load, and
            # then every tensor must be exactly the original.
            assert in_padding, pos
            _assert_same(got.tensors, _all_tensors(sections))


def test_flips_in_every_region_are_detected(tmp_path):
    path = tmp_path / "m.eqk"
    _write_nested(path)
    blob = path.read_bytes()
    _, _, spans = _spec_layout(blob)
    (length,) = struct.unpack_from("<Q", blob, 4)
    positions = [0, 5, 12, 12 + length // 2, 12 + length + 1]
    positions += [s for s, _ in spans] + [e - 1 for _, e in spans]
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(EqkFormatError):
            read_eqk(io.BytesIO(bytes(bad)))


def _rewrite_header(blob: bytes, edit) -> bytes:
    """Re-encode the header (same length by padding with spaces) with a correct CRC, so that the
    reader's semantic checks, not the CRC, must catch the edit."""
    (length,) = struct.unpack_from("<Q", blob, 4)
    header = json.loads(blob[12 : 12 + length])
    header["quant"] = {}  # frees room for edits that lengthen the header
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= length, "edit grew the header"
    new = new + b" " * (length - len(new))
    return blob[:12] + new + struct.pack("<I", zlib.crc32(new)) + blob[12 + length + 4 :]


def _set(path, value):
    def edit(h):
        target = h
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["version"], [2, 0]), "version"),
        (_set(["version"], [0, 9]), "version"),
        (_set(["version"], "1.0"), "version"),
        (_set(["format"], "npz"), "format"),
        (_set(["tensors", 0, "dtype"], "f32"), "dtype"),
        (_set(["tensors", 0, "shape"], [3, 4, 3, 2]), "nbytes"),
        (_set(["tensors", 0, "nbytes"], 100000), "nbytes"),
        (_set(["tensors", 0, "offset"], 64), "overlap|exceed"),
        (_set(["tensors", 1, "offset"], 1), "aligned"),
        (_set(["tensors", 0, "section"], 9), "section"),
        (_set(["tensors", 1, "name"], "stem.weight"), "twice"),
        (_set(["sections", 1, "offset"], 0), "offset"),
        (_set(["sections", 0, "nbytes"], 10**12), "offset|exceed"),
        (_set(["widths", "2"], [1]), "prefix"),
        (_set(["widths", "9"], [0]), "width"),
        (_set(["top_bits"], None), "top_bits"),
        (_set(["model"], [1, 2]), "model"),
    ],
)
def test_inconsistent_header_raises(tmp_path, edit, message):
    path = tmp_path / "m.eqk"
    _write_nested(path)
    bad = _rewrite_header(path.read_bytes(), edit)
    with pytest.raises(EqkFormatError, match=message):
        read_eqk(io.BytesIO(bad))


def test_minor_version_and_unknown_keys_are_accepted(tmp_path):
    path = tmp_path / "m.eqk"
    sections, _, _ = _write_nested(path)

    def edit(h):
        h["version"] = [1, 7]
        h["future_key"] = 1

    # Shorten the model record to make room for the new key.
    blob = _rewrite_header(path.read_bytes(), lambda h: (h.update(model={}), edit(h)))
    _assert_same(read_eqk(io.BytesIO(blob)).tensors, _all_tensors(sections))


def test_bad_magic_oversized_header_and_bad_json(tmp_path):
    path = tmp_path / "m.eqk"
    _write_nested(path)
    blob = path.read_bytes()
    with pytest.raises(EqkFormatError, match="magic"):
        read_eqk(io.BytesIO(b"EQK2" + blob[4:]))
    oversized = blob[:4] + struct.pack("<Q", MAX_HEADER_BYTES + 1) + blob[12:]
    with pytest.raises(EqkFormatError, match="limit"):
        read_eqk(io.BytesIO(oversized))
    huge = blob[:4] + struct.pack("<Q", 2**64 - 1) + blob[12:]
    with pytest.raises(EqkFormatError, match="limit"):
        read_eqk(io.BytesIO(huge))
    past_eof = blob[:4] + struct.pack("<Q", len(blob)) + blob[12:]
    with pytest.raises(EqkFormatError, match="truncated"):
        read_eqk(io.BytesIO(past_eof))
    for payload in (
        b"{not json",
        b"[1, 2]",
        b'{"a": NaN}',
        b'{"a":1,"a":2}',
        b"\xff\xfe",
        b"[" * 100000,
    ):
        forged = b"EQK1" + struct.pack("<Q", len(payload)) + payload
        forged += struct.pack("<I", zlib.crc32(payload))
        with pytest.raises(EqkFormatError):
            read_eqk(io.BytesIO(forged))
    with pytest.raises(EqkFormatError, match=r"trailing|unexpected"):
        read_eqk(io.BytesIO(blob + b"\0"))
    with pytest.raises(EqkFormatError):
        read_eqk_header(io.BytesIO(b""))


# ------------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_no_temp_file(tmp_path):
    _write_nested(tmp_path / "m.eqk")
    _write_nested(tmp_path / "m.eqk")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.eqk"]


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    import eqkernels.eqk.writer as fmt

    path = tmp_path / "m.eqk"
    _write_nested(path)
    before = path.read_bytes()
    calls = {"n": 0}
    real = fmt._write_section

    def failing(f, plans, size):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"partial")
            raise OSError("disk full (simulated)")
        return real(f, plans, size)

    monkeypatch.setattr(fmt, "_write_section", failing)
    with pytest.raises(OSError, match="simulated"):
        write_eqk(
            path,
            sections=[{"a": torch.ones(3)}, {"b": torch.ones(2)}, {"c": torch.ones(1)}],
            model={},
            nested=True,
            top_bits=3,
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.eqk"]


def test_writer_rejects_bad_arguments(tmp_path):
    path = tmp_path / "x.eqk"
    one = [{"a": torch.ones(2)}]
    with pytest.raises(ValueError, match="dtype"):
        write_eqk(
            path,
            sections=[{"a": torch.ones(2, dtype=torch.complex64)}],
            model={},
            nested=False,
            widths={"c": [0]},
        )
    with pytest.raises(ValueError, match="top_bits"):
        write_eqk(path, sections=one, model={}, nested=True)
    with pytest.raises(ValueError, match="widths"):
        write_eqk(path, sections=one, model={}, nested=False)
    with pytest.raises(ValueError, match="twice"):
        write_eqk(
            path,
            sections=[{"a": torch.ones(1)}, {"a": torch.ones(1)}],
            model={},
            nested=True,
            top_bits=2,
        )
    with pytest.raises(ValueError, match="prefix"):
        write_eqk(
            path,
            sections=[{"a": torch.ones(1)}, {"b": torch.ones(1)}],
            model={},
            nested=True,
            top_bits=2,
            widths={"2": [1]},
        )
    with pytest.raises(ValueError, match="model"):
        write_eqk(path, sections=one, model={"x": float("nan")}, nested=True, top_bits=1)
    assert not path.exists()


def test_split_planes_with_min_bits_matches_default_widths(tmp_path):
    planes = torch.randint(-(2**31), 2**31 - 1, (4, 3, 2), dtype=torch.int32)
    sections = split_planes("w", planes, min_bits=2)
    sections[0]["w.scale"] = torch.rand(3)
    path = tmp_path / "m.eqk"
    header = write_eqk(path, sections=sections, model={}, nested=True, top_bits=4)
    assert header["widths"] == {"2": [0], "3": [0, 1], "4": [0, 1, 2]}
    for bits in (2, 3, 4):
        assert torch.equal(read_eqk(path, max_bits=bits).planes("w"), planes[:bits])
    with pytest.raises(ValueError, match="min_bits"):
        split_planes("w", planes, min_bits=5)
