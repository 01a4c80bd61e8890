"""Backend choice (eqkernels/backend.py) and the lazy extension loader's messages (_ext.py).

The extension's presence is simulated by replacing the loader's probes with monkeypatch, so
these tests say the same thing whether or not _C is built here.
"""

import logging
import types

import pytest
import torch

import eqkernels
from eqkernels import _ext, backend

CPU = torch.device("cpu")
PREF = {"cpu": ("cpp",), "cuda": ("triton",)}


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, ImportError("simulated: no _C")))


@pytest.fixture
def extension_without_kernels(monkeypatch):
    module = types.SimpleNamespace(with_cuda=False)
    monkeypatch.setattr(_ext, "_load", lambda: (module, None))


def test_validate_name_accepts_known_and_reads_env(monkeypatch):
    for name in backend.BACKENDS:
        assert backend.validate_name(name) == name
    monkeypatch.setenv("EQK_BACKEND", "torch")
    assert backend.validate_name(None) == "torch"
    monkeypatch.delenv("EQK_BACKEND")
    assert backend.validate_name(None) == "auto"
    with pytest.raises(ValueError, match=r"backend='gpu'.*auto, torch, triton, cpp, cuda"):
        backend.validate_name("gpu")


def test_explicit_backend_without_implementation_for_device_raises():
    with pytest.raises(backend.BackendUnavailable, match=r"no implementation for cpu.*cpp, torch"):
        backend.choose("cuda", CPU, "op", PREF)
    assert backend.choose("torch", CPU, "op", PREF) == "torch"


def test_explicit_cpp_without_extension_says_how_to_build(no_extension):
    with pytest.raises(backend.BackendUnavailable, match=r"not built.*make build"):
        backend.choose("cpp", CPU, "op", PREF, kernels={"cpp": "k"})


def test_explicit_cpp_without_the_kernel_names_it(extension_without_kernels):
    with pytest.raises(backend.BackendUnavailable, match="no kernel 'fq_kernel'"):
        backend.choose("cpp", CPU, "op", PREF, kernels={"cpp": "fq_kernel"})


def test_auto_falls_back_and_logs_once_at_info(no_extension, caplog):
    backend._logged.discard(("op_fallback_test", "cpu", "torch"))
    with caplog.at_level(logging.INFO, logger="eqkernels"):
        assert backend.choose("auto", CPU, "op_fallback_test", PREF) == "torch"
        assert backend.choose("auto", CPU, "op_fallback_test", PREF) == "torch"
    messages = [r.getMessage() for r in caplog.records if "op_fallback_test" in r.getMessage()]
    assert len(messages) == 1 and "cpp" in messages[0] and messages[0].count("using torch") == 1
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pref = {"cpu": ("cpp", "triton")}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("triton", CPU, "op", pref) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backend.choose("triton", CPU, "op", pref)


def test_check_values_enabled(monkeypatch):
    monkeypatch.delenv("EQK_CHECK", raising=False)
    assert backend.check_values_enabled(torch.ones(1))
    assert not backend.check_values_enabled(torch.ones(1, device="meta"))
    with torch._subclasses.FakeTensorMode():
        assert not backend.check_values_enabled(torch.ones(1))
    monkeypatch.setenv("EQK_CHECK", "1")
    assert backend.check_values_enabled(torch.ones(1, device="meta"))


def test_ext_missing_raises_with_build_hint(no_extension):
    assert not _ext.available() and not _ext.has_kernel("x") and not _ext.cuda_available()
    with pytest.raises(_ext.ExtensionUnavailable, match=r"simulated: no _C.*make build"):
        _ext.ext()
    with pytest.raises(RuntimeError, match="make build"):  # ExtensionUnavailable is one
        _ext.kernel("fake_quant_fwd_cpu")


def test_ext_missing_kernel_is_named(extension_without_kernels):
    assert _ext.available() and not _ext.has_kernel("fake_quant_fwd_cpu")
    with pytest.raises(_ext.ExtensionUnavailable, match="no kernel 'fake_quant_fwd_cpu'"):
        _ext.kernel("fake_quant_fwd_cpu")


def test_ext_dir_without_module_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("EQK_EXT_DIR", str(tmp_path))
    module, error = _ext._load.__wrapped__()  # the uncached loader, so nothing is poisoned
    assert module is None and "holds no _C" in str(error)


def test_fake_quant_cpp_backend_without_extension_raises(no_extension):
    x, s = torch.randn(8), torch.ones(1)
    with pytest.raises(eqkernels.BackendUnavailable, match="make build"):
        eqkernels.fake_quant(x, s, None, -8, 7, backend="cpp")
    # auto falls back to the reference and still computes
    y = eqkernels.fake_quant(x, s, None, -8, 7, backend="auto")
    assert torch.equal(y, eqkernels.fake_quant(x, s, None, -8, 7, backend="torch"))


def test_force_cpu_isa_uses_the_extension_levels():
    """The ISA cap the CPU kernels receive is _C's number for the level's name, per thread and
    per block; the kernels never run above it."""
    from conftest import need_kernel

    need_kernel("bitplanes_cpu_isa")
    levels = backend.cpu_isa_levels()
    assert set(levels) == {"portable", "avx2", "avx512", "avx512gfni"}
    assert sorted(levels.values()) == list(range(len(levels)))  # an order, lowest first
    assert backend.cpu_isa_cap() == -1
    level_of = _ext.kernel("bitplanes_cpu_isa")
    for name, number in levels.items():
        with backend.force_cpu_isa(name):
            assert backend.cpu_isa_cap() == number
            assert level_of(backend.cpu_isa_cap()) <= number
        assert backend.cpu_isa_cap() == -1
    with pytest.raises(ValueError, match="isa='sse': accepted values are portable"):
        with backend.force_cpu_isa("sse"):
            pass
