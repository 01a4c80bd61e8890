"""The .eqk bit-plane file: layout constants, the validated header model, writer and reader
(DESIGN.md "The .eqk file", docs/eqk-format.md)."""

from .fields import is_int
from .groups import GROUP_QUANTUM
from .layout import (
    ALIGN,
    DTYPES,
    FORMAT_NAME,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_SECTIONS,
    MAX_TENSORS,
    MAX_TOP_BITS,
    PLANE_SEPARATOR,
    VERSION_MAJOR,
    VERSION_MINOR,
    EqkFormatError,
    align64,
    plane_tensor_name,
    split_planes,
)
from .reader import EqkFile, read_eqk, read_eqk_header
from .schema import identity_of, validate_header
from .writer import write_eqk

__all__ = [
    "ALIGN",
    "DTYPES",
    "FORMAT_NAME",
    "GROUP_QUANTUM",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_SECTIONS",
    "MAX_TENSORS",
    "MAX_TOP_BITS",
    "PLANE_SEPARATOR",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "EqkFile",
    "EqkFormatError",
    "align64",
    "identity_of",
    "is_int",
    "plane_tensor_name",
    "read_eqk",
    "read_eqk_header",
    "split_planes",
    "validate_header",
    "write_eqk",
]
