"""Issue 21's table on this CPU: embedpool against every sentence-transformers backend (and
fastembed), whole processes, one ``embedpool bench --json --compare PEER`` per row::

    python3 -m venv /tmp/stpeers && /tmp/stpeers/bin/pip install -r requirements/st-peers.txt
    .venv/bin/python benchmarks/peers_table.py --peer-python /tmp/stpeers/bin/python \\
        [--fastembed-python /tmp/fevenv/bin/python] [--chunks 120] [--json out.json]

Each row is one invocation of ``embedpool bench``: embedpool's default (or ``--precision``)
and the peer run one after the other in their own processes on the same texts and model
files, so a row's ratio is measured in one run; absolute chunks/s of different rows are
not comparable on a shared machine. Cosines are against sentence-transformers fp32 (torch)
on the same texts (fastembed's run has none). ``--fastembed-python``: a Python that has
embedpool and fastembed (``pip install -e . fastembed``); without it that row is left out.
The output names the CPU and its tier, as every figure must.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from embedpool.runtimes import cpu_features

ST_PEERS = ("st-torch", "st-onnx", "st-onnx-int8", "st-openvino", "st-openvino-int8")


def _bench(python: str, args: list[str]) -> dict[str, Any]:
    cmd = [python, "-m", "embedpool", "bench", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _row(result: dict[str, Any]) -> dict[str, Any]:
    ours, peer = result["runs"]
    return {
        "peer": peer["runner"],
        "ours_chunks_per_s": round(ours["chunks_per_s"], 2),
        "peer_chunks_per_s": round(peer["chunks_per_s"], 2),
        "ratio": result["ratio"]["throughput"],
        "ours_rss": ours["peak_rss_bytes"],
        "peer_rss": peer["peak_rss_bytes"],
        "ours_cos": ours.get("cos"),
        "peer_cos": peer.get("cos"),
        "precision": ours["settings"]["precision"],
    }


def _cos(c: dict[str, float] | None) -> str:
    return f"{c['mean']:.5f} / {c['min']:.5f}" if c else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", required=True, help="a Python with requirements/st-peers.txt")
    ap.add_argument("--fastembed-python", help="a Python with embedpool and fastembed")
    ap.add_argument("--chunks", type=int, default=120)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--peers", default=",".join(ST_PEERS), help="comma-separated st-* peers")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cpu = cpu_features()
    common = ["--chunks", str(a.chunks), "--workers", a.workers, "--precision", a.precision]
    rows = []
    for peer in a.peers.split(","):
        print(f"running {peer} ...", file=sys.stderr, flush=True)
        rows.append(
            _row(
                _bench(sys.executable, [*common, "--compare", peer, "--peer-python", a.peer_python])
            )
        )
    if a.fastembed_python:
        print("running fastembed ...", file=sys.stderr, flush=True)
        rows.append(_row(_bench(a.fastembed_python, [*common, "--compare", "fastembed"])))
    mb = 1 << 20
    print(f"CPU: {cpu.name}, tier {cpu.tier}; {a.chunks} chunks, embedpool --workers {a.workers}")
    print(
        "| peer | peer chunks/s | embedpool chunks/s | embedpool / peer (same run) "
        "| peak RSS peer / embedpool | cos peer | cos embedpool |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['peer']} | {r['peer_chunks_per_s']:.1f} | {r['ours_chunks_per_s']:.1f} "
            f"| **{r['ratio']:.2f}x** | {r['peer_rss'] / mb:.0f} / {r['ours_rss'] / mb:.0f} MB "
            f"| {_cos(r['peer_cos'])} | {_cos(r['ours_cos'])} |"
        )
    if a.json:
        a.json.write_text(json.dumps({"cpu": cpu.name, "tier": cpu.tier, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
