"""Dev benchmark: how fast the vector cache answers, and what a cached re-run costs to write.

    .venv/bin/python benchmarks/cache_bench.py [--n 5000] [--dim 384] [--batch 32] [--repeat 3]

Steps, each timed (best of ``--repeat``, wall clock and process CPU time, since this machine
is shared and wall time alone mostly measures the neighbours):

1. ``text_key`` of n texts (sha256);
2. ``put_many`` in batches of ``--batch`` (one transaction per batch, as a job does) into a
   fresh file;
3. ``get_many`` of all n keys from a freshly opened cache (a re-run's lookup), then again
   from the warm page cache;
4. writing n vectors to each output format (a re-run's other cost).

The vectors are random unit vectors; the texts are 40-line-sized strings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedpool.cache import VectorCache, text_key
from embedpool.outputs import SUPPORTED_EXTENSIONS, open_output

FP = "bench" + "0" * 27


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best (wall, cpu) seconds over ``repeat`` runs."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def report(label: str, n: int, wall: float, cpu: float, unit: str) -> None:
    print(
        f"{label:<34} {wall * 1000:9.1f} ms wall {cpu * 1000:9.1f} ms cpu   "
        f"{n / wall:>12,.0f} {unit}/s wall {n / max(cpu, 1e-9):>12,.0f} {unit}/s cpu"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, dim = args.n, args.dim

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    texts = [f"chunk {i}\n" + "def f(x):\n    return x + 1\n" * 40 for i in range(n)]
    ids = [f"file{i // 10}.py:{i % 10}" for i in range(n)]
    keys: list[bytes] = []

    def hash_all() -> None:
        keys[:] = [text_key(t) for t in texts]

    report("text_key", n, *timed(hash_all, args.repeat), "texts")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = 0

        def put_all() -> None:
            nonlocal run
            run += 1
            with VectorCache.open(root / f"put{run}.sqlite3") as cache:
                for s in range(0, n, args.batch):
                    cache.put_many(
                        FP, zip(keys[s : s + args.batch], vecs[s : s + args.batch], strict=True)
                    )

        report(f"put_many (batches of {args.batch})", n, *timed(put_all, args.repeat), "writes")
        db = root / f"put{run}.sqlite3"
        print(f"{'file size':<34} {db.stat().st_size / n:9.0f} bytes per {dim}-dim vector")

        hits: dict[bytes, object] = {}

        def get_cold() -> None:
            with VectorCache.open(db) as cache:
                hits.update(cache.get_many(FP, keys))

        report("get_many (open + lookup)", n, *timed(get_cold, args.repeat), "lookups")
        assert len(hits) == n
        miss_keys = [text_key(f"not cached {i}") for i in range(n)]
        with VectorCache.open(db) as cache:
            cache.get_many(FP, keys)
            report(
                "get_many (open cache)",
                n,
                *timed(lambda: cache.get_many(FP, keys), args.repeat),
                "lookups",
            )
            report(
                "get_many (all misses)",
                n,
                *timed(lambda: cache.get_many(FP, miss_keys), args.repeat),
                "lookups",
            )

        for ext in SUPPORTED_EXTENSIONS:
            out = root / f"out{ext}"

            def write_out(out: Path = out) -> None:
                with open_output(out, dim) as w:
                    for s in range(0, n, args.batch):
                        w.write(ids[s : s + args.batch], vecs[s : s + args.batch])

            wall, cpu = timed(write_out, args.repeat)
            report(f"write {ext}", n, wall, cpu, "rows")
            print(f"{'':<34} {out.stat().st_size / n:9.0f} bytes per row")


if __name__ == "__main__":
    main()
