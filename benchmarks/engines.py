"""The engines measured against each other on this CPU, in one process: the numbers behind
``embedpool.runtimes.MEASURED`` (one command per CPU)::

    .venv/bin/python benchmarks/engines.py                 # 240 chunks, 2 threads, 3 rounds
    .venv/bin/python benchmarks/engines.py --chunks 800 --threads 2 --rounds 5 --json out.json

Contenders, each a bare engine (``EngineSpec(...).build()``: no pool, no tokenising in the
timed part) on the same length-sorted batches of the built-in corpus (batch 8), run
interleaved round by round so that a shared machine's load hits all of them alike; the best
round counts:

* ``ort-fp32``, ``ort-int8``: ONNX Runtime on embedpool's fp32 and int8 graphs;
* ``ov-fp32``: OpenVINO on the fp32 graph; ``ov-int8``: OpenVINO's int8 (weight-only int8
  behind DequantizeLinear, graph.weight_int8); ``ov-bf16`` where the CPU has avx512_bf16 or AMX
  (else listed as not measurable, with the flags it needs);
* ``ov-int8graph``: OpenVINO on embedpool's int8 graph (dynamic MatMulInteger), to show what
  it makes of it.

Quality: each contender's cosines against ``ort-fp32`` on the same texts (mean / min). The
output names the CPU, its flags of interest, its tier and what ``--engine auto`` picks there
today, so a new CPU's row for ``runtimes.MEASURED`` can be read off it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from embedpool.corpus import stdlib_chunks
from embedpool.engine import EngineSpec
from embedpool.models import resolve_model
from embedpool.runtimes import BF16_FLAGS, choose, cpu_features, openvino_installed
from embedpool.tokenization import TextTokenizer

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--chunks", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    cpu = cpu_features()
    model = resolve_model(args.model)
    tok = TextTokenizer.for_model(model)
    seqs = sorted(tok.encode([c.text for c in stdlib_chunks(args.chunks)]).sequences, key=len)
    batches = [seqs[i : i + args.batch] for i in range(0, len(seqs), args.batch)]
    tokens = sum(len(s) for s in seqs)
    print(
        f"CPU: {cpu.name}; flags: {' '.join(f for f in FLAGS if f in cpu.flags) or 'none'}; "
        f"tier {cpu.tier}; {os.cpu_count()} cores visible, {args.threads} threads"
    )
    print(
        f"{len(seqs)} chunks, {tokens} tokens, batches of {args.batch}, "
        f"{args.rounds} interleaved rounds (best counts)"
    )

    specs: dict[str, EngineSpec] = {
        "ort-fp32": EngineSpec(model, "fp32", args.threads),
        "ort-int8": EngineSpec(model, "int8", args.threads),
    }
    skipped: dict[str, str] = {}
    if openvino_installed():
        specs["ov-fp32"] = EngineSpec(model, "fp32", args.threads, runtime="openvino")
        specs["ov-int8"] = EngineSpec(model, "int8", args.threads, runtime="openvino")
        if cpu.bf16:
            specs["ov-bf16"] = EngineSpec(model, "bf16", args.threads, runtime="openvino")
        else:
            skipped["ov-bf16"] = f"not measurable: the CPU has none of {', '.join(BF16_FLAGS)}"
    else:
        skipped["ov-*"] = "openvino is not installed (pip install 'embedpool[openvino]')"
    engines: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        engines[name] = spec.build()
        load_s[name] = time.perf_counter() - t0
    if "ov-fp32" in engines:  # OpenVINO on embedpool's int8 graph
        from embedpool.engine_openvino import OpenVinoEngine
        from embedpool.graph import prepare_onnx

        t0 = time.perf_counter()
        engines["ov-int8graph"] = OpenVinoEngine(
            prepare_onnx(model, "int8"), head=model.head, dim=model.dim, threads=args.threads
        )
        load_s["ov-int8graph"] = time.perf_counter() - t0

    best: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            out = [engine.embed(b) for b in batches]
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, dt), dt)
            vectors[name] = np.concatenate(out)
    ref = vectors["ort-fp32"]
    rows = []
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'engine':14} {'chunks/s':>9} {'x ort-fp32':>10} {'x ort-int8':>10} "
        f"{'cos mean':>9} {'cos min':>8} {'load s':>7}"
    )
    for name in engines:
        v = vectors[name]
        cos = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
        rate = len(seqs) / best[name]
        row = {
            "engine": name,
            "chunks_per_s": round(rate, 2),
            "vs_ort_fp32": round(best["ort-fp32"] / best[name], 3),
            "vs_ort_int8": round(best["ort-int8"] / best[name], 3),
            "cos_mean": round(float(cos.mean()), 6),
            "cos_min": round(float(cos.min()), 6),
            "load_s": round(load_s[name], 2),
        }
        rows.append(row)
        print(
            f"{name:14} {rate:9.1f} {row['vs_ort_fp32']:10.2f} {row['vs_ort_int8']:10.2f} "
            f"{row['cos_mean']:9.5f} {row['cos_min']:8.5f} {row['load_s']:7.2f}"
        )
    for name, why in skipped.items():
        print(f"{name:14} {why}")
    pick = choose("auto", "auto", device_kind="cpu", cpu=cpu, openvino=openvino_installed())
    print(f"--engine auto here today: {pick.runtime} {pick.precision} ({pick.reason})")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "cpu": cpu.name,
                    "tier": cpu.tier,
                    "flags": sorted(f for f in FLAGS if f in cpu.flags),
                    "threads": args.threads,
                    "chunks": len(seqs),
                    "rows": rows,
                    "not_measured": skipped,
                    "auto": [pick.runtime, pick.precision],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
