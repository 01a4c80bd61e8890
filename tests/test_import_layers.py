"""The package's imports point down through public names only, with no cycle.

Every `import` in python/eqnet and eqkernels is read with `ast` (nothing is executed), including
the imports inside functions, and `importlib.import_module("...")` calls with a literal name.
The layer order, lowest first:

    eqkernels  <  space, data, models  <  nn  <  convert  <  run
               <  train, search, deploy  <  cli (cli.py and commands/)  <  eqnet/__init__

An arrow may only point to a lower rank; parts of the same rank never import one another
(train, search and deploy stay independent). Across modules no private name is imported or
used as a module attribute (`from m import _x`, `m._x`); a private module (`_ext`) is private
to its own part.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"eqnet": REPO / "python" / "eqnet", "eqkernels": REPO / "eqkernels"}

RANK = {
    "eqkernels": 0,
    "space": 1,
    "data": 1,
    "models": 1,
    "nn": 2,
    "convert": 3,
    "run": 4,
    "train": 5,
    "search": 5,
    "deploy": 5,
    "cli": 6,
    "eqnet": 7,  # the package facade (eqnet/__init__.py) re-exports the parts below it
}


def _modules() -> dict[str, Path]:
    out = {}
    for top, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _part(module: str) -> str:
    """The layer part of a module: eqkernels, the eqnet facade, cli, or eqnet's subpackage."""
    parts = module.split(".")
    if parts[0] == "eqkernels":
        return "eqkernels"
    if len(parts) == 1:
        return "eqnet"
    return "cli" if parts[1] in ("cli", "commands") else parts[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(importer: str, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _own(name: str) -> bool:
    return name.split(".")[0] in ROOTS


def _known(name: str) -> str:
    """The longest prefix of dotted `name` that is a module of the packages."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _imports(importer: str, tree: ast.AST):
    """Yields (line, target module, imported name or None) for every own import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _own(alias.name):
                    yield node.lineno, _known(alias.name), None
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, node.level, node.module)
            if not _own(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, _known(base), alias.name
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and _own(node.args[0].value)
        ):
            yield node.lineno, _known(node.args[0].value), None


def _module_aliases(importer: str, tree: ast.AST) -> dict[str, str]:
    """Local names bound to own modules (`import a.b as m`, `from a import b`)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _own(alias.name) and alias.name in MODULES:
                    out[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    out[alias.asname or alias.name] = f"{base}.{alias.name}"
    return out


@functools.cache
def _graph():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    problems = []
    for importer, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = f"{path.relative_to(REPO)}"
        for line, target, name in _imports(importer, tree):
            if not target or target == importer:
                continue
            edges[importer].add(target)
            src, dst = _part(importer), _part(target)
            if src != dst and RANK[dst] >= RANK[src]:
                problems.append(f"{where}:{line}: {src} imports {target} ({dst}): not downward")
            if name is not None and _private(name):
                problems.append(f"{where}:{line}: imports the private name {target}.{name}")
            if src != dst and any(_private(p) for p in target.split(".")):
                problems.append(f"{where}:{line}: imports the private module {target}")
        aliases = _module_aliases(importer, tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != importer
                and _private(node.attr)
            ):
                target = aliases[node.value.id]
                problems.append(
                    f"{where}:{node.lineno}: uses the private name {target}.{node.attr}"
                )
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


# A package's __init__ re-exporting its own submodules is not a cycle with them: a submodule
# importing a sibling loads the package first, but the package never needs the submodule's
# import to finish. Only edges between two non-package modules, or from a package to a module
# outside it, can close a cycle.
def _cycle_edges(edges):
    out = {}
    for src, targets in edges.items():
        keep = set()
        for dst in targets:
            if _is_package(dst) and src.startswith(dst + "."):
                continue  # a submodule reading its own package's names
            keep.add(dst)
        out[src] = keep
    return out


def test_every_part_has_a_rank():
    assert {_part(m) for m in MODULES} <= set(RANK)
    assert "eqnet.run" in MODULES and "eqnet.search.pipeline" in MODULES


def test_imports_point_down_through_public_names():
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    edges, _ = _graph()
    cycles = _cycles(_cycle_edges(edges))
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_eqkernels_never_imports_eqnet():
    edges, _ = _graph()
    bad = [(s, d) for s, ds in edges.items() if s.startswith("eqkernels") for d in ds]
    assert not [(s, d) for s, d in bad if d.startswith("eqnet")]


def test_the_checker_sees_violations():
    """The walker flags what it must: an upward, a sideways and a private import."""
    tree = ast.parse(
        "from eqnet.search.genome import ChoiceTable\n"
        "def f():\n"
        "    from eqnet.deploy import export\n"
        "    from eqnet.space import _prefer\n"
        "    import eqnet.cli\n"
    )
    found = list(_imports("eqnet.train.trainer", tree))
    parts = [(_part(t), n) for _, t, n in found]
    assert ("search", "ChoiceTable") in parts and ("deploy", None) in parts
    assert ("space", "_prefer") in parts and ("cli", None) in parts
    src = _part("eqnet.train.trainer")
    upward = [t for _, t, _ in found if RANK[_part(t)] >= RANK[src] and _part(t) != src]
    assert len(upward) == 3
    assert _resolve("eqnet.deploy.loader", 1, "export") == "eqnet.deploy.export"
    assert _resolve("eqnet.nn", 2, "space") == "eqnet.space"
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
