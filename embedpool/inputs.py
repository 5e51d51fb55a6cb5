"""Reading a job's inputs: JSONL records, text files and directories, as (id, text) chunks.

- JSONL: one ``{"id": ..., "text": ...}`` per line. ``id`` is optional (default
  ``<file>:<line>``); a bad line (not UTF-8, not JSON, not an object, no ``text``, ``text``
  not a string) becomes an ``InputError`` naming the file, line and id, and the rest of the
  file is read on.
- Any other file, or every text file under a directory, is split into chunks of lines whose
  ids name the file and lines (``src/app.py:L10-L52``). Splits prefer top-level definition
  boundaries (``def``/``class``/``function``/``fn``/... at column 0) and blank lines, which is
  cheap and keeps most functions whole. Binary files and VCS/build folders are skipped.
- Empty or whitespace-only texts are kept and embedded (like sentence-transformers does: the
  vector of ``[CLS] [SEP]``); the job report counts them.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedpool.errors import InputError

#: Chunk size in lines. 40-60 lines of code is ~300-600 MiniLM tokens: near the model's
#: window and the size code-search tools index.
CHUNK_TARGET_LINES = 40
CHUNK_MAX_LINES = 60
#: Files larger than this are split but never read whole into one chunk.
MAX_FILE_BYTES = 16 * 1024 * 1024
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv",
                       ".mypy_cache", ".pytest_cache", ".ruff_cache", "dist", "build", ".tox",
                       ".idea", ".vscode", "target"})
_BOUNDARY = re.compile(r"^(def |class |async def |function |export |fn |pub |func |impl |"
                       r"struct |interface |type |const |let |var |#{1,3} |@)")


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str


@dataclass
class Inputs:
    chunks: list[Chunk] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)


def read_jsonl(path: Path) -> Iterator[Chunk | InputError]:
    src = str(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield InputError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                 source=src, line=lineno)
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                yield InputError(f"not valid JSON ({exc})", source=src, line=lineno)
                continue
            if not isinstance(obj, dict):
                yield InputError(f"expected a JSON object, got {type(obj).__name__}",
                                 source=src, line=lineno)
                continue
            raw_id = obj.get("id", f"{path.name}:{lineno}")
            item_id = raw_id if isinstance(raw_id, str) else json.dumps(raw_id)
            if "text" not in obj:
                yield InputError("missing field 'text'", source=src, line=lineno, item_id=item_id)
                continue
            text = obj["text"]
            if not isinstance(text, str):
                yield InputError(f"field 'text' must be a string, got {type(text).__name__}",
                                 source=src, line=lineno, item_id=item_id)
                continue
            yield Chunk(item_id, text)


def split_lines(lines: Sequence[str], target: int = CHUNK_TARGET_LINES,
                maximum: int = CHUNK_MAX_LINES) -> list[tuple[int, int]]:
    """(start, end) 0-based half-open line ranges: cut at a definition boundary or blank line
    once ``target`` lines are reached, and always at ``maximum``. Pure."""
    ranges: list[tuple[int, int]] = []
    start = 0
    n = len(lines)
    i = start
    while start < n:
        end = min(n, start + maximum)
        cut = end
        if end < n:
            for j in range(min(n, start + target), end):
                if _BOUNDARY.match(lines[j]) or not lines[j].strip():
                    cut = j if _BOUNDARY.match(lines[j]) else j + 1
                    break
            if cut <= start:
                cut = end
        ranges.append((start, cut))
        start = cut
        i += 1
    return ranges


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_text_file(path: Path, display: str) -> Iterator[Chunk | InputError]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES)
    except OSError as exc:
        yield InputError(f"cannot read: {exc.strerror}", source=display)
        return
    if _is_binary(data[:8192]):
        return
    cut = size > len(data)
    try:
        # A file read only in part may end inside a multi-byte character: the incremental
        # decoder keeps those last bytes back (final=False) instead of rejecting the file.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not cut)
    except UnicodeDecodeError as exc:
        yield InputError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=display)
        return
    if cut:
        yield InputError(f"file is {size} bytes; only the first {MAX_FILE_BYTES} were read",
                         source=display)
    lines = text.splitlines(keepends=True)
    for start, end in split_lines(lines):
        body = "".join(lines[start:end])
        if body.strip():
            yield Chunk(f"{display}:L{start + 1}-L{end}", body)


def iter_directory(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def read_inputs(paths: Sequence[Path]) -> Inputs:
    """All chunks and all input errors of the given paths, in a deterministic order."""
    out = Inputs()
    for path in paths:
        if path.is_dir():
            items: Iterator[Chunk | InputError] = (
                x for f in iter_directory(path)
                for x in read_text_file(f, str(f.relative_to(path))))
        elif path.is_file() and path.suffix == ".jsonl":
            items = read_jsonl(path)
        elif path.is_file():
            items = read_text_file(path, path.name)
        else:
            out.errors.append(InputError("no such file or directory", source=str(path)))
            continue
        for x in items:
            (out.errors if isinstance(x, InputError) else out.chunks).append(x)  # type: ignore[arg-type]
    return out
