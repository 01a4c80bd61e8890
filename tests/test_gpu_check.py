"""The CPU-side behaviour of `make gpu-check` (bench/gpu_check.py): GPU detection, the dry run,
argument handling and the result files. Nothing here builds the extension or needs a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_bench, gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python")])
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _so_files():
    return {p: p.stat().st_mtime for p in (ROOT / "eqkernels").glob("_C*.so")}


def test_without_a_gpu_one_line_and_nonzero_exit(tmp_path):
    """CUDA_VISIBLE_DEVICES='' hides any GPU, so this holds on a GPU machine too."""
    out = tmp_path / "results"
    before = _so_files()
    res = _run([str(out)], {"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines == ["gpu-check: no CUDA GPU (torch.cuda.is_available() is False); nothing run"]
    assert not out.exists()
    assert _so_files() == before  # nothing was built


def test_dry_run_checks_the_environment_and_lists_the_stages(capsys, monkeypatch):
    before = _so_files()
    code = gpu_check.main(["--dry-run"])
    text = capsys.readouterr().out
    assert "gpu-check would run: env, build, tests, fake_quant, lowbit, supernet" in text
    for item in ("python:", "torch:", "triton:", "nvcc:", "pytest:"):
        assert item in text
    problems = gpu_check.environment()["problems"]
    assert code == (1 if problems else 0)
    assert all(f"problem: {p}" in text for p in problems)
    assert _so_files() == before
    # A missing requirement is reported and fails the dry run.
    monkeypatch.setattr(gpu_check, "nvcc_path", lambda: None)
    assert gpu_check.main(["--dry-run", "--stages", "env,build"]) == 1
    text = capsys.readouterr().out
    assert "problem: nvcc not found" in text and "would run: env, build" in text


def test_dry_run_subprocess_exits_zero_without_a_gpu():
    if gpu_check.environment()["problems"]:
        pytest.skip(f"this machine lacks: {gpu_check.environment()['problems']}")
    res = _run(["--dry-run"], {"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gpu: None" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "OUTDIR is required"),
        (["out", "--stages", "tests,fly"], "--stages='tests,fly': accepted values are env, build"),
        (["out", "--stages", ""], "accepted values are"),
        (["out", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_outdir_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(SystemExit):
        gpu_check.main([str(path)])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_stage_subset_keeps_the_pipeline_order():
    assert gpu_check.parse_args(["o", "--stages", "lowbit,env"]).stages == ["env", "lowbit"]


def test_torch_version_gate():
    assert gpu_check._version_tuple("2.11.0+cu128") == (2, 11)
    assert gpu_check._version_tuple("2.9.1") < gpu_check.MIN_TORCH
    assert gpu_check._version_tuple("2.14.1+cu130") >= gpu_check.MIN_TORCH


def test_junit_summary_lists_failures(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="1.5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[cuda]">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="s"/></testcase>'
        "</testsuite></testsuites>"
    )
    text = gpu_check._junit_summary(xml, 1)
    assert "tests: 3, failures: 1, errors: 0, skipped: 1" in text
    assert "| tests.test_a::test_bad[cuda] | assert 1 == 2 |" in text
    assert "without a report" in gpu_check._junit_summary(tmp_path / "none.xml", 2)


def test_bench_results_written_as_markdown_and_csv(tmp_path):
    rows = [
        {"provider": "torch built-in", "M": 1, "us": 30.0},
        {"provider": "eqkernels", "M": 1, "us": 10.0},
    ]
    gpu_bench._ratios(rows, ("M",), "torch built-in", "x")
    assert [r["x"] for r in rows] == [1.0, 3.0]
    csv_path, md_path = gpu_bench.write("lowbit", rows, tmp_path, note="Device: test")
    assert csv_path.read_text().splitlines() == [
        "provider,M,us,x",
        "torch built-in,1,30.0,1.0",
        "eqkernels,1,10.0,3.0",
    ]
    md = md_path.read_text()
    assert "Target: W4 GEMV" in md and "| eqkernels | 1 | 10 | 3 |" in md


def test_make_gpu_check_uses_system_python_not_the_venv():
    if not (ROOT / "Makefile").exists() or not shutil_which("make"):
        pytest.skip("make is not installed")
    # A parent make (CI's `make test`) passes its command-line variables through MAKEFLAGS.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.pop("PYTHON", None)
    env.pop("GPU_OUT", None)
    res = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "python3 -m bench.gpu_check gpu-check-results"
    res = subprocess.run(
        ["make", "-n", "gpu-check", "PYTHON=/opt/py/bin/python3", "GPU_OUT=/tmp/r"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.stdout.strip() == "/opt/py/bin/python3 -m bench.gpu_check /tmp/r"


def shutil_which(name):
    import shutil

    return shutil.which(name)


@pytest.mark.parametrize("ninja", [True, False])
def test_build_stage_command_for_the_local_arch(monkeypatch, tmp_path, ninja):
    """The build command and its environment (captured, not run: CI never rebuilds here)."""
    seen = {}

    def fake_run(cmd, log, env, timeout):
        seen.update(cmd=cmd, env=env, log=log)
        return 0

    monkeypatch.setattr(gpu_check, "_run_logged", fake_run)
    monkeypatch.setattr(gpu_check, "ninja_available", lambda: ninja)
    report = {"info": {"arch": "9.0"}, "problems": []}
    assert gpu_check.stage_build(tmp_path, report)
    env = seen["env"]
    assert env["EQK_BUILD_CUDA"] == "1" and env["EQK_CUDA_ARCHS"] == "9.0"
    assert env["MAX_JOBS"] == str(os.cpu_count())
    assert seen["cmd"][0] == sys.executable and seen["log"] == tmp_path / "build.log"
    if ninja:
        assert seen["cmd"][1:] == ["setup.py", "-q", "build_ext", "--inplace"]
    else:
        assert seen["cmd"][1:] == ["-m", "bench.parallel_build", str(os.cpu_count())]


def test_stage_loop_times_each_stage_and_keeps_going_after_a_failure(monkeypatch, tmp_path, capsys):
    """The driver with a pretend GPU and stand-in stages: every stage is timed and recorded, a
    failing test stage does not lose the benchmark after it, a failing build stops the run."""
    report = {"info": {"gpu": "Pretend GPU", "arch": "9.0", "python": "3.12"}, "problems": []}
    monkeypatch.setattr(gpu_check, "environment", lambda: report)
    monkeypatch.setattr(gpu_check, "stage_build", lambda out, rep: True)

    def broken_tests(out, rep):
        raise RuntimeError("pytest exploded")

    monkeypatch.setattr(gpu_check, "stage_tests", broken_tests)
    monkeypatch.setattr(
        gpu_check, "stage_bench", lambda name, out: (out / f"{name}.md").write_text("rows") > 0
    )
    out = tmp_path / "r"
    assert gpu_check.main([str(out), "--stages", "env,build,tests,lowbit"]) == 1
    text = capsys.readouterr().out
    for stage, status in (("env", "ok"), ("build", "ok"), ("tests", "FAILED"), ("lowbit", "ok")):
        assert f"[{stage}] {status} in " in text
    assert "failed stages: tests" in text
    assert "| gpu | Pretend GPU |" in (out / "env.md").read_text()
    assert (out / "tests.error.txt").read_text() == "RuntimeError: pytest exploded\n"
    assert (out / "lowbit.md").read_text() == "rows"
    lines = (out / "stages.csv").read_text().splitlines()
    assert lines[0] == "stage,status,seconds"
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["env", "ok"], ["build", "ok"], ["tests", "failed"], ["lowbit", "ok"]
    ]  # fmt: skip
    monkeypatch.setattr(gpu_check, "stage_build", lambda out, rep: False)
    assert gpu_check.main([str(tmp_path / "r2"), "--stages", "build,lowbit"]) == 1
    text = capsys.readouterr().out
    assert "[build] FAILED" in text and "[lowbit]" not in text
