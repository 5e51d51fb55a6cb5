"""The package's shape, read from its source (an ast walk, no import): no import circle
between embedpool's modules, and every module opens with a docstring that says its role.

The import graph is what runs when a module is imported: its module-level imports (in ``try``,
``if`` and class bodies too), not those inside functions (run later, on use) or under
``if TYPE_CHECKING:`` (never run). ``from X import a`` is an edge to ``X`` (it runs X's
``__init__``) and to ``X.a`` when that is a module; ``import X.a`` an edge to ``X.a``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "embedpool"
#: A docstring shorter than this names nothing (a role takes a sentence).
MIN_DOCSTRING_CHARS = 30


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_at_import(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements a module body runs when it is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _run_at_import(node.body)
            yield from _run_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _run_at_import(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _run_at_import(node.body)


def imports_of(name: str, path: Path) -> set[str]:
    """The embedpool modules ``name`` imports at module level."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _run_at_import(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_checker_finds_a_circle_and_the_packages_modules() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert len(graph) > 50
    # the walk sees relative and absolute imports, and not those under TYPE_CHECKING
    assert "embedpool.executor" in graph["embedpool.workqueue"]
    assert "embedpool.cache" not in graph["embedpool.job"]


def test_no_import_circle() -> None:
    found = circles(import_graph())
    assert found == [], "import circles (strongly connected components): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_models_and_graph_families_do_not_import_each_other_at_module_level() -> None:
    """The issue's second circle (models/resolve -> graph/families -> models)."""
    graph = import_graph()
    families = {m for m in graph if m.startswith("embedpool.graph.families")}
    models = {m for m in graph if m.startswith("embedpool.models")}
    assert not {m for f in families for m in graph[f]} & models
    assert not {m for r in models for m in graph[r]} & families


def test_every_module_has_a_docstring_that_states_its_role() -> None:
    missing = []
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text(), str(path)))
        if doc is None or len(doc.strip()) < MIN_DOCSTRING_CHARS:
            missing.append(name)
    assert missing == [], f"modules without a docstring stating their role: {missing}"


def test_a_pools_parent_does_not_import_onnxruntime() -> None:
    """The parent of a pool resolves the model, builds the engine recipe and pickles it for
    its workers without onnxruntime (its import delayed the first worker's start and cost the
    parent's RSS); the engine imports it where a session is made."""
    code = (
        "import pickle, sys\n"
        "import embedpool.cli, embedpool.job, embedpool.placement, embedpool.engine\n"
        "from embedpool.models import resolve_model\n"
        "from embedpool.placement import engine_recipe\n"
        "pickle.dumps(engine_recipe(resolve_model(), 'int8', 1))\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
