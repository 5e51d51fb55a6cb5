"""Many clients at once, the micro-batcher's scheduling, graceful SIGTERM and a worker SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from polling import wait_until
from server_support import DIM, GatedEngine, LiveServer, expected_vectors

from embedpool.errors import ItemFailed, PoolBroken, PoolUnavailable, QueueFull
from embedpool.executor import (
    BatchResult,
    Counters,
    ExecutorStats,
    WorkBatch,
)
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.microbatcher import MicroBatcher, Ticket
from embedpool.testing import FakeEngineSpec, fake_vectors, make_sequences
from embedpool.tokenization import TextTokenizer
from embedpool.types import TokenIds
from embedpool.vectors import combine_windows

DEADLINE_S = 60.0
CLIENTS = 32
REQUESTS_PER_CLIENT = 4


def _texts(client: int, request: int) -> list[str]:
    n = 1 + (client + request) % 6
    return [
        f"client {client} request {request} item {i} " + "word " * ((client * 7 + i) % 40)
        for i in range(n)
    ]


def test_32_concurrent_clients_get_their_own_vectors(
    server: LiveServer, tokenizer: TextTokenizer
) -> None:
    def client_run(c: int) -> int:
        client = server.openai()
        for r in range(REQUESTS_PER_CLIENT):
            texts = _texts(c, r)
            res = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
            got = np.array([d.embedding for d in res.data], dtype=np.float32)
            np.testing.assert_array_equal(got, expected_vectors(tokenizer, texts))
        return REQUESTS_PER_CLIENT

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_run, c) for c in range(CLIENTS)]
        done = [f.result(timeout=DEADLINE_S) for f in futures]  # re-raises any client's error
    assert sum(done) == CLIENTS * REQUESTS_PER_CLIENT
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    ok = f'embedpool_requests_total{{route="/v1/embeddings",status="200"}} {CLIENTS * REQUESTS_PER_CLIENT}.0'
    assert ok in metrics
    assert 'status="5' not in metrics


# ----------------------------------------------------------------------------- batcher units
@dataclass
class _Busy:
    """A batcher whose one in-flight batch (``first``) is held in the engine until ``gate``
    is set; ``batches`` lists every batch it sent."""

    mb: MicroBatcher
    first: Ticket
    gate: threading.Event
    batches: list[WorkBatch]


@contextlib.contextmanager
def _busy_batcher(first: TokenIds, **options: Any) -> Iterator[_Busy]:
    gate = threading.Event()
    engine = GatedEngine(FakeEngineSpec(dim=8), gate)
    ex = InProcessExecutor(lambda: engine)
    batches: list[WorkBatch] = []
    mb = MicroBatcher(ex, max_inflight=1, on_batch=batches.append, **options)
    try:
        ticket = mb.submit([first], [0], 1)
        assert engine.entered.wait(DEADLINE_S)
        yield _Busy(mb, ticket, gate, batches)
    finally:
        gate.set()
        mb.close()
        ex.close()


def test_requests_waiting_behind_a_busy_pool_share_one_batch() -> None:
    seqs = make_sequences(5, seed=1)
    with _busy_batcher(seqs[0]) as busy:
        later = [busy.mb.submit([s], [0], 1) for s in seqs[1:]]
        busy.gate.set()
        for ticket, seq in zip([busy.first, *later], seqs, strict=True):
            np.testing.assert_array_equal(
                ticket.future.result(DEADLINE_S)[0], fake_vectors([seq], 8)[0]
            )
        assert [len(b.sequences) for b in busy.batches] == [1, 4]


def test_a_large_request_is_spread_over_many_batches_within_the_budget() -> None:
    ex = InProcessExecutor(FakeEngineSpec(dim=8).build)
    batches: list[WorkBatch] = []
    mb = MicroBatcher(
        ex, batch_tokens=128, max_batch_items=8, max_inflight=4, on_batch=batches.append
    )
    try:
        seqs = make_sequences(200, seed=2, max_len=40)
        out = mb.submit(seqs, list(range(200)), 200).future.result(DEADLINE_S)
        np.testing.assert_array_equal(out, fake_vectors(seqs, 8))
        assert len(batches) >= 200 / 8
        assert all(b.padded_tokens <= 128 or len(b.sequences) == 1 for b in batches)
        assert mb.stats().queued_tokens == 0 and mb.stats().inflight_batches == 0
    finally:
        mb.close()
        ex.close()


def test_cancelled_request_never_reaches_the_executor() -> None:
    seqs = make_sequences(3, seed=3)
    with _busy_batcher(seqs[0]) as busy:
        gone = busy.mb.submit(seqs[1:2], [0], 1)
        kept = busy.mb.submit(seqs[2:], [0], 1)
        assert gone.future.cancel()
        busy.gate.set()
        kept.future.result(DEADLINE_S)
        busy.first.future.result(DEADLINE_S)
        sent = [s.tobytes() for b in busy.batches for s in b.sequences]
        assert seqs[1].tobytes() not in sent and seqs[2].tobytes() in sent


def test_queue_full_names_sizes_and_bounds_retry_after() -> None:
    seqs = make_sequences(3, seed=4, min_len=20, max_len=20)
    with _busy_batcher(seqs[0], max_queue_tokens=30) as busy:
        with pytest.raises(QueueFull) as info:
            busy.mb.submit(seqs[1:2], [0], 1)
        assert info.value.queued_tokens == 20 and info.value.request_tokens == 20
        assert 1 <= info.value.retry_after <= 60
        busy.gate.set()
        busy.first.future.result(DEADLINE_S)
        busy.mb.submit(seqs[1:2], [0], 1).future.result(DEADLINE_S)  # room again


def test_oversized_request_is_admitted_into_an_empty_queue() -> None:
    ex = InProcessExecutor(FakeEngineSpec(dim=8).build)
    mb = MicroBatcher(ex, max_queue_tokens=10)
    try:
        seqs = make_sequences(4, seed=5, min_len=30, max_len=30)
        assert mb.submit(seqs, [0, 1, 2, 3], 4).future.result(DEADLINE_S).shape == (4, 8)
    finally:
        mb.close()
        ex.close()


class _ScriptedExecutor:
    """Answers each batch with a scripted failure (per-item or whole-batch)."""

    dim = 8
    broken: str | None = None  # the executor contract: never broken while idle

    def __init__(
        self, failed: dict[int, str] | None = None, error: BaseException | None = None
    ) -> None:
        self.failed = failed or {}
        self.error = error

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        if self.error is not None:
            fut.set_exception(self.error)
        else:
            fut.set_result(
                BatchResult(batch.batch_id, fake_vectors(batch.sequences, 8), self.failed)
            )
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


@pytest.mark.parametrize(
    ("executor", "error", "broken"),
    [
        (_ScriptedExecutor(failed={0: "killed 3 workers"}), ItemFailed, False),
        (_ScriptedExecutor(error=RuntimeError("lost")), PoolUnavailable, False),
        (_ScriptedExecutor(error=PoolBroken("no workers")), PoolUnavailable, True),
    ],
    ids=["poison-item", "batch-error", "pool-broken"],
)
def test_executor_failures_map_to_request_errors(
    executor: _ScriptedExecutor, error: type[Exception], broken: bool
) -> None:
    mb = MicroBatcher(executor)
    try:
        ticket = mb.submit(make_sequences(1, seed=6), [0], 1)
        with pytest.raises(error):
            ticket.future.result(DEADLINE_S)
        assert (mb.health() is not None) == broken
        if broken:
            with pytest.raises(PoolUnavailable, match="broken"):
                mb.submit(make_sequences(1), [0], 1)
    finally:
        mb.close()


def test_close_fails_pending_requests() -> None:
    with _busy_batcher(make_sequences(1)[0]) as busy:
        waiting = busy.mb.submit(make_sequences(1, seed=9), [0], 1)
        busy.mb.close()
        with pytest.raises(PoolUnavailable):
            waiting.future.result(DEADLINE_S)
        with pytest.raises(PoolUnavailable):
            busy.mb.submit(make_sequences(1), [0], 1)


@pytest.mark.parametrize(
    ("owner", "n_items"),
    [([0, 1, 2], 3), ([0, 0, 1, 2, 2, 2], 3), ([0, 0], 1)],
    ids=["no-windows", "mixed", "one-item-two-windows"],
)
def test_combine_windows(owner: list[int], n_items: int) -> None:
    rows = fake_vectors(make_sequences(len(owner), seed=7), 8)
    out = combine_windows(rows, owner, n_items)
    assert out.shape == (n_items, 8)
    for item in range(n_items):
        mean = rows[[i for i, o in enumerate(owner) if o == item]].mean(axis=0)
        np.testing.assert_allclose(out[item], mean / np.linalg.norm(mean), atol=1e-6)


# ----------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    wait_until(cond, what, timeout=deadline_s)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
    )


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    script = Path(__file__).with_name("serve_fake.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), "1.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _poll(up, "the server to start")
        result: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: result.append(
                httpx.post(
                    f"{url}/v1/embeddings", json={"input": ["in flight"]}, timeout=DEADLINE_S
                )
            )
        )
        t.start()
        _poll(
            lambda: _metric(url, "embedpool_inflight_batches") >= 1, "the request to be in flight"
        )
        proc.send_signal(signal.SIGTERM)
        t.join(DEADLINE_S)
        assert result and result[0].status_code == 200, result
        rc = proc.wait(DEADLINE_S)
        assert rc in (0, -signal.SIGTERM), rc
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.slow
def test_sigkill_of_a_worker_loses_no_request(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    from embedpool.executors.pool.config import PoolConfig
    from embedpool.executors.pool.pool import Pool

    pools: list[Pool] = []
    spec = FakeEngineSpec(dim=DIM, delay_per_token_s=2e-4)

    def factory() -> Pool:
        pools.append(Pool(spec, PoolConfig(workers=2, start_timeout_s=60)))
        return pools[0]

    live = serve(factory, batch_tokens=256)
    texts = [[f"client {c} item {i} " + "word " * (i % 30) for i in range(12)] for c in range(8)]
    killed: list[int] = []

    def kill_one_busy_worker() -> None:
        def busy() -> bool:
            return any(w.state == "busy" and w.pid for w in pools[0].stats().workers)

        _poll(busy, "a busy worker")
        pid = next(w.pid for w in pools[0].stats().workers if w.state == "busy" and w.pid)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    def client(c: int) -> list[httpx.Response]:
        return [
            httpx.post(f"{live.url}/v1/embeddings", json={"input": texts[c]}, timeout=DEADLINE_S)
            for _ in range(3)
        ]

    with ThreadPoolExecutor(9) as ex:
        futures = [ex.submit(client, c) for c in range(8)]
        ex.submit(kill_one_busy_worker).result(DEADLINE_S)
        responses = [f.result(DEADLINE_S) for f in futures]
    assert killed
    for c, rs in enumerate(responses):
        for r in rs:
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            np.testing.assert_array_equal(got, expected_vectors(tokenizer, texts[c]))
    stats = pools[0].stats()
    assert stats.deaths >= 1
    assert _metric(live.url, "embedpool_batch_retries_total") >= 1
    assert _metric(live.url, "embedpool_worker_deaths_total") >= 1
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
