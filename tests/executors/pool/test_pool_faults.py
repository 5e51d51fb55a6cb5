"""Real faults against a real pool: SIGKILL, SIGSTOP, poison inputs, leaks, failed starts,
a dead parent. Worker processes run the fake engine (embedpool.testing); the signals are real.

Every wait has a deadline (conftest.DEADLINE_S); a pool that hangs fails the test instead.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from engines import ENGINES
from polling import wait_until
from pool_support import DEADLINE_S, EventLog, clean_real_run, fast_config

from embedpool import events
from embedpool.errors import ConfigError, PoolBroken, WorkerStartError
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.pool.pool import Pool
from embedpool.testing import (
    CrashingSpec,
    FakeEngine,
    FakeEngineSpec,
    fake_vectors,
    make_batches,
    make_sequences,
)

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

DIM = 16
POISON = (7777, 7778)


def busy_pid(pool: Pool) -> int | None:
    busy = [w.pid for w in pool.stats().workers if w.state == "busy" and w.pid]
    return random.choice(busy) if busy else None


def check_all(results: dict[int, BatchResult], batches: list[WorkBatch]) -> None:
    assert sorted(results) == sorted(b.batch_id for b in batches)
    got = np.concatenate([results[b.batch_id].vectors for b in batches])
    want = fake_vectors([s for b in batches for s in b.sequences], DIM)
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.99999


def plant(seqs: list[Any], index: int) -> None:
    seqs[index] = np.concatenate([seqs[index][:3], POISON, seqs[index][3:]]).astype(np.int32)


# --- worker death ------------------------------------------------------------------------------


def test_sigkill_random_workers_during_a_long_job(event_log: EventLog) -> None:
    """SIGKILL a random busy worker 4 times in a 3,000-sequence job: everything is embedded,
    equal to a clean run, and each death is reported with its signal."""
    batches = make_batches(make_sequences(3000, seed=11, max_len=48), 16)
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.01)
    killed: list[int] = []
    with Pool(spec, fast_config(), on_event=event_log) as pool:
        stop = threading.Event()

        def killer() -> None:
            for threshold in (300, 900, 1500, 2100):
                while not stop.is_set() and pool.stats().sequences_done < threshold:
                    time.sleep(0.01)
                pid = None
                while not stop.is_set() and pid is None:
                    pid = busy_pid(pool)
                    time.sleep(0.005)
                if pid is None:
                    return
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

                def reported(p: int = pid) -> bool:
                    return any(e["pid"] == p for e in event_log.named(events.WORKER_DEATH))

                wait_until(reported, f"the death of {pid} to be reported")

        t = threading.Thread(target=killer)
        t.start()
        try:
            results = {r.batch_id: r for r in pool.run(batches)}
        finally:
            stop.set()
            t.join(DEADLINE_S)
        stats = pool.stats()
    check_all(results, batches)
    assert len(killed) == 4, "the job ended before every kill"
    deaths = event_log.named(events.WORKER_DEATH)
    assert sorted(e["pid"] for e in deaths) == sorted(killed)
    assert {e["exit"] for e in deaths} == {"SIGKILL(-9)"}
    # our kills are not the OOM killer's: the cgroup's oom_kill counter did not rise
    assert {e["kind"] for e in deaths} == {"external_sigkill"}
    assert all("did not rise" in e["cause"] for e in deaths)
    assert stats.deaths == 4 and stats.external_sigkills == 4 and stats.oom_kills == 0
    assert stats.poison_items == 0
    # each lost task is split after a SIGKILL (a one-item task is retried); a worker killed
    # just after it sent its result had nothing in flight. A task only queued behind the
    # running one is put back unblamed (a "not_blamed" retry), which is not a lost task.
    lost = sum(1 for e in deaths if e["items"] > 0)
    blamed_retries = [e for e in event_log.named(events.RETRY) if e["kind"] != "not_blamed"]
    assert len(event_log.named(events.SPLIT)) + len(blamed_retries) == lost


def test_sigkills_without_oom_evidence_keep_the_budget(event_log: EventLog) -> None:
    """Two SIGKILLs in a row that the cgroup's oom_kill counter does not confirm are external
    kills, not OOM kills: the budget stays and no emergency mode starts (the OOM path, with
    the kernel's own kills, is tests/test_executor_faults.py and test_pressure.py)."""
    batches = make_batches(make_sequences(60, seed=12), 6)
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.3)
    with Pool(spec, fast_config(workers=1, batch_tokens=1024), on_event=event_log) as pool:
        futures = [pool.submit(b) for b in batches]
        for n in (1, 2):
            wait_until(lambda: busy_pid(pool) is not None, f"a busy worker before kill {n}")
            pid = busy_pid(pool)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

            def died(n: int = n) -> bool:
                return len(event_log.named(events.WORKER_DEATH)) == n

            wait_until(died, f"death {n}")
        results = {
            b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
        }
        stats = pool.stats()
    check_all(results, batches)
    assert stats.external_sigkills == 2 and stats.oom_kills == 0
    assert stats.batch_tokens == 1024 and not stats.emergency
    assert event_log.named(events.EMERGENCY) == []
    assert [
        e for e in event_log.named(events.SCALE) if e["batch_tokens_to"] != e["batch_tokens_from"]
    ] == []


def test_sigstop_hung_worker_is_killed_and_its_batch_completes(event_log: EventLog) -> None:
    batches = make_batches(make_sequences(40, seed=13), 4)
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.2)
    cfg = fast_config(hang_base_s=2.0, hang_per_token_s=0.0)
    with Pool(spec, cfg, on_event=event_log) as pool:
        futures = [pool.submit(b) for b in batches]
        wait_until(lambda: busy_pid(pool) is not None, "a busy worker")
        pid = busy_pid(pool)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        results = {
            b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
        }
        stats = pool.stats()
    check_all(results, batches)
    names = [e["event"] for e in event_log.events if e.get("pid") == pid]
    assert (
        names.index(events.WORKER_HUNG_WARNING)
        < names.index(events.WORKER_HUNG_KILL)
        < names.index(events.WORKER_DEATH)
    )
    (death,) = event_log.named(events.WORKER_DEATH)
    assert death["exit"] == "SIGKILL(-9)" and "hung" in death["cause"]
    assert stats.hung_kills == 1 and stats.oom_kills == 0  # our own kill is not an OOM
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sigint_and_sigterm_to_a_worker_are_ignored(event_log: EventLog) -> None:
    """A group-wide Ctrl-C or SIGTERM reaches the workers too; the pool decides, so a worker
    goes on with its batch (the CLI test sends SIGTERM to the whole group)."""
    batches = make_batches(make_sequences(16, seed=18), 4)
    with Pool(
        FakeEngineSpec(dim=DIM, delay_per_batch_s=0.2), fast_config(workers=1), on_event=event_log
    ) as pool:
        futures = [pool.submit(b) for b in batches]
        wait_until(lambda: busy_pid(pool) is not None, "a busy worker")
        pid = busy_pid(pool)
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        results = {
            b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
        }
        stats = pool.stats()
    check_all(results, batches)
    assert stats.deaths == 0 and event_log.named(events.WORKER_DEATH) == []
    assert [w.pid for w in stats.workers] == [pid]


# --- bad inputs ----------------------------------------------------------------------------------


def test_poison_input_is_isolated_and_reported_once(event_log: EventLog) -> None:
    seqs = make_sequences(64, seed=14)
    plant(seqs, 37)
    batches = make_batches(seqs, 16)
    spec = FakeEngineSpec(dim=DIM, crash_on=POISON)
    cfg = fast_config(max_retries=1, start_method="forkserver")
    with Pool(spec, cfg, on_event=event_log) as pool:
        results = {r.batch_id: r for r in pool.run(batches)}
        stats = pool.stats()
    failed = {(bid, pos): err for bid, r in results.items() for pos, err in r.failed.items()}
    assert list(failed) == [(2, 5)]
    assert "item-37" in failed[(2, 5)] and "SIGKILL(-9)" in failed[(2, 5)]
    assert not results[2].vectors[5].any()
    (poison,) = event_log.named(events.POISON_ITEM)
    assert poison["item_id"] == "item-37" and poison["kind"] == "external_sigkill"
    # bisection 16 -> 1 costs log2(16) deaths, then 1 + max_retries tries of the item itself
    assert stats.deaths <= 4 + 1 + 1 and stats.poison_items == 1
    good = [b for b in batches if b.batch_id != 2]
    check_all({b.batch_id: results[b.batch_id] for b in good}, good)
    others = [i for i in range(16) if i != 5]
    np.testing.assert_allclose(
        results[2].vectors[others],
        fake_vectors([batches[2].sequences[i] for i in others], DIM),
        atol=1e-6,
    )


def test_python_error_in_embed_fails_one_item_without_deaths(event_log: EventLog) -> None:
    seqs = make_sequences(32, seed=15)
    plant(seqs, 9)
    batches = make_batches(seqs, 8)
    spec = FakeEngineSpec(dim=DIM, raise_on=POISON)
    with Pool(spec, fast_config(workers=1), on_event=event_log) as pool:
        results = {r.batch_id: r for r in pool.run(batches)}
        stats = pool.stats()
    assert {bid: list(r.failed) for bid, r in results.items() if r.failed} == {1: [1]}
    assert "ValueError" in results[1].failed[1] and "item-9" in results[1].failed[1]
    assert stats.deaths == 0 and stats.poison_items == 1


# --- memory growth -------------------------------------------------------------------------------


def test_worker_whose_rss_grows_is_recycled_not_mistaken_for_a_crash(event_log: EventLog) -> None:
    mib = 1024 * 1024
    batches = make_batches(make_sequences(20, seed=16), 4)
    spec = FakeEngineSpec(dim=DIM, grow_bytes_per_batch=40 * mib)
    with Pool(
        spec,
        fast_config(workers=1, recycle_growth_bytes=100 * mib, batch_tokens=256),
        on_event=event_log,
    ) as pool:
        results = {r.batch_id: r for r in pool.run(batches)}
        wait_until(lambda: len(event_log.named(events.WORKER_EXIT)) >= 1, "a recycled worker")
        stats = pool.stats()
    check_all(results, batches)
    recycles = event_log.named(events.RECYCLE)
    assert recycles and all(e["rss"] > e["limit"] for e in recycles)
    exits = event_log.named(events.WORKER_EXIT)
    assert {e["reason"] for e in exits} >= {"recycle"}
    assert event_log.named(events.WORKER_DEATH) == [] and stats.deaths == 0
    assert stats.recycles == len(recycles)


# --- starting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            FakeEngineSpec(fail_to_start="model file is corrupt"),
            r"(?s)RuntimeError: model file is corrupt.*worker traceback.*in build",
        ),
        (FakeEngineSpec(exit_on_start=7), r"died while starting: exit 7"),
    ],
    ids=["raises-while-loading", "exits-while-loading"],
)
def test_worker_start_failure_raises_at_once(
    spec: FakeEngineSpec, match: str, event_log: EventLog
) -> None:
    cfg = fast_config(start_timeout_s=120.0)
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match=match):
        Pool(spec, cfg, on_event=event_log)
    assert time.monotonic() - started < cfg.start_timeout_s / 4, "reported by a timeout"
    assert len(event_log.named(events.WORKER_START_FAILED)) == 1  # one try, not a fork bomb


def test_worker_that_never_gets_ready_is_bounded_by_start_timeout() -> None:
    with pytest.raises(WorkerStartError, match="not ready within"):
        Pool(FakeEngineSpec(start_delay_s=60.0), fast_config(start_timeout_s=1.0))


def test_unpicklable_spec_is_refused_before_any_process() -> None:
    class LocalSpec:  # a local class cannot be pickled by reference
        def build(self) -> FakeEngine:
            return FakeEngineSpec().build()

    with pytest.raises(ConfigError, match="cannot be pickled"):
        Pool(LocalSpec())


def test_pool_breaks_when_no_worker_can_be_respawned(tmp_path: Path, event_log: EventLog) -> None:
    flag = tmp_path / "broken-model"
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=0.5, fail_to_start_if_exists=str(flag))
    with Pool(spec, fast_config(workers=1, max_start_failures=2), on_event=event_log) as pool:
        (batch,) = make_batches(make_sequences(4, seed=17), 4)
        future = pool.submit(batch)
        wait_until(lambda: busy_pid(pool) is not None, "a busy worker")
        flag.touch()
        pid = busy_pid(pool)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PoolBroken, match=r"(?s)no worker could be started.*broken-model"):
            future.result(timeout=DEADLINE_S)
        with pytest.raises(PoolBroken):
            pool.submit(batch)
    assert len(event_log.named(events.WORKER_START_FAILED)) == 2
    assert len(event_log.named(events.POOL_BROKEN)) == 1


# --- no orphans ----------------------------------------------------------------------------------

_PARENT = """
import json, sys
from embedpool.executors.pool.pool import Pool
from embedpool.testing import FakeEngineSpec, make_batches, make_sequences
from tests.executors.pool.pool_support import fast_config
from tests.polling import wait_until
pool = Pool(FakeEngineSpec(dim=8, delay_per_batch_s=30.0), fast_config(start_method=sys.argv[1]))
futures = [pool.submit(b) for b in make_batches(make_sequences(8), 2)]
wait_until(lambda: sum(w.state == "busy" for w in pool.stats().workers) == 2, "busy workers")
print(json.dumps([w.pid for w in pool.stats().workers]), flush=True)
futures[0].result()
"""


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_parent_killed_with_sigkill_leaves_no_workers(start_method: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT, start_method],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(
                proc.stdout.readline()  # type: ignore[union-attr]
            )
        )
        reader.start()
        reader.join(DEADLINE_S)
        assert line and line[0], "the parent never reported its workers"
        pids = json.loads(line[0])
        assert len(pids) == 2
        proc.kill()
        proc.wait(DEADLINE_S)

        def gone(pid: int) -> bool:
            try:
                return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
            except psutil.NoSuchProcess:
                return True

        wait_until(
            lambda: all(gone(p) for p in pids),
            f"workers {pids} to die with their parent",
            timeout=15.0,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE_S)
        if proc.stdout is not None:
            proc.stdout.close()


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def real_model(request: pytest.FixtureRequest) -> Any:
    """The real engine on each runtime (tests/engines.py): the faults are the pool's, the
    engine under them a parameter."""
    return clean_real_run(
        [f"def f{i}(x):\n    return x * {i} + {i % 7}  # chunk {i}" for i in range(400)],
        runtime=request.param,
    )


@pytest.mark.slow
def test_real_model_survives_sigkill_with_vectors_of_a_clean_run(
    real_model: Any, event_log: EventLog
) -> None:
    """Exactly one SIGKILL, sent while a worker is busy (the batches are submitted and the
    test waits for a busy worker before it kills), and the job still equals a clean run."""
    spec, seqs, clean = real_model
    batches = make_batches(seqs, 8)
    with Pool(spec, fast_config(), on_event=event_log) as pool:
        futures = [pool.submit(b) for b in batches]
        wait_until(lambda: busy_pid(pool) is not None, "a busy worker")
        pid = busy_pid(pool)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        results = {
            b.batch_id: f.result(timeout=DEADLINE_S) for b, f in zip(batches, futures, strict=True)
        }
        stats = pool.stats()
    got = np.concatenate([results[b.batch_id].vectors for b in batches])
    assert np.sum(got * clean, axis=1).min() >= 0.99999
    (death,) = event_log.named(events.WORKER_DEATH)
    assert death["pid"] == pid and death["exit"] == "SIGKILL(-9)" and death["items"] > 0
    assert stats.deaths == 1 and not any(r.failed for r in results.values())


@pytest.mark.slow
def test_real_model_poison_input(real_model: Any, event_log: EventLog) -> None:
    """The real engine wrapped by the test-only CrashingSpec, which SIGKILLs its worker on a
    token pair only text 21 has: that text alone is given up."""
    spec, seqs, clean = real_model
    seqs = list(seqs[:48])
    pairs = [tuple(s[i : i + 2].tolist()) for s in seqs for i in range(len(s) - 1)]
    poison = next(
        p
        for p in (tuple(seqs[21][i : i + 2].tolist()) for i in range(len(seqs[21]) - 1))
        if pairs.count(p) == 1
    )  # two tokens in a row that only text 21 has
    batches = make_batches(seqs, 8)
    with Pool(CrashingSpec(spec, poison), fast_config(max_retries=1), on_event=event_log) as pool:
        results = {r.batch_id: r for r in pool.run(batches)}
    failed = {(bid, pos) for bid, r in results.items() for pos in r.failed}
    assert failed == {(2, 5)}
    got = np.concatenate([results[b.batch_id].vectors for b in batches])
    keep = [i for i in range(len(seqs)) if i != 21]
    assert np.sum(got[keep] * clean[keep], axis=1).min() >= 0.99999
