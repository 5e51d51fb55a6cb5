"""Can the parent's tokenisation keep N workers fed? Its rate per core vs one worker's.

The parent tokenises every text (``Embedder._prepare``: dedupe, ``TextTokenizer.encode``,
``plan_batches``) and each worker embeds. This measures, on the same corpus, in one script:

    parent      tokens/s of ``Embedder._prepare`` (the job's real path, cache off) in a child
                pinned to ONE core with RAYON_NUM_THREADS=1: the parent's cost per core
    parent-N    the same with every core this script may use and RAYON's default threads
    worker      tokens/s of one engine with 1 intra-op thread (what one pool worker does),
                ``Engine.embed`` over the job's own batches

and prints the ratio (how many single-threaded workers one parent core feeds) and what that
means at 16 and 96 cores. Run on a quiet machine: numbers from a busy one are only ratios.

Run: .venv/bin/python benchmarks/tokenize_rate.py [--chunks 2000] [--precision int8] [--json]
     [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def _prepare_rate(chunks: int, repeats: int) -> dict[str, Any]:
    """Tokens/s of the job's prepare step in this process (no executor is started)."""
    from embedpool.corpus import stdlib_chunks
    from embedpool.job import Embedder

    texts = [c.text for c in stdlib_chunks(chunks)]
    ids = [str(i) for i in range(len(texts))]
    emb = Embedder(lazy=True)
    emb._prepare(0, ids[:64], texts[:64])  # warm-up: tokenizer caches, numpy
    best = float("inf")
    tokens = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(texts), 8192):
            window = emb._prepare(start, ids, texts)
            tokens += window.prep.sequences_tokens
        best = min(best, time.perf_counter() - t0)
    return {
        "texts": len(texts),
        "tokens": tokens,
        "seconds": best,
        "tokens_per_s": tokens / best,
        "texts_per_s": len(texts) / best,
        "cores": len(os.sched_getaffinity(0)),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default"),
    }


def _worker_rate(chunks: int, precision: str) -> dict[str, Any]:
    """Tokens/s of one single-threaded engine over the job's own batches."""
    from embedpool.corpus import stdlib_chunks
    from embedpool.engine import EngineSpec
    from embedpool.job import Embedder
    from embedpool.models import resolve_model

    texts = [c.text for c in stdlib_chunks(chunks)]
    ids = [str(i) for i in range(len(texts))]
    window = Embedder(lazy=True)._prepare(0, ids, texts)
    engine = EngineSpec(resolve_model(), precision, threads=1).build()  # type: ignore[arg-type]
    engine.embed(window.batches[-1].sequences)  # warm-up: arena, kernels
    t0 = time.perf_counter()
    tokens = 0
    for b in window.batches:
        engine.embed(b.sequences)
        tokens += b.tokens
    seconds = time.perf_counter() - t0
    return {
        "texts": len(texts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "precision": precision,
    }


def _child(kind: str, chunks: int, extra: str, one_core: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if one_core:
        env["RAYON_NUM_THREADS"] = "1"
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, __file__, "--child", kind, "--chunks", str(chunks), "--arg", extra]
    if one_core:
        core = min(os.sched_getaffinity(0))
        cmd = ["taskset", "-c", str(core), *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arg", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "prepare":
        print(json.dumps(_prepare_rate(args.chunks, int(args.arg or 3))))
        return
    if args.child == "worker":
        print(json.dumps(_worker_rate(args.chunks, args.arg)))
        return

    cores = len(os.sched_getaffinity(0))
    parent1 = _child("prepare", args.chunks, str(args.repeats), one_core=True)
    parent_n = _child("prepare", args.chunks, str(args.repeats), one_core=False)
    worker = _child("worker", args.chunks, args.precision, one_core=True)
    per_core = parent1["tokens_per_s"]
    fed = per_core / worker["tokens_per_s"]
    result = {
        "cpu": _cpu_name(),
        "cores": cores,
        "parent_1core": parent1,
        "parent_all_cores": parent_n,
        "worker_1thread": worker,
        "workers_fed_per_parent_core": round(fed, 1),
        "parent_cores_needed": {str(n): round(n / fed, 2) for n in (16, 64, 96)},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"cpu: {result['cpu']}, {cores} usable cores")
    print(
        f"parent prepare, 1 core (RAYON_NUM_THREADS=1): {per_core:,.0f} tokens/s "
        f"({parent1['texts_per_s']:,.0f} texts/s)"
    )
    print(f"parent prepare, {cores} cores: {parent_n['tokens_per_s']:,.0f} tokens/s")
    print(f"one worker, 1 thread, {args.precision}: {worker['tokens_per_s']:,.0f} tokens/s")
    print(
        f"one parent core feeds {fed:.1f} single-threaded workers; parent cores needed: "
        + ", ".join(f"{n} workers {v}" for n, v in result["parent_cores_needed"].items())
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
