"""embedpool.errors: the hierarchy its docstring draws is the one defined, every class in it
is raised somewhere, and no other module defines an exception of its own (issue 20)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from embedpool import errors

PACKAGE = Path(errors.__file__).resolve().parent
#: Exception classes defined outside errors.py on purpose: never seen by a caller.
PRIVATE = {
    "ApiError": "server/openai.py: carries an HTTP error to its handler, which answers with it",
    "_Truncated": "models/shipped_onnx.py: a read that ended early, caught where it is raised",
}


def defined() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__ == errors.__name__
    }


def drawn() -> dict[str, str]:
    """Each class of the docstring's tree -> its parent in the tree (the root's: "")."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w+)\b", line)
        if not m or not line.startswith("    ") or m.group(2) not in defined():
            continue
        depth = len(line) - len(line.lstrip(" │├└─"))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group(2)] = stack[-1][1] if stack else ""
        stack.append((depth, m.group(2)))
    return parents


def test_the_drawn_tree_is_the_defined_one() -> None:
    classes = defined()
    tree = drawn()
    assert sorted(tree) == sorted(classes), "a class is missing from the tree, or extra"
    for name, parent in tree.items():
        cls = classes[name]
        if parent:
            assert cls.__bases__[0] is classes[parent], f"{name}'s parent is not {parent}"
        assert issubclass(cls, errors.EmbedpoolError)


def test_every_drawn_error_is_raised_somewhere() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "errors.py")
    unused = [
        name
        for name in defined()
        if name != "EmbedpoolError" and not re.search(rf"\b{name}\(", source)
    ]
    assert not unused, f"drawn but never raised: {unused}"


def test_no_module_defines_an_exception_of_its_own() -> None:
    own = re.compile(r"^class (\w+)\((?:[\w.]*(?:Error|Exception)\b)", re.M)
    found = {
        m.group(1): str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "errors.py"
        for m in own.finditer(p.read_text())
    }
    assert set(found) <= set(PRIVATE), f"exceptions outside errors.py: {found}"
