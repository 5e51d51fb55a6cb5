"""The steps of benchmarks/gpu_check.sh, one per subcommand, each writing one JSON file.

Every step runs on its own (the shell script calls each with a timeout, and a failed step
leaves an ``{"error": ...}`` file), so one failure never hides the others::

    corpus N FILE          N distinct stdlib chunks (cycled with a marker past the stdlib's
                           ~5,500), the one corpus every throughput step reads
    vectors OUT            CPU fp32 reference vs CUDA fp32 and CUDA fp16: cos mean and min
    embedpool OUT CORPUS   embedpool on the GPU (the device executor, --device cuda) over the
                           corpus: chunks/s, tokens/s, peak RSS of the whole process tree
    st OUT CORPUS          sentence-transformers, torch CUDA fp16, batch 256, same corpus and
                           model files (runs in the torch venv; needs no embedpool import)
    efficiency OUT         the CPU pool at 1, 2, 4, 8, 16 fixed workers: tokens/s and
                           parallel efficiency (tokens/s at N / (N x tokens/s at 1))
    report DIR             every step's JSON -> DIR/gpu_check.json and a short table

Run through the shell script: bash benchmarks/gpu_check.sh [--cpu-only] [--quick].
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: all-MiniLM-L6-v2's own window; sentence-transformers reads the same from the model dir.
MAX_LENGTH = 256


def write(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- corpus ---------------------------------------------------------------------------------

def corpus(n: int, out: str) -> None:
    """N distinct chunks: the stdlib's, then the same again with a marker line, so that no
    two are equal (the job dedupes equal texts)."""
    from embedpool.corpus import stdlib_chunks
    from embedpool.models import resolve_model

    base = [c.text for c in stdlib_chunks(n)]
    texts = [base[i] if i < len(base) else f"{base[i % len(base)]}\n# copy {i // len(base)}"
             for i in range(n)]
    write(out, {"texts": texts, "model_dir": str(resolve_model().directory)})


# -- vectors ---------------------------------------------------------------------------------

def vectors(out: str, n: int) -> None:
    """The CPU fp32 reference against CUDA fp32 and fp16 (each an in-process engine, batches
    of 32 length-sorted sequences: the same batches everywhere)."""
    import numpy as np

    from embedpool.corpus import stdlib_chunks
    from embedpool.engine import EngineSpec
    from embedpool.models import resolve_model
    from embedpool.placement import graph_precisions
    from embedpool.tokenization import TextTokenizer

    m = resolve_model()
    texts = [c.text for c in stdlib_chunks(n)]
    seqs = TextTokenizer(m.tokenizer_path, m.max_length).encode(texts).sequences
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

    def run(precision: str, device: str) -> Any:
        engine = EngineSpec(m, precision, threads=os.cpu_count() or 1,  # type: ignore[arg-type]
                            device=device).build()
        got = np.zeros((len(seqs), m.dim), dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            got[idx] = engine.embed([seqs[j] for j in idx])
        return got, time.perf_counter() - t0

    result: dict[str, Any] = {"chunks": len(texts), "graph_precisions": graph_precisions()}
    ref, secs = run("fp32", "cpu")
    result["cpu_fp32_seconds"] = round(secs, 2)
    for precision in ("fp32", "fp16"):
        if precision not in graph_precisions():
            result[f"cuda_{precision}"] = {"error": f"the graph builder makes no {precision}"}
            continue
        try:
            got, secs = run(precision, "cuda:0")
        except Exception as exc:  # one precision failing must not hide the other
            result[f"cuda_{precision}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        cos = np.sum(got * ref, axis=1)
        result[f"cuda_{precision}"] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                       "seconds": round(secs, 2),
                                       "meets_0.999": bool(cos.mean() >= 0.999
                                                           and cos.min() >= 0.999)}
    write(out, result)


# -- throughput -----------------------------------------------------------------------------

def embedpool_run(out: str, corpus_file: str, device: str, extra: list[str]) -> None:
    """embedpool over the corpus in a child, with the whole tree's RSS sampled from here."""
    import psutil

    texts = json.loads(Path(corpus_file).read_text())["texts"]
    work = Path(os.environ.get("WORK") or Path(corpus_file).parent)  # big files stay out of OUT
    src = work / (Path(out).stem + ".jsonl")
    src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                           for i, t in enumerate(texts)))
    dest = work / (Path(out).stem + ".npy")
    cmd = [sys.executable, "-m", "embedpool", "embed", str(src), "--out", str(dest),
           "--device", device, "--no-cache", "--log-json", *extra]
    log = work / (Path(out).stem + ".log")
    with open(log, "w") as err:  # a file, not a pipe: nobody reads a pipe while we sample
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [top, *top.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)
    stderr = log.read_text(errors="replace")
    summary = [ln for ln in stderr.splitlines() if ln.startswith("done:")]
    events = [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = {"exit": proc.returncode, "command": " ".join(cmd[2:]),
                              "chunks": len(texts), "peak_tree_rss_bytes": peak,
                              "summary": summary[-1] if summary else stderr[-3000:],
                              "fallbacks": [e for e in events if e.get("event") == "device_fallback"]}
    progress = [e for e in events if e.get("event") == "progress"]
    if summary:
        fields = dict(part.split(" ", 1) for part in summary[-1][len("done: "):].split(", ")
                      if " " in part)
        try:
            result["seconds"] = float(fields["seconds"])
            result["chunks_per_s"] = float(fields["chunks/s"])
        except (KeyError, ValueError):
            pass
    result["tokens"] = sum(int(e.get("tokens", 0)) for e in progress)
    if result.get("seconds"):
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
    write(out, result)


def st_run(out: str, corpus_file: str) -> None:
    """sentence-transformers on the GPU: torch CUDA, fp16, batch 256 (its encode sorts by
    length itself). Runs in the torch venv; only torch and sentence-transformers needed."""
    import torch
    from sentence_transformers import SentenceTransformer

    data = json.loads(Path(corpus_file).read_text())
    texts = data["texts"]
    t0 = time.perf_counter()
    model = SentenceTransformer(data["model_dir"], device="cuda")
    model.half()
    model.max_seq_length = MAX_LENGTH
    load = time.perf_counter() - t0
    model.encode(texts[:512], batch_size=256)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    vecs = model.encode(texts, batch_size=256, normalize_embeddings=True)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t1
    write(out, {"chunks": len(texts), "seconds": secs, "chunks_per_s": len(texts) / secs,
                "load_s": load, "dim": int(vecs.shape[1]),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                "settings": {"dtype": "float16", "batch_size": 256,
                             "max_seq_length": MAX_LENGTH}})


def efficiency(out: str, workers: list[int], per_worker: int) -> None:
    """The CPU pool at fixed worker counts (int8, 1 thread each): tokens/s, efficiency."""
    runs: dict[str, Any] = {}
    for n in workers:
        chunks = max(500, per_worker * n)
        proc = subprocess.run([sys.executable, "-m", "embedpool", "bench", "--device", "cpu",
                               "--workers", str(n), "--threads", "1", "--chunks", str(chunks),
                               "--json"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            runs[str(n)] = {"error": proc.stderr[-2000:]}
            continue
        r = json.loads(proc.stdout)["runs"][0]
        runs[str(n)] = {"chunks": chunks, "tokens_per_s": r["tokens_per_s"],
                        "chunks_per_s": r["chunks_per_s"], "peak_rss_bytes": r["peak_rss_bytes"]}
    one = runs.get("1", {}).get("tokens_per_s")
    for n, r in runs.items():
        if one and "tokens_per_s" in r:
            r["efficiency"] = round(r["tokens_per_s"] / (int(n) * one), 3)
    write(out, {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "runs": runs})


# -- report ---------------------------------------------------------------------------------

def report(directory: str) -> None:
    d = Path(directory)
    steps = {p.stem: json.loads(p.read_text()) for p in sorted((d / "steps").glob("*.json"))}
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                           "steps": steps}
    lines = [f"gpu_check on {out['cpu']}, {out['cores']} cores"]
    gpu = steps.get("machine", {}).get("gpu")
    if gpu:
        lines.append(f"gpu: {gpu}")
    vec = steps.get("vectors", {})
    for p in ("fp32", "fp16"):
        v = vec.get(f"cuda_{p}")
        if isinstance(v, dict) and "cos_mean" in v:
            lines.append(f"vectors cuda {p} vs cpu fp32: cos mean {v['cos_mean']:.6f}, min "
                         f"{v['cos_min']:.6f} ({'meets' if v['meets_0.999'] else 'MISSES'} 0.999)")
        elif v is not None:
            lines.append(f"vectors cuda {p}: {str(v.get('error', v))[:300]}")
    for where in ("gpu", "cpu"):
        run = steps.get(f"embedpool_{where}", {})
        if "chunks_per_s" in run:
            rss = run["peak_tree_rss_bytes"]
            lines.append(f"embedpool {where}: {run['chunks_per_s']:.1f} chunks/s over "
                         f"{run.get('chunks', '?')} chunks, tree RSS peak {rss / 2**30:.2f} GiB "
                         f"({'<=' if rss <= 2**30 else '>'} 1 GiB)"
                         + (f"; FELL BACK: {run['fallbacks']}" if run.get("fallbacks") else ""))
    ours, st = steps.get("embedpool_gpu", {}), steps.get("st_gpu", {})
    if "chunks_per_s" in st:
        lines.append(f"sentence-transformers fp16 b256: {st['chunks_per_s']:.1f} chunks/s")
    if "chunks_per_s" in ours and "chunks_per_s" in st:
        ratio = ours["chunks_per_s"] / st["chunks_per_s"]
        out["ratio_embedpool_over_st"] = round(ratio, 3)
        lines.append(f"ratio embedpool / sentence-transformers: {ratio:.2f}x (goal >= 1.0)")
    eff = steps.get("efficiency", {}).get("runs", {})
    if eff:
        lines.append("cpu pool (int8, 1 thread/worker): workers tokens/s efficiency")
        for n, r in eff.items():
            lines.append(f"  {n:>3} {r.get('tokens_per_s', 0):>10.0f} "
                         f"{r.get('efficiency', float('nan')):>6.2f}" if "tokens_per_s" in r
                         else f"  {n:>3} error: {str(r.get('error', ''))[:200]}")
    tok = steps.get("tokenize", {})
    if "parent_1core" in tok:
        lines.append(f"parent tokenising: {tok['parent_1core']['tokens_per_s']:.0f} tokens/s on "
                     f"1 core, {tok['parent_all_cores']['tokens_per_s']:.0f} on "
                     f"{tok['cores']}; one worker {tok['worker_1thread']['tokens_per_s']:.0f}")
    for name, s in steps.items():
        if isinstance(s, dict) and "error" in s and name not in ("vectors",):
            lines.append(f"step {name} failed: {str(s['error']).splitlines()[-1][:300]}")
    write(str(d / "gpu_check.json"), out)
    text = "\n".join(lines) + "\n"
    (d / "gpu_check.txt").write_text(text)
    print(text, end="")


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "corpus":
        corpus(int(args[0]), args[1])
    elif cmd == "vectors":
        vectors(args[0], int(args[1]))
    elif cmd == "embedpool":
        embedpool_run(args[0], args[1], args[2], args[3:])
    elif cmd == "st":
        st_run(args[0], args[1])
    elif cmd == "efficiency":
        efficiency(args[0], [int(x) for x in args[1].split(",")], int(args[2]))
    elif cmd == "report":
        report(args[0])
    else:
        raise SystemExit(f"unknown step {cmd!r}")


if __name__ == "__main__":
    main()
