"""Test configuration. TRITON_INTERPRET must be set before anything imports triton, so that
the Triton kernels run on CPU tensors (there is no GPU in this workplace)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def cpp_available() -> bool:
    from eqkernels import _ext

    return _ext.available()


requires_cpp = pytest.mark.skipif(
    os.environ.get("EQK_REQUIRE_EXT") != "1" and not cpp_available(),
    reason="eqkernels._C is not built",
)


def need_kernel(name: str) -> None:
    """Skip a test without the `_C` kernel `name`, or fail it where the extension is required
    (EQK_REQUIRE_EXT=1, as in CI)."""
    from eqkernels import _ext

    if not _ext.has_kernel(name):
        if os.environ.get("EQK_REQUIRE_EXT") == "1":
            pytest.fail(f"EQK_REQUIRE_EXT=1 but eqkernels._C has no kernel {name!r}")
        pytest.skip(f"eqkernels._C has no kernel {name!r}")
