"""Persistent, content-addressed vector cache: one SQLite file shared by every embedpool process.

A vector is addressed by ``(fingerprint, sha256([prompt,] text))`` (``text_key``). The fingerprint
(:meth:`embedpool.models.ResolvedModel.fingerprint`) names everything that shapes a vector:
the hashes of every model file used, head and text specs, precision and long-text mode. The value is
the exact float32 vector, stored little-endian, so a resumed job writes output equal bit for bit
to an uninterrupted one. Vectors are stored at the model's full width even when a call asks for
fewer ``dimensions``: one entry then serves every width, and cutting one (``vectors.
truncate_dims``) costs a slice and a norm, far less than a second entry or a re-embedding.

How a job uses it::

    texts ──sha256──> keys ──get_many(fp, keys)──> hits ──────────────────────────> output
                        └──> misses ──> pool ──> batch done ──put_many(fp, batch)──> output
                                                              (one transaction per batch)

Finished batches are committed as they complete, so a crash, ``kill -9`` or SIGTERM loses only
the batches in flight; running the same command again finds them all in the cache.

Sharing. The file is in WAL mode: readers never block writers nor each other, and writers
take the write lock up front (``BEGIN IMMEDIATE``) and wait for it for up to ``busy_timeout_s``,
so two CLI jobs, or the server and a CLI job, share one file without corruption or deadlock
(a deferred transaction that upgrades from read to write can fail at once with SQLITE_BUSY; an
immediate one cannot). Each transaction is short (one batch), so nobody waits long.

Schema (version :data:`SCHEMA_VERSION`, in ``meta``)::

    fingerprints(id INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE)   -- 32-char hex -> small int
    vectors(id INTEGER PRIMARY KEY, fp, key BLOB(32), used, vec BLOB, truncated)
        UNIQUE INDEX (fp, key)       -- the lookup
        INDEX (used)                 -- prune by age / LRU

``truncated`` remembers that the text lost tokens (truncate mode), so a job served from the
cache reports truncation as the first run did: 1 or 0 as the writer said, NULL in rows
written before the column existed (added in place when a file without it is opened for
writing). A caller that asks for the flag treats a NULL row as a miss and embeds the text
again once; callers that do not (rerank logits) read every row.

``vectors`` is a rowid table on purpose: a WITHOUT ROWID table keeps at most ~1000 bytes of a
row on its b-tree page, so every 384-dim vector (1,536 bytes) spilled to an overflow page and
the file was three times the data. ``used`` is a unix time updated lazily: a hit refreshes it
only when it is older than :data:`TOUCH_AFTER_S`, and those refreshes ride along with the next
write transaction (or :meth:`VectorCache.close`), so lookups stay read-only.

Failure policy:

* A file that cannot be a cache (garbage, truncated, not a database, someone else's database,
  another schema version, unreadable) raises :class:`~embedpool.errors.CacheError` from
  :meth:`VectorCache.open`, naming the path and the ways out (``--rebuild`` or
  ``embedpool cache clear``). ``open(rebuild=True)`` deletes such a file and starts afresh.
* Nothing raises mid-job. A failed write (``database or disk is full``, an I/O error, a lock
  held past the timeout) rolls back, sets :attr:`VectorCache.disabled` with the reason and logs
  one warning; later writes are skipped and the job goes on without caching. Reads keep
  working after a *write* failure (a full disk does not spoil what is there). A failed *read*
  (corruption found mid-job) disables reads too, and every later lookup is a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from types import TracebackType

import numpy as np

from embedpool.errors import CacheError
from embedpool.types import Vectors

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_FILENAME = "vectors.sqlite3"

#: How long a writer waits for another process's write transaction. Transactions are one batch
#: (milliseconds), so 30 s only runs out when something is badly stuck; then the write fails and
#: the cache is disabled for this job rather than stalling it.
DEFAULT_BUSY_TIMEOUT_S = 30.0
#: A hit refreshes its last-used time only when that is older than this: prune works in days,
#: and refreshing on every hit would turn each lookup into a write.
TOUCH_AFTER_S = 86_400
#: Pending last-used refreshes are flushed in their own transaction past this many keys (they
#: normally ride along with the next put_many or close).
TOUCH_FLUSH_AT = 20_000
#: Keys per SELECT ... IN (...). Bounded by SQLite's variable limit (999 before 3.32); larger
#: chunks gain nothing measurable (benchmarks/cache_bench.py).
LOOKUP_CHUNK = 900
#: SQLite page size for new files (see _prepare).
PAGE_SIZE = 8192
#: Rows deleted per prune transaction, so a prune never holds the write lock for long.
PRUNE_CHUNK = 5_000

_SQLITE_MAGIC = b"SQLite format 3\x00"
_FLOAT32_LE = np.dtype("<f4")

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE fingerprints (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE)",
    "CREATE TABLE vectors (id INTEGER PRIMARY KEY, fp INTEGER NOT NULL, key BLOB NOT NULL,"
    " used INTEGER NOT NULL, vec BLOB NOT NULL, truncated INTEGER)",
    "CREATE UNIQUE INDEX vectors_key ON vectors (fp, key)",
    "CREATE INDEX vectors_used ON vectors (used)",
)


def text_key(text: str, prompt: str = "") -> bytes:
    """The cache key of one text: the sha256 digest (32 bytes) of its UTF-8 encoding, and of
    its prompt when it has one. The prompt is part of the text but hashed apart from it
    (length-prefixed), not as its prefix: a model whose Pooling leaves the prompt out embeds
    the prompt "query: " with "x" otherwise than the text "query: x". Without a prompt the
    key is the text's alone, as before prompts existed, so existing caches stay valid."""
    data = text.encode("utf-8", "surrogatepass")
    if not prompt:
        return sha256(data).digest()
    p = prompt.encode("utf-8", "surrogatepass")
    return sha256(b"prompt\0" + len(p).to_bytes(8, "big") + p + data).digest()


def default_path() -> Path:
    """``config.cache_root() / "vectors.sqlite3"`` (EMBEDPOOL_CACHE_DIR or the user cache dir)."""
    from embedpool.config import cache_root

    return cache_root() / DEFAULT_FILENAME


@dataclass(frozen=True)
class CacheStats:
    """What :meth:`VectorCache.stats` reports."""

    path: Path
    size_bytes: int  # database file plus its -wal file
    entries: dict[str, int] = field(default_factory=dict)  # fingerprint -> vectors
    total: int = 0
    oldest_used: float | None = None  # unix time of the least recently used entry
    newest_used: float | None = None


def _way_out(path: Path) -> str:
    return (
        f"run the command again with --rebuild, or `embedpool cache clear`, "
        f"or delete {path} (it only holds cached vectors, which are recomputed)"
    )


def _corrupt(path: Path, what: str) -> CacheError:
    return CacheError(
        f"vector cache {path} is unusable: {what}. To start a fresh cache, {_way_out(path)}."
    )


def _check_header(path: Path) -> None:
    """Cheap checks SQLite itself does lazily: the magic string, and that the file is as long as
    its header says (a truncated file otherwise opens fine and fails on the first page past the
    cut, which would be mid-job)."""
    try:
        size = path.stat().st_size
        if size == 0:
            return  # SQLite treats an empty file as an empty database
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise CacheError(f"vector cache {path} cannot be read: {exc}. {_way_out(path)}.") from exc
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise _corrupt(path, "it is not an SQLite database (garbage or truncated header)")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    wal = Path(f"{path}-wal")
    wal_in_use = wal.exists() and wal.stat().st_size > 0
    # The in-header page count is only meaningful when the change counter matches
    # version-valid-for; and with a live WAL, an interrupted checkpoint may legitimately have
    # written page 1 before the pages that extend the file (recovery finishes it).
    if pages and change_counter == valid_for and not wal_in_use and size < pages * page_size:
        raise _corrupt(
            path,
            f"the file is truncated ({size} bytes, its header says "
            f"{pages} pages of {page_size} bytes)",
        )


class VectorCache:
    """The vector cache file. Build it with :meth:`open`; use it as a context manager.

    Thread-safe (one lock around the connection), so the server's threads can share one.
    """

    def __init__(
        self, path: Path, conn: sqlite3.Connection, *, readonly: bool, busy_timeout_s: float
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.write_errors = 0
        #: True once a failure turned caching off for this job, with the reason. It means
        #: *writes* are off; reads go on after a write failure. Callers must not skip get_many
        #: on it: get_many and put_many decide for themselves, and never raise mid-job.
        self.disabled = False
        self.disabled_reason: str | None = None
        self._reads_ok = True
        self._conn = conn
        self._busy_timeout_s = busy_timeout_s
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._fp_ids: dict[str, int] = {}
        self._pending_touch: dict[int, set[bytes]] = {}
        self._closed = False
        #: The file has the ``truncated`` column (a file written before it, opened read-only,
        #: does not: every flag then reads as unknown).
        self._has_flags = True

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: Path | None = None,
        *,
        rebuild: bool = False,
        readonly: bool = False,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> VectorCache:
        """Open (creating if needed) the cache at ``path`` (default :func:`default_path`).

        Raises CacheError, naming the path and ``--rebuild``, when the file is not a usable
        cache; with ``rebuild=True`` such a file (and its -wal/-shm) is deleted and recreated.
        ``readonly=True`` never writes (no file is created; a missing file is a CacheError).
        """
        path = Path(path) if path is not None else default_path()
        try:
            return cls._open(path, readonly=readonly, busy_timeout_s=busy_timeout_s)
        except CacheError:
            if not rebuild or readonly or path.is_dir():
                raise
            log.warning(
                "vector cache %s is unusable; deleting it and starting afresh (--rebuild)", path
            )
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                p.unlink(missing_ok=True)
            return cls._open(path, readonly=False, busy_timeout_s=busy_timeout_s)

    @classmethod
    def _open(cls, path: Path, *, readonly: bool, busy_timeout_s: float) -> VectorCache:
        if path.is_dir():
            raise CacheError(f"vector cache {path} is a directory; pass a file path to --cache")
        if readonly and not path.exists():
            raise CacheError(f"there is no vector cache at {path}")
        if not readonly:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(
                    f"cannot create the vector cache directory {path.parent}: "
                    f"{exc}; pass another --cache PATH or --no-cache"
                ) from exc
        if path.exists():
            _check_header(path)
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(
                    path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                )
        except sqlite3.Error as exc:
            raise CacheError(f"cannot open vector cache {path}: {exc}. {_way_out(path)}.") from exc
        try:
            cls._prepare(conn, path, readonly=readonly)
        except BaseException:
            conn.close()
            raise
        cache = cls(path, conn, readonly=readonly, busy_timeout_s=busy_timeout_s)
        cache._load_fingerprints()
        cache._has_flags = cache._flag_column()
        return cache

    def _flag_column(self) -> bool:
        """Whether ``vectors`` has the ``truncated`` column, adding it to a file written
        before it existed (when writable; two processes may race: the loser sees it there)."""

        def present() -> bool:
            return any(
                r[1] == "truncated" for r in self._conn.execute("PRAGMA table_info(vectors)")
            )

        try:
            if present() or self.readonly:
                return present()
            with contextlib.suppress(sqlite3.OperationalError):  # "duplicate column"
                self._conn.execute("ALTER TABLE vectors ADD COLUMN truncated INTEGER")
            return present()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _corrupt(self.path, f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _prepare(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        """Pragmas, then create the schema in an empty file or check the one that is there."""
        try:
            if not readonly:
                # Only takes effect on a new file. 8 KiB pages hold five 384-dim rows (1.6 KB
                # each) where 4 KiB pages held two: 1.7 KB on disk per vector instead of 2.1 KB.
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                # Set before the first table exists (it cannot change afterwards): lets prune
                # give pages back to the filesystem with `PRAGMA incremental_vacuum`.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise _corrupt(path, f"it cannot be put in WAL mode (journal_mode={mode})")
                # WAL + NORMAL: a commit survives a killed process (what resume needs); only a
                # power cut can lose the last transactions, which are recomputed.
                conn.execute("PRAGMA synchronous = NORMAL")
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if not tables:
                if readonly:
                    raise _corrupt(path, "it is empty (no embedpool tables)")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    tables = {
                        r[0]
                        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                    }
                    if not tables:  # another process may have created it meanwhile
                        for stmt in _SCHEMA:
                            conn.execute(stmt)
                        conn.execute(
                            "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            elif "meta" not in tables or "vectors" not in tables:
                raise _corrupt(
                    path,
                    f"it is an SQLite database but not an embedpool cache "
                    f"(tables: {', '.join(sorted(tables))})",
                )
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None or row[0] != str(SCHEMA_VERSION):
                found = "none" if row is None else row[0]
                raise _corrupt(
                    path, f"its schema version is {found}, this embedpool uses {SCHEMA_VERSION}"
                )
            # Touch the last page of every table: a file cut short in a way the header check
            # could not see (a live WAL) fails here, at open, rather than mid-job.
            conn.execute("SELECT max(id) FROM vectors").fetchone()
            conn.execute("SELECT max(used) FROM vectors").fetchone()
        except sqlite3.Error as exc:
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc

    def _load_fingerprints(self) -> None:
        try:
            self._fp_ids = {
                fp: i for i, fp in self._conn.execute("SELECT id, fingerprint FROM fingerprints")
            }
        except sqlite3.Error as exc:
            self._conn.close()
            raise _corrupt(self.path, f"{type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ lookups and writes

    def get_many(
        self, fingerprint: str, keys: Sequence[bytes], *, truncated: set[bytes] | None = None
    ) -> dict[bytes, Vectors]:
        """The cached vectors among ``keys`` (hits only), each float32 of shape (dim,).

        ``truncated``: when given, the hits whose text was truncated are added to it, and a
        row that does not know (written before the flag) is a miss. Duplicate keys are
        looked up once; hits/misses count distinct keys. Never raises for a database error:
        it disables the cache's reads and reports misses.
        """
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, Vectors] = {}
        with self._lock:
            if not self._reads_ok or self._closed or not unique:
                self.misses += len(unique)
                return found
            stale_before = int(time.time()) - TOUCH_AFTER_S
            stale: list[bytes] = []
            try:
                conn = self._connection()
                fp_id = self._fp_id(fingerprint, create=False)
                for chunk in _chunks(unique if fp_id is not None else [], LOOKUP_CHUNK):
                    marks = ",".join("?" * len(chunk))
                    flag = "truncated" if self._has_flags else "NULL"
                    rows = conn.execute(
                        f"SELECT key, used, vec, {flag} FROM vectors WHERE fp = ? AND key IN "
                        f"({marks})",
                        (fp_id, *chunk),
                    )
                    for key, used, blob, cut in rows:
                        if len(blob) % 4:
                            continue  # a damaged value is a miss (it gets overwritten)
                        if truncated is not None:
                            if cut is None:
                                continue  # truncation unknown: embedded again, once
                            if cut:
                                truncated.add(bytes(key))
                        found[bytes(key)] = np.frombuffer(blob, dtype=_FLOAT32_LE).astype(
                            np.float32
                        )
                        if used < stale_before:
                            stale.append(bytes(key))
            except sqlite3.Error as exc:
                self._disable(f"reading failed ({type(exc).__name__}: {exc})", reads=True)
                self.misses += len(unique)
                return {}
            if stale and fp_id is not None and not self.readonly:
                self._pending_touch.setdefault(fp_id, set()).update(stale)
                if sum(len(v) for v in self._pending_touch.values()) >= TOUCH_FLUSH_AT:
                    self._flush_touches()
            self.hits += len(found)
            self.misses += len(unique) - len(found)
        return found

    def put_many(
        self,
        fingerprint: str,
        items: Iterable[tuple[bytes, Vectors]],
        *,
        truncated: Collection[bytes] = (),
    ) -> None:
        """Store ``(key, vector)`` pairs in one transaction (call once per finished batch);
        ``truncated``: the keys whose text was truncated.

        Never raises for a database error: the first failure disables writes for the rest of
        the job (see :attr:`disabled_reason`) and logs one warning.
        """
        now = int(time.time())
        with self._lock:
            if self.disabled or self.readonly or self._closed:
                return
            rows: list[tuple[int, bytes, int, bytes, int]] = []
            cut = set(truncated)
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    fp_id = self._fp_id(fingerprint, create=True)
                    assert fp_id is not None
                    for key, vec in items:
                        arr = np.asarray(vec, dtype=_FLOAT32_LE)
                        if arr.ndim != 1:
                            raise ValueError(f"a cached vector must be 1-D, got shape {arr.shape}")
                        rows.append((fp_id, bytes(key), now, arr.tobytes(), int(key in cut)))
                    conn.executemany(
                        "INSERT OR REPLACE INTO vectors (fp, key, used, vec, "
                        "truncated) VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._write_touches(conn, now)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    self._fp_ids = {k: v for k, v in self._fp_ids.items() if k != fingerprint}
                    raise
            except sqlite3.Error as exc:
                self.write_errors += 1
                self._disable(_write_failure(exc), reads=False)
                return
            self._pending_touch.clear()
            self.writes += len(rows)

    # ------------------------------------------------------------------ maintenance

    def stats(self) -> CacheStats:
        """Size on disk and entries per fingerprint."""
        with self._maintenance("reading stats") as conn:
            entries = {
                fp: n
                for fp, n in conn.execute(
                    "SELECT f.fingerprint, count(*) FROM vectors v JOIN fingerprints f ON f.id = v.fp"
                    " GROUP BY f.fingerprint ORDER BY f.fingerprint"
                )
            }
            oldest, newest = conn.execute("SELECT min(used), max(used) FROM vectors").fetchone()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return CacheStats(
            self.path,
            size,
            entries,
            sum(entries.values()),
            None if oldest is None else float(oldest),
            None if newest is None else float(newest),
        )

    def prune(
        self,
        *,
        keep_fingerprints: Collection[str] | None = None,
        older_than_s: float | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Delete entries and return how many rows went.

        ``keep_fingerprints``: drop every other model's vectors. ``older_than_s``: drop entries
        not used for that long. ``max_bytes``: then drop least-recently-used entries until the
        data fits (estimated from pages in use; the file shrinks to match). Runs in small
        transactions, so jobs sharing the file keep going.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        deleted = 0
        with self._maintenance("prune") as conn:
            self._check_writable()
            self._flush_touches()
            if keep_fingerprints is not None:
                keep = set(keep_fingerprints)
                drop = [i for fp, i in self._fp_ids.items() if fp not in keep]
                for fp_id in drop:
                    deleted += self._delete_chunked(
                        "SELECT id FROM vectors WHERE fp = ? LIMIT ?", (fp_id,)
                    )
                if drop:
                    self._write(
                        lambda c: c.executemany(
                            "DELETE FROM fingerprints WHERE id = ?", [(i,) for i in drop]
                        )
                    )
                    self._load_fingerprints()
            if older_than_s is not None:
                cutoff = int(time.time() - older_than_s)
                deleted += self._delete_chunked(
                    "SELECT id FROM vectors WHERE used < ? LIMIT ?", (cutoff,)
                )
            if max_bytes is not None:
                deleted += self._prune_to_size(conn, max_bytes)
            self._vacuum()
        return deleted

    def clear(self) -> int:
        """Delete every entry (all fingerprints); returns how many."""
        with self._maintenance("clear"):
            self._check_writable()
            self._pending_touch.clear()
            n = 0

            def wipe(c: sqlite3.Connection) -> None:
                nonlocal n
                n = c.execute("DELETE FROM vectors").rowcount
                c.execute("DELETE FROM fingerprints")

            self._write(wipe)
            self._fp_ids = {}
            self._vacuum()
        return n

    def close(self) -> None:
        """Flush pending last-used refreshes and close the connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            if os.getpid() == self._pid:
                with contextlib.suppress(sqlite3.Error):
                    self._flush_touches()
                self._conn.close()
            self._closed = True

    def __enter__(self) -> VectorCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"disabled: {self.disabled_reason}" if self.disabled else "enabled"
        return (
            f"VectorCache({str(self.path)!r}, {state}, hits={self.hits}, "
            f"misses={self.misses}, writes={self.writes})"
        )

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _maintenance(self, what: str) -> Iterator[sqlite3.Connection]:
        """Lock, connection, and database errors as CacheError (stats/prune/clear, not jobs)."""
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise CacheError(
                    f"vector cache {self.path}: {what} failed ({type(exc).__name__}: {exc})"
                ) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise CacheError(f"vector cache {self.path} is closed")
        if os.getpid() != self._pid:
            # A connection must never be used across fork(): open a fresh one in the child and
            # leave the parent's alone (closing it here could disturb the parent's locks).
            self._conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._pid = os.getpid()
            self._pending_touch.clear()
        return self._conn

    def _fp_id(self, fingerprint: str, *, create: bool) -> int | None:
        """Fingerprint -> row id; with ``create``, inside the caller's write transaction."""
        fp_id = self._fp_ids.get(fingerprint)
        if fp_id is not None or not create:
            if fp_id is None:
                # Another process may have added it since we loaded the table.
                row = self._conn.execute(
                    "SELECT id FROM fingerprints WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                if row is not None:
                    fp_id = self._fp_ids[fingerprint] = int(row[0])
            return fp_id
        self._conn.execute(
            "INSERT OR IGNORE INTO fingerprints (fingerprint) VALUES (?)", (fingerprint,)
        )
        row = self._conn.execute(
            "SELECT id FROM fingerprints WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        fp_id = self._fp_ids[fingerprint] = int(row[0])
        return fp_id

    def _write_touches(self, conn: sqlite3.Connection, now: int) -> None:
        for fp_id, keys in self._pending_touch.items():
            conn.executemany(
                "UPDATE vectors SET used = ? WHERE fp = ? AND key = ?",
                [(now, fp_id, k) for k in keys],
            )

    def _flush_touches(self) -> None:
        """Best effort: a failed refresh only makes prune a little less accurate."""
        if not self._pending_touch or self.readonly or self.disabled:
            self._pending_touch.clear()
            return
        now = int(time.time())
        with contextlib.suppress(sqlite3.Error):
            self._write(lambda c: self._write_touches(c, now))
        self._pending_touch.clear()

    def _write(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Run ``fn(conn)`` in one immediate transaction (maintenance paths: errors raise)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _delete_chunked(self, select_ids: str, params: tuple[object, ...]) -> int:
        deleted = 0
        while True:
            n = 0

            def step(c: sqlite3.Connection) -> None:
                nonlocal n
                n = c.execute(
                    f"DELETE FROM vectors WHERE id IN ({select_ids})", (*params, PRUNE_CHUNK)
                ).rowcount

            self._write(step)
            deleted += n
            if n < PRUNE_CHUNK:
                return deleted

    def _prune_to_size(self, conn: sqlite3.Connection, max_bytes: int) -> int:
        deleted = 0
        for _ in range(8):  # the estimate converges in one or two rounds
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            used_bytes = (pages - free) * page_size
            rows = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
            if used_bytes <= max_bytes or rows == 0:
                break
            per_row = used_bytes / rows
            excess = -(-(used_bytes - max_bytes) // max(int(per_row), 1))
            target = min(rows, max(int(excess), 1))
            while target > 0:
                n = 0
                take = min(target, PRUNE_CHUNK)

                def step(c: sqlite3.Connection, take: int = take) -> None:
                    nonlocal n
                    n = c.execute(
                        "DELETE FROM vectors WHERE id IN (SELECT id FROM vectors "
                        "ORDER BY used, id LIMIT ?)",
                        (take,),
                    ).rowcount

                self._write(step)
                deleted += n
                target -= take
                if n == 0:
                    break
        return deleted

    def _vacuum(self) -> None:
        """Give free pages back to the filesystem (auto_vacuum=INCREMENTAL), best effort."""
        with contextlib.suppress(sqlite3.Error):
            conn = self._connection()
            # executescript steps the pragma to completion; execute() frees a single page.
            conn.executescript("PRAGMA incremental_vacuum;")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _check_writable(self) -> None:
        if self.readonly:
            raise CacheError(f"vector cache {self.path} was opened read-only")

    def _disable(self, reason: str, *, reads: bool) -> None:
        if reads:
            self._reads_ok = False
        if not self.disabled:
            self.disabled = True
            self.disabled_reason = reason
            log.warning(
                "vector cache %s disabled for the rest of this job: %s. The job goes on "
                "without caching.",
                self.path,
                reason,
            )
        self._pending_touch.clear()


def _write_failure(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return f"the disk is full ({text})"
    if "locked" in text or "busy" in text:
        return f"another process held the cache's write lock too long ({text})"
    return f"writing failed ({type(exc).__name__}: {text})"


def _chunks(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BoundCache:
    """A VectorCache bound to one model fingerprint, keyed by text (the server's cache hook)."""

    def __init__(self, cache: VectorCache, fingerprint: str) -> None:
        self.cache = cache
        self.fingerprint = fingerprint

    def get_many(
        self, texts: Sequence[str], prompt: str = "", truncated: list[bool] | None = None
    ) -> list[np.ndarray | None]:
        """Per text its cached vector or None; ``truncated`` (when given) gets, per text,
        whether it was truncated (False for misses)."""
        keys = [text_key(t, prompt) for t in texts]
        cut: set[bytes] | None = None if truncated is None else set()
        found = self.cache.get_many(self.fingerprint, keys, truncated=cut)
        if truncated is not None and cut is not None:
            truncated[:] = [k in cut for k in keys]
        return [found.get(k) for k in keys]

    def put_many(
        self,
        texts: Sequence[str],
        vectors: np.ndarray,
        prompt: str = "",
        truncated: Sequence[bool] | None = None,
    ) -> None:
        keys = [text_key(t, prompt) for t in texts]
        cut = [k for k, c in zip(keys, truncated, strict=True) if c] if truncated else []
        self.cache.put_many(self.fingerprint, list(zip(keys, vectors, strict=True)), truncated=cut)
