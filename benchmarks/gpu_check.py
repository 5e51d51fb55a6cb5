"""The steps of benchmarks/gpu_check.sh, one per subcommand, each writing one JSON file.

Every step runs on its own (the shell script calls each with a timeout, and a failed step
leaves an ``{"error": ...}`` file), so one failure never hides the others::

    corpus N FILE          N distinct stdlib chunks (cycled with a marker past the stdlib's
                           ~5,500), the one corpus every throughput step reads
    vectors OUT            CPU fp32 reference vs CUDA fp32 and CUDA fp16: cos mean and min
    embedpool OUT CORPUS   embedpool on the GPU (the device executor, --device cuda) over the
                           corpus: chunks/s, tokens/s, peak RSS of the whole process tree
    st OUT CORPUS          sentence-transformers, torch CUDA fp16, batch 256, same corpus and
                           model files (runs in the torch venv; needs no embedpool import);
                           [--max-length N|model] [--save-vectors N FILE]
    efficiency OUT         the CPU pool at 1, 2, 4, 8, 16 fixed workers: tokens/s and
                           parallel efficiency (tokens/s at N / (N x tokens/s at 1))
    qwen3_make DIR         Qwen3-Embedding-0.6B's shape, random weights, saved by
                           sentence-transformers (benchmarks/decoders.py's make step; torch venv)
    qwen3_corpus MODEL N FILE   N distinct 256-token chunks for it (decoders.make_texts), in
                           the corpus format the embedpool and st steps read
    qwen3_graphs MODEL     its fp32 and fp16 graphs, built before anything is timed
    qwen3_vectors OUT CORPUS N DEVICE [ST_NPY]   embedpool's CPU fp32 against its fp16 on
                           DEVICE (cuda:0; cpu checks the step without a GPU) and against
                           sentence-transformers' fp16 vectors (ST_NPY): cos mean and min
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
from typing import Any, Literal

#: all-MiniLM-L6-v2's own window; sentence-transformers reads the same from the model dir.
MAX_LENGTH = 256
BENCHMARKS = Path(__file__).resolve().parent
#: The Qwen3 rows: 256-token chunks (benchmarks/decoders.py's), the fp16 bar against fp32.
QWEN3_TOKENS = 256
FP16_BAR = 0.999


def decoders() -> Any:
    """benchmarks/decoders.py as a module (its imports are the standard library only, so the
    torch venv can use its make step too)."""
    sys.path.insert(0, str(BENCHMARKS))
    import decoders as mod

    return mod


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
    texts = [
        base[i] if i < len(base) else f"{base[i % len(base)]}\n# copy {i // len(base)}"
        for i in range(n)
    ]
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
        engine = EngineSpec(
            m,
            precision,
            threads=os.cpu_count() or 1,  # type: ignore[arg-type]
            device=device,
        ).build()
        got = np.zeros((len(seqs), m.dim), dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
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
        result[f"cuda_{precision}"] = {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "seconds": round(secs, 2),
            "meets_0.999": bool(cos.mean() >= 0.999 and cos.min() >= 0.999),
        }
    write(out, result)


# -- throughput -----------------------------------------------------------------------------


def embedpool_run(out: str, corpus_file: str, device: str, extra: list[str]) -> None:
    """embedpool over the corpus in a child, with the whole tree's RSS sampled from here."""
    import psutil

    texts = json.loads(Path(corpus_file).read_text())["texts"]
    work = Path(os.environ.get("WORK") or Path(corpus_file).parent)  # big files stay out of OUT
    src = work / (Path(out).stem + ".jsonl")
    src.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    dest = work / (Path(out).stem + ".npy")
    cmd = [
        sys.executable,
        "-m",
        "embedpool",
        "embed",
        str(src),
        "--out",
        str(dest),
        "--device",
        device,
        "--no-cache",
        "--log-json",
        *extra,
    ]
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
    result: dict[str, Any] = {
        "exit": proc.returncode,
        "command": " ".join(cmd[2:]),
        "chunks": len(texts),
        "peak_tree_rss_bytes": peak,
        "summary": summary[-1] if summary else stderr[-3000:],
        "fallbacks": [e for e in events if e.get("event") == "device_fallback"],
    }
    progress = [e for e in events if e.get("event") == "progress"]
    if summary:
        fields = dict(
            part.split(" ", 1) for part in summary[-1][len("done: ") :].split(", ") if " " in part
        )
        try:
            result["seconds"] = float(fields["seconds"])
            result["chunks_per_s"] = float(fields["chunks/s"])
        except (KeyError, ValueError):
            pass
    result["tokens"] = sum(int(e.get("tokens", 0)) for e in progress)
    if result.get("seconds"):
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
    write(out, result)


def st_run(
    out: str,
    corpus_file: str,
    max_length: int | None = MAX_LENGTH,
    save: tuple[int, str] | None = None,
) -> None:
    """sentence-transformers on the GPU: torch CUDA, fp16, batch 256 (its encode sorts by
    length itself). Runs in the torch venv; only torch and sentence-transformers needed.
    ``max_length`` None keeps the model's own; ``save`` (N, FILE): the first N vectors as
    .npy, for the vectors step to compare."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    data = json.loads(Path(corpus_file).read_text())
    texts = data["texts"]
    t0 = time.perf_counter()
    model = SentenceTransformer(data["model_dir"], device="cuda")
    model.half()
    if max_length is not None:
        model.max_seq_length = max_length
    load = time.perf_counter() - t0
    model.encode(texts[:512], batch_size=256)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    vecs = model.encode(texts, batch_size=256, normalize_embeddings=True)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t1
    if save is not None:
        np.save(save[1], np.asarray(vecs[: save[0]], dtype=np.float32))
    write(
        out,
        {
            "chunks": len(texts),
            "seconds": secs,
            "chunks_per_s": len(texts) / secs,
            "load_s": load,
            "dim": int(vecs.shape[1]),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0),
            "settings": {
                "dtype": "float16",
                "batch_size": 256,
                "max_seq_length": model.max_seq_length,
            },
        },
    )


def efficiency(out: str, workers: list[int], per_worker: int) -> None:
    """The CPU pool at fixed worker counts (int8, 1 thread each): tokens/s, efficiency."""
    runs: dict[str, Any] = {}
    for n in workers:
        chunks = max(500, per_worker * n)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedpool",
                "bench",
                "--device",
                "cpu",
                "--workers",
                str(n),
                "--threads",
                "1",
                "--chunks",
                str(chunks),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            runs[str(n)] = {"error": proc.stderr[-2000:]}
            continue
        r = json.loads(proc.stdout)["runs"][0]
        runs[str(n)] = {
            "chunks": chunks,
            "tokens_per_s": r["tokens_per_s"],
            "chunks_per_s": r["chunks_per_s"],
            "peak_rss_bytes": r["peak_rss_bytes"],
        }
    one = runs.get("1", {}).get("tokens_per_s")
    for count, run in runs.items():
        if one and "tokens_per_s" in run:
            run["efficiency"] = round(run["tokens_per_s"] / (int(count) * one), 3)
    write(out, {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "runs": runs})


# -- Qwen3-Embedding-0.6B's shape -------------------------------------------------------------


def qwen3_make(directory: str) -> None:
    """decoders.py's make step with this interpreter (the torch venv): DIR/model."""
    mod = decoders()
    work = Path(directory)
    if (work / "model" / "model.safetensors").is_file():
        print("exists", work / "model")
        return
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-c",
            mod.MAKE,
            str(BENCHMARKS.parent),
            str(work),
            json.dumps(mod.SHAPE),
            "16384",
        ],
        check=True,
    )


def qwen3_corpus(model_dir: str, n: int, out: str) -> None:
    texts = decoders().make_texts(Path(model_dir), n, QWEN3_TOKENS)
    write(out, {"texts": texts, "model_dir": str(Path(model_dir).resolve())})


def qwen3_graphs(model_dir: str) -> None:
    from embedpool.graph import prepare_onnx
    from embedpool.models import resolve_model

    m = resolve_model(model_dir)
    for precision in ("fp32", "fp16"):
        print(precision, prepare_onnx(m, precision))


def qwen3_vectors(out: str, corpus_file: str, n: int, device: str, st_file: str | None) -> None:
    """embedpool's fp32 graph on the CPU (the reference: equal to sentence-transformers fp32,
    tests/test_decoders.py) against its fp16 graph on ``device``, and against
    sentence-transformers' fp16 vectors of the same texts where ``st_file`` exists; one
    engine each, batches of 8, the same batches everywhere."""
    import numpy as np

    from embedpool.engine import Engine
    from embedpool.graph import prepare_onnx
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    data = json.loads(Path(corpus_file).read_text())
    m = resolve_model(data["model_dir"])
    seqs = TextTokenizer(m.tokenizer_path, m.max_length).encode(data["texts"][:n]).sequences

    def run(precision: Literal["fp32", "fp16"], where: str) -> tuple[Any, float]:
        engine = Engine.for_model(
            prepare_onnx(m, precision),
            m,
            threads=os.cpu_count() or 1,
            device=where,
            precision=precision,
        )
        t0 = time.perf_counter()
        got = np.concatenate([engine.embed(seqs[i : i + 8]) for i in range(0, len(seqs), 8)])
        return got, time.perf_counter() - t0

    def compare(got: Any, ref: Any) -> dict[str, Any]:
        cos = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        return {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            f"meets_{FP16_BAR}": bool(cos.min() >= FP16_BAR),
        }

    result: dict[str, Any] = {
        "chunks": len(seqs),
        "device": device,
        "tokens_max": max(len(s) for s in seqs),
    }
    ref, secs = run("fp32", "cpu")
    result["cpu_fp32_seconds"] = round(secs, 2)
    try:
        got, secs = run("fp16", device)
        result["embedpool_fp16"] = {**compare(got, ref), "seconds": round(secs, 2)}
    except Exception as exc:  # the other comparison still runs
        result["embedpool_fp16"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if st_file and Path(st_file).is_file():
        st = np.load(st_file)
        result["st_fp16"] = (
            compare(st, ref[: len(st)])
            if st.shape[1] == ref.shape[1]
            else {"error": f"sentence-transformers vectors {st.shape} against {ref.shape}"}
        )
    write(out, result)


# -- report ---------------------------------------------------------------------------------


def report(directory: str) -> None:
    d = Path(directory)
    steps = {p.stem: json.loads(p.read_text()) for p in sorted((d / "steps").glob("*.json"))}
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "steps": steps}
    lines = [f"gpu_check on {out['cpu']}, {out['cores']} cores"]
    gpu = steps.get("machine", {}).get("gpu")
    if gpu:
        lines.append(f"gpu: {gpu}")
    vec = steps.get("vectors", {})
    for p in ("fp32", "fp16"):
        v = vec.get(f"cuda_{p}")
        if isinstance(v, dict) and "cos_mean" in v:
            lines.append(
                f"vectors cuda {p} vs cpu fp32: cos mean {v['cos_mean']:.6f}, min "
                f"{v['cos_min']:.6f} ({'meets' if v['meets_0.999'] else 'MISSES'} 0.999)"
            )
        elif v is not None:
            lines.append(f"vectors cuda {p}: {str(v.get('error', v))[:300]}")
    for where in ("gpu", "cpu"):
        run = steps.get(f"embedpool_{where}", {})
        if "chunks_per_s" in run:
            rss = run["peak_tree_rss_bytes"]
            lines.append(
                f"embedpool {where}: {run['chunks_per_s']:.1f} chunks/s over "
                f"{run.get('chunks', '?')} chunks, tree RSS peak {rss / 2**30:.2f} GiB "
                f"({'<=' if rss <= 2**30 else '>'} 1 GiB)"
                + (f"; FELL BACK: {run['fallbacks']}" if run.get("fallbacks") else "")
            )
    ours, st = steps.get("embedpool_gpu", {}), steps.get("st_gpu", {})
    if "chunks_per_s" in st:
        lines.append(f"sentence-transformers fp16 b256: {st['chunks_per_s']:.1f} chunks/s")
    if "chunks_per_s" in ours and "chunks_per_s" in st:
        ratio = ours["chunks_per_s"] / st["chunks_per_s"]
        out["ratio_embedpool_over_st"] = round(ratio, 3)
        lines.append(f"ratio embedpool / sentence-transformers: {ratio:.2f}x (goal >= 1.0)")
    lines += qwen3_lines(steps, out)
    eff = steps.get("efficiency", {}).get("runs", {})
    if eff:
        lines.append("cpu pool (int8, 1 thread/worker): workers tokens/s efficiency")
        for n, r in eff.items():
            lines.append(
                f"  {n:>3} {r.get('tokens_per_s', 0):>10.0f} "
                f"{r.get('efficiency', float('nan')):>6.2f}"
                if "tokens_per_s" in r
                else f"  {n:>3} error: {str(r.get('error', ''))[:200]}"
            )
    tok = steps.get("tokenize", {})
    if "parent_1core" in tok:
        lines.append(
            f"parent tokenising: {tok['parent_1core']['tokens_per_s']:.0f} tokens/s on "
            f"1 core, {tok['parent_all_cores']['tokens_per_s']:.0f} on "
            f"{tok['cores']}; one worker {tok['worker_1thread']['tokens_per_s']:.0f}"
        )
    for name, s in steps.items():
        if isinstance(s, dict) and "error" in s and name not in ("vectors", "qwen3_vectors"):
            lines.append(f"step {name} failed: {str(s['error']).splitlines()[-1][:300]}")
    write(str(d / "gpu_check.json"), out)
    text = "\n".join(lines) + "\n"
    (d / "gpu_check.txt").write_text(text)
    print(text, end="")


def qwen3_lines(steps: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """The Qwen3-0.6B-shape rows: fp16 vectors against fp32, then embedpool fp16 on CUDA
    against sentence-transformers fp16 on the same GPU."""
    lines: list[str] = []
    vec = steps.get("qwen3_vectors", {})
    for key, who in (
        ("embedpool_fp16", "embedpool fp16"),
        ("st_fp16", "sentence-transformers fp16"),
    ):
        v = vec.get(key)
        if isinstance(v, dict) and "cos_mean" in v:
            lines.append(
                f"qwen3-0.6b {who} ({vec.get('device', '?')}) vs embedpool cpu fp32: "
                f"cos mean {v['cos_mean']:.6f}, min {v['cos_min']:.6f} "
                f"({'meets' if v[f'meets_{FP16_BAR}'] else 'MISSES'} {FP16_BAR})"
            )
        elif isinstance(v, dict):
            lines.append(f"qwen3-0.6b {who}: {str(v.get('error', v))[:300]}")
    if "error" in vec:
        lines.append(f"qwen3-0.6b vectors failed: {str(vec['error']).splitlines()[-1][:300]}")
    ours, st = steps.get("qwen3_embedpool_gpu", {}), steps.get("qwen3_st_gpu", {})
    if "chunks_per_s" in ours:
        lines.append(
            f"qwen3-0.6b embedpool fp16 cuda: {ours['chunks_per_s']:.1f} chunks/s "
            f"({QWEN3_TOKENS} tokens), tree RSS peak "
            f"{ours['peak_tree_rss_bytes'] / 2**30:.2f} GiB"
            + (f"; FELL BACK: {ours['fallbacks']}" if ours.get("fallbacks") else "")
        )
    if "chunks_per_s" in st:
        lines.append(
            f"qwen3-0.6b sentence-transformers fp16 b256: {st['chunks_per_s']:.1f} chunks/s"
        )
    if "chunks_per_s" in ours and "chunks_per_s" in st:
        ratio = ours["chunks_per_s"] / st["chunks_per_s"]
        out["qwen3_ratio_embedpool_over_st"] = round(ratio, 3)
        lines.append(f"qwen3-0.6b ratio embedpool / sentence-transformers: {ratio:.2f}x")
    return lines


def st_args(args: list[str]) -> tuple[int | None, tuple[int, str] | None]:
    """``st``'s options after OUT CORPUS: --max-length N|model, --save-vectors N FILE."""
    max_length: int | None = MAX_LENGTH
    save = None
    rest = list(args)
    while rest:
        opt = rest.pop(0)
        if opt == "--max-length":
            value = rest.pop(0)
            max_length = None if value == "model" else int(value)
        elif opt == "--save-vectors":
            save = (int(rest.pop(0)), rest.pop(0))
        else:
            raise SystemExit(f"st: unknown option {opt!r}")
    return max_length, save


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "corpus":
        corpus(int(args[0]), args[1])
    elif cmd == "vectors":
        vectors(args[0], int(args[1]))
    elif cmd == "embedpool":
        embedpool_run(args[0], args[1], args[2], args[3:])
    elif cmd == "st":
        st_run(args[0], args[1], *st_args(args[2:]))
    elif cmd == "efficiency":
        efficiency(args[0], [int(x) for x in args[1].split(",")], int(args[2]))
    elif cmd == "qwen3_make":
        qwen3_make(args[0])
    elif cmd == "qwen3_corpus":
        qwen3_corpus(args[0], int(args[1]), args[2])
    elif cmd == "qwen3_graphs":
        qwen3_graphs(args[0])
    elif cmd == "qwen3_vectors":
        qwen3_vectors(args[0], args[1], int(args[2]), args[3], args[4] if len(args) > 4 else None)
    elif cmd == "report":
        report(args[0])
    else:
        raise SystemExit(f"unknown step {cmd!r}")


if __name__ == "__main__":
    main()
