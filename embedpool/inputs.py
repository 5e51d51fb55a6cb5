"""Reading a job's inputs: JSONL records, text files and directories, as (id, text) chunks,
streamed: ``iter_inputs`` yields one chunk (or input error) at a time and holds one JSONL
line, or one text file, whatever the input's size; the job reads it window by window.

- JSONL: one ``{"id": ..., "text": ...}`` per line. ``id`` is optional (default
  ``<file>:<line>``); a bad line (not UTF-8, not JSON, not an object, no ``text``, ``text``
  not a string) becomes an ``InputError`` naming the file, line and id, and the rest of the
  file is read on. Lines are parsed by orjson (about 3.5x ``json.loads``, README
  "Measured"); a line orjson refuses is parsed again by ``json`` (which also takes NaN and
  integers beyond 64 bits), so what is accepted and every error message stay ``json``'s.
- Any other file, or every text file under a directory, is split into chunks of lines whose
  ids name the file and lines (``src/app.py:L10-L52``). Splits prefer top-level definition
  boundaries (``def``/``class``/``function``/``fn``/... at column 0) and blank lines, which is
  cheap and keeps most functions whole. Binary files and VCS/build folders are skipped.
- Empty or whitespace-only texts are kept and embedded (like sentence-transformers does: the
  vector of ``[CLS] [SEP]``); the job report counts them.

``count_chunks`` is the progress total without holding anything: a JSONL file's lines
counted in 1 MiB blocks (blank and bad lines included: an upper bound), text files split as
the reader splits them. ``validate_inputs`` is ``--strict``'s pass before any work: every
record read and checked, none kept.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from embedpool.errors import InputError

#: Chunk size in lines. 40-60 lines of code is ~300-600 MiniLM tokens: near the model's
#: window and the size code-search tools index.
CHUNK_TARGET_LINES = 40
CHUNK_MAX_LINES = 60
#: Files larger than this are split but never read whole into one chunk.
MAX_FILE_BYTES = 16 * 1024 * 1024
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "node_modules",
        "__pycache__",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "dist",
        "build",
        ".tox",
        ".idea",
        ".vscode",
        "target",
    }
)
_BOUNDARY = re.compile(
    r"^(def |class |async def |function |export |fn |pub |func |impl |"
    r"struct |interface |type |const |let |var |#{1,3} |@)"
)


class Chunk(NamedTuple):
    """One input record: an ``(id, text)`` pair, what ``Embedder.stream`` reads."""

    id: str
    text: str


@dataclass
class Inputs:
    chunks: list[Chunk] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)


def read_jsonl(path: Path) -> Iterator[Chunk | InputError]:
    """The records of a JSONL file, one line at a time (see the module docstring)."""
    src = str(path)
    loads = orjson.loads
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                if not raw.strip():
                    continue
                parsed = _parse_slowly(raw, src, lineno)
                if isinstance(parsed, InputError):
                    yield parsed
                    continue
                obj = parsed
            if type(obj) is not dict:
                yield InputError(
                    f"expected a JSON object, got {type(obj).__name__}", source=src, line=lineno
                )
                continue
            text = obj.get("text")
            raw_id = obj.get("id")
            if type(text) is str and type(raw_id) is str:  # the common record: no more checks
                yield Chunk(raw_id, text)
                continue
            if type(raw_id) is float:  # orjson reads an integer beyond 64 bits as a float
                raw_id = _parse_slowly(raw, src, lineno)["id"]
            item_id = (
                f"{path.name}:{lineno}"
                if "id" not in obj
                else raw_id
                if isinstance(raw_id, str)
                else json.dumps(raw_id)
            )
            if "text" not in obj:
                yield InputError("missing field 'text'", source=src, line=lineno, item_id=item_id)
                continue
            if not isinstance(text, str):
                yield InputError(
                    f"field 'text' must be a string, got {type(text).__name__}",
                    source=src,
                    line=lineno,
                    item_id=item_id,
                )
                continue
            yield Chunk(item_id, text)


def _parse_slowly(raw: bytes, src: str, lineno: int) -> Any:
    """A line orjson refused, by ``json`` (its errors are the messages users see)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InputError(
            f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=src, line=lineno
        )
    try:
        return json.loads(line)
    except ValueError as exc:
        return InputError(f"not valid JSON ({exc})", source=src, line=lineno)


def split_lines(
    lines: Sequence[str], target: int = CHUNK_TARGET_LINES, maximum: int = CHUNK_MAX_LINES
) -> list[tuple[int, int]]:
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
        yield InputError(
            f"file is {size} bytes; only the first {MAX_FILE_BYTES} were read", source=display
        )
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


def iter_inputs(paths: Iterable[Path]) -> Iterator[Chunk | InputError]:
    """Every chunk and input error of the given paths, in a deterministic order, read as
    they are consumed (one JSONL line or one text file at a time)."""
    for path in paths:
        if path.is_dir():
            for f in iter_directory(path):
                yield from read_text_file(f, str(f.relative_to(path)))
        elif path.is_file() and path.suffix == ".jsonl":
            yield from read_jsonl(path)
        elif path.is_file():
            yield from read_text_file(path, path.name)
        else:
            yield InputError("no such file or directory", source=str(path))


def read_inputs(paths: Sequence[Path]) -> Inputs:
    """All chunks and all input errors of the given paths, held in memory (small inputs and
    tests; a job streams ``iter_inputs``)."""
    out = Inputs()
    for x in iter_inputs(paths):
        if isinstance(x, InputError):
            out.errors.append(x)
        else:
            out.chunks.append(x)
    return out


@dataclass
class ErrorLog:
    """Input errors as a job meets them: all counted, the first ``keep`` kept (a bounded
    report, whatever the input)."""

    keep: int
    count: int = 0
    kept: list[InputError] = field(default_factory=list)

    def add(self, error: InputError) -> None:
        self.count += 1
        if len(self.kept) < self.keep:
            self.kept.append(error)


def chunks_of(
    items: Iterable[Chunk | InputError], on_error: Callable[[InputError], None]
) -> Iterator[Chunk]:
    """The chunks of ``items``, lazily; each input error goes to ``on_error``."""
    for x in items:
        if isinstance(x, InputError):
            on_error(x)
        else:
            yield x


def validate_inputs(paths: Sequence[Path], errors: ErrorLog) -> int:
    """``--strict``'s pass before any work: read and check every record, keep none; the
    number of chunks (the progress total), every error logged in ``errors``."""
    return sum(1 for _ in chunks_of(iter_inputs(paths), errors.add))


#: Block size of the line count: big enough that counting runs at disk speed.
COUNT_BLOCK_BYTES = 1 << 20


def count_chunks(paths: Sequence[Path]) -> int:
    """The progress total, cheaply and holding nothing: a JSONL file's non-empty lines
    (bad ones too: an upper bound), a text file's or directory's chunks as ``read_text_file``
    splits them."""
    total = 0
    for path in paths:
        if path.is_file() and path.suffix == ".jsonl":
            total += _count_lines(path)
        elif path.exists():
            total += sum(1 for x in iter_inputs([path]) if not isinstance(x, InputError))
    return total


def _count_lines(path: Path) -> int:
    lines = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(COUNT_BLOCK_BYTES):
            lines += block.count(b"\n") - block.count(b"\n\n")
            if last == b"\n" and block[:1] == b"\n":
                lines -= 1  # an empty line across the block boundary
            last = block[-1:]
    return lines + (last != b"\n")
