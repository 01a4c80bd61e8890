"""Per-group scales of bit-plane tensors (format version 1.2, docs/eqk-format.md).

A bit-plane tensor `P` (stored as `P@plane0`, `P@plane1`, ...; each `int32[N, ceil(K/32)]`) may
carry per-group scales: the header's `groups` object maps `P` to `{"group_size": g, "K": K,
"scale": <tensor name>, "zero_point": <tensor name> | null}`, with `scale` a `float32[N, K/g]`
tensor (one step per g consecutive columns of each row) and `zero_point` an `int32[N, K/g]`
tensor. The planes are unchanged; the scales travel beside them.

Every value is checked as hostile: the structure against the tensor table before anything is
allocated (`check_groups`), the scale and zero-point values when their section is read
(`check_group_values`).
"""

from __future__ import annotations

import torch

from .fields import dict_of, fail, integer, optional, record, string
from .layout import MAX_NAME_CHARS, MAX_TENSORS, MAX_TOP_BITS, plane_tensor_name

# A group covers whole 32-column words of a plane (what the low-bit GEMM's per-group path reads).
GROUP_QUANTUM = 32
MAX_GROUP_SIZE = 1 << 20
MAX_COLUMNS = 1 << 31
# Zero points of asymmetric weights are small integers; bounded so no kernel sum overflows.
MAX_ZERO_POINT = 1 << 16
GROUPS_SINCE = (1, 2)
_MIN_SCALE = torch.finfo(torch.float32).tiny

_GROUP = record(
    {
        "group_size": integer(GROUP_QUANTUM, MAX_GROUP_SIZE),
        "K": integer(1, MAX_COLUMNS),
        "scale": string(MAX_NAME_CHARS),
        "zero_point": optional(string(MAX_NAME_CHARS)),
    }
)
GROUPS_FIELD = dict_of(_GROUP, key_check=string(MAX_NAME_CHARS), max_len=MAX_TENSORS)


def check_groups(header: dict) -> None:
    """Cross-check `header["groups"]` (already type-checked) against the tensor table."""
    if "groups" not in header:
        return
    if tuple(header["version"]) < GROUPS_SINCE:
        raise fail("header.groups", "per-group scales need format version 1.2 or later")
    entries = {t["name"]: t for t in header["tensors"]}
    owners: dict[str, str] = {}
    for planes, group in header["groups"].items():
        path = f"header.groups[{planes!r}]"
        g, k = group["group_size"], group["K"]
        if g % GROUP_QUANTUM or k % g:
            raise fail(path + ".group_size", f"{g} must be a multiple of {GROUP_QUANTUM} "
                                             f"dividing K={k}")  # fmt: skip
        first = entries.get(plane_tensor_name(planes, 0))
        if first is None:
            raise fail(path, f"no tensor {plane_tensor_name(planes, 0)!r} (the planes' sign plane)")
        words = -(-k // 32)
        if first["dtype"] != "int32" or len(first["shape"]) != 2 or first["shape"][1] != words:
            raise fail(path + ".K", f"{k} does not match the planes {first['dtype']}"
                                    f"{first['shape']} (expected int32[N, {words}])")  # fmt: skip
        n = first["shape"][0]
        for j in range(1, MAX_TOP_BITS):
            plane = entries.get(plane_tensor_name(planes, j))
            if plane is not None and (plane["dtype"], plane["shape"]) != ("int32", [n, words]):
                raise fail(path, f"plane {j} is not int32[{n}, {words}] like plane 0")
        shape = [n, k // g]
        for key, dtype in (("scale", "float32"), ("zero_point", "int32")):
            name = group[key]
            if name is None:
                continue
            entry = entries.get(name)
            if entry is None:
                raise fail(f"{path}.{key}", f"names no tensor of the file ({name!r})")
            if (entry["dtype"], entry["shape"]) != (dtype, shape):
                raise fail(f"{path}.{key}", f"tensor {name!r} is {entry['dtype']}"
                                            f"{entry['shape']}, expected {dtype}{shape}")  # fmt: skip
            if name in owners:
                raise fail(f"{path}.{key}", f"tensor {name!r} is already used")
            owners[name] = planes


def check_group_values(header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Scales finite and at least 2^-126 (so 1/scale is finite); zero points within
    +-2^16; for the group tensors among `tensors` (the sections just read)."""
    for planes, group in header.get("groups", {}).items():
        scale = tensors.get(group["scale"])
        if scale is not None and not bool(torch.all(torch.isfinite(scale) & (scale >= _MIN_SCALE))):
            raise fail(
                f"tensor {group['scale']!r}",
                f"per-group scales of {planes!r} must be finite and >= 2^-126",
            )
        zp = tensors.get(group["zero_point"]) if group["zero_point"] else None
        if zp is not None and bool(torch.any(zp.abs() > MAX_ZERO_POINT)):
            raise fail(
                f"tensor {group['zero_point']!r}",
                f"per-group zero points of {planes!r} must be within +-{MAX_ZERO_POINT}",
            )
