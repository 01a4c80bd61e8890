"""Constants and naming rules of the .eqk byte layout (docs/eqk-format.md)."""

from __future__ import annotations

import struct

import torch

MAGIC = b"EQK1"
FORMAT_NAME = "eqk"
# Major versions are incompatible (rejected by readers of another major); minor versions only
# add keys, which older readers ignore. 1.1 adds the per-section digests and the identity, 1.2
# the per-group scales of bit-plane tensors (`groups`).
VERSION_MAJOR = 1
VERSION_MINOR = 2
# Parsing JSON costs up to ~30 bytes of Python objects per header byte (a header of nested
# empty arrays), so the header size and its object count are bounded before parsing.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_CONTAINERS = 1 << 20
ALIGN = 64
PREAMBLE = struct.Struct("<4sQ")  # magic, header length
CRC = struct.Struct("<I")
READ_CHUNK = 1 << 24

# Bounds on header counts: far above any real model, low enough that no loop or allocation
# driven by a header value can run away.
MAX_SECTIONS = 4096
MAX_TENSORS = 1 << 18
MAX_DIMS = 8
MAX_TOP_BITS = 8
MAX_NAME_CHARS = 1024
# No tensor's element count times its item size (zero dimensions skipped) may reach this, so
# no size product overflows in torch or in the reader.
MAX_TENSOR_BYTES = 1 << 48
DIGEST = "sha256"

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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "int64": 8,
}

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
