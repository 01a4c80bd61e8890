"""Writing a .eqk file (docs/eqk-format.md)."""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..atomic import atomic_write
from .layout import (
    CRC,
    DTYPE_NAMES,
    DTYPES,
    FORMAT_NAME,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_JSON_CONTAINERS,
    MAX_TOP_BITS,
    PREAMBLE,
    VERSION_MAJOR,
    VERSION_MINOR,
    EqkFormatError,
    align64,
)
from .schema import identity_of, validate_header


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
            if tensor.dtype not in DTYPE_NAMES:
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
        position = align64(position + size + CRC.size)
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


def _section_chunks(plans: list[_TensorPlan], size: int):
    """The bytes of one section (tensors with their zero alignment padding), in order."""
    written = 0
    for plan in plans:
        yield bytes(plan.offset - written)
        yield _tensor_bytes(plan.tensor)
        written = plan.offset + plan.nbytes
    if written != size:
        raise RuntimeError(f"section layout error: wrote {written} bytes, planned {size}")


def _section_digest(plans: list[_TensorPlan], size: int) -> str:
    digest = hashlib.sha256()
    for chunk in _section_chunks(plans, size):
        digest.update(chunk)
    return digest.hexdigest()


def _write_section(f: BinaryIO, plans: list[_TensorPlan], size: int) -> None:
    """Write one section's tensors (with alignment padding) and its trailing CRC32."""
    crc = 0
    for chunk in _section_chunks(plans, size):
        f.write(chunk)
        crc = zlib.crc32(chunk, crc)
    f.write(CRC.pack(crc & 0xFFFFFFFF))


def _check_arguments(sections, nested, top_bits, widths) -> dict[str, list[int]]:
    if not isinstance(nested, bool):
        raise ValueError(f"nested: expected True or False, got {nested!r}")
    if top_bits is not None and (
        not isinstance(top_bits, int)
        or isinstance(top_bits, bool)
        or not 1 <= top_bits <= MAX_TOP_BITS
    ):
        raise ValueError(f"top_bits: expected an int in [1, {MAX_TOP_BITS}] or None, got "
                         f"{top_bits!r}")  # fmt: skip
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
    return widths_json


def write_eqk(
    path,
    *,
    sections: list[Mapping[str, torch.Tensor]],
    model: Mapping[str, Any],
    nested: bool,
    top_bits: int | None = None,
    widths: Mapping[str, Iterable[int]] | None = None,
    quant: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
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
        section j >= 1 plane min_bits-1+j: what `split_planes(..., min_bits)` produces).
        Non-nested files use any names (one per exported configuration) and any section sets;
        they have no prefix property.
    quant, extra: caller JSON objects (quantization parameters; anything else).
    groups: per-group scales of bit-plane tensors: planes name -> {"group_size": g, "K": K,
        "scale": tensor name (float32[N, K/g]), "zero_point": tensor name (int32[N, K/g]) or
        None}; g a multiple of 32 dividing K (docs/eqk-format.md, version 1.2).

    The header records a SHA-256 digest of every section and the file's identity (a digest of
    those). The file is written through `eqkernels.atomic.atomic_write`, so `path` holds either
    the old or the new file.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("writing .eqk files on big-endian hosts is not implemented")
    widths_json = _check_arguments(sections, nested, top_bits, widths)
    plans, sizes = _plan_sections(list(sections))
    offsets = _section_offsets(sizes)
    by_section = [[p for p in plans if p.section == i] for i in range(len(sizes))]
    digests = [_section_digest(by_section[i], size) for i, size in enumerate(sizes)]
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
                "dtype": DTYPE_NAMES[p.tensor.dtype],
                "shape": list(p.tensor.shape),
                "section": p.section,
                "offset": p.offset,
                "nbytes": p.nbytes,
            }
            for p in plans
        ],
        "digests": digests,
        "identity": identity_of(digests),
    }
    if groups:
        header["groups"] = _as_json_object(groups, "groups")
    try:
        validate_header(header)  # the writer obeys exactly what the reader checks
    except EqkFormatError as exc:
        raise ValueError(f"write_eqk: inconsistent arguments: {exc}") from None
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(
            f"header of {len(header_bytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if header_bytes.count(b"{") + header_bytes.count(b"[") > MAX_JSON_CONTAINERS:
        raise ValueError(f"header: more than {MAX_JSON_CONTAINERS} JSON objects and arrays")
    with atomic_write(path, "wb") as f:
        head = PREAMBLE.pack(MAGIC, len(header_bytes)) + header_bytes
        head += CRC.pack(zlib.crc32(header_bytes) & 0xFFFFFFFF)
        f.write(head)
        position = len(head)
        data_start = align64(position)
        for index, size in enumerate(sizes):
            start = data_start + offsets[index]
            f.write(bytes(start - position))
            _write_section(f, by_section[index], size)
            position = start + size + CRC.size
    return header
