"""The in-process executor under the one fault rule: an out-of-memory error lowers its budget
(``faults.TimedBudget``), so later batches are cut instead of failing again."""

from __future__ import annotations

import numpy as np

from embedpool import events
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.testing import FakeEngineSpec, fake_vectors, make_batches, make_sequences
from tests.executors.pool.pool_support import DEADLINE_S, EventLog

DIM = 8


def test_an_out_of_memory_error_lowers_the_budget_for_the_batches_after_it() -> None:
    """Batches of 16 x 64 = 1024 padded tokens on an engine whose memory holds 600: the first
    fails (ORT's arena error), is split and the budget halved to 512; every later batch is
    cut to it and none fails again. Without a budget each of the 6 would fail once."""
    log = EventLog()
    batches = make_batches(make_sequences(96, seed=41, min_len=64, max_len=64), 16)
    with InProcessExecutor(FakeEngineSpec(dim=DIM, device_oom_above=600), on_event=log) as ex:
        results = [ex.submit(b).result(timeout=DEADLINE_S) for b in batches]
        stats = ex.stats()
    for b, r in zip(batches, results, strict=True):
        assert r.failed == {}
        np.testing.assert_allclose(r.vectors, fake_vectors(b.sequences, DIM), atol=1e-6)
    (split,) = log.named(events.SPLIT)
    assert split["kind"] == "device_oom" and split["items"] == 16
    (scale,) = log.named(events.SCALE)
    assert (scale["batch_tokens_from"], scale["batch_tokens_to"]) == (1024, 512)
    assert stats.batch_tokens == 512 and stats.poison_items == 0
