"""The parser of ggml's `test-backend-ops perf` console output (bench/ggml_perf.py), on a line
of its real output (ANSI colours included) and a made-up second row."""

import pytest

from bench import ggml_perf

REAL = (
    "Backend 1/1: CPU\n  Device description: AMD EPYC\n\n"
    "  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,"
    "o=1,src_overlap=0):                     69 runs - 20753.80 us/run - 117.44 MFLOP/run - "
    "\x1b[1;34m  5.66 GFLOPS\x1b[0m\n"
    "  MUL_MAT(type_a=q4_K,type_b=f32,m=4096,n=1,k=14336,bs=[1,1]):   12 runs -   812.50 us/run"
    " - 117.44 MFLOP/run - 144.54 GFLOPS\n"
    "  Backend CPU: \x1b[1;32mOK\x1b[0m\n"
)


def test_parse_reads_every_perf_row():
    rows = ggml_perf.parse(REAL)
    assert [r["params"]["type_a"] for r in rows] == ["q4_0", "q4_K"]
    first = rows[0]
    assert first["runs"] == 69 and first["us_per_run"] == 20753.80
    assert first["gflops"] == pytest.approx(5.66)
    assert first["params"]["bs"] == "[1,1]" and first["params"]["per"] == "[0,1,2,3]"
    assert (first["params"]["m"], first["params"]["n"], first["params"]["k"]) == (
        "4096",
        "1",
        "14336",
    )
    assert rows[1]["us_per_run"] == 812.5 and rows[1]["gflops"] == pytest.approx(144.54)
    assert ggml_perf.parse("no perf lines here") == []


def test_missing_build_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no bin/test-backend-ops there"):
        ggml_perf.binary(tmp_path)
