"""The executor contract: run() over any executor, and the in-process executor."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from embedpool.errors import IntakeClosed, PoolBroken
from embedpool.executor import (
    BatchResult,
    Counters,
    ExecutorStats,
    WorkBatch,
    run,
    with_threads,
)
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.testing import FakeEngineSpec, fake_vectors, make_batches, make_sequences

DIM = 8
POISON = (4242, 4243)


def test_in_process_results_equal_the_engine() -> None:
    batches = make_batches(make_sequences(50, seed=1), 7)
    with InProcessExecutor(FakeEngineSpec(dim=DIM)) as ex:
        got = {r.batch_id: r for r in ex.run(batches)}
        stats = ex.stats()
    np.testing.assert_allclose(
        np.concatenate([got[b.batch_id].vectors for b in batches]),
        fake_vectors([s for b in batches for s in b.sequences], DIM),
        atol=1e-6,
    )
    assert stats.backend == "in-process" and stats.batches_done == len(batches)
    assert stats.workers[0].rss > 0 and stats.deaths == 0


def test_in_process_isolates_an_input_that_raises() -> None:
    seqs = make_sequences(8, seed=2)
    seqs[6] = np.concatenate([POISON, seqs[6]]).astype(np.int32)
    (batch,) = make_batches(seqs, 8)
    with InProcessExecutor(FakeEngineSpec(dim=DIM, raise_on=POISON)) as ex:
        result = ex.submit(batch).result(timeout=30)
        stats = ex.stats()
    assert list(result.failed) == [6] and "ValueError" in result.failed[6]
    ok = [i for i in range(8) if i != 6]
    np.testing.assert_allclose(
        result.vectors[ok], fake_vectors([seqs[i] for i in ok], DIM), atol=1e-6
    )
    assert stats.poison_items == 1 and stats.splits == 3  # 8 -> 4 -> 2 -> 1


def test_in_process_accepts_a_factory_and_is_never_broken_while_open() -> None:
    engine = FakeEngineSpec(dim=DIM).build()
    ex = InProcessExecutor(lambda: engine)
    assert ex.engine is engine and ex.dim == DIM and ex.broken is None
    ex.close()
    ex.close()  # idempotent


class _Scripted:
    """An executor that answers from a script, for run()'s own behaviour: it resolves the
    first ``answer`` batches as they are submitted and leaves the rest pending."""

    dim = DIM
    broken: str | None = None

    def __init__(self, answer: int = 10**9, intake: int | None = None) -> None:
        self.answer = answer
        self.intake = intake
        self.futures: list[Future[BatchResult]] = []

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        if self.intake is not None and len(self.futures) >= self.intake:
            raise IntakeClosed("stopping")
        fut: Future[BatchResult] = Future()
        if len(self.futures) < self.answer:
            fut.set_result(BatchResult(batch.batch_id, np.zeros((1, DIM), np.float32)))
        self.futures.append(fut)
        return fut

    def stats(self) -> ExecutorStats:
        return ExecutorStats.of(
            Counters(),
            backend="in-process",
            workers=(),
            target_workers=1,
            max_workers=1,
            threads=1,
            batch_tokens=0,
            queued=0,
        )

    def close(self) -> None:
        pass


def _batches(n: int) -> list[WorkBatch]:
    return [WorkBatch(i, (np.ones(1, np.int32),)) for i in range(n)]


def test_run_is_lazy_and_bounded() -> None:
    ex = _Scripted()
    taken = 0

    def source() -> Iterator[WorkBatch]:
        nonlocal taken
        for b in _batches(6):
            taken += 1
            yield b

    gen = run(ex, source(), max_pending=2)
    first = next(gen)
    assert taken == 2, "run() read ahead of its max_pending"
    assert sorted([first.batch_id, *(r.batch_id for r in gen)]) == list(range(6))


def test_run_stops_taking_when_intake_closes_and_drains_what_is_in_flight() -> None:
    ex = _Scripted(intake=2)
    assert sorted(r.batch_id for r in run(ex, _batches(6), max_pending=4)) == [0, 1]


def test_run_raises_when_the_executor_breaks_without_answering() -> None:
    ex = _Scripted(answer=0)
    gen = run(ex, _batches(1))
    ex.broken = "the manager thread is gone"
    with pytest.raises(PoolBroken, match="manager thread is gone"):
        next(gen)


def test_closing_run_early_cancels_what_has_not_started() -> None:
    ex = _Scripted(answer=1)
    gen = run(ex, _batches(4), max_pending=4)
    assert next(gen).batch_id == 0
    gen.close()
    assert len(ex.futures) == 4 and all(f.cancelled() for f in ex.futures[1:])


@pytest.mark.parametrize(
    ("spec", "threads"),
    [(FakeEngineSpec(threads=1), 3), (object(), 3)],
    ids=["dataclass-with-threads", "other"],
)
def test_with_threads(spec: Any, threads: int) -> None:
    out = with_threads(spec, threads)
    if isinstance(spec, FakeEngineSpec):
        assert out.threads == threads and spec.threads == 1
    else:
        assert out is spec
