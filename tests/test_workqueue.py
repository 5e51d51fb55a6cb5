"""The WorkQueue every executor draws from, driven by hand (no worker anywhere)."""

from __future__ import annotations

import logging
from concurrent.futures import Future

import numpy as np
import pytest

from embedpool import events
from embedpool.errors import IntakeClosed, PoolBroken, PoolError
from embedpool.executor import BatchResult, WorkBatch
from embedpool.faults import FailureKind, FaultPolicy
from embedpool.testing import fake_vectors, make_batches, make_sequences
from embedpool.types import Event
from embedpool.workqueue import WorkQueue

DIM = 4


def queue(max_retries: int = 2) -> tuple[WorkQueue, list[Event], list[int]]:
    seen: list[Event] = []
    wakes: list[int] = []
    work = WorkQueue(
        lambda: wakes.append(1),
        events.Emitter(seen.append, logging.getLogger("t")),
        FaultPolicy(max_retries=max_retries),
    )
    work.dim = DIM
    return work, seen, wakes


def finish_all(work: WorkQueue, budget: int | None = None) -> int:
    """Complete every task with its clean vectors; returns how many tasks ran."""
    n = 0
    while (task := work.next_task(budget)) is not None:
        work.complete(task, fake_vectors(task.sequences, DIM))
        n += 1
    return n


def test_a_batch_comes_back_whole_and_the_submit_wakes_the_manager() -> None:
    work, _, wakes = queue()
    (batch,) = make_batches(make_sequences(6, seed=1), 6)
    fut = work.submit(batch)
    assert wakes == [1] and not fut.done() and work.queued_batches == 1
    assert finish_all(work) == 1
    result = fut.result(timeout=0)
    np.testing.assert_allclose(result.vectors, fake_vectors(batch.sequences, DIM), atol=1e-6)
    assert work.idle and work.counters.batches_done == 1 and work.counters.sequences_done == 6


def test_cut_to_the_budget_and_reassembled_in_order() -> None:
    work, _, _ = queue()
    seqs = make_sequences(20, seed=2, min_len=10, max_len=40)
    (batch,) = make_batches(seqs, 20)
    fut = work.submit(batch)
    assert finish_all(work, budget=100) > 1
    np.testing.assert_allclose(fut.result(timeout=0).vectors, fake_vectors(seqs, DIM), atol=1e-6)


def test_prompt_lengths_follow_their_sequences_through_cuts_and_splits() -> None:
    work, _, _ = queue()
    seqs = make_sequences(8, seed=4, min_len=10, max_len=40)
    plens = tuple(range(1, 9))
    fut = work.submit(WorkBatch(0, tuple(seqs), prompt_lengths=plens))
    task = work.next_task(100)  # cut to the budget
    assert task is not None and 0 < len(task.positions) < 8
    assert task.prompt_lengths == tuple(plens[p] for p in task.positions)
    work.fail(task, FailureKind.CRASH, "died")  # split in two halves
    half = work.next_task(None)
    assert half is not None and half.prompt_lengths == tuple(plens[p] for p in half.positions)
    work.complete(half, fake_vectors(half.sequences, DIM))
    finish_all(work)
    assert fut.result(timeout=0).vectors.shape == (8, DIM)
    (plain,) = make_batches(seqs, 8)
    work.submit(plain)
    task = work.next_task(None)
    assert task is not None and task.prompt_lengths is None  # engines get sequences alone
    with pytest.raises(ValueError, match="3 prompt lengths for 8 sequences"):
        WorkBatch(1, tuple(seqs), prompt_lengths=(1, 2, 3))


def test_failures_split_retry_and_give_up_with_events() -> None:
    work, seen, _ = queue(max_retries=1)
    (batch,) = make_batches(make_sequences(4, seed=3), 4)
    fut = work.submit(batch)
    task = work.next_task(None)
    assert task is not None
    work.fail(task, FailureKind.CRASH, "died")  # 4 -> 2 + 2
    left = work.next_task(None)
    assert left is not None and left.positions == (0, 1) and left.suspect
    work.fail(left, FailureKind.CRASH, "died")  # 2 -> 1 + 1
    one = work.next_task(None)
    assert one is not None and one.positions == (0,)
    work.fail(one, FailureKind.CRASH, "died")  # retried once ...
    again = work.next_task(None)
    assert again is one
    work.fail(again, FailureKind.CRASH, "died again")  # ... then given up
    finish_all(work)
    result: BatchResult = fut.result(timeout=0)
    assert list(result.failed) == [0] and "died again" in result.failed[0]
    assert [e["event"] for e in seen] == ["split", "split", "retry", "poison_item"]
    c = work.counters
    assert (c.splits, c.retries, c.poison_items) == (2, 1, 1)


def test_wrong_shape_from_the_engine_is_an_engine_error() -> None:
    work, seen, _ = queue()
    (batch,) = make_batches(make_sequences(1, seed=4), 1)
    fut = work.submit(batch)
    task = work.next_task(None)
    assert task is not None
    assert not work.complete(task, np.zeros((1, DIM + 1), np.float32))
    assert "shape" in fut.result(timeout=0).failed[0]
    assert seen[-1]["kind"] == "engine_error"


def test_requeue_blames_nobody_and_unget_is_silent() -> None:
    work, seen, _ = queue()
    (batch,) = make_batches(make_sequences(2, seed=5), 2)
    work.submit(batch)
    task = work.next_task(None)
    assert task is not None
    work.requeue(task, "queued on a dead worker", suspect=True)
    again = work.next_task(None)
    assert again is task and task.tries == 0 and task.suspect
    work.unget(task)
    assert work.next_task(None) is task
    assert [e["event"] for e in seen] == ["retry"]


def test_intake_closed_and_broken() -> None:
    work, seen, _ = queue()
    batches = make_batches(make_sequences(4, seed=6), 2)
    running = work.submit(batches[0])
    waiting = work.submit(batches[1])
    assert work.next_task(None) is not None  # batch 0 started
    work.close_intake()
    with pytest.raises(IntakeClosed, match="no new batches"):
        work.submit(batches[0])
    work.break_(PoolBroken("no worker can start"))
    for fut in (running, waiting):
        with pytest.raises(PoolBroken, match="no worker can start"):
            fut.result(timeout=0)
    with pytest.raises(PoolBroken):
        work.submit(batches[0])
    assert seen[-1]["event"] == "pool_broken"


def test_fail_unfinished_names_what_was_left() -> None:
    work, _, _ = queue()
    (batch,) = make_batches(make_sequences(3, seed=7), 3)
    fut: Future[BatchResult] = work.submit(batch)
    assert work.next_task(None) is not None
    work.fail_unfinished()
    with pytest.raises(PoolError, match=r"batch 0 unfinished \(3 of 3 items left\)"):
        fut.result(timeout=0)


def test_empty_batch_and_cancelled_batch() -> None:
    work, _, _ = queue()
    empty = work.submit(WorkBatch(9, ()))
    assert empty.result(timeout=0).vectors.shape == (0, DIM)
    (batch,) = make_batches(make_sequences(2, seed=8), 2)
    fut = work.submit(batch)
    assert fut.cancel()
    assert work.next_task(None) is None and work.idle


def test_a_lost_device_puts_the_task_back_whole_once_then_it_is_an_engine_error() -> None:
    work, seen, _ = queue()
    (batch,) = make_batches(make_sequences(6, seed=7), 6)
    fut = work.submit(batch)
    task = work.next_task(None)
    assert task is not None
    decision = work.fail(task, FailureKind.DEVICE_LOST, "CUDA failure 719")
    assert decision.action == "fall_back" and not decision.lower_budget
    again = work.next_task(None)
    assert again is task and len(again.positions) == 6  # whole, first in line, unsplit
    assert [e["kind"] for e in seen if e["event"] == "retry"] == ["device_lost"]
    # the transport did not leave the device: the second report is bisected like an error
    assert work.fail(again, FailureKind.DEVICE_LOST, "CUDA failure 719").action == "split"
    assert work.counters.splits == 1
    assert finish_all(work) == 2
    np.testing.assert_allclose(
        fut.result(timeout=0).vectors, fake_vectors(batch.sequences, DIM), atol=1e-6
    )


def test_an_inner_executors_result_is_delivered_with_its_given_up_items_and_precision() -> None:
    """The device executor hands whole batches to its members and delivers what they return."""
    work, _, _ = queue()
    (batch,) = make_batches(make_sequences(5, seed=9), 5)
    fut = work.submit(batch)
    task = work.next_task(None)
    assert task is not None and len(task.positions) == 5
    rows = fake_vectors(batch.sequences, DIM)
    rows[3] = 0.0
    inner = BatchResult(
        batch.batch_id, rows, {3: "input 'item-3' could not be embedded"}, precision="fp32"
    )
    assert work.deliver(task, inner)
    result = fut.result(timeout=0)
    assert result.failed == {3: "input 'item-3' could not be embedded"}
    assert result.precision == "fp32"
    np.testing.assert_allclose(result.vectors, rows, atol=1e-6)
    assert work.idle and work.counters.sequences_done == 4


def test_fail_batch_fails_only_that_batch() -> None:
    work, _, _ = queue()
    first, second = make_batches(make_sequences(8, seed=10), 4)
    f1, f2 = work.submit(first), work.submit(second)
    task = work.next_task(None)
    assert task is not None and task.batch_id == first.batch_id
    work.fail_batch(task, PoolBroken("the CPU pool broke"))
    with pytest.raises(PoolBroken, match="the CPU pool broke"):
        f1.result(timeout=0)
    assert finish_all(work) == 1 and f2.result(timeout=0).failed == {}
    assert work.idle
