"""Jobs of any size (issue 20, part 1): the parent's memory and the first vector's time on a
1M-chunk JSONL against a 10k one, and the JSONL reader's lines per second.

    .venv/bin/python benchmarks/streaming.py [--small 10000] [--large 1000000]
        [--large-rows 12000] [--model tests/fixtures/families/modernbert/model]
        [--workers 1] [--batch-tokens 8192] [--formats npy,parquet] [--first-runs 2]
        [--baseline-tree DIR] [--data-dir /tmp/embedpool-streaming]

1. Two JSONL files of ``--small`` and ``--large`` records (``{"id", "text"}``, texts of about
   430 characters of English-like words), written once into ``--data-dir`` and reused.
2. The reader: ``inputs.read_jsonl`` over the first 200k lines of the large file, and
   ``json.loads`` per line (the reader before orjson) over the same lines, in this process:
   lines per wall second and per CPU second (steady on a loaded machine), and their ratio.
3. ``embedpool embed FILE --out OUT.EXT --workers W --no-cache --log-json`` as a
   subprocess, the real CLI end to end, once per file and output format (``--formats``).
   This script samples the parent's RSS (the ``embed`` process alone, not its workers) every
   20 ms and counts the rows done from its progress events; with ``.npy`` it also watches
   the output's temporary file: the first vector is written when a row appears there. The
   small file runs to its end.
   Embedding all of the large one would take hours here, so its work is bounded by rows:
   once ``--large-rows`` rows are written (default 1.2x the small file: past every window
   size the small run reaches, so both did the same kind of work) it gets SIGINT and
   finishes its in-flight batches, as on Ctrl-C. The ratio of peak RSS then compares the
   same work with 100x more input behind it. The default model is the repo's random-weight
   ModernBERT fixture (4 x 32, max length 128), so compute is cheap and the parent's own
   work (reading, tokenising, writing) dominates; ``--model all-MiniLM-L6-v2`` runs the real
   model.

4. The first vector with the default settings, ``--first-runs`` times: ``embedpool embed
   LARGE -o OUT.npy`` with the default model and workers and a fresh vector cache (graphs
   built already), stopped once a row is in the output. From its ``--log-json`` events, where
   the seconds went: the first worker's start and readiness, the first batch done, the first
   window whole. The CPU and the load average are printed with it.

A graph is built on a model's first run: a warm-up run on 100 records builds it first, so no
timing includes it. EMBEDPOOL_CACHE_DIR is set to ``--data-dir``/cache. ``--baseline-tree
DIR`` also runs the large file for ``--baseline-seconds`` with the embedpool checked out in
DIR (``git archive 31104e9``: before streaming, every input was read first).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
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
    words = sorted(
        {
            w.strip(".,;:()[]'\"`")
            for w in (REPO / "README.md").read_text().split()
            if w.isascii() and w.isalpha()
        }
    )
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for start in range(0, n, 10_000):
            f.write(
                b"".join(
                    orjson.dumps(
                        {"id": f"doc-{i}", "text": " ".join(rng.choices(words, k=64))[:430]}
                    )
                    + b"\n"
                    for i in range(start, min(n, start + 10_000))
                )
            )
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


def rows_written(temp: Path) -> int:
    """Rows in a .npy being streamed: its header (written at open) gives the width."""
    with temp.open("rb") as f:
        header = f.read(NPY_HEADER)
    found = re.search(rb"'shape': \(\d+, (\d+)\)", header)
    if found is None:
        return 0
    return max(0, (temp.stat().st_size - NPY_HEADER) // (4 * int(found.group(1))))


def cpu_name() -> str:
    """The CPU's model name (lscpu's), for every figure printed."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


class Events:
    """The ``--log-json`` events of a running CLI, read from its stderr in a thread, each
    with the seconds since start at which it arrived."""

    def __init__(self, proc: subprocess.Popen[str], t0: float) -> None:
        self.seen: list[tuple[float, dict[str, object]]] = []
        self.lines: list[str] = []
        self.done = 0
        self._thread = threading.Thread(target=self._read, args=(proc, t0), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str], t0: float) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                self.lines.append(line.rstrip("\n"))
                continue
            if isinstance(event, dict):
                self.seen.append((time.perf_counter() - t0, event))
                if event.get("event") == "progress":
                    self.done = max(self.done, int(event.get("done", 0)))

    def first(self, name: str, **match: object) -> float | None:
        return next(
            (
                t
                for t, e in self.seen
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
            ),
            None,
        )

    def join(self) -> None:
        self._thread.join(timeout=60)


def run_embed(
    src: Path,
    out_dir: Path,
    args: argparse.Namespace,
    seconds: float,
    tree: Path | None = None,
    stop_rows: int | None = None,
    fmt: str = "npy",
    cli: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, object]:
    """The CLI on ``src`` until it ends, ``stop_rows`` rows are done or ``seconds`` pass
    (then SIGINT: in-flight batches finish): the parent's peak RSS, the first vector's time
    (.npy), what the summary says. ``tree``: run the embedpool checked out there. ``cli``:
    these options instead of the benchmark's (model, workers, budget, no cache)."""
    out = out_dir / f"{src.stem}.{fmt}"
    for stale in out_dir.glob(f"*{src.stem}*"):
        stale.unlink()
    opts = (
        cli
        if cli is not None
        else [
            "--model",
            args.model,
            "--workers",
            args.workers,
            "--batch-tokens",
            str(args.batch_tokens),
            "--no-cache",
        ]
    )
    cmd = [
        sys.executable,
        "-m",
        "embedpool",
        "embed",
        str(src),
        "--out",
        str(out),
        *opts,
        "--log-json",
    ]
    env = env or {**os.environ, "EMBEDPOOL_CACHE_DIR": str(args.data_dir / "cache")}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    t0 = time.perf_counter()
    # cwd: not the repository, whose embedpool ``python -m`` would import first
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=args.data_dir)
    events = Events(proc, t0)
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
        if first is None and fmt == "npy":
            for temp in out_dir.glob(f".{out.name}.tmp-*"):
                with contextlib.suppress(OSError):
                    if rows_written(temp) > 0:
                        first = now
        stop = stop_rows is not None and (
            events.done >= stop_rows or (stop_rows == 1 and first is not None)
        )
        if not interrupted and (now > seconds or stop):
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.02)
    proc.wait(timeout=300)
    events.join()
    summary = next(
        (line for line in events.lines if line.startswith("done:")), " | ".join(events.lines[-5:])
    )
    return {
        "file": src.name,
        "format": fmt,
        "tree": str(tree or "this"),
        "rc": proc.returncode,
        "peak_rss_mb": round(peak / 2**20, 1),
        "first_vector_s": None if first is None else round(first, 2),
        "rows_done": events.done,
        "wall_s": round(time.perf_counter() - t0, 1),
        "interrupted": interrupted,
        "summary": summary,
        "events": events,
    }


def defaults_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a default-settings run: its own cache dir, and Python's bytecode
    cached (in the data dir) as an installed package has it, whatever this shell says
    (PYTHONDONTWRITEBYTECODE=1 recompiles every embedpool module in the CLI and in each
    worker on every start)."""
    env = {
        **os.environ,
        "EMBEDPOOL_CACHE_DIR": str(args.data_dir / "cache-defaults"),
        "PYTHONPYCACHEPREFIX": str(args.data_dir / "pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def first_vector(
    large: Path, out_dir: Path, args: argparse.Namespace, tree: Path | None = None
) -> dict[str, object]:
    """``embedpool embed LARGE -o OUT.npy`` with the default model and workers and a fresh
    vector cache, until its first row is written; where the seconds went."""
    for stale in (args.data_dir / "cache-defaults").glob("vectors.sqlite3*"):
        stale.unlink()
    r = run_embed(large, out_dir, args, 120, tree, stop_rows=1, cli=[], env=defaults_env(args))
    ev = r.pop("events")
    assert isinstance(ev, Events)
    written = r["first_vector_s"]
    assert written is None or isinstance(written, float)
    marks = {
        "first worker started": ev.first("worker_start"),
        "first worker ready": ev.first("worker_ready"),
        "first batch done": ev.first("progress"),
    }
    return {
        "tree": str(tree or "this"),
        "first_vector_s": written,
        "load": load(),
        **{k: None if v is None else round(v, 2) for k, v in marks.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument(
        "--seconds",
        type=float,
        default=600.0,
        help="Cap on each run (SIGINT after it); the large run stops at --large-rows rows written.",
    )
    ap.add_argument(
        "--large-rows",
        type=int,
        default=None,
        help="Rows the large run writes before SIGINT (default 1.2 x --small: "
        "past every window size the small run reaches).",
    )
    ap.add_argument("--baseline-seconds", type=float, default=60.0)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=8192,
        help="Batch budget (the tiny fixture's 128-token texts: 64 per batch).",
    )
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--workers", default="1")
    ap.add_argument(
        "--formats",
        default="npy,parquet",
        help="Output formats the small and large runs write (comma-separated).",
    )
    ap.add_argument(
        "--first-runs",
        type=int,
        default=2,
        help="Runs of the default-settings first-vector measure (0: none).",
    )
    ap.add_argument(
        "--first-baseline-tree",
        type=Path,
        default=None,
        help="Also measure the first vector with the embedpool checked out here, "
        "alternating with this one's runs (same load).",
    )
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/embedpool-streaming"))
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="Also run the large file with the embedpool of this checkout (e.g. "
        "`git archive 31104e9`, before streaming), for the same time.",
    )
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small = make_jsonl(args.data_dir / f"chunks-{args.small}.jsonl", args.small)
    large = make_jsonl(args.data_dir / f"chunks-{args.large}.jsonl", args.large)
    warm = make_jsonl(args.data_dir / "chunks-100.jsonl", 100)
    print(
        f"inputs ready in {time.perf_counter() - t0:.1f} s: {large} "
        f"({large.stat().st_size / 2**20:.0f} MiB)",
        flush=True,
    )
    rates = reader_rate(large)
    fast = rates["read_jsonl lines/cpu-s"]
    print(
        "reader: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
        + f" (per CPU second {fast / rates['json.loads lines/cpu-s']:.2f}x json.loads)",
        flush=True,
    )
    out_dir = args.data_dir / "out"
    out_dir.mkdir(exist_ok=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; {load()}", flush=True)
    print("warm-up:", run_embed(warm, out_dir, args, 600)["summary"], flush=True)
    if args.first_runs:  # the default model's graph, built before any timing
        trees = [None, args.first_baseline_tree] if args.first_baseline_tree else [None]
        for tree in trees:
            print(
                "warm-up (defaults):",
                run_embed(warm, out_dir, args, 600, tree, cli=[], env=defaults_env(args))[
                    "summary"
                ],
                flush=True,
            )
    for i in range(args.first_runs):
        for tree in [None, args.first_baseline_tree] if args.first_baseline_tree else [None]:
            print(
                f"first vector, default settings, run {i + 1}:",
                json.dumps(first_vector(large, out_dir, args, tree)),
                flush=True,
            )
    large_rows = args.large_rows or int(1.2 * args.small)
    ratios = []
    first: object = None
    for fmt in filter(None, args.formats.split(",")):
        results = [
            run_embed(small, out_dir, args, args.seconds, fmt=fmt),
            run_embed(large, out_dir, args, args.seconds, stop_rows=large_rows, fmt=fmt),
        ]
        for r in results:
            r.pop("events")
            print(json.dumps(r), flush=True)
        peak_small = float(results[0]["peak_rss_mb"])  # type: ignore[arg-type]
        peak_large = float(results[1]["peak_rss_mb"])  # type: ignore[arg-type]
        ratios.append(f"{fmt} {peak_large / peak_small:.2f}x")
        if fmt == "npy":
            first = results[1]["first_vector_s"]
    if args.baseline_tree is not None:
        print(
            "baseline warm-up:",
            run_embed(warm, out_dir, args, 600, args.baseline_tree)["summary"],
            flush=True,
        )
        base = run_embed(large, out_dir, args, args.baseline_seconds, args.baseline_tree)
        base.pop("events")
        print(json.dumps(base), flush=True)
    print(
        f"parent peak RSS {args.large:,} / {args.small:,} chunks: {', '.join(ratios)} "
        f"(target <= 1.3); first vector on {args.large:,} (the benchmark's model): "
        f"{first} s (target <= 5); reader {fast:,.0f} lines "
        f"per CPU second (target >= 100,000); {cpu_name()}, {load()}"
    )


if __name__ == "__main__":
    main()
