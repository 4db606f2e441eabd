"""ARCHITECTURE.md matches the code: every package it names exists, every import between
migbed's packages is one its table allows, Ray stays at the edges, and the Xen model and the
workloads open no sockets and start no threads."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("nodes", "workloads", "cluster")


def allowed_imports() -> dict[str, set[str]]:
    """The package table of ARCHITECTURE.md: package -> the packages it may import."""
    table: dict[str, set[str]] = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`[\w.]+`", cells[0]):
            continue
        table[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return table


def package_of(module: str, packages: set[str]) -> str | None:
    """The longest package of the table that `module` lies in."""
    best = None
    for p in packages:
        if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts == ("nodes",):
                continue             # the package of packages: a docstring only
            out.append((".".join(parts), path))
    return out


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_every_package_in_the_table_exists():
    table = allowed_imports()
    assert len(table) >= 8, "the package table of ARCHITECTURE.md was not found"
    for package in table:
        path = ROOT.joinpath(*package.split("."))
        assert path.is_dir() or path.with_suffix(".py").is_file(), package
        for allowed in table[package]:
            assert allowed in table, f"{package} may import {allowed}, which the table lacks"


def test_every_module_belongs_to_a_package_of_the_table():
    table = allowed_imports()
    for module, _ in modules():
        assert package_of(module, set(table)) is not None, module


@pytest.mark.parametrize("module,path", modules(), ids=lambda x: str(x))
def test_imports_go_only_where_the_table_allows(module, path):
    table = allowed_imports()
    packages = set(table)
    here = package_of(module, packages)
    for name in imports(path):
        if name.split(".")[0] not in OURS:
            continue
        there = package_of(name, packages)
        if there is None or there == here:
            continue
        assert there in table[here], f"{module} imports {name}: {here} may not import {there}"


def test_ray_only_at_the_edges():
    for module, path in modules():
        uses_ray = any(n.split(".")[0] == "ray" for n in imports(path))
        if uses_ray:
            assert module == "nodes.host.actor" or module.startswith("cluster"), module


def test_the_model_and_the_workloads_open_no_sockets_and_start_no_threads():
    for module, path in modules():
        if not (module.startswith("nodes.xen") or module.startswith("workloads")):
            continue
        names = imports(path)
        assert not {"socket", "select", "subprocess", "ray"} & {n.split(".")[0] for n in names}
        src = path.read_text()
        if module != "workloads.vcpu":       # the vCPU is the one thread a guest has
            assert "Thread(" not in src, module


def _imported_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative ones resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _known(name: str, known: set[str]) -> str | None:
    """The longest module of ours that `name` is or lies in (`a.b.func` -> `a.b`)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def edges_of(module: str, path: Path, source: str, known: set[str]) -> set[str]:
    """The modules of ours that `source` (the text of `module` at `path`) imports, counting
    every import statement wherever it stands (top level, inside a function, under
    `if TYPE_CHECKING:`), relative ones resolved. `from pkg import name` is an edge to
    `pkg.name` when that is a module, to `pkg` (its `__init__`) otherwise."""
    out: set[str | None] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(_known(a.name, known) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _imported_from(module, path, node)
            out.update(_known(f"{base}.{a.name}", known) for a in node.names)
    return {m for m in out if m and m != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (`edges_of`), for every module of ours."""
    found = modules()
    known = {m for m, _ in found}
    return {m: edges_of(m, p, p.read_text(), known) for m, p in found}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete cycle through a component, as a readable chain `a -> b -> a`."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:                  # breadth first inside the component, back to `start`
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    chain = [start]
                    while v != start:
                        chain.append(v)
                        v = parents[v]
                    return " -> ".join([start, *reversed(chain[1:]), start])
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    return " <-> ".join(component)


def test_the_import_graph_sees_every_kind_of_import():
    known = {"p", "p.a", "p.b", "p.e", "p.q", "p.q.c", "p.q.d", "p.q.f"}
    source = """
import p.a
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from p.b import Thing
def later():
    from .c import helper
    from . import d
from ..q import f, not_a_module
from p import e
"""
    edges = edges_of("p.q.g", ROOT / "p" / "q" / "g.py", source, known)
    assert edges == {"p.a", "p.b", "p.q.c", "p.q.d", "p.q.f", "p.q", "p.e"}
    package = edges_of("p.q", ROOT / "p" / "q" / "__init__.py", "from . import f\nfrom .. import a",
                       known)
    assert package == {"p.q.f", "p.a"}
    assert "cluster.sweep.outputs" in import_graph()["cluster.sweep"]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    cycles = list(strongly_connected(graph))
    assert not cycles, "import cycles (every import counts, in functions and under " \
        "TYPE_CHECKING too):\n" + "\n".join(
            f"{a_cycle(graph, c)}   (all tied: {', '.join(c)})" for c in cycles)


@pytest.mark.parametrize("top", ["nodes", "cluster"])
def test_no_two_modules_share_a_file_name(top):
    """A traceback line names its module unambiguously: within `nodes/` and within `cluster/`
    every module's file name is its own (`__init__` and `__main__` aside)."""
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        if path.stem not in ("__init__", "__main__"):
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not shared, f"file names used twice in {top}/: {shared}"
