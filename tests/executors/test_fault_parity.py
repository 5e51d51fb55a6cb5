"""The same faults against both backends, the local pool and Ray, with the same assertions.

Each test runs once per backend (``backend`` is ``pool`` or ``ray``), one row of issue 20's
part 4 each where it names one:

    a SIGKILL from outside                      test_sigkill_of_a_busy_worker_loses_nothing
    two or more unfinished tasks on a death     test_a_death_with_several_unfinished_tasks_...
    an OOM kill by the kernel (busy)            test_oom_kill_in_a_cgroup_is_confirmed_...
    an OOM kill of an idle worker               test_an_idle_worker_oom_killed_lowers_the_budget
    repeated OOM kills: one budget state        test_repeated_oom_kills_enter_emergency_...
    replacements that cannot start              test_replacements_that_cannot_start_...
    a hung worker or actor (one hang loop)      test_hung_worker_is_killed_replaced_...
    a lost GPU: device fallback                 test_a_lost_gpu_breaks_the_executor_...
    a poison input                              test_poison_input_is_given_up_alone
    an on_event callback that raises            test_a_raising_callback_is_logged_and_ignored

Recycling is the local pool's only (a Ray actor reports no RSS: ``faults.recycle``); its test
is tests/executors/pool/test_pool_faults.py. Both backends take every failure through ``faults.py``,
so the events, counters and per-item errors they report must be the same; where a backend's
transport differs (a pool worker holds one task, a Ray actor two), the same rule gives the
answer each row states.

The workers are real processes (pool workers, Ray actors on the local cluster of
conftest.py) running the fake engine; the signals and the cgroup limit are real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from polling import wait_until

from embedpool import events
from embedpool.errors import DeviceLost
from embedpool.executor import BatchResult, Executor, WorkBatch
from embedpool.faults import FaultPolicy
from embedpool.testing import FakeEngineSpec, fake_vectors, make_batches, make_sequences
from embedpool.types import Event, TokenIds
from tests.executors.pool.pool_support import DEADLINE_S, EventLog, fast_config

try:
    import cgroup_util
except ImportError:  # tests/ is not on sys.path unless pytest's pythonpath says so
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cgroup_util

DIM = 16
POISON = (31337, 31338)
KiB, MiB = 1024, 1024 * 1024

Start = Callable[..., Executor]


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()


@pytest.fixture(params=["pool", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request: pytest.FixtureRequest) -> Iterator[Start]:
    """``start(spec, workers=, batch_tokens=, policy=, on_event=)``: a started executor of
    this backend; every one started is closed at teardown."""
    started: list[Any] = []

    def start(
        spec: FakeEngineSpec,
        *,
        workers: int = 2,
        batch_tokens: int = 1024,
        policy: FaultPolicy | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Executor:
        p = policy or FaultPolicy()
        ex: Any
        if request.param == "pool":
            from embedpool.executors.pool.pool import Pool

            on_gpu = {"device": spec.device, "profile": "cloud"} if spec.device != "cpu" else {}
            ex = Pool(
                spec,
                fast_config(
                    workers=workers,
                    batch_tokens=batch_tokens,
                    max_retries=p.max_retries,
                    hang_base_s=p.hang_base_s,
                    hang_per_token_s=p.hang_per_token_s,
                    **on_gpu,
                ),
                on_event=on_event,
            )
        else:
            request.getfixturevalue("ray_cluster")
            from embedpool.executors.ray.executor import RayExecutor

            ex = RayExecutor(
                spec, actors=workers, batch_tokens=batch_tokens, policy=p, on_event=on_event
            )
        started.append(ex)
        return ex  # type: ignore[no-any-return]

    yield start
    for ex in started:
        ex.close()


def run_all(ex: Executor, batches: list[WorkBatch]) -> dict[int, BatchResult]:
    futures: list[Future[BatchResult]] = [ex.submit(b) for b in batches]
    return {
        b.batch_id: f.result(timeout=DEADLINE_S * 2) for b, f in zip(batches, futures, strict=True)
    }


def assert_clean(
    results: dict[int, BatchResult],
    batches: list[WorkBatch],
    skip: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """Every row equals a clean run's vector, except the given-up ones (zeros)."""
    assert sorted(results) == sorted(b.batch_id for b in batches)
    for b in batches:
        r = results[b.batch_id]
        want = fake_vectors(b.sequences, DIM)
        for row in range(len(b.sequences)):
            if (b.batch_id, row) in skip:
                assert not r.vectors[row].any() and row in r.failed
            else:
                assert row not in r.failed, r.failed
                assert float(r.vectors[row] @ want[row]) >= 0.99999


def plant(seqs: list[TokenIds], index: int) -> None:
    seqs[index] = np.concatenate([seqs[index][:3], POISON, seqs[index][3:]]).astype(np.int32)


def busy_pid(ex: Executor) -> int | None:
    busy = [w.pid for w in ex.stats().workers if w.state == "busy" and w.pid]
    return busy[0] if busy else None


# --- a SIGKILL from outside ---------------------------------------------------------------


def test_sigkill_of_a_busy_worker_loses_nothing(backend: Start, event_log: EventLog) -> None:
    batches = make_batches(make_sequences(120, seed=21), 6)
    ex = backend(FakeEngineSpec(dim=DIM, delay_per_batch_s=0.1), on_event=event_log)
    futures = [ex.submit(b) for b in batches]
    wait_until(lambda: busy_pid(ex) is not None, "a busy worker")
    pid = busy_pid(ex)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    results = {
        b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
    }
    stats = ex.stats()
    assert_clean(results, batches)
    deaths = event_log.named(events.WORKER_DEATH)
    # exactly our kill (Ray may add a death it reports for an overloaded actor: >= there)
    assert [e["pid"] for e in deaths][:1] == [pid]
    assert stats.deaths == len(deaths) and (stats.deaths == 1 or stats.backend == "ray")
    assert stats.oom_kills == 0, "our SIGKILL is not an OOM kill: no cgroup counter rose"
    assert deaths[0]["kind"] == ("external_sigkill" if stats.backend == "pool" else "crash")
    assert stats.poison_items == 0
    # the task it was running is split (or retried when it held one item), never lost
    assert len(event_log.named(events.SPLIT)) + len(event_log.named(events.RETRY)) >= 1


# --- a death with two or more unfinished tasks -----------------------------------------------


def test_a_death_with_several_unfinished_tasks_charges_none_of_them(
    backend: Start, event_log: EventLog, tmp_path: Path
) -> None:
    """One worker, two batches, held at a gate (a file) so that neither finishes; then a
    SIGKILL. One rule (``faults.blame``) on both: a pool worker holds one task, which is
    charged (split); a Ray actor holds both (it queues two), and since the oldest may have
    finished with its result lost, neither is charged: both go back unblamed and run alone.
    No input is given up and every vector is a clean run's."""
    gate = tmp_path / "gate"
    gate.touch()
    batches = make_batches(make_sequences(8, seed=29), 4)
    ex = backend(
        FakeEngineSpec(dim=DIM, hold_while_exists=str(gate)), workers=1, on_event=event_log
    )
    futures = [ex.submit(b) for b in batches]
    is_ray = ex.stats().backend == "ray"
    # the pool's worker takes one batch, the other waits; a Ray actor takes both
    wait_until(
        lambda: busy_pid(ex) is not None and ex.stats().queued == (0 if is_ray else 1),
        "the worker holding its batches",
    )
    pid = busy_pid(ex)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: bool(event_log.named(events.WORKER_DEATH)), "the death")
    gate.unlink()
    results = {
        b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
    }
    stats = ex.stats()
    assert_clean(results, batches)
    (death,) = event_log.named(events.WORKER_DEATH)
    assert death["pid"] == pid and stats.deaths == 1 and stats.poison_items == 0
    not_blamed = [e for e in event_log.named(events.RETRY) if e["kind"] == "not_blamed"]
    if is_ray:  # two unfinished: none charged, both back as suspects, no split
        assert death["blamed"] is False
        assert len(not_blamed) == 2 and not event_log.named(events.SPLIT)
    else:  # one task: it is charged, split at once
        assert death["blamed"] is True and not not_blamed
        (split,) = event_log.named(events.SPLIT)
        assert split["items"] == 4 and split["kind"] == "external_sigkill"


# --- the kernel's OOM killer in a cgroup -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cgroup
def test_oom_kill_in_a_cgroup_is_confirmed_split_and_lowers_the_budget(
    backend: Start, event_log: EventLog
) -> None:
    """One worker, which joins a 128 MiB cgroup while it loads. A task of 16 x 64 = 1024
    padded tokens allocates 1024 x 192 KiB = 192 MiB: the kernel kills it. The cgroup's
    oom_kill counter rose, so it is an OOM kill: the budget is halved (2 x 96 MiB fit), the
    killed size is never sent again, and every vector equals a clean run's."""
    batches = make_batches(make_sequences(48, seed=22, min_len=64, max_len=64), 16)
    with cgroup_util.memory_cgroup(128 * MiB) as cg:
        spec = FakeEngineSpec(
            dim=DIM, alloc_bytes_per_token=192 * KiB, join_cgroup=str(cg.procs_file)
        )
        ex = backend(spec, workers=1, batch_tokens=1024, on_event=event_log)
        results = run_all(ex, batches)
        stats = ex.stats()
        kernel_kills = cg.oom_kills()
        ex.close()
    assert_clean(results, batches)
    (death,) = event_log.named(events.WORKER_DEATH)
    assert kernel_kills == stats.deaths == stats.oom_kills == 1
    assert death["kind"] == "oom_kill" and "OOM kill" in death["cause"]
    assert death["tokens"] == 1024
    assert stats.batch_tokens == 512, "the budget was not halved after the OOM kill"
    lowered = [e for e in event_log.named(events.SCALE) if e["batch_tokens_to"] == 512]
    assert lowered and lowered[0]["batch_tokens_from"] == 1024


@pytest.mark.slow
@pytest.mark.cgroup
def test_repeated_oom_kills_enter_emergency_mode_with_one_budget_state(
    backend: Start, event_log: EventLog
) -> None:
    """Two OOM kills in a row (no batch completed in between): the first halves the budget
    (1024 -> 512), the second enters emergency mode at the floor (256) on both backends
    (``faults.budget_after_oom``: one ``BudgetState``; Ray used to halve again), the killed
    sizes are never sent again, and every vector equals a clean run's. At 320 KiB a padded
    token, 1024 tokens (320 MiB) and 512 (160 MiB) overflow the 128 MiB cgroup, 256 fit."""
    batches = make_batches(make_sequences(32, seed=30, min_len=64, max_len=64), 16)
    with cgroup_util.memory_cgroup(128 * MiB) as cg:
        spec = FakeEngineSpec(
            dim=DIM, alloc_bytes_per_token=320 * KiB, join_cgroup=str(cg.procs_file)
        )
        ex = backend(spec, workers=1, batch_tokens=1024, on_event=event_log)
        results = run_all(ex, batches)
        stats = ex.stats()
        kernel_kills = cg.oom_kills()
        ex.close()
    assert_clean(results, batches)
    deaths = event_log.named(events.WORKER_DEATH)
    assert [(d["kind"], d["tokens"]) for d in deaths] == [("oom_kill", 1024), ("oom_kill", 512)]
    assert kernel_kills == stats.oom_kills == stats.deaths == 2
    steps = [(e["batch_tokens_from"], e["batch_tokens_to"]) for e in event_log.named(events.SCALE)]
    assert steps[:2] == [(1024, 512), (512, 256)], steps
    assert all(to < 512 for _, to in steps[2:]), "a killed size came back"
    emergency = event_log.named(events.EMERGENCY)
    assert emergency and emergency[0]["on"] is True
    assert stats.batch_tokens == 256 and stats.poison_items == 0


#: Joins a cgroup (argv[1]), takes argv[3] MiB in one go and holds it until the worker argv[2]
#: is gone (or a zombie), then exits. The worker holds more of the cgroup's memory and has the
#: higher oom_score_adj (pool workers raise theirs): the kernel kills it, idle.
HOG = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
held = bytearray(b"1") * (int(sys.argv[3]) << 20)
end = time.monotonic() + 60
while alive(int(sys.argv[2])) and time.monotonic() < end:
    time.sleep(0.01)
"""


def only_pid(ex: Executor) -> int:
    pids = [w.pid for w in ex.stats().workers if w.pid]
    assert len(pids) == 1, ex.stats().workers
    return pids[0]


@pytest.mark.slow
@pytest.mark.cgroup
def test_an_idle_worker_oom_killed_lowers_the_budget(backend: Start, event_log: EventLog) -> None:
    """A worker with no task, OOM-killed by the kernel because another process of its cgroup
    took the memory: the same rule on both backends (``faults.idle_death_lowers_budget``),
    the budget halved (memory is tight whatever the worker was doing), the worker replaced,
    and the next batches embedded. Ray used to do nothing (it reports no idle death)."""
    batches = make_batches(make_sequences(8, seed=27), 4)  # one before, one after
    with cgroup_util.memory_cgroup(128 * MiB) as cg:
        # its one batch leaves 80 MiB charged to the cgroup (it joined after loading)
        spec = FakeEngineSpec(
            dim=DIM, join_cgroup=str(cg.procs_file), grow_bytes_per_batch=80 * MiB
        )
        ex = backend(spec, workers=1, batch_tokens=1024, on_event=event_log)
        assert_clean(run_all(ex, batches[:1]), batches[:1])
        wait_until(lambda: [w.state for w in ex.stats().workers] == ["idle"], "an idle worker")
        pid = only_pid(ex)
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(cg.procs_file), str(pid), "64"])
        try:
            wait_until(
                lambda: bool(event_log.named(events.WORKER_DEATH)), "the idle worker's death"
            )
        finally:
            hog.kill()
            hog.wait(timeout=DEADLINE_S)
        results = run_all(ex, batches[1:])
        stats = ex.stats()
        kernel_kills = cg.oom_kills()
        ex.close()  # before the cgroup goes, with the workers in it
    assert_clean(results, batches[1:])
    (death,) = event_log.named(events.WORKER_DEATH)
    assert death["pid"] == pid and death["kind"] == "oom_kill" and death["items"] == 0
    # the kernel may also take the hog once the worker is gone: >= 1 kill in the cgroup
    assert kernel_kills >= 1 and stats.oom_kills == stats.deaths == 1
    lowered = [
        e
        for e in event_log.named(events.SCALE)
        if (e["batch_tokens_from"], e["batch_tokens_to"]) == (1024, 512)
    ]
    assert lowered, "an idle worker's OOM kill did not lower the budget"


# --- replacements that cannot start ------------------------------------------------------------


@pytest.mark.slow
def test_replacements_that_cannot_start_back_off_and_break_only_with_none_alive(
    backend: Start, event_log: EventLog, tmp_path: Path
) -> None:
    """After the model stops loading (a flag file), a killed worker's replacements fail: the
    executor retries with a growing backoff while a worker lives and keeps embedding on it
    (Ray used to break after 3 failures with live actors), and breaks, naming the failure,
    only once no worker is alive (``faults.start_failure``)."""
    flag = tmp_path / "broken-model"
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.02, fail_to_start_if_exists=str(flag))
    ex = backend(spec, workers=2, on_event=event_log)
    batches = make_batches(make_sequences(48, seed=28), 4)
    wait_until(
        lambda: sum(w.state == "idle" and w.pid is not None for w in ex.stats().workers) == 2,
        "two ready workers",
    )
    flag.touch()
    first, second = (w.pid for w in ex.stats().workers)
    assert first is not None and second is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: ex.stats().start_failures >= 3, "three failed starts")
    assert_clean(run_all(ex, batches), batches)  # on the survivor
    assert ex.broken is None, "a live worker: the executor must not break"
    failed = event_log.named(events.WORKER_START_FAILED)
    assert len(failed) >= 3 and ex.stats().start_failures >= 3
    assert not event_log.named(events.POOL_BROKEN)
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: ex.broken is not None, "the executor to break with no worker alive")
    assert "no worker could be started" in str(ex.broken)
    assert "broken-model" in str(ex.broken)


# --- a hung worker -------------------------------------------------------------------------------


@pytest.mark.slow
def test_hung_worker_is_killed_replaced_and_its_input_given_up(
    backend: Start, event_log: EventLog
) -> None:
    """An input on which the engine blocks forever: each task holding it is warned about at
    60% of its deadline, killed at 100% and split; alone, it is given up as hung."""
    seqs = make_sequences(12, seed=23)
    seqs[5] = np.concatenate([seqs[5][:2], POISON, seqs[5][2:]]).astype(np.int32)
    batches = make_batches(seqs, 4)  # the hang sits at row 1 of batch 1
    policy = FaultPolicy(max_retries=0, hang_base_s=1.5, hang_per_token_s=0.0)
    ex = backend(FakeEngineSpec(dim=DIM, hang_on=POISON), policy=policy, on_event=event_log)
    results = run_all(ex, batches)
    stats = ex.stats()
    assert_clean(results, batches, skip=frozenset({(1, 1)}))
    assert "item-5" in results[1].failed[1] and "hung" in results[1].failed[1]
    kills = event_log.named(events.WORKER_HUNG_KILL)
    # 4 items -> 2 -> 1, and the single item is not retried (max_retries=0)
    assert len(kills) == 3 == stats.hung_kills == stats.deaths
    assert len(event_log.named(events.WORKER_HUNG_WARNING)) == 3
    assert {e["kind"] for e in event_log.named(events.WORKER_DEATH)} == {"hung"}
    (poison,) = event_log.named(events.POISON_ITEM)
    assert poison["item_id"] == "item-5" and poison["kind"] == "hung"


# --- a lost GPU ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lost_gpu_breaks_the_executor_and_only_the_device_executor_falls_back(
    backend: Start, event_log: EventLog
) -> None:
    """A sticky CUDA error (the fake GPU's "unspecified launch failure") is nobody's input's
    fault: no input is given up or split for it (``faults.decide``: fall back). Neither
    backend can leave its device, so both break with ``DeviceLost`` naming the error; the
    pool's device executor (``executors/devices.py``) then runs the batches on the CPU. Ray
    has no device fallback (its actors run the CPU recipe): it stays broken, and says so."""
    seqs = make_sequences(24, seed=31)
    plant(seqs, 9)
    batches = make_batches(seqs, 6)  # row 3 of batch 1
    gpu = FakeEngineSpec(dim=DIM, device="cuda:0", lose_device_on=POISON)
    ex = backend(gpu, workers=1, on_event=event_log)
    futures = [ex.submit(b) for b in batches]
    with pytest.raises(DeviceLost, match="unspecified launch failure"):
        futures[1].result(timeout=DEADLINE_S)
    wait_until(lambda: ex.broken is not None, "the executor to break")
    assert "was lost" in str(ex.broken)
    assert not event_log.named(events.SPLIT) and not event_log.named(events.POISON_ITEM)
    if ex.stats().backend == "ray":
        assert "no device fallback" in str(ex.broken)
        return
    ex.close()
    from embedpool.executors import devices
    from embedpool.executors.devices import PoolRecipe

    cpu = PoolRecipe("cpu", gpu.on_cpu(), fast_config(workers=1), precision="fp32")
    on_gpu = PoolRecipe(
        "cuda:0 FakeGPU", gpu, fast_config(workers=1, device="cuda:0", profile="cloud")
    )
    with devices.start([on_gpu], fallback=cpu, on_event=event_log) as dex:
        results = {r.batch_id: r for r in dex.run(batches)}
        assert dex.devices == ["cpu"]
    assert_clean(results, batches)
    (fallback,) = event_log.named(events.DEVICE_FALLBACK)
    assert fallback["device"] == "cuda:0 FakeGPU" and fallback["to"] == "cpu"
    assert results[1].precision == "fp32"  # the poisoned batch ran on the CPU


# --- a poison input --------------------------------------------------------------------------------


def test_poison_input_is_given_up_alone(backend: Start, event_log: EventLog) -> None:
    seqs = make_sequences(32, seed=24)
    plant(seqs, 13)
    batches = make_batches(seqs, 8)  # row 5 of batch 1
    ex = backend(
        FakeEngineSpec(dim=DIM, crash_on=POISON),
        policy=FaultPolicy(max_retries=1),
        on_event=event_log,
    )
    results = run_all(ex, batches)
    stats = ex.stats()
    assert_clean(results, batches, skip=frozenset({(1, 5)}))
    assert "item-13" in results[1].failed[5] and "2 times" in results[1].failed[5]
    # 8 -> 4 -> 2 -> 1 (3 deaths), then 1 + max_retries tries of the item (2 deaths)
    assert stats.deaths >= 5 and stats.poison_items == 1 and stats.splits == 3
    (poison,) = event_log.named(events.POISON_ITEM)
    assert poison["item_id"] == "item-13" and poison["tries"] == 2


# --- an on_event callback that raises ------------------------------------------------------------


def test_a_raising_callback_is_logged_and_ignored(
    backend: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Every event raises in the callback, deaths included: the job still completes."""
    seen: list[str] = []
    lock = threading.Lock()

    def bad(event: Event) -> None:
        with lock:
            seen.append(event["event"])
        raise RuntimeError("callback bug")

    seqs = make_sequences(24, seed=25)
    plant(seqs, 3)
    batches = make_batches(seqs, 4)
    ex = backend(
        FakeEngineSpec(dim=DIM, crash_on=POISON), policy=FaultPolicy(max_retries=0), on_event=bad
    )
    results = run_all(ex, batches)
    assert_clean(results, batches, skip=frozenset({(0, 3)}))
    assert {events.WORKER_DEATH, events.SPLIT, events.POISON_ITEM} <= set(seen)
    assert "callback failed" in caplog.text
