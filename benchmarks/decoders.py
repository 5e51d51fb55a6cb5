"""Qwen3-Embedding-0.6B's shape, random weights: embedpool against sentence-transformers, whole
processes in one run, and the process tree's peak RSS with 1 and 2 workers.

    python benchmarks/decoders.py [--chunks 24] [--tokens 256] [--rounds 2] [--vocab 16384]
                                  [--threads 1,2] [--work DIR] [--rss]
    .venv/bin/python benchmarks/decoders.py --fused-vs-plain [--layers 4] [--lengths 256,2048]
    python benchmarks/decoders.py --long 8192     # one long text in the int8 engine: peak RSS

Steps (each in its own process; this script only orchestrates, with any Python):

1. ``make`` (the dev venv, torch): a ``Qwen3Model`` at Qwen3-Embedding-0.6B's shape (hidden
   1024, 28 layers, 16 q / 8 kv heads, head_dim 128, intermediate 3072), random weights
   saved in float32 by transformers, in sentence-transformers 6's layout (last-token pooling,
   Normalize) with the Qwen tokenizer of tests/fixtures/families/qwen3. The vocabulary is
   shrunk from 151,669 to ``--vocab`` rows: a row lookup costs the same whatever the table's
   size, so speed does not change; it keeps the fp32 graph under protobuf's 2 GB and the
   files small on a shared disk.
2. ``build`` (the project venv): embedpool's default-precision graph (int8), built once
   and cached before anything is timed.
3. ``run`` alternately for each system and thread count (``--rounds`` times): load the model,
   embed 2 chunks (warm-up), then embed ``--chunks`` chunks of ``--tokens`` tokens, timing
   the process tree's CPU seconds (psutil: the process and its live children, i.e. pool
   workers) and wall seconds over the timed part; the tree's RSS and PSS are sampled every 200 ms.
   embedpool runs through ``Embedder`` (a real pool worker with ``--threads`` threads, its
   defaults otherwise); sentence-transformers through ``SentenceTransformer.encode`` at its
   defaults (float32, batch 32) with ``torch.set_num_threads``.
4. ``--rss``: embedpool with 1 worker x 1 thread against 2 workers x 1 thread (and 1 worker x
   2 threads), the tree's peak PSS over the same job (proportional set size: the weights the
   workers map from one file, graph/external.py, counted once; RSS would count them per
   process) beside its peak RSS.

Reported: chunks per CPU second (the measure that holds on a shared machine), chunks per
wall second, peak tree RSS, and the ratios embedpool / sentence-transformers of the same run.
Outputs go to ``--work`` (default /tmp/embedpool-decoder-bench), never into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV_PYTHON = os.environ.get("EMBEDPOOL_DEV_PYTHON", "/work/devenv/bin/python")
PROJECT_PYTHON = os.environ.get("EMBEDPOOL_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
}

MAKE = r"""
import json, shutil, sys
from pathlib import Path
import torch, transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
root, out, shape, vocab = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
fixture = root / "tests/fixtures/families/qwen3/model"
torch.manual_seed(0)
cfg = transformers.Qwen3Config(vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                               pad_token_id=0, **shape)
model = transformers.Qwen3Model(cfg).eval()
hf = out / "hf"
model.save_pretrained(str(hf), safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(fixture / f, hf / f)
st = SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=8192),
                                  Pooling(shape["hidden_size"], pooling_mode="lasttoken"),
                                  Normalize()], device="cpu")
st.save(str(out / "model"))
shutil.rmtree(hf)
print("made", out / "model")
"""

BUILD = r"""
import sys
from embedpool.graph import prepare_onnx
from embedpool.models import resolve_model
m = resolve_model(sys.argv[1])
print("built", prepare_onnx(m, "int8"))
"""

#: One timed run: prints a JSON line {cpu_s, wall_s, peak_rss, chunks, tokens}.
RUN = r"""
import json, os, resource, sys, threading, time
try:
    import psutil
except ImportError:  # the dev venv may lack it: one process, no workers to add up
    psutil = None
system, model_dir, texts_path, threads, workers = sys.argv[1:6]
threads, workers = int(threads), int(workers)
texts = json.loads(open(texts_path).read())
me = psutil.Process() if psutil is not None else None
peak = [0]
peak_pss = [0]

def pss(pid):  # proportional set size: shared pages (the mapped weights) split between sharers
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except OSError:
        return 0
stop = threading.Event()

def tree():
    procs = [me]
    if psutil is None:
        return procs
    try:
        procs += me.children(recursive=True)
    except psutil.Error:
        pass
    return procs

def sample():
    if psutil is None:
        return
    while not stop.is_set():
        rss = total_pss = 0
        for p in tree():
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
            total_pss += pss(p.pid)
        peak[0] = max(peak[0], rss)
        peak_pss[0] = max(peak_pss[0], total_pss)
        stop.wait(0.2)

def cpu():
    if psutil is None:
        t = os.times()
        return t.user + t.system
    total = 0.0
    for p in tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total

threading.Thread(target=sample, daemon=True).start()
if system == "embedpool":
    from embedpool.job import Embedder
    emb = Embedder(model_dir, workers=workers, threads=threads)
    embed = emb.embed
    extra = {"precision": emb.precision}
else:
    import torch
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model_dir, device="cpu")
    embed = st.encode
    extra = {"precision": "fp32 (torch)"}
embed(texts[:2])
c0, w0 = cpu(), time.perf_counter()
vecs = embed(texts)
c1, w1 = cpu(), time.perf_counter()
stop.set()
if psutil is None:  # the process's own high-water mark (Linux: KiB)
    peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"cpu_s": c1 - c0, "wall_s": w1 - w0, "peak_rss": peak[0],
                  "peak_pss": peak_pss[0] or peak[0],
                  "chunks": len(texts), "dim": len(vecs[0]), **extra}))
if system == "embedpool":
    emb.close()
"""


def make_texts(model_dir: Path, n: int, tokens: int) -> list[str]:
    """``n`` distinct chunks of ``tokens`` tokens each (with the EOS), decoded from windows
    of a long code-and-prose text's ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sys.path.insert(0, str(ROOT / "scripts"))
    base = (ROOT / "embedpool" / "job.py").read_text() + (ROOT / "README.md").read_text()
    ids = tok.encode(base, add_special_tokens=False).ids
    out: list[str] = []
    step = tokens - 1
    for i in range(n):
        start = (i * step) % max(1, len(ids) - step)
        out.append(tok.decode(ids[start : start + step]))
    counts = [len(tok.encode(t).ids) for t in out]
    print(
        f"texts: {n} chunks, tokens mean {statistics.mean(counts):.0f} "
        f"(min {min(counts)}, max {max(counts)})",
        flush=True,
    )
    return out


def own_memory_cgroup_v1() -> Path | None:
    """This process's cgroup v1 memory directory, when it can hold a child (else None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return where if os.access(where, os.W_OK) else None
    return None


def run(
    python: str,
    system: str,
    model_dir: Path,
    texts: Path,
    threads: int,
    workers: int,
    env: dict[str, str],
    cgroup: bool = False,
) -> dict[str, float]:
    """One run in its own process. ``cgroup``: in a fresh child memory cgroup (v1, no limit),
    the page cache dropped first, so that the mapped weights are read again and charged to
    it: its ``memory.max_usage_in_bytes`` is the tree's peak as the kernel counts it for the
    OOM killer (every page once, shared or not), reported as ``peak_cgroup``."""
    argv = [python, "-c", RUN, system, str(model_dir), str(texts), str(threads), str(workers)]
    child = None
    if cgroup:
        parent = own_memory_cgroup_v1()
        if parent is None:
            raise SystemExit("--cgroup needs a writable cgroup v1 memory hierarchy")
        child = parent / f"embedpool-bench-{os.getpid()}-{workers}x{threads}"
        child.mkdir()
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3")
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(child), *argv]
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=3600, check=False
        )
        if res.returncode != 0:
            raise SystemExit(f"{system} run failed:\n{res.stderr[-3000:]}")
        out: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
        if child is not None:
            out["peak_cgroup"] = int((child / "memory.max_usage_in_bytes").read_text())
        return out
    finally:
        if child is not None:
            with contextlib.suppress(OSError):
                child.rmdir()


def fused_vs_plain(layers: int, lengths: list[int], repeat: int, vocab: int) -> None:
    """The fused fp32 graph (GroupQueryAttention, Simplified/SkipSimplifiedLayerNormalization,
    QuickGelu) against the unfused one (standard ops, Softmax attention), in this process,
    1 thread, interleaved, at the real width with ``layers`` layers (the per-layer ratio is
    the model's): chunks per CPU second at each length."""
    import time

    import numpy as np
    import onnxruntime as ort

    from embedpool.graph.compose import compose
    from embedpool.graph.families import qwen2, qwen3
    from embedpool.modelspec import HeadSpec, PoolingSpec

    cfg = qwen3.parse_config(
        {
            "model_type": "qwen3",
            **SHAPE,
            "num_hidden_layers": layers,
            "vocab_size": vocab,
            "max_position_embeddings": 32768,
        }
    )
    rng = np.random.default_rng(0)
    shapes = qwen2.expected_shapes(cfg)
    shapes["embed_tokens.weight"] = (vocab, cfg.hidden_size)
    weights = {
        k: (rng.standard_normal(v) * (0.02 if len(v) > 1 else 1)).astype(np.float32)
        for k, v in shapes.items()
    }
    head = HeadSpec(PoolingSpec(("lasttoken",)), normalize=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(
            compose(qwen3, weights, cfg, head, fused=fused).SerializeToString(),
            opts,
            providers=["CPUExecutionProvider"],
        )
        for name, fused in (("fused", True), ("plain", False))
    }
    print(
        f"\nfused vs plain fp32, {layers} layers at Qwen3-0.6B's width, 1 thread "
        f"(chunks per CPU second, best of {repeat}):"
    )
    for n in lengths:
        ids = rng.integers(0, vocab, (1, n)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        best: dict[str, float] = {}
        for _ in range(repeat):
            for name, sess in sessions.items():
                t = time.process_time()
                sess.run(None, feeds)
                best[name] = min(best.get(name, 1e9), time.process_time() - t)
        print(
            f"  {n} tokens: fused {1 / best['fused']:.3f}, plain {1 / best['plain']:.3f} "
            f"chunks/CPU s: fused {best['plain'] / best['fused']:.2f}x"
        )


LONG = r"""
import resource, sys, time
from pathlib import Path
import numpy as np
from embedpool.engine import Engine
from embedpool.graph import prepare_onnx
from embedpool.models import resolve_model
m = resolve_model(sys.argv[1])
e = Engine.for_model(prepare_onnx(m, "int8"), m, threads=1)
ids = np.random.default_rng(0).integers(1, 400, int(sys.argv[2])).astype(np.int32)
t = time.process_time()
e.embed([ids])
t = time.process_time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"one {ids.size}-token text, int8, 1 thread: {t:.1f} CPU s, peak RSS {peak:.0f} MiB")
"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedpool-decoder-bench"))
    ap.add_argument("--rss", action="store_true", help="also 1 vs 2 workers, peak tree RSS")
    ap.add_argument("--rss-chunks", type=int, default=4, help="chunks of the --rss runs")
    ap.add_argument("--skip-speed", action="store_true", help="only the --rss runs")
    ap.add_argument(
        "--cgroup",
        action="store_true",
        help="--rss runs each in a fresh child memory cgroup (v1): the peak the kernel charges",
    )
    ap.add_argument("--no-compare", action="store_true", help="embedpool only")
    ap.add_argument(
        "--long",
        type=int,
        default=0,
        help="only one text of this many tokens through the int8 engine: peak RSS",
    )
    ap.add_argument(
        "--fused-vs-plain",
        action="store_true",
        help="only the fused against the unfused fp32 graph, in this process",
    )
    ap.add_argument("--layers", type=int, default=4, help="layers of --fused-vs-plain")
    ap.add_argument("--lengths", default="256,2048", help="tokens of --fused-vs-plain")
    args = ap.parse_args()
    if args.fused_vs_plain:
        fused_vs_plain(
            args.layers, [int(n) for n in args.lengths.split(",")], args.rounds, args.vocab
        )
        return
    work = args.work
    model_dir = work / "model"
    env = {
        **os.environ,
        "EMBEDPOOL_CACHE_DIR": str(work / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not (model_dir / "model.safetensors").is_file():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [DEV_PYTHON, "-c", MAKE, str(ROOT), str(work), json.dumps(SHAPE), str(args.vocab)],
            check=True,
            env=env,
        )
    subprocess.run([PROJECT_PYTHON, "-c", BUILD, str(model_dir)], check=True, env=env)
    if args.long:
        subprocess.run(
            [PROJECT_PYTHON, "-c", LONG, str(model_dir), str(args.long)], check=True, env=env
        )
        return
    texts = work / f"texts-{args.chunks}x{args.tokens}.json"
    texts.write_text(json.dumps(make_texts(model_dir, args.chunks, args.tokens)))
    print(
        textwrap.dedent(f"""\
        CPU: {cpu_name()}, {os.cpu_count()} logical cores; load {os.getloadavg()[0]:.1f}
        shape: Qwen3-Embedding-0.6B {SHAPE}, vocab {args.vocab} (real: 151,669; speed-neutral)
        {args.chunks} chunks x {args.tokens} tokens, {args.rounds} round(s), alternating"""),
        flush=True,
    )
    systems = [("embedpool", PROJECT_PYTHON)] + (
        [] if args.no_compare else [("sentence-transformers", DEV_PYTHON)]
    )
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(0 if args.skip_speed else args.rounds):
        for threads in map(int, args.threads.split(",")):
            for name, python in systems:
                r = run(
                    python,
                    "embedpool" if name == "embedpool" else "st",
                    model_dir,
                    texts,
                    threads,
                    1,
                    env,
                )
                results.setdefault((name, threads), []).append(r)
                print(
                    f"  {name:<22} {threads} thread(s): {r['chunks'] / r['cpu_s']:.3f} "
                    f"chunks/CPU s, {r['chunks'] / r['wall_s']:.3f} chunks/s, peak tree RSS "
                    f"{r['peak_rss'] / 2**20:.0f} MiB ({r['precision']})",
                    flush=True,
                )
    if results:
        print("\nbest of rounds (chunks per CPU second; wall; peak tree RSS):")
    for threads in map(int, args.threads.split(",")) if results else ():
        best = {
            name: max(results[(name, threads)], key=lambda r: r["chunks"] / r["cpu_s"])
            for name, _ in systems
        }
        for name, r in best.items():
            print(
                f"  {threads} thread(s) {name:<22} {r['chunks'] / r['cpu_s']:.3f} / "
                f"{r['chunks'] / r['wall_s']:.3f} chunks/s / {r['peak_rss'] / 2**20:.0f} MiB"
            )
        if len(best) == 2:
            e, s = best["embedpool"], best["sentence-transformers"]
            print(
                f"  {threads} thread(s) embedpool / sentence-transformers: "
                f"{(e['chunks'] / e['cpu_s']) / (s['chunks'] / s['cpu_s']):.2f}x per CPU s, "
                f"{(e['chunks'] / e['wall_s']) / (s['chunks'] / s['wall_s']):.2f}x wall, "
                f"{e['peak_rss'] / s['peak_rss']:.2f}x memory"
            )
    if args.rss:
        print("\npeak tree RSS, embedpool (workers x threads):")
        rss: dict[tuple[int, int], dict[str, float]] = {}
        few = work / f"texts-{args.rss_chunks}x{args.tokens}.json"
        few.write_text(json.dumps(json.loads(texts.read_text())[: args.rss_chunks]))
        for workers, threads in ((1, 1), (2, 1), (1, 2)):
            r = run(
                PROJECT_PYTHON,
                "embedpool",
                model_dir,
                few,
                threads,
                workers,
                env,
                cgroup=args.cgroup,
            )
            rss[(workers, threads)] = r
            charged = f"cgroup {r['peak_cgroup'] / 2**20:.0f} MiB, " if args.cgroup else ""
            print(
                f"  {workers} x {threads}: {charged}PSS {r['peak_pss'] / 2**20:.0f} MiB, RSS "
                f"{r['peak_rss'] / 2**20:.0f} MiB, "
                f"{r['chunks'] / r['cpu_s']:.3f} chunks/CPU s, "
                f"{r['chunks'] / r['wall_s']:.3f} chunks/s",
                flush=True,
            )
        keys = [("peak_pss", "PSS"), ("peak_rss", "RSS")]
        if args.cgroup:
            keys.insert(0, ("peak_cgroup", "memory charged to its cgroup"))
        for key, what in keys:
            print(
                f"  peak tree {what}, 2 workers / 1 worker: "
                f"{rss[(2, 1)][key] / rss[(1, 1)][key]:.2f}x; 1 worker x 2 threads / 1 x 1: "
                f"{rss[(1, 2)][key] / rss[(1, 1)][key]:.2f}x"
            )


if __name__ == "__main__":
    main()
