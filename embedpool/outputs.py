"""Output writers: stream vectors to ``--out`` and make the file appear only when it is complete.

Every writer writes to a hidden temporary file in the destination's directory
(``.NAME.tmp-PID-RANDOM``) and, at :meth:`~OutputWriter.commit`, fsyncs it and ``os.replace``-s
it onto the final name, an atomic rename on POSIX and Windows. So a job killed at any moment
(``kill -9`` included) leaves either the previous output or the complete new one, never a
half-written file that looks complete. :meth:`~OutputWriter.abort` removes the temporary
files; a temporary file left behind by a killed process (whose pid is gone) is swept away by
the next :func:`open_output` for the same destination.

Formats, chosen by the extension:

* ``.jsonl``: one ``{"id": ..., "embedding": [...]}`` per line, in input order. Each float is
  the shortest decimal that reads back as the same float32 (:func:`format_vectors`), so
  ``np.array(json.loads(line)["embedding"], dtype=np.float32)`` is the exact vector.
* ``.npy``: a float32 ``(n, dim)`` array, plus ``ids_path(out)`` = ``OUT.ids.json`` beside it
  (a JSON list of the ids, same order). Rows are streamed to disk after a header of fixed
  size that is rewritten with the final row count at commit, so memory stays flat.
  The pair is consistent: commit first removes an old ``OUT``, then renames the new ids file,
  then the new ``OUT``. ``OUT`` is the commit marker: whenever it exists, the ids file beside
  it is from the same run (a kill between the renames leaves ids without an array, which
  reads as "no output").
* ``.parquet``: columns ``id`` (string) and ``embedding`` (``fixed_size_list<float32>[dim]``),
  written with pyarrow's ParquetWriter. Rows are buffered as Arrow arrays until
  :data:`PARQUET_ROW_GROUP_BYTES` of vectors and ids (or :data:`PARQUET_ROW_GROUP_ROWS` rows)
  are held, then written as one row group: the writer holds at most that plus one ``write``
  (a job's window) and the row group being encoded, whatever the output's size.
  pyarrow is imported only here, when a parquet file is opened.

``open_output(out, dim, partial=True)`` writes ``partial_path(out)`` (``NAME.partial.EXT``)
instead: the interrupted-job path (SIGINT/SIGTERM) saves what is done under a name that cannot
be mistaken for the final output. A final commit removes a stale partial output of the same
destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import numpy as np

from embedpool.errors import ConfigError
from embedpool.proc import pid_alive
from embedpool.types import Vectors

SUPPORTED_EXTENSIONS = (".jsonl", ".npy", ".parquet")

#: Bytes (vectors and ids) of one parquet row group, which the writer buffers before writing
#: it: the bound on the parent's output buffer (a job's window of 4,096 x 384 floats is 6 MiB).
#: 16 MiB is about 10,000 rows of 384 dims: groups large enough for readers to scan at speed
#: (DuckDB and Polars read row groups of this size in parallel), while the parent of a
#: 1M-chunk job stays within 1.3x of a 10k-chunk one's (benchmarks/streaming.py; 64 MiB
#: groups, buffered and then copied whole, put it over).
PARQUET_ROW_GROUP_BYTES = 16 << 20
#: At most this many rows per row group, whatever their width.
PARQUET_ROW_GROUP_ROWS = 1 << 17

#: Bytes reserved for the .npy magic + header, so the header can be rewritten in place with the
#: final shape: 128 holds any (rows, dim) pair of 64-bit integers and keeps the data 64-byte
#: aligned, as numpy's own writer does.
_NPY_HEADER_BYTES = 128
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


class OutputWriter(Protocol):
    """Writes rows in input order; nothing appears under the final name before commit()."""

    path: Path

    def write(self, ids: Sequence[str], vectors: Vectors) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def partial_path(out: Path) -> Path:
    """Where an interrupted job saves what it finished: ``dir/name.partial.ext``."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def ids_path(out: Path) -> Path:
    """The ids file that goes with a ``.npy`` output: ``OUT.ids.json``."""
    return out.with_name(out.name + ".ids.json")


def open_output(path: Path, dim: int, *, partial: bool = False) -> AtomicWriter:
    """A writer for ``path`` chosen by its extension (see the module docstring).

    Raises ConfigError for an unknown extension, listing the supported ones.
    """
    path = Path(path)
    ext = path.suffix.lower()
    writer_cls = _WRITERS.get(ext)
    if writer_cls is None:
        raise ConfigError(
            f"--out {str(path)!r}: unknown output format {ext or '(no extension)'}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    final = partial_path(path) if partial else path
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(final)
    _sweep_stale_temps(ids_path(final))
    return writer_cls(final, dim, stale_partial=None if partial else partial_path(path))


# ---------------------------------------------------------------------- temporary files


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _create_temp(final: Path, mode: str = "wb") -> tuple[Path, IO[Any]]:
    """A new hidden file beside ``final``; created with 0666 & ~umask like a normal open()."""
    while True:
        temp = final.with_name(f"{_temp_prefix(final)}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if "b" in mode:
            return temp, os.fdopen(fd, mode)
        return temp, os.fdopen(fd, mode, encoding="utf-8", newline="\n")


def _sweep_stale_temps(final: Path) -> None:
    """Remove temporaries of ``final`` left by processes that no longer exist (kill -9)."""
    prefix = _temp_prefix(final)
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a dir)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finish_file(f: IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


# ---------------------------------------------------------------------- writers


class AtomicWriter:
    """Shared life cycle: write* -> commit | abort; a context manager that aborts on error."""

    def __init__(self, path: Path, dim: int, *, stale_partial: Path | None) -> None:
        self.path = path
        self.dim = dim
        self.rows = 0
        self._stale_partial = stale_partial
        self._temps: list[Path] = []
        self._done = False

    def write(self, ids: Sequence[str], vectors: Vectors) -> None:
        if self._done:
            raise RuntimeError(f"output {self.path} is already committed or aborted")
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape != (len(ids), self.dim):
            raise ValueError(
                f"output {self.path}: expected vectors of shape "
                f"({len(ids)}, {self.dim}), got {arr.shape}"
            )
        if len(ids):
            self._write(ids, arr)
            self.rows += len(ids)

    def commit(self) -> None:
        if self._done:
            raise RuntimeError(f"output {self.path} is already committed or aborted")
        try:
            self._finish()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._temps = []
        if self._stale_partial is not None:
            for stale in (self._stale_partial, ids_path(self._stale_partial)):
                with contextlib.suppress(OSError):
                    stale.unlink()
        _fsync_dir(self.path.parent)

    def retarget(self, path: Path) -> None:
        """Publish to ``path`` instead (the interrupted-job path: ``partial_path(out)``), so
        what was streamed so far lands in a clearly marked file, never under the final name."""
        if self._done:
            raise RuntimeError(f"output {self.path} is already committed or aborted")
        self.path = Path(path)
        self._stale_partial = None

    def abort(self) -> None:
        """Drop everything written so far (idempotent; safe after a failed commit)."""
        self._done = True
        with contextlib.suppress(Exception):
            self._close()
        for temp in self._temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        self._temps = []

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._done:
            self.commit()
        elif not self._done:
            self.abort()

    def _publish(self) -> None:
        os.replace(self._temps[0], self.path)

    # Subclass hooks.
    def _write(self, ids: Sequence[str], vectors: Vectors) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Flush and fsync the temporary file(s); called once by commit()."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close open handles without finishing (abort path)."""
        raise NotImplementedError


class JsonlWriter(AtomicWriter):
    def __init__(self, path: Path, dim: int, *, stale_partial: Path | None) -> None:
        super().__init__(path, dim, stale_partial=stale_partial)
        temp, self._f = _create_temp(path, "w")
        self._temps.append(temp)

    def _write(self, ids: Sequence[str], vectors: Vectors) -> None:
        dumps = json.dumps
        self._f.write(
            "".join(
                f'{{"id": {dumps(i)}, "embedding": {row}}}\n'
                for i, row in zip(ids, format_vectors(vectors), strict=True)
            )
        )

    def _finish(self) -> None:
        _finish_file(self._f)

    def _close(self) -> None:
        self._f.close()


#: Rows formatted per numpy pass: bounds the temporary digit matrices (~25 MB at 384 dims).
_FORMAT_ROWS = 512
#: Powers of ten that float64 holds exactly (so m / 10**k is correctly rounded, as in a parser).
_POW10 = 10.0 ** np.arange(23)


def format_vectors(vectors: Vectors) -> list[str]:
    """Each row as a JSON array text, every float32 written as the shortest decimal that reads
    back (JSON parser to float64, then cast to float32) as exactly the same float32.

    ``json.dumps(row.tolist())`` gives the same guarantee with 17-digit reprs, at about ten
    times the cost and twice the size; on a cached re-run that formatting was the whole job.
    The fast path is vectorised for the values embeddings hold (zero, and 1e-7 <= |x| < 1,
    written positionally as ``0.0123``); a row holding anything else falls back to json.dumps.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows: list[str] = []
    for start in range(0, len(x), _FORMAT_ROWS):
        rows.extend(_format_chunk(x[start : start + _FORMAT_ROWS]))
    return rows


def _format_chunk(x: Vectors) -> list[str]:
    n, d = x.shape
    if n == 0:
        return []
    if d == 0:
        return ["[]"] * n
    flat = x.reshape(-1)
    a = np.abs(flat.astype(np.float64))
    target = np.abs(flat)
    in_range = (a >= 1e-7) & (a < 1.0)
    e10 = np.floor(np.log10(np.where(in_range, a, 0.5))).astype(np.int64)  # -7..-1
    # Value = m / 10**k. Nine significant digits always read back exactly; then shorten while
    # the value still reads back (if p digits do, p + 1 digits do too, so stop at the first
    # failure), working only on the values still shortening.
    k = np.where(in_range, 8 - e10, 1)
    m = np.where(in_range, np.rint(a * _POW10[k]), 0.0)
    ok = in_range & (m < _POW10[k]) & ((m / _POW10[k]).astype(np.float32) == target)
    idx = np.flatnonzero(ok)
    for _ in range(8):
        kp = k[idx] - 1
        mp = np.rint(a[idx] * _POW10[kp])
        good = (mp / _POW10[kp]).astype(np.float32) == target[idx]
        idx = idx[good]
        if not idx.size:
            break
        k[idx] = kp[good]
        m[idx] = mp[good]
    done = ok | (a == 0)
    k = np.where(done, k, 1)
    m = np.where(done, m, 0.0)
    # The text of a value is "0." + the last k digits of m zero-padded to max(k, 9): m has at
    # most 9 digits, so that is (k - 9) zeros then m's 9 padded digits, or, when k < 9, the
    # last k of those 9. Lay every value out in fixed columns
    #     [sign] 0 . [zeros: width-9] [digits of m: 9] , space
    # mark the unused ones 0 and squeeze them out in one pass.
    pad = max(int(k.max()) - 9, 0)
    chars = np.zeros((flat.size, 14 + pad), np.uint8)
    chars[:, 0] = np.signbit(flat) * np.uint8(ord("-"))
    chars[:, 1] = ord("0")
    chars[:, 2] = ord(".")
    if pad:
        chars[:, 3 : 3 + pad] = (np.arange(pad) < (k - 9)[:, None]) * np.uint8(ord("0"))
    m32 = m.astype(np.uint32)  # < 10**9
    keep = np.arange(9) >= (9 - k)[:, None]
    for j in range(9):  # scalar divisors: numpy's fast path
        digit = (m32 // np.uint32(10 ** (8 - j))) % np.uint32(10)
        chars[:, 3 + pad + j] = (digit.astype(np.uint8) + np.uint8(ord("0"))) * keep[:, j]
    chars[:, 12 + pad] = ord(",")
    chars[:, 13 + pad] = ord(" ")
    chars.reshape(n, d, -1)[:, -1, 12 + pad :] = 0  # no separator after a row's last value
    lengths = (np.signbit(flat) + k + 4).reshape(n, d).sum(axis=1) - 2
    text = chars[chars != 0].tobytes().decode("ascii")
    ends = np.cumsum(lengths).tolist()
    fast_rows = done.reshape(n, d).all(axis=1).tolist()
    out: list[str] = []
    begin = 0
    for i, end in enumerate(ends):
        if fast_rows[i]:
            out.append(f"[{text[begin:end]}]")
        else:  # a value outside the fast path: the exact, slower way
            out.append(json.dumps(x[i].tolist()))
        begin = end
    return out


class NpyWriter(AtomicWriter):
    def __init__(self, path: Path, dim: int, *, stale_partial: Path | None) -> None:
        super().__init__(path, dim, stale_partial=stale_partial)
        temp, self._f = _create_temp(path, "wb")
        self._temps.append(temp)
        ids_temp, self._ids = _create_temp(ids_path(path), "w")
        self._temps.append(ids_temp)
        self._f.write(_npy_header(0, dim))
        self._ids.write("[")

    def _write(self, ids: Sequence[str], vectors: Vectors) -> None:
        self._f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        sep = ",\n" if self.rows else "\n"
        self._ids.write(sep + ",\n".join(json.dumps(i) for i in ids))

    def _finish(self) -> None:
        self._f.seek(0)
        self._f.write(_npy_header(self.rows, self.dim))
        _finish_file(self._f)
        self._ids.write("\n]\n")
        _finish_file(self._ids)

    def _publish(self) -> None:
        array_temp, ids_temp = self._temps
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # an old array must never pair with the new ids (see docstring)
        os.replace(ids_temp, ids_path(self.path))
        os.replace(array_temp, self.path)

    def _close(self) -> None:
        self._f.close()
        self._ids.close()


def _npy_header(rows: int, dim: int) -> bytes:
    """An .npy v1.0 header of exactly _NPY_HEADER_BYTES for a little-endian float32 matrix."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body_len = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2
    body = text.ljust(body_len - 1).encode("latin1") + b"\n"
    if len(body) != body_len:
        raise ValueError(f"shape ({rows}, {dim}) does not fit the .npy header")
    return _NPY_MAGIC + struct.pack("<H", body_len) + body


class ParquetWriter(AtomicWriter):
    def __init__(self, path: Path, dim: int, *, stale_partial: Path | None) -> None:
        super().__init__(path, dim, stale_partial=stale_partial)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ConfigError(
                f"--out {str(path)!r}: writing parquet needs pyarrow "
                f"(pip install 'embedpool[parquet]')"
            ) from exc
        self._pa = pa
        self._schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
        temp, f = _create_temp(path, "wb")
        self._temps.append(temp)
        self._file = f
        try:
            self._writer = pq.ParquetWriter(f, self._schema)
        except BaseException:
            f.close()
            temp.unlink()
            raise
        self._group_bytes = PARQUET_ROW_GROUP_BYTES
        self._group_rows = PARQUET_ROW_GROUP_ROWS
        self._buf: list[Any] = []  # pyarrow RecordBatches, one per write
        self._buf_rows = 0
        self._buf_bytes = 0

    def _write(self, ids: Sequence[str], vectors: Vectors) -> None:
        pa = self._pa
        flat = np.array(vectors, dtype=np.float32, copy=True).reshape(-1)  # the caller's is theirs
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(ids, type=pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), self.dim),
            ],
            schema=self._schema,
        )
        self._buf.append(batch)
        self._buf_rows += batch.num_rows
        self._buf_bytes += batch.nbytes
        if self._buf_bytes >= self._group_bytes or self._buf_rows >= self._group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        table = self._pa.Table.from_batches(self._buf, schema=self._schema)
        self._buf, self._buf_rows, self._buf_bytes = [], 0, 0
        self._writer.write_table(table, row_group_size=table.num_rows)

    def _finish(self) -> None:
        self._flush()
        self._writer.close()
        _finish_file(self._file)

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._file.close()


_WRITERS: dict[str, Callable[..., AtomicWriter]] = {
    ".jsonl": JsonlWriter,
    ".npy": NpyWriter,
    ".parquet": ParquetWriter,
}
