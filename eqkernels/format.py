"""The .eqk bit-plane file: writer and reader (DESIGN.md "The .eqk file", docs/eqk-format.md).

Byte layout (little-endian)::

    0        b"EQK1"
    4        u64 header length H (at most MAX_HEADER_BYTES, checked before allocating)
    12       H bytes of UTF-8 JSON header
    12+H     u32 CRC32 of the header bytes
    D        data sections, D = align64(12 + H + 4); section i starts at D + offset_i (a
             multiple of 64), holds nbytes_i bytes and is followed by the u32 CRC32 of them.

Section offsets are relative to D so that the header does not depend on its own length.
Tensors start at 64-byte aligned offsets inside their section. Nothing is ever unpickled:
tensor bytes are decoded with `torch.frombuffer` and copied into owned, writable tensors.

A nested file (vertical layering) is ordered by significance, so the sections needed by width b
are a prefix 0..m_b-1 of the file and `read_eqk(path, max_bits=b)` reads no byte past the CRC of
section m_b-1. A non-nested file maps each exported configuration to its own sections.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

MAGIC = b"EQK1"
FORMAT_NAME = "eqk"
# Major versions are incompatible (rejected by readers of another major); minor versions only
# add keys, which older readers ignore.
VERSION_MAJOR = 1
VERSION_MINOR = 0
MAX_HEADER_BYTES = 64 * 1024 * 1024
ALIGN = 64
_PREAMBLE = struct.Struct("<4sQ")  # magic, header length
_CRC = struct.Struct("<I")
_MAX_INT = (1 << 63) - 1
_READ_CHUNK = 1 << 24

# The closed list of tensor dtypes a file may hold (name in the header -> torch dtype).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

PLANE_SEPARATOR = "@plane"


class EqkFormatError(ValueError):
    """A .eqk file is malformed, corrupted, truncated or of an unsupported version."""


def align64(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plane_tensor_name(name: str, plane: int) -> str:
    """Name under which plane `plane` (0 = sign plane) of the bit-plane tensor `name` is stored."""
    return f"{name}{PLANE_SEPARATOR}{plane}"


def split_planes(
    name: str, planes: torch.Tensor, min_bits: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Split `planes` int32[n, N, W] (MSB first) into the per-section dicts of a nested file:
    entry 0 holds planes 0..min_bits-1 (what the narrowest width needs), entry j >= 1 holds
    plane min_bits-1+j (what width min_bits+j adds). Merge the entries of every layer into the
    `sections` of `write_eqk`."""
    if planes.dim() != 3 or planes.dtype != torch.int32:
        raise ValueError(f"planes: expected int32[n, N, W], got {planes.dtype}{list(planes.shape)}")
    n = planes.shape[0]
    if not isinstance(min_bits, int) or not 1 <= min_bits <= n:
        raise ValueError(f"min_bits: expected an int in [1, {n}], got {min_bits!r}")
    first = {plane_tensor_name(name, j): planes[j] for j in range(min_bits)}
    return [first] + [{plane_tensor_name(name, j): planes[j]} for j in range(min_bits, n)]


# ----------------------------------------------------------------------------------- writing


@dataclass
class _TensorPlan:
    name: str
    tensor: torch.Tensor
    section: int
    offset: int
    nbytes: int


def _as_json_object(value: Any, argname: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{argname}: expected a JSON object (dict), got {type(value).__name__}")
    try:
        # Round trip: proves the value is plain JSON (no NaN, no custom objects) and gives the
        # reader exactly what the writer stored.
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{argname}: not JSON-serializable ({exc})") from None


def _plan_sections(sections: list[Mapping[str, torch.Tensor]]):
    plans: list[_TensorPlan] = []
    sizes: list[int] = []
    seen: set[str] = set()
    for index, tensors in enumerate(sections):
        if not isinstance(tensors, Mapping):
            raise ValueError(f"sections[{index}]: expected a dict name -> Tensor")
        offset = 0
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"sections[{index}]: tensor names must be non-empty strings")
            if name in seen:
                raise ValueError(f"sections: tensor name {name!r} appears twice")
            seen.add(name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"sections[{index}][{name!r}]: expected a Tensor")
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(
                    f"sections[{index}][{name!r}]: dtype {tensor.dtype} is not storable; "
                    f"accepted: {sorted(DTYPES)}"
                )
            offset = align64(offset)
            nbytes = tensor.numel() * tensor.element_size()
            plans.append(_TensorPlan(name, tensor, index, offset, nbytes))
            offset += nbytes
        sizes.append(offset)
    return plans, sizes


def _section_offsets(sizes: list[int]) -> list[int]:
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position = align64(position + size + _CRC.size)
    return offsets


def _default_nested_widths(num_sections: int, top_bits: int) -> dict[str, list[int]]:
    min_bits = top_bits - num_sections + 1
    if min_bits < 1:
        raise ValueError(
            f"sections: a nested file with top_bits={top_bits} has at most {top_bits} sections "
            f"(one per plane), got {num_sections}"
        )
    return {str(b): list(range(b - min_bits + 1)) for b in range(min_bits, top_bits + 1)}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _write_section(f: BinaryIO, plans: list[_TensorPlan], size: int) -> None:
    """Write one section's tensors (with alignment padding) and its trailing CRC32."""
    crc, written = 0, 0
    for plan in plans:
        pad = bytes(plan.offset - written)
        data = _tensor_bytes(plan.tensor)
        for chunk in (pad, data):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        written = plan.offset + plan.nbytes
    if written != size:
        raise RuntimeError(f"section layout error: wrote {written} bytes, planned {size}")
    f.write(_CRC.pack(crc & 0xFFFFFFFF))


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_eqk(
    path: str | os.PathLike,
    *,
    sections: list[Mapping[str, torch.Tensor]],
    model: Mapping[str, Any],
    nested: bool,
    top_bits: int | None = None,
    widths: Mapping[str, Iterable[int]] | None = None,
    quant: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write a .eqk file atomically and return its header (as a reader will see it).

    sections: one dict name -> Tensor per data section, in file order. Names are unique across
        the file; dtypes from `DTYPES`. Store bit planes one per section with `split_planes`.
    model: the self-describing model record (JSON object), e.g. {"arch": "resnet18",
        "kwargs": {...}} or {"layers": [...]}; stored verbatim, never code.
    nested: True for a vertically layered file ordered by significance (prefix = model).
    top_bits: the top width n (required when nested).
    widths: width/configuration name -> the section indices it needs. Nested files use the bit
        width in decimal as key and every list must be a prefix [0, ..., m_b - 1], growing
        with b; by default width b needs sections 0..b - min_bits with
        min_bits = top_bits - len(sections) + 1 (section 0 then holds planes 0..min_bits-1,
        section j >= 1 plane min_bits-1+j: what `split_planes(..., min_bits)` produces). Non-nested files use any names (one per
        exported configuration) and any section sets; they have no prefix property.
    quant, extra: caller JSON objects (quantization parameters; anything else).

    The file is written to a temporary file in the same directory, fsynced, renamed over
    `path` and the directory fsynced, so `path` holds either the old or the new file.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("writing .eqk files on big-endian hosts is not implemented")
    if not isinstance(nested, bool):
        raise ValueError(f"nested: expected True or False, got {nested!r}")
    if top_bits is not None and (
        not isinstance(top_bits, int) or isinstance(top_bits, bool) or not 1 <= top_bits <= 64
    ):
        raise ValueError(f"top_bits: expected an int in [1, 64] or None, got {top_bits!r}")
    if nested and top_bits is None:
        raise ValueError("top_bits: required for a nested file")
    if not isinstance(sections, list | tuple) or not sections:
        raise ValueError("sections: expected a non-empty list of dicts name -> Tensor")
    if widths is None:
        if not nested:
            raise ValueError("widths: required for a non-nested file (configuration -> sections)")
        widths = _default_nested_widths(len(sections), top_bits)
    if not isinstance(widths, Mapping) or not widths:
        raise ValueError("widths: expected a non-empty dict name -> list of section indices")
    widths_json = {}
    for key, value in widths.items():
        try:
            widths_json[str(key)] = [int(i) for i in value]
        except (TypeError, ValueError):
            raise ValueError(f"widths[{key!r}]: expected a list of section indices") from None

    plans, sizes = _plan_sections(list(sections))
    offsets = _section_offsets(sizes)
    header = {
        "format": FORMAT_NAME,
        "version": [VERSION_MAJOR, VERSION_MINOR],
        "model": _as_json_object(model, "model"),
        "quant": _as_json_object(quant, "quant"),
        "extra": _as_json_object(extra, "extra"),
        "top_bits": top_bits,
        "nested": nested,
        "widths": widths_json,
        "sections": [{"offset": o, "nbytes": n} for o, n in zip(offsets, sizes)],
        "tensors": [
            {
                "name": p.name,
                "dtype": _DTYPE_NAMES[p.tensor.dtype],
                "shape": list(p.tensor.shape),
                "section": p.section,
                "offset": p.offset,
                "nbytes": p.nbytes,
            }
            for p in plans
        ],
    }
    try:
        _validate_header(header)  # the writer obeys exactly what the reader checks
    except EqkFormatError as exc:
        raise ValueError(f"write_eqk: inconsistent arguments: {exc}") from None
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(
            f"header of {len(header_bytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            head = _PREAMBLE.pack(MAGIC, len(header_bytes)) + header_bytes
            head += _CRC.pack(zlib.crc32(header_bytes) & 0xFFFFFFFF)
            f.write(head)
            position = len(head)
            data_start = align64(position)
            for index, size in enumerate(sizes):
                start = data_start + offsets[index]
                f.write(bytes(start - position))
                _write_section(f, [p for p in plans if p.section == index], size)
                position = start + size + _CRC.size
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return header


# ----------------------------------------------------------------------------------- reading


def _fail(message: str) -> EqkFormatError:
    return EqkFormatError(message)


def _is_int(value: Any, low: int = 0, high: int = _MAX_INT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_object(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _parse_header(data: bytes) -> dict:
    try:
        header = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail("header is not a JSON object")
    return header


def _validate_header(header: dict) -> None:
    """Check every structural rule of the header (docs/eqk-format.md, "Validation")."""
    if header.get("format") != FORMAT_NAME:
        raise _fail(f"header 'format' is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("version")
    if not (isinstance(version, list) and len(version) == 2 and all(_is_int(v) for v in version)):
        raise _fail(f"header 'version' must be [major, minor], got {version!r}")
    if version[0] != VERSION_MAJOR:
        raise _fail(
            f"unsupported format version {version[0]}.{version[1]}: this reader reads major "
            f"version {VERSION_MAJOR} (any minor)"
        )
    for key in ("model", "quant", "extra"):
        if not isinstance(header.get(key), dict):
            raise _fail(f"header {key!r} must be a JSON object")
    nested = header.get("nested")
    if not isinstance(nested, bool):
        raise _fail("header 'nested' must be true or false")
    top_bits = header.get("top_bits")
    if top_bits is not None and not _is_int(top_bits, 1, 64):
        raise _fail(f"header 'top_bits' must be null or an int in [1, 64], got {top_bits!r}")
    if nested and top_bits is None:
        raise _fail("a nested file must give 'top_bits'")

    sections = header.get("sections")
    if not isinstance(sections, list) or not sections:
        raise _fail("header 'sections' must be a non-empty list")
    expected_offset = 0
    for i, sec in enumerate(sections):
        if not (
            isinstance(sec, dict) and _is_int(sec.get("offset")) and _is_int(sec.get("nbytes"))
        ):
            raise _fail(f"section {i}: needs integer 'offset' and 'nbytes'")
        if sec["offset"] != expected_offset:
            raise _fail(f"section {i}: offset {sec['offset']}, expected {expected_offset}")
        expected_offset = align64(sec["offset"] + sec["nbytes"] + _CRC.size)

    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise _fail("header 'tensors' must be a list")
    names: set[str] = set()
    extents: dict[int, list[tuple[int, int, str]]] = {}
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise _fail("every tensor entry needs a non-empty string 'name'")
        name = t["name"]
        if name in names:
            raise _fail(f"tensor {name!r} is listed twice")
        names.add(name)
        if t.get("dtype") not in DTYPES:
            raise _fail(
                f"tensor {name!r}: unknown dtype {t.get('dtype')!r}; known: {sorted(DTYPES)}"
            )
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_int(d) for d in shape):
            raise _fail(f"tensor {name!r}: shape must be a list of non-negative ints")
        if not _is_int(t.get("section"), 0, len(sections) - 1):
            raise _fail(f"tensor {name!r}: section {t.get('section')!r} does not exist")
        if not _is_int(t.get("offset")) or not _is_int(t.get("nbytes")):
            raise _fail(f"tensor {name!r}: needs integer 'offset' and 'nbytes'")
        if t["offset"] % ALIGN:
            raise _fail(f"tensor {name!r}: offset {t['offset']} is not {ALIGN}-byte aligned")
        itemsize = torch.empty((), dtype=DTYPES[t["dtype"]]).element_size()
        if t["nbytes"] != math.prod(shape) * itemsize:
            raise _fail(f"tensor {name!r}: nbytes {t['nbytes']} does not match shape {shape}")
        sec = sections[t["section"]]
        if t["offset"] + t["nbytes"] > sec["nbytes"]:
            raise _fail(f"tensor {name!r}: bytes [{t['offset']}, +{t['nbytes']}) exceed section")
        extents.setdefault(t["section"], []).append((t["offset"], t["nbytes"], name))
    for ranges in extents.values():
        ranges.sort()
        for (o1, n1, a), (o2, _, b) in zip(ranges, ranges[1:]):
            if o1 + n1 > o2:
                raise _fail(f"tensors {a!r} and {b!r} overlap")

    widths = header.get("widths")
    if not isinstance(widths, dict) or not widths:
        raise _fail("header 'widths' must be a non-empty object")
    for key, needed in widths.items():
        if (
            not key
            or not isinstance(needed, list)
            or not all(_is_int(i, 0, len(sections) - 1) for i in needed)
        ):
            raise _fail(f"widths[{key!r}] must list existing section indices")
        if needed != sorted(set(needed)):
            raise _fail(f"widths[{key!r}] must be sorted and without repeats")
    if nested:
        previous = -1
        for key in sorted(widths, key=lambda k: int(k) if k.isdecimal() else -1):
            if not key.isdecimal() or key != str(int(key)) or not 1 <= int(key) <= top_bits:
                raise _fail(f"nested file: width {key!r} is not a bit width in [1, {top_bits}]")
            needed = widths[key]
            if needed != list(range(len(needed))) or len(needed) < previous:
                raise _fail(f"nested file: width {key} does not need a growing prefix of sections")
            previous = len(needed)


def _read_exact(f: BinaryIO, n: int, what: str, hint: str = "") -> bytearray:
    # Reads in bounded chunks: a size is only trusted after the file proved to hold it.
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), _READ_CHUNK))
        if not chunk:
            raise _fail(f"file is truncated: {what} needs {n} bytes, only {len(buf)} present{hint}")
        buf += chunk
    return buf


class _Source:
    """A seekable binary file plus the number of bytes read from it."""

    def __init__(self, source):
        self.owned = not hasattr(source, "read")
        self.f = open(source, "rb") if self.owned else source  # noqa: SIM115
        if not self.f.seekable():
            self.close()
            raise ValueError("source: expected a path or a seekable binary file object")
        self.base = self.f.tell()
        self.size = self.f.seek(0, os.SEEK_END) - self.base
        self.bytes_read = 0

    def read(self, offset: int, n: int, what: str, hint: str = "") -> bytearray:
        if offset + n > self.size:
            raise _fail(
                f"file is truncated: {what} needs bytes [{offset}, {offset + n}) but the file "
                f"has {self.size} bytes{hint}"
            )
        self.f.seek(self.base + offset)
        data = _read_exact(self.f, n, what, hint)
        self.bytes_read += n
        return data

    def close(self):
        if self.owned:
            self.f.close()


def _read_header(src: _Source) -> tuple[dict, int, int]:
    preamble = src.read(0, _PREAMBLE.size, "the magic and header length")
    magic, length = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r}: not a .eqk file (expected {MAGIC!r})")
    if length > MAX_HEADER_BYTES:
        raise _fail(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    block = src.read(_PREAMBLE.size, length + _CRC.size, "the header")
    data = bytes(block[:length])
    (stored,) = _CRC.unpack(block[length:])
    crc = zlib.crc32(data) & 0xFFFFFFFF
    if crc != stored:
        raise _fail(f"header CRC mismatch (stored {stored:#010x}, computed {crc:#010x})")
    header = _parse_header(data)
    _validate_header(header)
    return header, align64(_PREAMBLE.size + length + _CRC.size), crc


def _decode_tensor(entry: dict, section: bytearray) -> torch.Tensor:
    dtype = DTYPES[entry["dtype"]]
    shape = entry["shape"]
    if entry["nbytes"] == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(section, dtype=dtype, count=math.prod(shape), offset=entry["offset"])
    return flat.clone().reshape(shape)  # owned and writable; the section buffer can go


@dataclass
class EqkFile:
    """What `read_eqk` loaded. `tensors` holds the tensors of the sections read so far."""

    header: dict
    tensors: dict[str, torch.Tensor]
    sections_read: list[int]
    bytes_read: int
    selection: str | None  # the width/configuration key loaded ("all" for the whole file)
    _data_start: int = field(repr=False)
    _header_crc: int = field(repr=False)

    @property
    def model(self) -> dict:
        return self.header["model"]

    @property
    def quant(self) -> dict:
        return self.header["quant"]

    @property
    def extra(self) -> dict:
        return self.header["extra"]

    @property
    def nested(self) -> bool:
        return self.header["nested"]

    @property
    def top_bits(self) -> int | None:
        return self.header["top_bits"]

    @property
    def widths(self) -> dict[str, list[int]]:
        return self.header["widths"]

    @property
    def bits(self) -> int | None:
        """For a nested file, the largest width whose sections are all loaded."""
        if not self.nested:
            return None
        have = set(self.sections_read)
        full = [int(k) for k, need in self.widths.items() if set(need) <= have]
        return max(full) if full else None

    def planes(self, name: str) -> torch.Tensor:
        """Stack the loaded planes of bit-plane tensor `name` (stored with `split_planes`) into
        int32[b, N, W], MSB first; b is the number of consecutive planes loaded from plane 0."""
        stack = []
        while plane_tensor_name(name, len(stack)) in self.tensors:
            stack.append(self.tensors[plane_tensor_name(name, len(stack))])
        if not stack:
            raise KeyError(f"no planes of {name!r} are loaded")
        return torch.stack(stack)

    def upgrade(
        self,
        source,
        max_bits: int | None = None,
        *,
        config: str | None = None,
        sections: Iterable[int] | None = None,
    ) -> EqkFile:
        """Read the sections of a wider selection that are not loaded yet, from the same file
        (its header is re-read and must be byte-identical), and add their tensors in place."""
        src = _Source(source)
        try:
            header, data_start, crc = _read_header(src)
            if crc != self._header_crc or data_start != self._data_start or header != self.header:
                raise _fail("upgrade: the file's header differs from the one loaded before")
            key, wanted = _select(header, max_bits, config, sections)
            new = [i for i in wanted if i not in self.sections_read]
            self.tensors.update(_read_sections(src, header, data_start, new))
            self.sections_read = sorted(set(self.sections_read) | set(new))
            self.bytes_read += src.bytes_read
            self.selection = key
        finally:
            src.close()
        return self


def _select(header: dict, max_bits, config, sections) -> tuple[str | None, list[int]]:
    given = sum(x is not None for x in (max_bits, config, sections))
    if given > 1:
        raise ValueError("give at most one of max_bits, config, sections")
    widths = header["widths"]
    if max_bits is not None:
        if not header["nested"]:
            raise ValueError(
                f"max_bits: the file is not nested (no prefix property); choose config= one of "
                f"{sorted(widths)}"
            )
        if not _is_int(max_bits, 1, 64):
            raise ValueError(f"max_bits: expected an int in [1, 64], got {max_bits!r}")
        fitting = [int(k) for k in widths if int(k) <= max_bits]
        if not fitting:
            raise ValueError(
                f"max_bits={max_bits}: the file's narrowest width is {min(map(int, widths))}"
            )
        key = str(max(fitting))
        return key, widths[key]
    if config is not None:
        if config not in widths:
            raise ValueError(f"config: {config!r} is not in the file; accepted: {sorted(widths)}")
        return config, widths[config]
    if sections is not None:
        wanted = sorted({int(i) for i in sections})
        if any(not 0 <= i < len(header["sections"]) for i in wanted):
            raise ValueError(f"sections: indices must be in [0, {len(header['sections'])})")
        return None, wanted
    return "all", list(range(len(header["sections"])))


def _read_sections(src: _Source, header: dict, data_start: int, wanted: list[int], hint=""):
    tensors = {}
    by_section: dict[int, list[dict]] = {}
    for entry in header["tensors"]:
        by_section.setdefault(entry["section"], []).append(entry)
    for index in wanted:
        sec = header["sections"][index]
        block = src.read(
            data_start + sec["offset"], sec["nbytes"] + _CRC.size, f"section {index}", hint
        )
        (stored,) = _CRC.unpack(block[sec["nbytes"] :])
        del block[sec["nbytes"] :]
        crc = zlib.crc32(block) & 0xFFFFFFFF
        if crc != stored:
            raise _fail(
                f"section {index}: CRC mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )
        for entry in by_section.get(index, []):
            tensors[entry["name"]] = _decode_tensor(entry, block)
    return tensors


def read_eqk_header(source) -> dict:
    """Read and validate only the header of a .eqk file (path or seekable binary file)."""
    src = _Source(source)
    try:
        return _read_header(src)[0]
    finally:
        src.close()


def read_eqk(
    source,
    *,
    max_bits: int | None = None,
    config: str | None = None,
    sections: Iterable[int] | None = None,
) -> EqkFile:
    """Read a .eqk file from a path or a seekable binary file object.

    With no selection the whole file is required (a truncated file raises EqkFormatError; ask
    for `max_bits` to load a prefix). `max_bits=b` (nested files) loads the largest stored width
    <= b and reads no byte past the end of that width's last section CRC. `config=name` loads a
    configuration of `widths` (any file); `sections=[...]` loads exactly those sections.
    Malformed files raise EqkFormatError; bad arguments raise ValueError.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("reading .eqk files on big-endian hosts is not implemented")
    src = _Source(source)
    try:
        header, data_start, crc = _read_header(src)
        key, wanted = _select(header, max_bits, config, sections)
        hint = ""
        if key == "all":
            hint = "; to load a prefix of a nested file, pass max_bits" if header["nested"] else ""
            last = header["sections"][-1]
            end = data_start + last["offset"] + last["nbytes"] + _CRC.size
            if src.size < end:
                raise _fail(
                    f"file is truncated: {src.size} bytes, the whole file needs {end}{hint}"
                )
            if src.size > end:
                raise _fail(f"file has {src.size - end} unexpected bytes after the last section")
        tensors = _read_sections(src, header, data_start, wanted, hint)
        return EqkFile(header, tensors, list(wanted), src.bytes_read, key, data_start, crc)
    finally:
        src.close()
