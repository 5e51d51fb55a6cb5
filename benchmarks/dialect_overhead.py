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
a ratio to OpenAI float; and the CPU ratio round by round (each route against OpenAI float in
the same round: its median and quartiles), which says whether the difference has settled. On a
shared machine the CPU ratio is the one that holds: wall-clock latency swings with other
programs' load. The goal is a ratio <= 1.05. The CPU model and the load average (before and
after) are printed with the numbers.

    .venv/bin/python benchmarks/dialect_overhead.py --payload short --rounds 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    routes: dict[str, tuple[str, dict[str, Any]]] = {
        "openai-float": (
            "/v1/embeddings",
            {"model": MODEL, "input": texts, "encoding_format": "float"},
        ),
        "openai-base64": (
            "/v1/embeddings",
            {"model": MODEL, "input": texts, "encoding_format": "base64"},
        ),
        "ollama-embed": ("/api/embed", {"model": MODEL, "input": texts}),
        "tei-embed": ("/embed", {"inputs": texts}),
        "tei-root": ("/", {"inputs": texts}),
    }
    if len(texts) == 1:
        routes["ollama-embeddings"] = ("/api/embeddings", {"model": MODEL, "prompt": texts[0]})
    return routes


Measured = dict[str, tuple[float, float, list[float]]]


def measure(
    url: str, routes: dict[str, tuple[str, dict[str, Any]]], rounds: int, per_round: int
) -> Measured:
    """Per route: median latency (ms), CPU ms per request of this process (server, engine
    and client together), and its ratio to openai-float's in each round; routes interleaved
    round by round, the order rotating."""
    names = list(routes)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    payloads = {n: json.dumps(b).encode() for n, (_, b) in routes.items()}
    with httpx.Client(
        base_url=url, timeout=120, headers={"content-type": "application/json"}
    ) as client:
        for name in names:  # warm-up: every route a few times
            for _ in range(3):
                client.post(routes[name][0], content=payloads[name]).raise_for_status()
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                path, body = routes[name][0], payloads[name]
                cpu_start = time.process_time()
                for _ in range(per_round):
                    start = time.perf_counter()
                    resp = client.post(path, content=body)
                    times[name].append(time.perf_counter() - start)
                    resp.raise_for_status()
                cpu[name].append((time.process_time() - cpu_start) / per_round)
    base = cpu["openai-float"]
    return {
        n: (
            statistics.median(times[n]) * 1000,
            statistics.fmean(cpu[n]) * 1000,
            [c / b for c, b in zip(cpu[n], base, strict=True)],
        )
        for n in names
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["real", "fake"], default="real")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument(
        "--payload",
        choices=["short", "chunks", "both"],
        default="both",
        help="short: 1 short text; chunks: 16 code chunks",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    model = resolve_model(MODEL)
    factory = (
        default_executor_factory(model, args.precision)
        if args.engine == "real"
        else (lambda: InProcessExecutor(FakeEngineSpec(dim=model.dim).build))
    )
    app = create_app(ServerSettings(api_key="", precision=args.precision), factory, model=model)
    url, stop = start_server(app)
    payloads = {"1 short text": ["How do I sort a list in Python?"]}
    if args.payload != "short":
        payloads["16 code chunks"] = [c.text[:600] for c in stdlib_chunks(16)]
        if args.payload == "chunks":
            del payloads["1 short text"]
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "engine": args.engine,
        "precision": args.precision,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "cpu": cpu_name(),
        "loadavg_before": load_before,
    }
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs; load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}"
    )
    try:
        for label, texts in payloads.items():
            got = measure(url, bodies(texts), args.rounds, args.per_round)
            wall, cpu, _ = got["openai-float"]
            print(
                f"\n{label}: per request, median wall ms and mean CPU ms (ratio to "
                "openai-float); CPU ratio round by round: median [quartiles]"
            )
            results[label] = {}
            for name, (ms, cms, ratios) in got.items():
                q1, med, q3 = statistics.quantiles(ratios, n=4)
                print(
                    f"  {name:18s} wall {ms:8.2f} ms {ms / wall:6.3f}x   "
                    f"cpu {cms:8.2f} ms {cms / cpu:6.3f}x   "
                    f"by round {med:6.3f}x [{q1:.3f}, {q3:.3f}]"
                )
                results[label][name] = {
                    "wall_ms": ms,
                    "wall_ratio": ms / wall,
                    "cpu_ms": cms,
                    "cpu_ratio": cms / cpu,
                    "cpu_ratio_rounds_median": med,
                    "cpu_ratio_rounds_quartiles": [q1, q3],
                }
    finally:
        stop()
    load_after = os.getloadavg()
    results["loadavg_after"] = load_after
    print(f"\nload average after {' '.join(f'{x:.2f}' for x in load_after)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
