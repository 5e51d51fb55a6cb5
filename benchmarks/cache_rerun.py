"""Re-embedding an unchanged corpus: first run vs re-run through the CLI, wall time.

    .venv/bin/python benchmarks/cache_rerun.py [--chunks 5000] [--out-ext .npy]

Writes a JSONL of stdlib chunks, runs `embedpool embed` twice with a fresh cache file, then
once more after changing 1% of the chunks, and prints the wall times, the speed-up and the
cache hits the CLI reported (the re-run must do no inference).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedpool.corpus import stdlib_chunks


def run(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "embedpool", *args], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - t0, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=5000)
    ap.add_argument("--out-ext", default=".npy")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        recs = [{"id": c.id, "text": c.text} for c in stdlib_chunks(a.chunks)]
        src = d / "corpus.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in recs))
        common = ["embed", str(src), "--cache", str(d / "cache.sqlite3"), "-q"]
        first, _ = run([*common, "--out", str(d / f"1{a.out_ext}")])
        second, log2 = run([*common, "--out", str(d / f"2{a.out_ext}")])
        for i in range(0, len(recs), 100):
            recs[i]["text"] += "\n# changed"
        src.write_text("".join(json.dumps(r) + "\n" for r in recs))
        third, log3 = run([*common, "--out", str(d / f"3{a.out_ext}")])
    hits = [re.search(r"cache hits (\d+)", x).group(1) for x in (log2, log3)]  # type: ignore[union-attr]
    print(
        f"chunks {len(recs)}: first run {first:.1f} s; unchanged re-run {second:.2f} s "
        f"(cache hits {hits[0]}) = {first / second:.0f}x faster; 1% changed {third:.1f} s "
        f"(cache hits {hits[1]}, re-embedded {len(recs) - int(hits[1])})"
    )


if __name__ == "__main__":
    main()
