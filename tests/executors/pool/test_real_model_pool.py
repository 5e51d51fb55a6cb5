"""The pool with the real model: SIGKILL a random worker several times during a 2,000-chunk job;
every chunk is embedded, equal to a clean single-process run, and each death is reported.

It runs the default precision, int8, whose static activation scales make a vector
independent of its batch mates, so the batch a SIGKILL splits in half must still give the
clean run's vectors. The real-model poison test and a single-kill test are in test_faults.py.

Chunks are the first 2,000 standard-library chunks, truncated to 16 tokens, which keeps the
job near a minute on 2 shared cores.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
from polling import wait_until
from pool_support import DEADLINE_S, EventLog, clean_real_run, fast_config

from embedpool import events
from embedpool.executor import BatchResult
from embedpool.executors.pool.pool import Pool
from embedpool.testing import make_batches

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

CHUNKS = 2000
MAX_TOKENS = 16  # fp32 runs ~15 chunks/s at 64 tokens on 2 busy cores: 16 keeps it ~1 min
KILL_AT = (300, 800, 1300)  # sequences done before each kill


@pytest.fixture(scope="module")
def stdlib_run() -> Any:
    from embedpool.corpus import stdlib_chunks

    spec, seqs, clean = clean_real_run([c.text for c in stdlib_chunks(CHUNKS)], MAX_TOKENS)
    assert len(seqs) == CHUNKS
    return spec, seqs, clean


def test_sigkill_random_workers_real_model(stdlib_run: Any, event_log: EventLog) -> None:
    spec, seqs, clean = stdlib_run
    batches = make_batches(seqs, 16)
    killed: list[int] = []
    rng = random.Random(7)
    with Pool(spec, fast_config(workers=2), on_event=event_log) as pool:
        stop = threading.Event()

        def busy() -> list[int]:
            return [w.pid for w in pool.stats().workers if w.state == "busy" and w.pid]

        def killer() -> None:
            for threshold in KILL_AT:
                while not stop.is_set() and pool.stats().sequences_done < threshold:
                    time.sleep(0.01)
                pids: list[int] = []
                while not stop.is_set() and not pids:
                    pids = busy()
                    time.sleep(0.005)
                if stop.is_set():
                    return
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

                def reported(p: int = pid) -> bool:
                    return any(e["pid"] == p for e in event_log.named(events.WORKER_DEATH))

                wait_until(reported, f"the death of {pid} to be reported")

        t = threading.Thread(target=killer, name="test-killer")
        t.start()
        try:
            results: dict[int, BatchResult] = {r.batch_id: r for r in pool.run(batches)}
        finally:
            stop.set()
            t.join(DEADLINE_S)
        stats = pool.stats()

    assert len(killed) == len(KILL_AT), "the job ended before every kill"
    assert sorted(results) == [b.batch_id for b in batches]
    assert not any(r.failed for r in results.values())
    got = np.concatenate([results[b.batch_id].vectors for b in batches])
    cos = np.sum(got * clean, axis=1)
    assert cos.min() >= 0.99999, f"min cos {cos.min()} at chunk {int(cos.argmin())}"

    deaths = event_log.named(events.WORKER_DEATH)
    assert sorted(e["pid"] for e in deaths) == sorted(killed)
    assert {e["exit"] for e in deaths} == {"SIGKILL(-9)"}
    assert stats.deaths == len(KILL_AT) and stats.poison_items == 0
    ready = event_log.named(events.WORKER_READY)
    assert len(ready) >= 2 + len(KILL_AT) - 1, "dead workers were not replaced"
    rss = [e["rss"] for e in ready]
    print(
        f"\nreal model fp32: {CHUNKS} chunks, {len(killed)} SIGKILLs, min cos {cos.min():.7f}, "
        f"worker RSS after load {min(rss) >> 20}-{max(rss) >> 20} MiB"
    )
