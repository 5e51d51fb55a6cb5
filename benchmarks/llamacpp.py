"""llama.cpp (llama-cpp-python, a Q8_0 GGUF of the same weights), what Ollama users run,
against embedpool's default precision (int8) at Qwen3-Embedding-0.6B's shape with random
weights: whole processes in one run, on the same 256-token chunks.

    .venv/bin/python benchmarks/llamacpp.py [--chunks 16] [--threads 1,2] [--rounds 2]
        [--model DIR] [--llama-src DIR] [--work DIR] [--check 8]

Steps (each in its own process; this script orchestrates, with the project venv's Python):

1. ``model``: benchmarks/decoders.py's model (its ``make`` step in the dev venv, torch):
   ``--model`` (default /tmp/embedpool-decoder-bench/model, made there if absent).
2. ``convert`` (the dev venv): the GGUF, by ``convert_hf_to_gguf.py --outtype q8_0`` of the
   llama.cpp source that llama-cpp-python's sdist ships (``--llama-src``:
   ``vendor/llama.cpp`` of the unpacked sdist; its own ``gguf-py``). One change, made in
   this script's wrapper and nowhere in llama.cpp: the converter recognises a BPE
   pre-tokenizer by the hash of its token ids for a probe text, and the hash of the
   fixture's 500-token Qwen tokenizer is not in its table; its pre-tokenizer *is* Qwen2's
   (NFC, Qwen's split regex, byte level), so the wrapper names it ``qwen2``, the name
   the converter gives Qwen3-Embedding's real tokenizer. The converter also needs
   ``sentencepiece`` installed (it imports it before it falls back to BPE).
3. ``build`` (the project venv): embedpool's int8 and fp32 graphs, cached before anything
   is timed.
4. ``check``: the first ``--check`` chunks once more, through embedpool fp32 (the
   reference: equal to sentence-transformers, tests/test_decoders.py), embedpool int8 and
   llama.cpp: the cosines against embedpool fp32, and whether llama.cpp's token ids (its
   own tokenizer, from the GGUF) equal embedpool's (the same chunks must be the same input).
5. ``run``, alternately for each system and thread count (``--rounds`` times): load, embed
   2 chunks (warm-up), then ``--chunks`` chunks, timing the process tree's CPU seconds
   and wall seconds over the timed part; peak RSS over the whole process. embedpool runs
   through decoders.py's runner (``Embedder``, one pool worker with ``--threads``
   threads; the hung-worker deadline raised, see ``EMBEDPOOL_RUN``); llama.cpp as
   ``Llama(gguf, embedding=True, pooling_type=LAST, n_threads=t,
   n_threads_batch=t, n_ctx=n_batch=n_ubatch=512)`` (llama-cpp-python's default context;
   ``LLAMACPP_N_CTX`` sets another) and ``Llama.embed(chunks, normalize=True)`` (it packs
   sequences into batches of ``n_batch`` tokens), one process, peak RSS from
   ``getrusage`` (llama.cpp maps the GGUF: its pages count once they are touched).

Reported: chunks per CPU second (the measure that holds on a shared machine), chunks per
wall second, peak RSS, and the ratios embedpool / llama.cpp of the same run. Outputs go to
``--work`` (default /tmp/embedpool-llamacpp-bench), never into the repository.

Building llama-cpp-python here: PyPI has only its sdist (0.3.36, no wheel for this
platform); ``CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 pip install
--no-deps llama_cpp_python-0.3.36.tar.gz`` into the dev venv builds with the system's
cmake/gcc/ninja: 193 steps in ~75 minutes on 2 cores shared at load 10-25 (it installed);
ggml and libllama (what embeddings use) were done after ~40, the rest is the multimodal
library (``-DLLAVA_BUILD=OFF`` skips it: embeddings never load it). The measured runs used
libllama/libggml from that build beside the sdist's ``llama_cpp`` package on PYTHONPATH,
before pip had finished the rest. ``diskcache`` (imported by ``llama_cpp.llama``) and
``sentencepiece`` (the converter) come from PyPI.

Measured (AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI; 2 shared cores; chunks per CPU second,
embedpool int8 / llama.cpp Q8_0, whole processes alternating, one round each):

- ``--chunks 8 --rounds 1 --threads 1 --check 0`` and ``--threads 2`` (n_ctx 512, load
  1-3): 1 thread 0.321 / 0.151 (**2.12x**), 2 threads 0.251 / 0.134 (**1.88x**); peak RSS
  665-667 / 652 MiB.
- ``LLAMACPP_N_CTX=2048 ... --chunks 8 --rounds 1 --check 6`` (load 14-24): 1 thread
  0.241 / 0.095 (2.54x), 2 threads 0.227 / 0.078 (2.91x); peak RSS 667 / 1,357 MiB.
  llama-cpp-python's ``embed`` decodes a batch's sequences in one unified KV cache, so each
  token's attention spans the other sequences' (masked) keys: 8 chunks a batch cost more
  than 2.
- Token ids equal in 6 of 6 chunks; against embedpool fp32: llama.cpp cos mean 0.99957
  (min 0.99945), embedpool int8 0.99832 (min 0.99806).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoders  # benchmarks/decoders.py: the model, its texts and runner

ROOT = decoders.ROOT
DEV_PYTHON = decoders.DEV_PYTHON
PROJECT_PYTHON = decoders.PROJECT_PYTHON
N_CTX = 512

#: convert_hf_to_gguf.py with the pre-tokenizer named (see the module docstring, step 2).
CONVERT = r"""
import runpy, sys
from pathlib import Path
src, model, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = [str(src), str(src / "gguf-py")]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [str(src / "convert_hf_to_gguf.py"), model, "--outtype", "q8_0", "--outfile", out]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

#: One llama.cpp run: prints a JSON line as decoders.py's runner does; argv: gguf, texts
#: (JSON), threads, and optionally a .npy for the vectors (then no timing, and the token ids
#: of each text as a .json beside it).
LLAMA_RUN = r"""
import json, os, resource, sys, time
import numpy as np
from llama_cpp import LLAMA_POOLING_TYPE_LAST, Llama
gguf, texts_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
save = sys.argv[4] if len(sys.argv) > 4 else None
texts = json.loads(open(texts_path).read())
n_ctx = int(os.environ.get("LLAMACPP_N_CTX", "512"))
llm = Llama(model_path=gguf, embedding=True, pooling_type=LLAMA_POOLING_TYPE_LAST,
            n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
            n_ubatch=n_ctx, verbose=False)
if save:
    np.save(save, np.asarray(llm.embed(texts, normalize=True), dtype=np.float32))
    ids = [llm.tokenize(t.encode("utf-8")) for t in texts]
    open(save[:-4] + ".ids.json", "w").write(json.dumps(ids))
    print(json.dumps({"saved": save}))
    sys.exit(0)

def cpu():
    t = os.times()
    return t.user + t.system

llm.embed(texts[:2], normalize=True)
c0, w0 = cpu(), time.perf_counter()
vecs = llm.embed(texts, normalize=True)
c1, w1 = cpu(), time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"cpu_s": c1 - c0, "wall_s": w1 - w0, "peak_rss": peak, "peak_pss": peak,
                  "chunks": len(texts), "dim": len(vecs[0]), "precision": "Q8_0 (llama.cpp)"}))
"""

#: embedpool's graph at one precision, built and cached.
BUILD = r"""
import sys
from embedpool.graph import prepare_onnx
from embedpool.models import resolve_model
print("built", prepare_onnx(resolve_model(sys.argv[1]), sys.argv[2]))
"""

#: embedpool's vectors of the check chunks at one precision, and its token ids.
EMBEDPOOL_VECTORS = r"""
import json, sys
import numpy as np
from embedpool.job import Embedder
from embedpool.tokenization import TextTokenizer
model_dir, texts_path, precision, out = sys.argv[1:5]
texts = json.loads(open(texts_path).read())
with Embedder(model_dir, precision=precision, workers=1, threads=2,
              pool_options={"hang_base_s": 3600.0}) as e:
    np.save(out, np.asarray(e.embed(texts), dtype=np.float32))
    m = e.model
tok = TextTokenizer(m.tokenizer_path, m.max_length)
ids = [[int(i) for i in s] for s in tok.encode(texts).sequences]
open(out[:-4] + ".ids.json", "w").write(json.dumps(ids))
"""


#: decoders.py's runner (``Embedder``, the tree's CPU seconds and sampled RSS) with the pool's
#: hung-worker deadline raised: on a loaded 2-core machine one 256-token batch of a 0.6B
#: decoder outlasts the default 30 s + 10 ms a token (faults.FaultPolicy, sized for the small
#: encoders), and the worker is killed as hung and its batch split, again and again.
_EMBEDDER = "Embedder(model_dir, workers=workers, threads=threads)"
EMBEDPOOL_RUN = decoders.RUN.replace(
    _EMBEDDER, _EMBEDDER[:-1] + ', pool_options={"hang_base_s": 3600.0})'
)
assert EMBEDPOOL_RUN != decoders.RUN, "decoders.RUN no longer builds its Embedder as expected"


def embedpool_run(
    model_dir: Path, texts: Path, threads: int, env: dict[str, str]
) -> dict[str, Any]:
    res = subprocess.run(
        [
            PROJECT_PYTHON,
            "-c",
            EMBEDPOOL_RUN,
            "embedpool",
            str(model_dir),
            str(texts),
            str(threads),
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"embedpool run failed:\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def llama_run(
    gguf: Path, texts: Path, threads: int, env: dict[str, str], save: Path | None = None
) -> dict[str, Any]:
    cmd = [DEV_PYTHON, "-c", LLAMA_RUN, str(gguf), str(texts), str(threads)]
    res = subprocess.run(
        cmd + ([str(save)] if save else []),
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def convert(llama_src: Path, model_dir: Path, gguf: Path, env: dict[str, str]) -> None:
    if gguf.is_file():
        return
    if not (llama_src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(
            f"--llama-src {llama_src} has no convert_hf_to_gguf.py (unpack "
            "llama-cpp-python's sdist: pip download --no-deps llama-cpp-python)"
        )
    tmp = gguf.with_suffix(".part")
    subprocess.run(
        [DEV_PYTHON, "-c", CONVERT, str(llama_src), str(model_dir), str(tmp)], check=True, env=env
    )
    tmp.rename(gguf)


def check(model_dir: Path, gguf: Path, texts: Path, work: Path, env: dict[str, str]) -> None:
    """Cosines of llama.cpp's and embedpool int8's vectors against embedpool fp32's, and
    whether the token ids agree."""
    vecs: dict[str, Any] = {}
    ids: dict[str, Any] = {}
    for name in ("fp32", "int8", "llama.cpp"):
        out = work / f"check-{name}.npy"
        if name == "llama.cpp":
            llama_run(gguf, texts, 2, env, save=out)
        else:
            subprocess.run(
                [
                    PROJECT_PYTHON,
                    "-c",
                    EMBEDPOOL_VECTORS,
                    str(model_dir),
                    str(texts),
                    name,
                    str(out),
                ],
                check=True,
                env=env,
            )
        vecs[name] = np.load(out)
        ids[name] = json.loads(out.with_suffix(".ids.json").read_text())
    ref = vecs["fp32"]
    same = sum(a == b for a, b in zip(ids["llama.cpp"], ids["fp32"], strict=True))
    print(
        f"\nvectors of {len(ref)} chunks against embedpool fp32 (cos mean / min); token ids "
        f"equal to embedpool's in {same} of {len(ref)} chunks "
        f"(lengths llama.cpp {sorted({len(i) for i in ids['llama.cpp']})}, embedpool "
        f"{sorted({len(i) for i in ids['fp32']})}):"
    )
    for name in ("int8", "llama.cpp"):
        got = vecs[name]
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        label = "embedpool int8" if name == "int8" else "llama.cpp Q8_0"
        print(f"  {label:<16} cos mean {cos.mean():.5f}, min {cos.min():.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--check", type=int, default=8, help="chunks of the vectors check (0: none)")
    ap.add_argument("--model", type=Path, default=Path("/tmp/embedpool-decoder-bench/model"))
    ap.add_argument(
        "--llama-src",
        type=Path,
        default=Path("/tmp/llama18/llama_cpp_python-0.3.36/vendor/llama.cpp"),
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedpool-llamacpp-bench"))
    args = ap.parse_args()
    work, model_dir = args.work, args.model
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "EMBEDPOOL_CACHE_DIR": str(work / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "LLAMACPP_N_CTX": os.environ.get("LLAMACPP_N_CTX", str(N_CTX)),
    }
    if not (model_dir / "model.safetensors").is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                DEV_PYTHON,
                "-c",
                decoders.MAKE,
                str(ROOT),
                str(model_dir.parent),
                json.dumps(decoders.SHAPE),
                "16384",
            ],
            check=True,
            env=env,
        )
    gguf = work / "model-q8_0.gguf"
    convert(args.llama_src, model_dir, gguf, env)
    for precision in ("int8", "fp32"):
        subprocess.run(
            [PROJECT_PYTHON, "-c", BUILD, str(model_dir), precision], check=True, env=env
        )
    texts = work / f"texts-{args.chunks}x{args.tokens}.json"
    texts.write_text(json.dumps(decoders.make_texts(model_dir, args.chunks, args.tokens)))
    print(
        textwrap.dedent(f"""\
        CPU: {decoders.cpu_name()}, {os.cpu_count()} logical cores; load {os.getloadavg()[0]:.1f}
        shape: Qwen3-Embedding-0.6B {decoders.SHAPE}, model {model_dir}
        llama.cpp: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB, Q8_0)
        {args.chunks} chunks x {args.tokens} tokens, {args.rounds} round(s), alternating"""),
        flush=True,
    )
    if args.check:
        few = work / f"texts-check-{args.check}.json"
        few.write_text(json.dumps(json.loads(texts.read_text())[: args.check]))
        check(model_dir, gguf, few, work, env)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    threads_list = [int(t) for t in args.threads.split(",")]
    print("\nruns (chunks per CPU second, chunks per wall second, peak RSS):")
    for _ in range(args.rounds):
        for threads in threads_list:
            for name in ("embedpool", "llama.cpp"):
                r = (
                    embedpool_run(model_dir, texts, threads, env)
                    if name == "embedpool"
                    else llama_run(gguf, texts, threads, env)
                )
                results.setdefault((name, threads), []).append(r)
                print(
                    f"  {name:<10} {threads} thread(s): {r['chunks'] / r['cpu_s']:.3f} "
                    f"chunks/CPU s, {r['chunks'] / r['wall_s']:.3f} chunks/s, peak RSS "
                    f"{r['peak_rss'] / 2**20:.0f} MiB ({r['precision']})",
                    flush=True,
                )
    print("\nbest of rounds (chunks per CPU second / per wall second / peak RSS):")
    for threads in threads_list:
        best = {
            name: max(results[(name, threads)], key=lambda r: r["chunks"] / r["cpu_s"])
            for name in ("embedpool", "llama.cpp")
        }
        for name, r in best.items():
            print(
                f"  {threads} thread(s) {name:<10} {r['chunks'] / r['cpu_s']:.3f} / "
                f"{r['chunks'] / r['wall_s']:.3f} chunks/s / {r['peak_rss'] / 2**20:.0f} MiB"
            )
        e, ll = best["embedpool"], best["llama.cpp"]
        print(
            f"  {threads} thread(s) embedpool int8 / llama.cpp Q8_0: "
            f"{(e['chunks'] / e['cpu_s']) / (ll['chunks'] / ll['cpu_s']):.2f}x per CPU s, "
            f"{(e['chunks'] / e['wall_s']) / (ll['chunks'] / ll['wall_s']):.2f}x wall, "
            f"{e['peak_rss'] / ll['peak_rss']:.2f}x memory"
        )


if __name__ == "__main__":
    main()
