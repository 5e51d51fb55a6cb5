"""``GET /ready``: one real tiny embedding through the pool, shared by every caller.

The probe goes straight to the executor (a readiness check must not wait behind a full queue,
nor be refused with 429 by it). That makes it a way around admission control, so it is rate
limited here instead: concurrent /ready calls await the one probe in flight, and its answer is
reused for ``ready_reuse_s``. A flood of /ready therefore costs at most one probe embedding
(a few tokens) per ``ready_reuse_s``, whatever the number of callers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.errors import PoolUnavailable
from embedpool.microbatcher import MicroBatcher
from embedpool.tokenization import Encoded


@dataclass(frozen=True)
class Readiness:
    """One probe's answer: the HTTP status and the JSON body."""

    status: int
    body: dict[str, Any]


STARTING = Readiness(503, {"status": "starting"})


async def probe_once(
    batcher: MicroBatcher, encoded: Encoded, dim: int, timeout_s: float
) -> Readiness:
    """Embed ``encoded`` (one tiny text) through the executor and check the vector."""
    start = time.perf_counter()
    try:
        fut = batcher.probe(encoded.sequences)
        result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        vec = result.vectors
        if result.failed or vec.shape != (1, dim) or not np.isfinite(vec).all():
            raise PoolUnavailable(f"probe returned a bad vector (failed={result.failed})")
    except TimeoutError:
        return Readiness(
            503, {"status": "unready", "reason": f"probe embedding took over {timeout_s:g} s"}
        )
    except Exception as exc:  # any failure of the probe means "not ready", never a 500
        return Readiness(503, {"status": "unready", "reason": f"{type(exc).__name__}: {exc}"[:500]})
    return Readiness(
        200, {"status": "ready", "probe_ms": round((time.perf_counter() - start) * 1e3, 2)}
    )


class SharedProbe:
    """At most one probe in flight; its answer reused for ``reuse_s`` (event-loop only)."""

    def __init__(
        self,
        run: Callable[[], Awaitable[Readiness]],
        reuse_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._reuse_s = reuse_s
        self._clock = clock
        self._inflight: asyncio.Future[Readiness] | None = None
        self._last: tuple[float, Readiness] | None = None
        self.probes = 0  # probes actually run

    async def check(self) -> Readiness:
        if self._last is not None and self._clock() - self._last[0] < self._reuse_s:
            return self._last[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._probe())
        # shield: a caller that disconnects must not cancel the probe the others await.
        return await asyncio.shield(self._inflight)

    async def _probe(self) -> Readiness:
        self.probes += 1
        try:
            answer = await self._run()
        finally:
            self._inflight = None
        self._last = (self._clock(), answer)
        return answer
