"""The micro-batcher's health against a real pool (the batching itself: tests/server)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from polling import wait_until

from embedpool.errors import PoolUnavailable
from embedpool.executors.pool.pool import Pool
from embedpool.microbatcher import MicroBatcher
from embedpool.testing import FakeEngineSpec, make_sequences
from tests.executors.pool.pool_support import DEADLINE_S, fast_config


def test_health_notices_a_pool_that_broke_while_idle(tmp_path: Path) -> None:
    """Regression: /health looked for a ``broken`` attribute the pool did not have, so a pool
    whose workers could no longer start while no request came stayed "healthy". Here the
    idle worker dies and its replacements fail to load: the pool breaks with no batch in
    flight, and the batcher's health (what /health serves) and admission both say so."""
    flag = tmp_path / "broken-model"
    pool = Pool(
        FakeEngineSpec(dim=8, fail_to_start_if_exists=str(flag)),
        fast_config(workers=1, max_start_failures=2),
    )
    mb = MicroBatcher(pool)
    try:
        assert mb.health() is None and pool.broken is None
        flag.touch()
        (pid,) = [w.pid for w in pool.stats().workers if w.pid]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pool.broken is not None, "the idle pool to break", timeout=DEADLINE_S)
        assert "no worker could be started" in (pool.broken or "")
        health = mb.health()
        assert health is not None and "broken" in health and "broken-model" in health
        with pytest.raises(PoolUnavailable, match="broken"):
            mb.submit(make_sequences(1, seed=1), [0], 1)
    finally:
        mb.close()
        pool.close()
