"""Server throughput vs the CLI's batch throughput on the same chunks, and short-text latency.

    .venv/bin/python benchmarks/serve_bench.py                       # real model (int8)
    .venv/bin/python benchmarks/serve_bench.py --engine fake         # simulated compute

What it measures, on one machine, with the same executor configuration for both sides:

1. *direct*: ``embedpool.job.Embedder(...).embed(texts)``, the CLI's path (tokenise, sort,
   token-budget batches, pool), timed after a warm-up;
2. *server*: the same texts sent to ``POST /v1/embeddings`` (base64, as the openai client
   does) in requests of ``--per-request`` texts by 1, 8 and 32 concurrent clients; throughput
   as a ratio to (1);
3. *latency*: p50 and p99 of one short text, sequential requests on an idle server.

Clients run in this process (threads with keep-alive connections) next to the server, so on a
small machine their CPU time is charged to the server's numbers: the ratios are conservative.
``--engine fake`` replaces the model by ``FakeEngineSpec`` sleeping ``--fake-s-per-token`` per
token in each worker (default ~ MiniLM int8 on one core here), which isolates the server's
own overhead from model speed.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from embedpool.corpus import stdlib_chunks
from embedpool.engine import EngineSpec
from embedpool.job import Embedder
from embedpool.models import resolve_model
from embedpool.pool.pool import Pool, pool_config_for
from embedpool.server import ServerSettings, create_app
from embedpool.testing import FakeEngineSpec


def start_server(app: Any) -> tuple[str, Callable[[], None]]:
    import uvicorn

    # proto=IPPROTO_TCP, else asyncio skips TCP_NODELAY and each response waits 40 ms (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("server failed to start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(60)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def run_clients(url: str, requests: list[list[str]], clients: int, timeout: float) -> float:
    """Seconds to send every request with ``clients`` concurrent keep-alive clients."""
    work: queue.Queue[list[str]] = queue.Queue()
    for r in requests:
        work.put(r)
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                try:
                    texts = work.get_nowait()
                except queue.Empty:
                    return
                r = http.post(f"{url}/v1/embeddings",
                              json={"input": texts, "model": "all-MiniLM-L6-v2",
                                    "encoding_format": "base64"})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["real", "fake"], default="real")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--workers", default="2", help="pool workers (same for both sides)")
    ap.add_argument("--chunks", type=int, default=600)
    ap.add_argument("--per-request", type=int, default=16)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--fake-s-per-token", type=float, default=1.5e-4)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    model = resolve_model()
    spec: Any
    if args.engine == "fake":
        spec = FakeEngineSpec(dim=model.dim, delay_per_token_s=args.fake_s_per_token)
    else:
        spec = EngineSpec(model, args.precision, threads=1)
    texts = [c.text for c in stdlib_chunks(args.chunks)]
    settings = ServerSettings(api_key="", precision=args.precision, log_level="warning")
    results: dict[str, Any] = {"engine": args.engine, "workers": args.workers,
                               "chunks": len(texts), "per_request": args.per_request}

    # 1. direct: the CLI's path
    with Embedder(model, precision=args.precision, workers=args.workers, engine=spec,
                  batch_tokens=settings.batch_tokens) as emb:
        emb.embed(texts[:32])  # warm-up: workers loaded, first batches run
        start = time.perf_counter()
        emb.embed(texts)
        direct = len(texts) / (time.perf_counter() - start)
    results["direct_chunks_per_s"] = round(direct, 1)
    print(f"direct (Embedder, workers={args.workers}): {direct:.1f} chunks/s", flush=True)

    # 2. server at several concurrencies
    def factory() -> Pool:
        return Pool(spec, pool_config_for(workers=args.workers, batch_tokens=settings.batch_tokens))

    url, stop = start_server(create_app(settings, factory, model=model))
    try:
        run_clients(url, [texts[:16]] * 4, 4, 300)  # warm-up
        requests = [texts[i:i + args.per_request] for i in range(0, len(texts), args.per_request)]
        for c in (int(x) for x in args.clients.split(",")):
            seconds = run_clients(url, requests, c, 600)
            rate = len(texts) / seconds
            results[f"server_{c}_chunks_per_s"] = round(rate, 1)
            results[f"server_{c}_ratio"] = round(rate / direct, 3)
            print(f"server, {c:>2} clients: {rate:.1f} chunks/s = {rate / direct:.2f} x direct",
                  flush=True)

        # 3. latency of one short text, idle server
        lat: list[float] = []
        with httpx.Client(timeout=60) as http:
            for _ in range(args.latency_requests):
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/embeddings", json={"input": "def add(a, b): return a + b"})
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        lat.sort()
        p50 = statistics.median(lat) * 1e3
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
        results["latency_p50_ms"], results["latency_p99_ms"] = round(p50, 2), round(p99, 2)
        print(f"short text latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"({args.latency_requests} requests)", flush=True)
    finally:
        stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
