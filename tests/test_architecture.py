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
