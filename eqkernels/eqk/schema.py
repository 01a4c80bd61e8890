"""The validated header model of a .eqk file (docs/eqk-format.md, "Validation on load").

`validate_header` checks every key's type and range and every cross-field rule before the
reader allocates anything a header value sizes: bounded counts, shapes against byte lengths,
no overflowing size product, tensors inside their section and not overlapping, sections laid
out by the layout rule, widths naming existing sections, and (version >= 1.1) one digest per
section and the identity derived from them, and (1.2) per-group scales beside their planes
(groups.py). New header keys are one more entry in `_HEADER`.
"""

from __future__ import annotations

import hashlib
import itertools
import math

from .fields import (
    any_object,
    boolean,
    dict_of,
    fail,
    integer,
    is_int,
    list_of,
    one_of,
    optional,
    record,
    string,
)
from .groups import GROUPS_FIELD, check_groups
from .layout import (
    ALIGN,
    CRC,
    DTYPES,
    FORMAT_NAME,
    ITEMSIZE,
    MAX_DIMS,
    MAX_NAME_CHARS,
    MAX_SECTIONS,
    MAX_TENSOR_BYTES,
    MAX_TENSORS,
    MAX_TOP_BITS,
    VERSION_MAJOR,
    EqkFormatError,
    align64,
)

_HEX_DIGEST = string(64, "[0-9a-f]{64}")

_SECTION = record(
    {"offset": integer(0, MAX_TENSOR_BYTES * MAX_SECTIONS), "nbytes": integer(0, MAX_TENSOR_BYTES)}
)
_TENSOR = record(
    {
        "name": string(MAX_NAME_CHARS),
        "dtype": one_of(*DTYPES),
        "shape": list_of(integer(0, MAX_TENSOR_BYTES), max_len=MAX_DIMS),
        "section": integer(0, MAX_SECTIONS - 1),
        "offset": integer(0, MAX_TENSOR_BYTES),
        "nbytes": integer(0, MAX_TENSOR_BYTES),
    }
)
_HEADER = record(
    {
        "format": one_of(FORMAT_NAME),
        "version": list_of(integer(0, 1 << 16), min_len=2, max_len=2),
        "model": any_object,
        "quant": any_object,
        "extra": any_object,
        "nested": boolean,
        "top_bits": optional(integer(1, MAX_TOP_BITS)),
        "sections": list_of(_SECTION, min_len=1, max_len=MAX_SECTIONS),
        "tensors": list_of(_TENSOR, max_len=MAX_TENSORS),
        "widths": dict_of(
            list_of(integer(0, MAX_SECTIONS - 1), max_len=MAX_SECTIONS),
            key_check=string(256),
            min_len=1,
            max_len=MAX_SECTIONS,
        ),
        "digests": list_of(_HEX_DIGEST, min_len=1, max_len=MAX_SECTIONS),
        "identity": _HEX_DIGEST,
        "groups": GROUPS_FIELD,
    },
    optional_keys=("digests", "identity", "groups"),
)


def identity_of(digests: list[str]) -> str:
    """The file's identity: a digest over its section digests, so two files with the same
    identity hold the same bytes in every section."""
    return hashlib.sha256(":".join(digests).encode("ascii")).hexdigest()


def has_digests(header: dict) -> bool:
    return tuple(header["version"]) >= (1, 1)


def validate_header(header) -> dict:
    """Raise EqkFormatError naming the first field that breaks a rule; return `header`."""
    if not isinstance(header, dict):
        raise EqkFormatError("header: not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise fail("header.format", f"is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("version")
    if (
        isinstance(version, list)
        and len(version) == 2
        and is_int(version[0])
        and version[0] != VERSION_MAJOR
    ):
        raise fail(
            "header.version",
            f"unsupported format version {version[0]}.{version[1]}: this reader reads major "
            f"version {VERSION_MAJOR} (any minor)",
        )
    _HEADER(header, "header")
    if header["nested"] and header["top_bits"] is None:
        raise fail("header.top_bits", "a nested file must give 'top_bits'")
    sections = header["sections"]
    _check_sections(sections)
    _check_tensors(header["tensors"], sections)
    _check_widths(header)
    _check_digests(header)
    check_groups(header)
    return header


def _check_sections(sections: list) -> None:
    expected = 0
    for i, sec in enumerate(sections):
        if sec["offset"] != expected:
            raise fail(f"header.sections[{i}].offset", f"is {sec['offset']}, expected {expected}")
        expected = align64(sec["offset"] + sec["nbytes"] + CRC.size)


def _check_tensors(tensors: list, sections: list) -> None:
    names: set[str] = set()
    extents: dict[int, list[tuple[int, int, str]]] = {}
    for i, t in enumerate(tensors):
        name, path = t["name"], f"header.tensors[{i}]"
        if name in names:
            raise fail(path + ".name", f"tensor {name!r} is listed twice")
        names.add(name)
        shape = t["shape"]
        # Skip zero dimensions in the bound: torch multiplies every dimension when it sizes
        # even an empty tensor, so [2**62, 2**62, 0] must be refused too.
        span = math.prod(max(d, 1) for d in shape) * ITEMSIZE[t["dtype"]]
        if span > MAX_TENSOR_BYTES:
            raise fail(path + ".shape", f"tensor {name!r}: shape {shape} is too large")
        if t["nbytes"] != math.prod(shape) * ITEMSIZE[t["dtype"]]:
            raise fail(
                path + ".nbytes",
                f"tensor {name!r}: nbytes {t['nbytes']} does not match shape {shape}",
            )
        if t["offset"] % ALIGN:
            raise fail(path + ".offset", f"tensor {name!r}: not {ALIGN}-byte aligned")
        if t["section"] >= len(sections):
            raise fail(path + ".section", f"tensor {name!r}: section {t['section']} does not exist")
        if t["offset"] + t["nbytes"] > sections[t["section"]]["nbytes"]:
            raise fail(path, f"tensor {name!r}: bytes [{t['offset']}, +{t['nbytes']}) exceed its "
                             "section")  # fmt: skip
        extents.setdefault(t["section"], []).append((t["offset"], t["nbytes"], name))
    for ranges in extents.values():
        ranges.sort()
        for (o1, n1, a), (o2, _, b) in itertools.pairwise(ranges):
            if o1 + n1 > o2:
                raise fail("header.tensors", f"tensors {a!r} and {b!r} overlap")


def _check_widths(header: dict) -> None:
    widths, count = header["widths"], len(header["sections"])
    for key, needed in widths.items():
        if any(i >= count for i in needed):
            raise fail(f"header.widths[{key!r}]", "lists a section that does not exist")
        if needed != sorted(set(needed)):
            raise fail(f"header.widths[{key!r}]", "must be sorted and without repeats")
    if not header["nested"]:
        return
    top = header["top_bits"]
    previous = -1
    for key in sorted(widths, key=lambda k: int(k) if k.isdecimal() and len(k) < 4 else -1):
        if not (key.isdecimal() and key == str(int(key)) and 1 <= int(key) <= top):
            raise fail(f"header.widths[{key!r}]", f"not a bit width in [1, {top}] (nested file)")
        needed = widths[key]
        if needed != list(range(len(needed))) or len(needed) < previous:
            raise fail(f"header.widths[{key!r}]", "does not need a growing prefix of sections")
        previous = len(needed)


def _check_digests(header: dict) -> None:
    if not has_digests(header):
        return
    for key in ("digests", "identity"):
        if key not in header:
            raise fail("header", f"missing key {key!r} (required from version 1.1)")
    if len(header["digests"]) != len(header["sections"]):
        raise fail("header.digests", "needs exactly one digest per section")
    if header["identity"] != identity_of(header["digests"]):
        raise fail("header.identity", "does not match the section digests")
