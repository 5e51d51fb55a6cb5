"""The pool's facade and happy paths, with real worker processes running the fake engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from polling import wait_until
from pool_support import DEADLINE_S, EventLog, fast_config

from embedpool import events
from embedpool.errors import ConfigError, PoolError
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.pool import Pool, pool_config_for
from embedpool.testing import (
    FakeEngineSpec,
    contains_subsequence,
    fake_vectors,
    make_batches,
    make_sequences,
)
from embedpool.types import TokenIds

DIM = 16


def assemble(results: dict[int, BatchResult], batches: list[WorkBatch]) -> np.ndarray:
    return np.concatenate([results[b.batch_id].vectors for b in batches])


def all_sequences(batches: list[WorkBatch]) -> list[TokenIds]:
    return [s for b in batches for s in b.sequences]


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exitcode", "name"),
    [
        (-9, "SIGKILL(-9)"),
        (-15, "SIGTERM(-15)"),
        (-11, "SIGSEGV(-11)"),
        (1, "exit 1"),
        (0, "exit 0"),
        (None, "running"),
    ],
    ids=["sigkill", "sigterm", "sigsegv", "exit1", "exit0", "running"],
)
def test_exit_name(exitcode: int | None, name: str) -> None:
    assert events.exit_name(exitcode) == name


@pytest.mark.parametrize(
    ("seq", "pattern", "found"),
    [
        ([101, 5, 6, 7, 102], (6, 7), True),
        ([101, 5, 6, 7, 102], (7, 6), False),
        ([101, 5], (101, 5, 6), False),
        ([101, 5], (), False),
    ],
    ids=["present", "wrong-order", "longer-than-seq", "empty-pattern"],
)
def test_contains_subsequence(seq: list[int], pattern: tuple[int, ...], found: bool) -> None:
    assert contains_subsequence(np.asarray(seq, dtype=np.int32), pattern) is found


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workers": 0}, "workers"),
        ({"max_retries": -1}, "max_retries"),
        ({"start_method": "fork"}, "start_method"),
        ({"hang_warn_fraction": 1.5}, "hang_warn_fraction"),
        ({"start_timeout_s": 0}, "start_timeout_s"),
        ({"profile": "laptop"}, "profile"),
    ],
    ids=["zero-workers", "negative-retries", "fork", "warn-fraction", "start-timeout", "profile"],
)
def test_pool_config_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PoolConfig(**kwargs)


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ("auto", None),
        (None, None),
        (3, 3),
        ("2", 2),
    ],
    ids=["auto", "none", "int", "digit-string"],
)
def test_pool_config_for(workers: int | str | None, expected: int | None) -> None:
    assert pool_config_for(workers=workers, precision="fp32").workers == expected


def test_pool_config_for_rejects_bad_workers() -> None:
    with pytest.raises(ConfigError, match="workers"):
        pool_config_for(workers="many")


def test_make_event_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        events.make_event("no_such_event")


# --- one pool, many checks ----------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """A 2-worker pool shared by the happy-path tests (starting one costs seconds here)."""
    with Pool(FakeEngineSpec(dim=DIM), fast_config(batch_tokens=512)) as p:
        # both started before the first test's leak check takes its "before" picture
        wait_until(
            lambda: sum(w.state == "idle" for w in p.stats().workers) == 2, "both workers ready"
        )
        yield p


def test_results_equal_a_clean_run(pool: Pool) -> None:
    batches = make_batches(make_sequences(600, seed=1), 24)
    got = {r.batch_id: r for r in pool.run(batches)}
    assert sorted(got) == [b.batch_id for b in batches]
    assert all(not r.failed for r in got.values())
    np.testing.assert_allclose(
        assemble(got, batches), fake_vectors(all_sequences(batches), DIM), atol=1e-6
    )
    assert pool.dim == DIM


def test_run_streams_before_the_input_ends_and_bounds_look_ahead(pool: Pool) -> None:
    batches = make_batches(make_sequences(200, seed=2), 5)
    taken = 0

    def source() -> Iterator[WorkBatch]:
        nonlocal taken
        for b in batches:
            taken += 1
            yield b

    seen_at_first: int | None = None
    yielded = 0
    for _ in pool.run(source(), max_pending=3):
        yielded += 1
        seen_at_first = taken if seen_at_first is None else seen_at_first
        assert taken <= yielded + 3, "run() read ahead of its max_pending"
    assert yielded == len(batches)
    assert seen_at_first is not None and seen_at_first < len(batches)


def test_batch_over_the_budget_is_cut_and_reassembled(pool: Pool) -> None:
    seqs = make_sequences(40, seed=3, min_len=30, max_len=60)  # 40 x 60 > the 512 budget
    (batch,) = make_batches(seqs, 40)
    result = pool.submit(batch).result(timeout=DEADLINE_S)
    np.testing.assert_allclose(result.vectors, fake_vectors(seqs, DIM), atol=1e-6)


def test_submit_from_many_threads(pool: Pool) -> None:
    seqs = make_sequences(160, seed=4)
    batches = make_batches(seqs, 4)
    futures: dict[int, Future[BatchResult]] = {}
    lock = threading.Lock()

    def client(part: list[WorkBatch]) -> None:
        for b in part:
            f = pool.submit(b)
            with lock:
                futures[b.batch_id] = f

    threads = [threading.Thread(target=client, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    results = {i: f.result(timeout=DEADLINE_S) for i, f in futures.items()}
    np.testing.assert_allclose(assemble(results, batches), fake_vectors(seqs, DIM), atol=1e-6)


def test_empty_batch_completes_at_once(pool: Pool) -> None:
    result = pool.submit(WorkBatch(99, ())).result(timeout=DEADLINE_S)
    assert result.vectors.shape == (0, DIM)


def test_closing_run_early_does_not_hang(pool: Pool) -> None:
    """fastembed #669: early-closing a parallel iterator hung. Here it cancels and returns."""
    gen = pool.run(make_batches(make_sequences(400, seed=5), 4), max_pending=8)
    next(gen)
    gen.close()
    # the pool still works afterwards
    (b,) = make_batches(make_sequences(3, seed=6), 3)
    assert pool.submit(b).result(timeout=DEADLINE_S).vectors.shape == (3, DIM)


def test_stats_names_workers_and_counts(pool: Pool) -> None:
    wait_until(
        lambda: len([w for w in pool.stats().workers if w.state == "idle"]) == 2,
        "both workers idle",
    )
    s = pool.stats()
    assert s.threads == 1 and s.target_workers == 2 and s.batch_tokens == 512
    assert all(w.pid and w.rss > 0 for w in s.workers)
    assert s.batches_done > 0 and s.sequences_done > 0 and s.tokens_done > 0
    assert s.deaths == 0 and not s.emergency


# --- lifecycle ------------------------------------------------------------------------------------


def test_stop_intake_finishes_in_flight_and_refuses_new(event_log: EventLog) -> None:
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.05)
    with Pool(spec, fast_config(), on_event=event_log) as p:
        batches = make_batches(make_sequences(40, seed=7), 4)
        futures = [p.submit(b) for b in batches]
        p.stop_intake()
        with pytest.raises(PoolError, match="takes no new batches"):
            p.submit(batches[0])
        assert all(not f.result(timeout=DEADLINE_S).failed for f in futures)
    assert event_log.names()[-1] == events.POOL_STOP


def test_close_after_grace_fails_unfinished_and_stops_workers() -> None:
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=5.0)
    p = Pool(spec, fast_config(workers=1))
    pids = [w.pid for w in p.stats().workers]
    futures = [p.submit(b) for b in make_batches(make_sequences(6, seed=8), 2)]
    started = time.monotonic()
    p.close(grace_s=0.2)
    assert time.monotonic() - started < DEADLINE_S
    for f in futures:
        with pytest.raises(PoolError, match="closed"):
            f.result(timeout=DEADLINE_S)
    p.close()  # idempotent
    assert pids and p.stats().workers == ()


def test_event_callback_errors_do_not_break_the_pool() -> None:
    def bad(event: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    with Pool(FakeEngineSpec(dim=DIM), fast_config(workers=1), on_event=bad) as p:
        (b,) = make_batches(make_sequences(3, seed=9), 3)
        assert p.submit(b).result(timeout=DEADLINE_S).vectors.shape == (3, DIM)


def test_periodic_status_event(event_log: EventLog) -> None:
    with Pool(
        FakeEngineSpec(dim=DIM), fast_config(workers=1, status_interval_s=0.1), on_event=event_log
    ) as p:
        list(p.run(make_batches(make_sequences(20, seed=10), 5)))
        wait_until(lambda: len(event_log.named(events.STATUS)) >= 2, "two status events")
    status = event_log.named(events.STATUS)[-1]
    assert {"sequences_done", "seq_per_s", "workers", "supervisor_rss", "worker_rss"} <= set(status)
    assert status["supervisor_rss"] > 0
