"""embedpool.cache: exact round trips, sharing between processes, corrupt files, full disks, prune."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedpool.cache import (
    LOOKUP_CHUNK,
    SCHEMA_VERSION,
    BoundCache,
    VectorCache,
    default_path,
    text_key,
)
from embedpool.errors import CacheError
from embedpool.types import Vectors

FP = "a" * 32
FP2 = "b" * 32
DIM = 16
#: Every wait on a child process is bounded by this (2 shared cores: generous, never asserted).
DEADLINE_S = 120.0


def keys_for(n: int, prefix: str = "t") -> list[bytes]:
    return [text_key(f"{prefix}{i}") for i in range(n)]


def vector_for(key: bytes, dim: int = DIM) -> Vectors:
    """A vector that depends only on the key, so any process can check any entry."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.standard_normal(dim).astype(np.float32)


def fill(cache: VectorCache, keys: list[bytes], fp: str = FP, batch: int = 50) -> None:
    for s in range(0, len(keys), batch):
        cache.put_many(fp, [(k, vector_for(k)) for k in keys[s : s + batch]])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "vectors.sqlite3"


# ---------------------------------------------------------------------- keys and round trips


@pytest.mark.parametrize(
    "text",
    ["", "def f(x):\n    return x", "ünïcødé ✓ 漢字", "a" * 100_000],
    ids=["empty", "code", "unicode", "long"],
)
def test_text_key_is_sha256_of_utf8(text: str) -> None:
    key = text_key(text)
    assert key == hashlib.sha256(text.encode("utf-8")).digest()
    assert len(key) == 32


def test_text_key_lone_surrogate_does_not_raise() -> None:
    assert len(text_key("bad \udc80 surrogate")) == 32


@pytest.mark.parametrize(
    "values",
    [
        np.array(
            [0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1 / 3, np.pi], dtype=np.float32
        ),
        np.random.default_rng(1).standard_normal(384).astype(np.float32),
        np.random.default_rng(2).standard_normal(1024).astype(np.float32),
        np.array([0.5], dtype=np.float32),
    ],
    ids=["special-values", "dim384", "dim1024", "dim1"],
)
def test_round_trip_is_bit_exact_float32(db: Path, values: Vectors) -> None:
    key = text_key("x")
    with VectorCache.open(db) as cache:
        cache.put_many(FP, [(key, values)])
    with VectorCache.open(db) as cache:  # from disk, not from memory
        got = cache.get_many(FP, [key])[key]
    assert got.dtype == np.float32 and got.shape == values.shape
    assert got.tobytes() == values.tobytes()
    got[0] = 7.0  # the caller owns what it gets back


def test_float64_input_is_stored_as_float32(db: Path) -> None:
    key = text_key("x")
    with VectorCache.open(db) as cache:
        cache.put_many(FP, [(key, np.array([0.1, 0.2], dtype=np.float64))])
        got = cache.get_many(FP, [key])[key]
    assert got.tobytes() == np.array([0.1, 0.2], dtype=np.float32).tobytes()


def test_get_many_returns_hits_only_and_counts(db: Path) -> None:
    keys = keys_for(10)
    with VectorCache.open(db) as cache:
        fill(cache, keys[:6])
        got = cache.get_many(FP, [*keys, keys[0]])  # a duplicate is looked up once
        assert set(got) == set(keys[:6])
        assert (cache.hits, cache.misses, cache.writes, cache.write_errors) == (6, 4, 6, 0)


def test_fingerprints_are_separate(db: Path) -> None:
    keys = keys_for(5)
    with VectorCache.open(db) as cache:
        fill(cache, keys, fp=FP)
        assert cache.get_many(FP2, keys) == {}
        assert len(cache.get_many(FP, keys)) == 5


def test_lookup_larger_than_the_variable_limit_is_chunked(db: Path) -> None:
    keys = keys_for(2 * LOOKUP_CHUNK + 7)
    with VectorCache.open(db) as cache:
        fill(cache, keys, batch=500)
        got = cache.get_many(FP, keys)
    assert len(got) == len(keys)
    assert all(np.array_equal(got[k], vector_for(k)) for k in keys)


def test_put_many_replaces_an_existing_entry(db: Path) -> None:
    key = text_key("x")
    with VectorCache.open(db) as cache:
        cache.put_many(FP, [(key, np.zeros(4, np.float32))])
        cache.put_many(FP, [(key, np.ones(4, np.float32))])
        assert np.array_equal(cache.get_many(FP, [key])[key], np.ones(4, np.float32))
        assert cache.stats().total == 1


def test_empty_put_and_get(db: Path) -> None:
    with VectorCache.open(db) as cache:
        cache.put_many(FP, [])
        assert cache.get_many(FP, []) == {}


def test_default_path_follows_embedpool_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path / "root"))
    assert default_path() == tmp_path / "root" / "vectors.sqlite3"
    with VectorCache.open() as cache:
        assert cache.path == tmp_path / "root" / "vectors.sqlite3"
    assert (tmp_path / "root" / "vectors.sqlite3").is_file()


def test_file_is_in_wal_mode(db: Path) -> None:
    with VectorCache.open(db):
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_threads_share_one_cache(db: Path) -> None:
    errors: list[BaseException] = []
    with VectorCache.open(db) as cache:

        def work(t: int) -> None:
            try:
                keys = keys_for(200, prefix=f"thread{t}-")
                for s in range(0, 200, 20):
                    cache.put_many(FP, [(k, vector_for(k)) for k in keys[s : s + 20]])
                    got = cache.get_many(FP, keys[: s + 20])
                    assert len(got) == s + 20
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(DEADLINE_S)
            assert not th.is_alive(), "thread deadlocked"
        assert not errors
        assert cache.stats().total == 800


# ---------------------------------------------------------------------- several processes

_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from embedpool.cache import VectorCache, text_key

    path, prefix, n, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fp = sys.argv[5]
    def vec(k):
        return np.random.default_rng(int.from_bytes(k[:8], "little")).standard_normal(16).astype(np.float32)
    with VectorCache.open(path) as cache:
        keys = [text_key(f"{prefix}{i}") for i in range(n)]
        for s in range(0, n, batch):
            cache.put_many(fp, [(k, vec(k)) for k in keys[s:s + batch]])
            print(s + batch, flush=True)
        assert not cache.disabled, cache.disabled_reason
    print("done", flush=True)
""")

_READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from embedpool.cache import VectorCache, text_key

    path, expected, deadline = Path(sys.argv[1]), int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
    fp = sys.argv[4]
    keys = [text_key(f"{p}{i}") for p in ("shared", "w0-", "w1-") for i in range(400)]
    def vec(k):
        return np.random.default_rng(int.from_bytes(k[:8], "little")).standard_normal(16).astype(np.float32)
    rounds = 0
    with VectorCache.open(path) as cache:
        while time.monotonic() < deadline:
            got = cache.get_many(fp, keys)
            assert all(np.array_equal(v, vec(k)) for k, v in got.items()), "wrong vector"
            assert not cache.disabled, cache.disabled_reason
            rounds += 1
            if len(got) >= expected:
                break
    print("rounds", rounds, "seen", len(got), flush=True)
    sys.exit(0 if len(got) >= expected else 3)
""")


def _spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_writer_processes_and_a_reader_share_one_file(db: Path) -> None:
    """Two jobs write (overlapping keys) into a file that does not exist yet while a third
    process reads; both finish, nothing is lost, every value is exact."""
    expected = 1200  # 400 shared + 400 each
    procs = [
        _spawn(_WRITER, db, "shared", 400, 20, FP),
        _spawn(_WRITER, db, "shared", 400, 25, FP),
        _spawn(_WRITER, db, "w0-", 400, 20, FP),
        _spawn(_WRITER, db, "w1-", 400, 40, FP),
    ]
    reader = _spawn(_READER, db, expected, DEADLINE_S, FP)
    for p in [*procs, reader]:
        try:
            out, err = p.communicate(timeout=DEADLINE_S + 30)
        except subprocess.TimeoutExpired:
            for q in [*procs, reader]:
                q.kill()
            pytest.fail("a cache process deadlocked (no exit within the deadline)")
        assert p.returncode == 0, f"rc={p.returncode}\n{out}\n{err}"
    with VectorCache.open(db) as cache:
        keys = [text_key(f"{p}{i}") for p in ("shared", "w0-", "w1-") for i in range(400)]
        got = cache.get_many(FP, keys)
        assert len(got) == expected
        assert all(np.array_equal(got[k], vector_for(k)) for k in keys)
        assert cache.stats().total == expected


@pytest.mark.slow
def test_sigkill_mid_job_keeps_every_committed_batch(db: Path) -> None:
    """What resume relies on: batches committed before a kill -9 are all there, exact."""
    proc = _spawn(_WRITER, db, "k", 100_000, 10, FP)
    assert proc.stdout is not None
    committed = 0
    deadline = time.monotonic() + DEADLINE_S
    while committed < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL
    assert committed >= 200, "the writer never got going"
    with VectorCache.open(db) as cache:
        keys = [text_key(f"k{i}") for i in range(committed)]
        got = cache.get_many(FP, keys)
        assert len(got) == committed
        assert all(np.array_equal(got[k], vector_for(k)) for k in keys)


# ---------------------------------------------------------------------- unusable files


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(20_000))


def _truncated_half(path: Path) -> None:
    with VectorCache.open(path) as cache:
        fill(cache, keys_for(2000), batch=500)
    os.truncate(path, path.stat().st_size // 2)


def _truncated_header(path: Path) -> None:
    with VectorCache.open(path) as cache:
        fill(cache, keys_for(10))
    os.truncate(path, 50)


def _garbage_after_header(path: Path) -> None:
    with VectorCache.open(path) as cache:
        fill(cache, keys_for(2000), batch=500)
    with path.open("r+b") as f:
        f.seek(100)
        f.write(os.urandom(path.stat().st_size - 100))


def _foreign_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()


def _other_schema_version(path: Path) -> None:
    with VectorCache.open(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_garbage, "not an SQLite database"),
        (_truncated_half, "truncated"),
        (_truncated_header, "not an SQLite database"),
        (_garbage_after_header, "unusable"),
        (_foreign_database, "not an embedpool cache"),
        (_other_schema_version, f"schema version is {SCHEMA_VERSION + 1}"),
    ],
    ids=[
        "garbage",
        "truncated-half",
        "truncated-header",
        "garbage-after-header",
        "foreign-database",
        "other-schema-version",
    ],
)
def test_unusable_file_raises_at_open_and_rebuild_recovers(
    db: Path, damage: object, message: str
) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    assert callable(damage)
    damage(db)
    with pytest.raises(CacheError) as info:
        VectorCache.open(db)
    text = str(info.value)
    assert str(db) in text and "--rebuild" in text and "embedpool cache clear" in text
    assert message in text
    with VectorCache.open(db, rebuild=True) as cache:
        assert cache.stats().total == 0
        fill(cache, keys_for(3))
        assert len(cache.get_many(FP, keys_for(3))) == 3
    with VectorCache.open(db) as cache:  # and it stays fixed
        assert cache.stats().total == 3


def test_rebuild_keeps_a_healthy_file(db: Path) -> None:
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(5))
    with VectorCache.open(db, rebuild=True) as cache:
        assert cache.stats().total == 5


def test_empty_file_is_a_new_cache(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.touch()
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(2))
        assert cache.stats().total == 2


def test_directory_in_the_way_is_a_clear_error(db: Path) -> None:
    db.mkdir(parents=True)
    with pytest.raises(CacheError, match="is a directory"):
        VectorCache.open(db, rebuild=True)


def test_corruption_found_mid_job_turns_lookups_into_misses(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = keys_for(2000)
    with VectorCache.open(db) as cache:
        fill(cache, keys, batch=500)
    with VectorCache.open(db) as cache, caplog.at_level(logging.WARNING, "embedpool.cache"):
        with db.open("r+b") as f:  # damaged behind the open connection's back
            f.seek(200_000)
            f.write(os.urandom(400_000))
        assert cache.get_many(FP, keys) == {}
        assert cache.disabled and "reading failed" in (cache.disabled_reason or "")
        assert cache.get_many(FP, keys[:5]) == {}
        cache.put_many(FP, [(keys[0], vector_for(keys[0]))])  # skipped, no exception
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1


# ---------------------------------------------------------------------- write failures


def test_disk_full_disables_writes_and_the_job_goes_on(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = keys_for(400)
    with VectorCache.open(db) as cache, caplog.at_level(logging.WARNING, "embedpool.cache"):
        fill(cache, keys[:50])
        pages = cache._conn.execute("PRAGMA page_count").fetchone()[0]
        # Simulates a full disk: SQLite answers "database or disk is full" past this size.
        cache._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        for s in range(50, 400, 50):  # the job keeps calling put_many; none raises
            cache.put_many(FP, [(k, np.ones(1024, np.float32)) for k in keys[s : s + 50]])
        assert cache.disabled
        assert "disk is full" in (cache.disabled_reason or "")
        assert cache.write_errors == 1
        assert cache.writes == 50
        # What was cached before stays readable; the failed batch left nothing half-written.
        got = cache.get_many(FP, keys)
        assert set(got) == set(keys[:50])
    warnings = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(warnings) == 1 and "without caching" in warnings[0].getMessage()


def test_write_lock_held_too_long_disables_writes(db: Path) -> None:
    with VectorCache.open(db, busy_timeout_s=0.2) as cache:
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            cache.put_many(FP, [(text_key("x"), np.ones(4, np.float32))])
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert cache.disabled and "write lock" in (cache.disabled_reason or "")
        assert cache.write_errors == 1


def test_readonly_never_writes(db: Path) -> None:
    with pytest.raises(CacheError, match="no vector cache"):
        VectorCache.open(db, readonly=True)
    assert not db.exists()
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(3))
    with VectorCache.open(db, readonly=True) as cache:
        assert len(cache.get_many(FP, keys_for(3))) == 3
        cache.put_many(FP, [(text_key("new"), np.ones(4, np.float32))])
        assert cache.writes == 0 and not cache.disabled
        with pytest.raises(CacheError, match="read-only"):
            cache.clear()
        assert cache.stats().total == 3


# ---------------------------------------------------------------------- maintenance


def _age(db: Path, keys: list[bytes], seconds_ago: float) -> None:
    conn = sqlite3.connect(db)
    conn.executemany(
        "UPDATE vectors SET used = ? WHERE key = ?",
        [(int(time.time() - seconds_ago), k) for k in keys],
    )
    conn.commit()
    conn.close()


def test_stats(db: Path) -> None:
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(7), fp=FP)
        fill(cache, keys_for(3), fp=FP2)
        stats = cache.stats()
    assert stats.path == db
    assert stats.entries == {FP: 7, FP2: 3}
    assert stats.total == 10
    assert stats.size_bytes > 0
    assert stats.oldest_used is not None and stats.newest_used is not None


def test_prune_keep_fingerprints(db: Path) -> None:
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(7), fp=FP)
        fill(cache, keys_for(3), fp=FP2)
        assert cache.prune(keep_fingerprints=[FP]) == 3
        assert cache.stats().entries == {FP: 7}
        fill(cache, keys_for(2), fp=FP2)  # a dropped fingerprint can come back
        assert cache.stats().entries == {FP: 7, FP2: 2}


def test_prune_older_than(db: Path) -> None:
    keys = keys_for(10)
    with VectorCache.open(db) as cache:
        fill(cache, keys)
    _age(db, keys[:4], seconds_ago=30 * 86_400)
    with VectorCache.open(db) as cache:
        assert cache.prune(older_than_s=7 * 86_400) == 4
        assert set(cache.get_many(FP, keys)) == set(keys[4:])


def test_prune_max_bytes_drops_least_recently_used_and_shrinks_the_file(db: Path) -> None:
    keys = keys_for(3000)
    with VectorCache.open(db) as cache:
        fill(cache, keys, batch=500)
    _age(db, keys[:1500], seconds_ago=10 * 86_400)  # the first half is older
    _age(db, keys[1500:], seconds_ago=3_600)  # (no tie with the refresh below)
    _age(db, keys[:10], seconds_ago=20 * 86_400)
    with VectorCache.open(db) as cache:
        cache.get_many(FP, keys[:10])  # ... but these were just used again
    with VectorCache.open(db) as cache:
        before = cache.stats().size_bytes
        deleted = cache.prune(max_bytes=before // 2)
        after = cache.stats().size_bytes
        left = cache.get_many(FP, keys)
    assert 0 < deleted < 3000
    assert after <= before // 2 + 64 * 1024, (before, after)
    survivors = set(left)
    assert set(keys[:10]) <= survivors, "recently used entries must survive"
    # Least recently used first: an older entry survives only if every newer one did.
    assert not (set(keys[10:1500]) & survivors) or set(keys[1500:]) <= survivors


def test_hit_refreshes_last_used_lazily(db: Path) -> None:
    keys = keys_for(4)
    with VectorCache.open(db) as cache:
        fill(cache, keys)
    _age(db, keys, seconds_ago=5 * 86_400)
    with VectorCache.open(db) as cache:
        cache.get_many(FP, keys[:2])
        assert cache.prune(older_than_s=86_400 * 2) == 2  # prune flushes pending refreshes
        assert set(cache.get_many(FP, keys)) == set(keys[:2])


def test_clear(db: Path) -> None:
    with VectorCache.open(db) as cache:
        fill(cache, keys_for(7), fp=FP)
        fill(cache, keys_for(3), fp=FP2)
        assert cache.clear() == 10
        assert cache.stats().total == 0
        assert cache.get_many(FP, keys_for(7)) == {}
        fill(cache, keys_for(2))
        assert cache.stats().total == 2


def test_close_is_idempotent_and_closed_cache_refuses(db: Path) -> None:
    cache = VectorCache.open(db)
    cache.close()
    cache.close()
    with pytest.raises(CacheError, match="closed"):
        cache.stats()


def test_maintenance_blocked_by_a_stuck_writer_is_a_cache_error(db: Path) -> None:
    with VectorCache.open(db, busy_timeout_s=0.2) as cache:
        fill(cache, keys_for(3))
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(CacheError, match=r"vectors\.sqlite3: clear failed.*locked"):
                cache.clear()
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert cache.clear() == 3


# ---------------------------------------------------------------------- callers after a write failure


@contextlib.contextmanager
def _write_lock_held(db: Path) -> Iterator[None]:
    """Another connection holds the write lock: a cache opened with a short busy timeout then
    fails its next write (and disables writes)."""
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_server_hook_keeps_reading_after_a_write_failure(db: Path) -> None:
    texts = ["cached one", "cached two"]
    with VectorCache.open(db, busy_timeout_s=0.2) as cache:
        hook = BoundCache(cache, FP)
        hook.put_many(texts, np.ones((2, DIM), np.float32))
        with _write_lock_held(db):
            hook.put_many(["new"], np.ones((1, DIM), np.float32))
        assert cache.disabled
        got = hook.get_many([*texts, "new"])
    assert [v is not None for v in got] == [True, True, False]


def test_job_keeps_reading_after_a_write_failure(db: Path) -> None:
    from embedpool.job import Embedder
    from embedpool.testing import FakeEngineSpec

    old, new = ["def a(): pass", "def b(): pass"], ["brand new text"]
    fake = FakeEngineSpec(dim=DIM)
    with (
        VectorCache.open(db, busy_timeout_s=0.2) as cache,
        Embedder(engine=fake, cache=cache) as emb,
    ):
        first = emb.embed(old)
        with _write_lock_held(db):
            emb.embed(new)  # its put fails: writes are off for the rest of the job
        assert cache.disabled
        again = emb.embed(old)
        assert emb.last_report.cache_hits == len(old)
    np.testing.assert_array_equal(again, first)


def test_truncation_flag_round_trips_and_old_rows_are_misses_for_it(db: Path) -> None:
    """The cache remembers which texts were truncated (issue 22). A file written before the
    column existed gets it on open; its rows do not know, so a caller that asks for the flag
    embeds them again (a miss), while a caller that does not (rerank logits) still hits."""
    keys = keys_for(3)
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # as the old embedpool wrote it
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE fingerprints (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE)"
        )
        conn.execute(
            "CREATE TABLE vectors (id INTEGER PRIMARY KEY, fp INTEGER NOT NULL, "
            "key BLOB NOT NULL, used INTEGER NOT NULL, vec BLOB NOT NULL)"
        )
        conn.execute("CREATE UNIQUE INDEX vectors_key ON vectors (fp, key)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.execute("INSERT INTO fingerprints VALUES (1, ?)", (FP,))
        conn.execute(
            "INSERT INTO vectors (fp, key, used, vec) VALUES (1, ?, ?, ?)",
            (keys[0], int(time.time()), vector_for(keys[0]).tobytes()),
        )
    with VectorCache.open(db) as cache:
        assert set(cache.get_many(FP, keys)) == {keys[0]}  # no flag asked: a hit
        flags: set[bytes] = set()
        assert cache.get_many(FP, keys, truncated=flags) == {}  # unknown flag: a miss
        cache.put_many(FP, [(k, vector_for(k)) for k in keys], truncated=[keys[1]])
        flags = set()
        assert set(cache.get_many(FP, keys, truncated=flags)) == set(keys)
        assert flags == {keys[1]}
    bound = BoundCache(VectorCache.open(db, readonly=True), FP)
    texts = ["short", "long one"]
    with VectorCache.open(db) as cache:
        BoundCache(cache, FP).put_many(
            texts, np.stack([vector_for(b"x"), vector_for(b"y")]), truncated=[False, True]
        )
    got: list[bool] = []
    assert all(v is not None for v in bound.get_many(texts, "", got))
    assert got == [False, True]
    bound.cache.close()
