"""Per-request overhead of each API dialect (Ollama, TEI) against the OpenAI route, same server,
same texts, same run.

    .venv/bin/python benchmarks/dialect_overhead.py                  # real model (int8)
    .venv/bin/python benchmarks/dialect_overhead.py --engine fake    # the server's own cost

One server (``create_app`` with the in-process engine, or ``FakeEngineSpec`` for ``--engine
fake``, which leaves only the server's own work: parsing, tokenising, batching, rendering).
Sequential requests on one keep-alive connection, for each payload (1 short text; 16 code
chunks), to every embedding route: OpenAI ``/v1/embeddings`` (float, the dialects' encoding,
and base64, the openai client's), Ollama ``/api/embed`` and ``/api/embeddings``, TEI
``/embed`` and ``POST /``. Routes are measured in alternation (``--rounds`` rounds, each
route ``--per-round`` requests per round, the order rotating), so load from other programs
falls on all alike. Reported per route: the median latency and the CPU time of this process
per request (server, engine and the httpx client, the same client for every route), each as
a ratio to OpenAI float. On a shared machine the CPU ratio is the one that holds: wall-clock
latency swings with other programs' load. The goal is a ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import start_server

from embedpool.corpus import stdlib_chunks
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.models import resolve_model
from embedpool.server import ServerSettings, create_app, default_executor_factory
from embedpool.testing import FakeEngineSpec

MODEL = "all-MiniLM-L6-v2"


def bodies(texts: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Route name -> (path, body) embedding ``texts``."""
    routes = {
        "openai-float": ("/v1/embeddings", {"model": MODEL, "input": texts,
                                            "encoding_format": "float"}),
        "openai-base64": ("/v1/embeddings", {"model": MODEL, "input": texts,
                                             "encoding_format": "base64"}),
        "ollama-embed": ("/api/embed", {"model": MODEL, "input": texts}),
        "tei-embed": ("/embed", {"inputs": texts}),
        "tei-root": ("/", {"inputs": texts}),
    }
    if len(texts) == 1:
        routes["ollama-embeddings"] = ("/api/embeddings", {"model": MODEL, "prompt": texts[0]})
    return routes


def measure(url: str, routes: dict[str, tuple[str, dict[str, Any]]], rounds: int,
            per_round: int) -> dict[str, tuple[float, float]]:
    """Per route: median latency (ms) and CPU ms per request of this process (server,
    engine and client together), routes interleaved round by round."""
    names = list(routes)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    payloads = {n: json.dumps(b).encode() for n, (_, b) in routes.items()}
    with httpx.Client(base_url=url, timeout=120,
                      headers={"content-type": "application/json"}) as client:
        for name in names:  # warm-up: every route once
            client.post(routes[name][0], content=payloads[name]).raise_for_status()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                path, body = routes[name][0], payloads[name]
                cpu_start = time.process_time()
                for _ in range(per_round):
                    start = time.perf_counter()
                    resp = client.post(path, content=body)
                    times[name].append(time.perf_counter() - start)
                    resp.raise_for_status()
                cpu[name] += time.process_time() - cpu_start
    return {n: (statistics.median(times[n]) * 1000, cpu[n] * 1000 / len(times[n]))
            for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["real", "fake"], default="real")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    model = resolve_model(MODEL)
    factory = (default_executor_factory(model, args.precision) if args.engine == "real"
               else (lambda: InProcessExecutor(FakeEngineSpec(dim=model.dim).build)))
    app = create_app(ServerSettings(api_key="", precision=args.precision), factory, model=model)
    url, stop = start_server(app)
    chunks = [c.text[:600] for c in stdlib_chunks(16)]
    results: dict[str, Any] = {"engine": args.engine, "precision": args.precision,
                               "rounds": args.rounds, "per_round": args.per_round}
    try:
        for label, texts in (("1 short text", ["How do I sort a list in Python?"]),
                             ("16 code chunks", chunks)):
            got = measure(url, bodies(texts), args.rounds, args.per_round)
            wall, cpu = got["openai-float"]
            print(f"\n{label}: per request, median wall ms and CPU ms (ratio to openai-float)")
            for name, (ms, cms) in got.items():
                print(f"  {name:18s} wall {ms:8.2f} ms {ms / wall:6.3f}x   "
                      f"cpu {cms:8.2f} ms {cms / cpu:6.3f}x")
            results[label] = {n: {"wall_ms": ms, "wall_ratio": ms / wall, "cpu_ms": cms,
                                  "cpu_ratio": cms / cpu} for n, (ms, cms) in got.items()}
    finally:
        stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
