"""Reading a .eqk file (docs/eqk-format.md): every header value is validated by the schema
before anything it sizes is allocated, sizes are compared with the file size before a buffer
is allocated, data is read in bounded chunks, and each section read is checked against its
CRC and (version >= 1.1) its SHA-256 digest. Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

from .fields import is_int
from .groups import check_group_values
from .layout import (
    CRC,
    DTYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_JSON_CONTAINERS,
    PREAMBLE,
    READ_CHUNK,
    EqkFormatError,
    align64,
    plane_tensor_name,
)
from .schema import has_digests, validate_header


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_object(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def json_containers(data: bytes) -> int:
    """An upper bound on the JSON objects and arrays in `data` (brackets inside strings count
    too), found without parsing."""
    return data.count(b"{") + data.count(b"[")


def _parse_header(data: bytes) -> dict:
    containers = json_containers(data)
    if containers > MAX_JSON_CONTAINERS:
        raise EqkFormatError(
            f"header: {containers} JSON objects and arrays exceed the {MAX_JSON_CONTAINERS} limit"
        )
    try:
        header = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EqkFormatError(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EqkFormatError("header is not a JSON object")
    return header


def _read_exact(f: BinaryIO, n: int, what: str, hint: str = "") -> bytearray:
    # Reads in bounded chunks: a size is only trusted after the file proved to hold it.
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), READ_CHUNK))
        if not chunk:
            raise EqkFormatError(
                f"file is truncated: {what} needs {n} bytes, only {len(buf)} present{hint}"
            )
        buf += chunk
    return buf


class _Source:
    """A seekable binary file plus the number of bytes read from it."""

    def __init__(self, source):
        self.owned = not hasattr(source, "read")
        self.f = open(source, "rb") if self.owned else source
        if not self.f.seekable():
            self.close()
            raise ValueError("source: expected a path or a seekable binary file object")
        self.base = self.f.tell()
        self.size = self.f.seek(0, os.SEEK_END) - self.base
        self.bytes_read = 0

    def read(self, offset: int, n: int, what: str, hint: str = "") -> bytearray:
        if offset + n > self.size:
            raise EqkFormatError(
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
    preamble = src.read(0, PREAMBLE.size, "the magic and header length")
    magic, length = PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise EqkFormatError(f"bad magic {bytes(magic)!r}: not a .eqk file (expected {MAGIC!r})")
    if length > MAX_HEADER_BYTES:
        raise EqkFormatError(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    block = src.read(PREAMBLE.size, length + CRC.size, "the header")
    data = bytes(block[:length])
    (stored,) = CRC.unpack(block[length:])
    crc = zlib.crc32(data) & 0xFFFFFFFF
    if crc != stored:
        raise EqkFormatError(f"header CRC mismatch (stored {stored:#010x}, computed {crc:#010x})")
    header = validate_header(_parse_header(data))
    return header, align64(PREAMBLE.size + length + CRC.size), crc


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
    def identity(self) -> str | None:
        """The export identity (a digest of the section digests); None for version 1.0."""
        return self.header.get("identity")

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

    @property
    def groups(self) -> dict[str, dict]:
        """(1.2) bit-plane tensor name -> its per-group scales record (`group_size`, `K`,
        `scale`, `zero_point` tensor names); empty when the file has none."""
        return self.header.get("groups", {})

    def group_scales(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(scale float32[N, K/g], zero_point int32[N, K/g] or None, g) of bit-plane tensor
        `name`; KeyError when it has no per-group scales or they are not loaded."""
        group = self.groups.get(name)
        if group is None:
            raise KeyError(f"{name!r} has no per-group scales in this file")
        zp = group["zero_point"]
        return (
            self.tensors[group["scale"]],
            None if zp is None else self.tensors[zp],
            group["group_size"],
        )

    def upgrade(
        self,
        source,
        max_bits: int | None = None,
        *,
        config: str | None = None,
        sections: Iterable[int] | None = None,
    ) -> EqkFile:
        """Read the sections of a wider selection that are not loaded yet and add their
        tensors in place. The source must be the same export: its identity and the digests of
        the sections already loaded must equal this file's (and its header be identical)."""
        src = _Source(source)
        try:
            header, data_start, crc = _read_header(src)
            _check_same_export(self.header, header, self.sections_read)
            if crc != self._header_crc or data_start != self._data_start or header != self.header:
                raise EqkFormatError("upgrade: the file's header differs from the one loaded")
            key, wanted = _select(header, max_bits, config, sections)
            new = [i for i in wanted if i not in self.sections_read]
            added = _read_sections(src, header, data_start, new)
            check_group_values(header, added)
            self.tensors.update(added)
            self.sections_read = sorted(set(self.sections_read) | set(new))
            self.bytes_read += src.bytes_read
            self.selection = key
        finally:
            src.close()
        return self


def _check_same_export(loaded: dict, other: dict, sections_read: list[int]) -> None:
    if not (has_digests(loaded) and has_digests(other)):
        raise EqkFormatError(
            "upgrade: a version 1.0 file has no section digests, so the source cannot be proven "
            "to be the same export; load the whole file instead (or re-export it)"
        )
    if other["identity"] != loaded["identity"]:
        raise EqkFormatError(
            f"upgrade: the source is another export (identity {other['identity'][:16]}..., "
            f"loaded {loaded['identity'][:16]}...)"
        )
    for i in sections_read:
        if i >= len(other["digests"]) or other["digests"][i] != loaded["digests"][i]:
            raise EqkFormatError(f"upgrade: section {i} of the source differs from the loaded one")


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
        if not is_int(max_bits, 1, 64):
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
        try:
            wanted = sorted({int(i) for i in sections})
        except (TypeError, ValueError):
            raise ValueError("sections: expected an iterable of section indices") from None
        if any(not 0 <= i < len(header["sections"]) for i in wanted):
            raise ValueError(f"sections: indices must be in [0, {len(header['sections'])})")
        return None, wanted
    return "all", list(range(len(header["sections"])))


def _read_sections(src: _Source, header: dict, data_start: int, wanted: list[int], hint=""):
    tensors = {}
    by_section: dict[int, list[dict]] = {}
    for entry in header["tensors"]:
        by_section.setdefault(entry["section"], []).append(entry)
    digests = header.get("digests") if has_digests(header) else None
    for index in wanted:
        sec = header["sections"][index]
        block = src.read(
            data_start + sec["offset"], sec["nbytes"] + CRC.size, f"section {index}", hint
        )
        (stored,) = CRC.unpack(block[sec["nbytes"] :])
        del block[sec["nbytes"] :]
        crc = zlib.crc32(block) & 0xFFFFFFFF
        if crc != stored:
            raise EqkFormatError(
                f"section {index}: CRC mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )
        if digests is not None and hashlib.sha256(block).hexdigest() != digests[index]:
            raise EqkFormatError(f"section {index}: SHA-256 digest mismatch (header.digests)")
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
            end = data_start + last["offset"] + last["nbytes"] + CRC.size
            if src.size < end:
                raise EqkFormatError(
                    f"file is truncated: {src.size} bytes, the whole file needs {end}{hint}"
                )
            if src.size > end:
                raise EqkFormatError(
                    f"file has {src.size - end} unexpected bytes after the last section"
                )
        tensors = _read_sections(src, header, data_start, wanted, hint)
        check_group_values(header, tensors)
        return EqkFile(header, tensors, list(wanted), src.bytes_read, key, data_start, crc)
    finally:
        src.close()
