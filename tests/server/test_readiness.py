"""/ready: one real probe embedding, shared by concurrent callers and reused briefly, so a
flood of /ready cannot get around the queue's admission control."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
from server_support import DIM, GatedEngine, LiveServer

from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.server.readiness import Readiness, SharedProbe
from embedpool.testing import FakeEngineSpec

DEADLINE_S = 60.0
FLOOD = 24


class _CountingProbes(InProcessExecutor):
    """Counts the probe batches that reach the executor."""

    probes = 0

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        if batch.item_ids == ("probe",):
            self.probes += 1
        return super().submit(batch)


def test_a_flood_of_ready_runs_one_probe(serve: Callable[..., LiveServer]) -> None:
    gate = threading.Event()
    engines: list[GatedEngine] = []
    executors: list[_CountingProbes] = []

    def factory() -> _CountingProbes:
        def build() -> GatedEngine:
            engines.append(GatedEngine(FakeEngineSpec(dim=DIM), gate))
            return engines[0]

        executors.append(_CountingProbes(build))
        return executors[0]

    # A long reuse window: every call of the flood, early or late, is answered by one probe.
    live = serve(factory, ready_reuse_s=600.0)

    def ready() -> httpx.Response:
        return httpx.get(f"{live.url}/ready", timeout=DEADLINE_S)

    with ThreadPoolExecutor(FLOOD) as pool:
        first = pool.submit(ready)
        assert engines and engines[0].entered.wait(DEADLINE_S), "the probe never ran"
        rest = [pool.submit(ready) for _ in range(FLOOD - 1)]  # while the probe is held
        gate.set()
        answers = [f.result(DEADLINE_S) for f in [first, *rest]]
    assert [r.status_code for r in answers] == [200] * FLOOD
    assert executors[0].probes == 1
    metrics = httpx.get(f"{live.url}/metrics", timeout=DEADLINE_S).text
    assert "embedpool_ready_probes_total 1.0" in metrics


def test_concurrent_checks_share_the_probe_in_flight() -> None:
    async def scenario() -> tuple[list[Readiness], int]:
        release = asyncio.Event()

        async def run() -> Readiness:
            await release.wait()
            return Readiness(200, {"status": "ready"})

        shared = SharedProbe(run, reuse_s=0.0)
        tasks = [asyncio.ensure_future(shared.check()) for _ in range(10)]
        await asyncio.sleep(0)  # every task now waits on the one probe
        release.set()
        return list(await asyncio.gather(*tasks)), shared.probes

    answers, probes = asyncio.run(scenario())
    assert probes == 1 and all(a.status == 200 for a in answers)


def test_an_answer_is_reused_only_within_the_window() -> None:
    now = [0.0]
    statuses = iter([503, 200])

    async def run() -> Readiness:
        return Readiness(next(statuses), {})

    async def scenario() -> list[int]:
        shared = SharedProbe(run, reuse_s=1.0, clock=lambda: now[0])
        got = [(await shared.check()).status]
        now[0] = 0.9
        got.append((await shared.check()).status)  # reused
        now[0] = 1.0
        got.append((await shared.check()).status)  # a fresh probe
        return got

    assert asyncio.run(scenario()) == [503, 503, 200]


def test_a_caller_that_goes_away_does_not_cancel_the_probe() -> None:
    async def scenario() -> Readiness:
        release = asyncio.Event()

        async def run() -> Readiness:
            await release.wait()
            return Readiness(200, {})

        shared = SharedProbe(run, reuse_s=0.0)
        gone = asyncio.ensure_future(shared.check())
        stays = asyncio.ensure_future(shared.check())
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        return await stays

    assert asyncio.run(scenario()).status == 200
