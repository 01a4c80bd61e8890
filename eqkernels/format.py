"""The .eqk bit-plane file (DESIGN.md "The .eqk file", docs/eqk-format.md).

The implementation lives in `eqkernels.eqk` (layout, validated header schema, writer, reader);
this module keeps the public names importable from `eqkernels.format`.
"""

from .eqk import *  # noqa: F403
from .eqk import __all__ as __all__
