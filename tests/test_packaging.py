"""Package metadata: pyproject.toml's [project] is the one place, the version has one source."""

import ast
from pathlib import Path

import eqnet
import pytest

import eqkernels

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the package itself needs >= 3.10

REPO = Path(__file__).resolve().parent.parent


def test_version_has_one_source():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "eqkernels.__version__"}
    assert eqnet.__version__ == eqkernels.__version__
    sources = sorted(REPO.glob("eqkernels/**/*.py")) + sorted(REPO.glob("python/**/*.py"))
    sources.append(REPO / "setup.py")
    assigned = [
        p.relative_to(REPO).as_posix()
        for p in sources
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
    ]
    assert assigned == ["eqkernels/__init__.py"]


def test_metadata_lives_in_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "eqkernels" and project["requires-python"] == ">=3.10"
    assert project["scripts"] == {"eqnet": "eqnet.cli:main"}
    assert "pytest" in project["optional-dependencies"]["test"]
    calls = [
        node
        for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    assert len(calls) == 1
    assert {k.arg for k in calls[0].keywords} == {"ext_modules", "cmdclass"}
    from eqnet.cli import main

    assert callable(main)
