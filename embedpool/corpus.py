"""The built-in benchmark corpus: chunks of the Python standard library's own source.

Deterministic (sorted files, fixed chunking) and present wherever Python is, so ``embedpool
bench`` numbers are comparable between machines with the same Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from embedpool.inputs import Chunk, read_text_file

#: Packages whose sources are mostly generated data or tests: skipped for a code-like mix.
_SKIP = ("test", "idlelib", "lib2to3", "site-packages", "encodings", "pydoc_data", "tkinter")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_chunks(n: int, root: Path | None = None) -> list[Chunk]:
    """The first ``n`` chunks of stdlib ``*.py`` files in sorted path order."""
    base = root or stdlib_dir()
    files = sorted(
        p
        for p in base.rglob("*.py")
        if not any(part in _SKIP for part in p.relative_to(base).parts)
    )
    out: list[Chunk] = []
    for f in files:
        for x in read_text_file(f, str(f.relative_to(base))):
            if isinstance(x, Chunk):
                out.append(x)
                if len(out) >= n:
                    return out
    return out
