"""Server throughput vs the CLI's batch throughput on the same chunks, and short-text latency;
with ``--backend ray``, ``serve --backend ray`` as a ratio to the local server.

    .venv/bin/python benchmarks/serve_bench.py                       # real model (int8)
    .venv/bin/python benchmarks/serve_bench.py --engine fake         # simulated compute
    .venv/bin/python benchmarks/serve_bench.py --backend ray         # + the server on Ray actors

What it measures, on one machine, with the same executor configuration for both sides:

1. *direct*: ``embedpool.job.Embedder(...).embed(texts)``, the CLI's path (tokenise, sort,
   token-budget batches, pool), timed after a warm-up;
2. *server*: the same texts sent to ``POST /v1/embeddings`` (base64, as the openai client
   does) in requests of ``--per-request`` texts by 1, 8 and 32 concurrent clients; throughput
   as a ratio to (1);
3. *latency*: p50 and p99 of one short text, sequential requests on an idle server.

With ``--backend ray`` the script first joins Ray (``--ray-address``) or starts a private local
instance (workers at nice 0, as ``RayExecutor`` does), then also runs the CLI's path on Ray
actors (``Embedder(backend="ray")``) and a second server whose executor is ``RayExecutor``
(``--workers`` actors x 1 CPU, the model shipped through the object store), both servers up
at once and measured in alternation (``--rounds`` passes each, in rotating order, median
reported), so that load from other programs falls on both alike. It reports each server's
throughput at every concurrency, ``ray_vs_local_<c>`` (Ray server / local server, the
figure that matters) and both against the CLI path, plus Ray's start-up time.

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
from embedpool.executors.pool.pool import Pool, pool_config_for
from embedpool.job import Embedder
from embedpool.models import resolve_model
from embedpool.server import ServerSettings, create_app
from embedpool.testing import FakeEngineSpec

CLIENT_TIMEOUT_S = 600.0


def start_server(app: Any) -> tuple[str, Callable[[], None]]:
    """uvicorn serving ``app`` in a thread on a free port, once the lifespan has started."""
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
                r = http.post(
                    f"{url}/v1/embeddings",
                    json={"input": texts, "model": "all-MiniLM-L6-v2", "encoding_format": "base64"},
                )
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


def connect_ray(address: str | None) -> float:
    """Join ``address`` or start a private local Ray as RayExecutor would; seconds taken."""
    import os

    import ray

    from embedpool.engine import usable_cores

    started = time.perf_counter()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address="local", num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False
        )
    return time.perf_counter() - started


def direct_rate(
    model: Any,
    spec: Any,
    texts: list[str],
    workers: str,
    precision: str,
    batch_tokens: int,
    backend: str,
) -> float:
    """Chunks/s of ``Embedder.embed``, the CLI's path, after a warm-up."""
    with Embedder(
        model,
        precision=precision,
        workers=workers,
        engine=spec,  # type: ignore[arg-type]
        batch_tokens=batch_tokens,
        backend=backend,
    ) as emb:
        emb.embed(texts[:32])  # warm-up: workers loaded, first batches run
        start = time.perf_counter()
        emb.embed(texts)
        return len(texts) / (time.perf_counter() - start)


def latency_ms(url: str, n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of one short text, ``n`` sequential requests."""
    lat: list[float] = []
    with httpx.Client(timeout=60) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/embeddings", json={"input": "def add(a, b): return a + b"})
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    lat.sort()
    return statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["real", "fake"], default="real")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--workers", default="2", help="pool workers, and Ray actors (same for all)")
    ap.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="ray: also the server on Ray actors, as a ratio to the local one",
    )
    ap.add_argument("--ray-address", default=None, help="default: a private local Ray")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="passes per server and concurrency (the median is reported)",
    )
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
    tokens = settings.batch_tokens
    results: dict[str, Any] = {
        "engine": args.engine,
        "workers": args.workers,
        "backend": args.backend,
        "chunks": len(texts),
        "per_request": args.per_request,
        "rounds": args.rounds,
    }
    on_ray = args.backend == "ray"
    if on_ray:
        results["ray_init_s"] = round(connect_ray(args.ray_address), 2)

    # 1. direct: the CLI's path (and on Ray actors, for reference)
    direct = direct_rate(model, spec, texts, args.workers, args.precision, tokens, "local")
    results["direct_chunks_per_s"] = round(direct, 1)
    print(f"direct (Embedder, workers={args.workers}): {direct:.1f} chunks/s", flush=True)
    if on_ray:
        rate = direct_rate(model, spec, texts, args.workers, args.precision, tokens, "ray")
        results["direct_ray_chunks_per_s"] = round(rate, 1)
        print(f"direct on Ray (Embedder, {args.workers} actors): {rate:.1f} chunks/s", flush=True)

    # 2. servers at several concurrencies, measured in alternation
    def pool_factory() -> Pool:
        return Pool(spec, pool_config_for(workers=args.workers, batch_tokens=tokens))

    factories: dict[str, Callable[[], Any]] = {"local": pool_factory}
    if on_ray:
        from embedpool.server.on_ray import ray_executor_factory

        factories["ray"] = ray_executor_factory(
            spec, address=args.ray_address, actors=int(args.workers), batch_tokens=tokens
        )
    servers: dict[str, str] = {}
    stops: list[Callable[[], None]] = []
    try:
        for name, factory in factories.items():
            started = time.perf_counter()
            app = create_app(settings, factory, model=model)
            url, stop = start_server(app)
            stops.append(stop)
            wait_all_workers_ready(app)
            results[f"{name}_server_start_s"] = round(time.perf_counter() - started, 2)
            run_clients(url, [texts[:16]] * 4, 4, CLIENT_TIMEOUT_S)  # warm-up
            servers[name] = url
        requests = [texts[i : i + args.per_request] for i in range(0, len(texts), args.per_request)]
        names = list(servers)
        for c in (int(x) for x in args.clients.split(",")):
            runs: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    seconds = run_clients(servers[name], requests, c, CLIENT_TIMEOUT_S)
                    runs[name].append(len(texts) / seconds)
            for name, rates in runs.items():
                rate = statistics.median(rates)
                key = "server" if name == "local" else f"server_{name}"
                results[f"{key}_{c}_chunks_per_s"] = round(rate, 1)
                results[f"{key}_{c}_ratio"] = round(rate / direct, 3)
                if args.rounds > 1:
                    results[f"{key}_{c}_runs"] = [round(x, 1) for x in rates]
                print(
                    f"{name} server, {c:>2} clients: {rate:.1f} chunks/s = "
                    f"{rate / direct:.2f} x direct",
                    flush=True,
                )
            if on_ray:
                ratio = statistics.median(runs["ray"]) / statistics.median(runs["local"])
                results[f"ray_vs_local_{c}"] = round(ratio, 3)
                print(f"ray server / local server, {c:>2} clients: {ratio:.2f}", flush=True)

        # 3. latency of one short text, idle server
        for name, url in servers.items():
            p50, p99 = latency_ms(url, args.latency_requests)
            prefix = "latency" if name == "local" else f"{name}_latency"
            results[f"{prefix}_p50_ms"], results[f"{prefix}_p99_ms"] = round(p50, 2), round(p99, 2)
            print(
                f"{name} server, short text latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
                f"({args.latency_requests} requests)",
                flush=True,
            )
    finally:
        for stop in reversed(stops):
            stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    json.dump(results, sys.stdout)
    print()


def wait_all_workers_ready(app: Any, timeout: float = 300.0) -> None:
    """Until every worker (or actor) of the app's executor is ready: a pool or a Ray executor
    starts serving on its first one."""
    deadline = time.monotonic() + timeout
    while True:
        workers = app.state.runtime.executor.stats().workers
        if workers and all(w.state != "starting" for w in workers):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"workers not ready after {timeout:.0f} s: {workers}")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
