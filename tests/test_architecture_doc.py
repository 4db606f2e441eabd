"""ARCHITECTURE.md stays true: every file or folder it names exists, and every class, function,
method or constant it names is defined in a module its own paragraph names (so "`LiveRounds` in
`nodes/migration/send/sender.py`" fails the day `LiveRounds` moves), or, in a paragraph that names
no module, somewhere in the tree."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "ARCHITECTURE.md"
TREES = ("nodes", "cluster", "workloads", "dashboards")
PATH = re.compile(r"^[\w.-]+(/[\w.-]+)+/?$")            # nodes/migration/send/pipeline.py, postcopy/
SYMBOL = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")    # Domain.write_words, decide(stats)


def paragraphs() -> list[str]:
    """The doc's paragraphs and list items (a numbered step or a bullet is one each)."""
    out, current = [], []
    for line in DOC.read_text().splitlines():
        starts_item = re.match(r"^\s*(\d+\.|-|\|)\s", line) is not None
        if not line.strip() or starts_item:
            if current:
                out.append(" ".join(current))
            current = [] if not line.strip() else [line]
        else:
            current.append(line)
    if current:
        out.append(" ".join(current))
    return out


def tokens(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def named_paths(text: str) -> list[str]:
    return [t for t in tokens(text) if PATH.match(t)]


@cache
def definitions(path: Path) -> frozenset[str]:
    """What a module defines: classes, functions, methods (Class.method), module constants,
    class fields and attributes set on self (Class.attr)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names |= _top_level(node)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n}" for n in _members(node)}
    return frozenset(names)


def _top_level(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _members(cls: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for node in cls.body:
        names |= _top_level(node)
    for node in ast.walk(cls):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                      and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def modules_in(path: str) -> list[Path]:
    p = ROOT / path
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def all_modules() -> list[Path]:
    return [p for top in TREES for p in sorted((ROOT / top).rglob("*.py"))]


def symbols(text: str) -> list[str]:
    """The code names of a paragraph worth checking: CamelCase classes (and their members),
    CONSTANTS, and calls like `decide(stats)`; not words such as `setup` or report keys."""
    out = []
    for t in tokens(text):
        if PATH.match(t) or " " in t.split("(")[0]:
            continue
        m = SYMBOL.match(t)
        if m is None:
            continue
        name = m.group(0)
        head = name.split(".")[0]
        if head[0].isupper() or "(" in t:
            out.append(name)
    return out


def is_defined(name: str, where: list[Path]) -> bool:
    head = name.split(".")[0]
    if head[0].islower():                           # ctx.sample("event"): the method exists
        leaf = name.split(".")[-1]
        return any(leaf in {d.split(".")[-1] for d in definitions(p)} for p in where)
    return any(name in definitions(p) for p in where)


def test_every_path_the_doc_names_exists():
    missing = sorted({p for text in paragraphs() for p in named_paths(text)
                      if not (ROOT / p).exists()})
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_name_is_defined_where_its_paragraph_says():
    wrong = []
    for text in paragraphs():
        files = [m for p in named_paths(text) if (ROOT / p).exists() for m in modules_in(p)
                 if m.suffix == ".py"]
        for name in symbols(text):
            if not is_defined(name, files or all_modules()):
                if files and is_defined(name, all_modules()):
                    wrong.append(f"{name} is not in {', '.join(named_paths(text))}")
                else:
                    wrong.append(f"{name} is defined nowhere")
    assert not wrong, "ARCHITECTURE.md: " + "; ".join(sorted(set(wrong)))


def test_the_checker_catches_a_moved_name():
    """The rule itself: a class named beside the wrong module is caught."""
    files = modules_in("nodes/xen/memory.py")
    assert not is_defined("PagePipeline.send_batch", files)
    assert is_defined("PagePipeline.send_batch", all_modules())
