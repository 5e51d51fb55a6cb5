"""Jobs of any size (issue 20, part 1): the parent's memory and the first vector's time on a
1M-chunk JSONL against a 10k one, and the JSONL reader's lines per second.

    .venv/bin/python benchmarks/streaming.py [--small 10000] [--large 1000000]
        [--seconds 30] [--model tests/fixtures/families/modernbert/model] [--workers 1]
        [--data-dir /tmp/embedpool-streaming]

1. Two JSONL files of ``--small`` and ``--large`` records (``{"id", "text"}``, texts of about
   430 characters of English-like words, ~100-130 MiniLM tokens), written once into
   ``--data-dir`` and reused.
2. The reader: ``inputs.read_jsonl`` over the first 200k lines of the large file, and
   ``json.loads`` per line (the reader before orjson) over the same lines, in this process:
   lines per wall second and per CPU second (steady on a loaded machine), and their ratio.
3. ``embedpool embed FILE --out OUT.npy --workers W --no-cache -q`` as a subprocess, the
   real CLI end to end, once per file. This script samples the parent's RSS (the ``embed``
   process alone, not its workers) every 20 ms and watches the output's temporary file: the
   first vector is written when it grows past the .npy header. Work is bounded by time, not
   by the input: after ``--seconds`` the job gets SIGINT and finishes its in-flight batches
   (what the CLI does on Ctrl-C). Both files run for the same time (the small one may finish
   first), so the ratio of peak RSS compares the same work with 100x more input behind it.
   The default model is the repo's random-weight ModernBERT fixture (4 x 32, max length
   128: compute is cheap, so the parent's own work, reading and tokenising, dominates and
   many windows pass in the time); ``--model all-MiniLM-L6-v2`` runs the real model.

A graph is built on a model's first run: a warm-up run on 100 records builds it first, so no
timing includes it. EMBEDPOOL_CACHE_DIR is set to ``--data-dir``/cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "families" / "modernbert" / "model"
NPY_HEADER = 128
READER_LINES = 200_000


def make_jsonl(path: Path, n: int) -> Path:
    """``n`` records, deterministic; written once."""
    if path.exists():
        return path
    rng = random.Random(0)
    words = sorted({w.strip(".,;:()[]'\"`") for w in (REPO / "README.md").read_text().split()
                    if w.isascii() and w.isalpha()})
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for start in range(0, n, 10_000):
            f.write(b"".join(
                orjson.dumps({"id": f"doc-{i}", "text": " ".join(rng.choices(words, k=64))[:430]})
                + b"\n" for i in range(start, min(n, start + 10_000))))
    tmp.rename(path)
    return path


def reader_rate(path: Path) -> dict[str, float]:
    """Lines per wall second and per CPU second (the steadier measure on a shared machine) of
    ``read_jsonl`` and of ``json.loads`` per line, over the first READER_LINES lines."""
    from embedpool.inputs import read_jsonl

    head = path.with_name(f"head-{READER_LINES}.jsonl")
    if not head.exists():
        with path.open("rb") as src, head.open("wb") as dst:
            dst.writelines(itertools.islice(src, READER_LINES))

    def old() -> int:
        with head.open("rb") as f:
            return sum(1 for raw in f if isinstance(json.loads(raw.decode("utf-8")), dict))

    def new() -> int:
        return sum(1 for _ in read_jsonl(head))

    rates: dict[str, float] = {}
    for name, fn in (("read_jsonl", new), ("json.loads", old)):
        w0, c0 = time.perf_counter(), time.process_time()
        n = fn()
        rates[f"{name} lines/s"] = n / (time.perf_counter() - w0)
        rates[f"{name} lines/cpu-s"] = n / (time.process_time() - c0)
    return rates


def run_embed(src: Path, out_dir: Path, args: argparse.Namespace, seconds: float,
              tree: Path | None = None) -> dict[str, object]:
    """The CLI on ``src`` for at most ``seconds``: the parent's peak RSS, the first vector's
    time, what the summary says."""
    out = out_dir / f"{src.stem}.npy"
    for stale in out_dir.glob(f"*{src.stem}*"):
        stale.unlink()
    cmd = [sys.executable, "-m", "embedpool", "embed", str(src), "--out", str(out),
           "--model", args.model, "--workers", args.workers, "--no-cache", "-q"]
    t0 = time.perf_counter()
    env = {**os.environ, "EMBEDPOOL_CACHE_DIR": str(args.data_dir / "cache")}
    if tree is not None:  # another checkout's embedpool (--baseline-tree)
        env["PYTHONPATH"] = str(tree)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    me = psutil.Process(proc.pid)
    peak = 0
    first: float | None = None
    interrupted = False
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.Error:
            break
        now = time.perf_counter() - t0
        if first is None:
            for temp in out_dir.glob(f".{out.name}.tmp-*"):
                try:
                    if temp.stat().st_size > NPY_HEADER:
                        first = now
                except OSError:
                    pass
        if now > seconds and not interrupted:
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    summary = next((line for line in err.splitlines() if line.startswith("done:")), err[-500:])
    return {"file": src.name, "tree": str(tree or "this"), "rc": proc.returncode, "peak_rss_mb": round(peak / 2**20, 1),
            "first_vector_s": None if first is None else round(first, 2),
            "wall_s": round(time.perf_counter() - t0, 1), "interrupted": interrupted,
            "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--workers", default="1")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/embedpool-streaming"))
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="Also run the large file with the embedpool of this checkout (e.g. "
                         "`git archive 31104e9`, before streaming), for the same time.")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small = make_jsonl(args.data_dir / f"chunks-{args.small}.jsonl", args.small)
    large = make_jsonl(args.data_dir / f"chunks-{args.large}.jsonl", args.large)
    warm = make_jsonl(args.data_dir / "chunks-100.jsonl", 100)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s: {large} "
          f"({large.stat().st_size / 2**20:.0f} MiB)", flush=True)
    rates = reader_rate(large)
    fast = rates["read_jsonl lines/cpu-s"]
    print("reader: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
          + f" (per CPU second {fast / rates['json.loads lines/cpu-s']:.2f}x json.loads)",
          flush=True)
    out_dir = args.data_dir / "out"
    out_dir.mkdir(exist_ok=True)
    print("warm-up:", run_embed(warm, out_dir, args, 600)["summary"], flush=True)
    results = [run_embed(src, out_dir, args, args.seconds) for src in (small, large)]
    for r in results:
        print(json.dumps(r), flush=True)
    if args.baseline_tree is not None:
        print("baseline warm-up:",
              run_embed(warm, out_dir, args, 600, args.baseline_tree)["summary"], flush=True)
        print(json.dumps(run_embed(large, out_dir, args, args.seconds, args.baseline_tree)),
              flush=True)
    peak_small = float(results[0]["peak_rss_mb"])  # type: ignore[arg-type]
    peak_large = float(results[1]["peak_rss_mb"])  # type: ignore[arg-type]
    print(f"parent peak RSS {args.large:,} / {args.small:,} chunks: "
          f"{peak_large / peak_small:.2f}x (target <= 1.3); first vector on {args.large:,}: "
          f"{results[1]['first_vector_s']} s (target <= 5); reader {fast:,.0f} lines per CPU "
          "second (target >= 100,000)")


if __name__ == "__main__":
    main()
