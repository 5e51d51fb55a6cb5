"""Dev probe: does a prompt cost anything beyond its tokens?

    .venv/bin/python benchmarks/prompt_overhead.py [--chunks 1000] [--rounds 3]
        [--prompt "query: "] [--precision int8] [--threads 1]

The same texts, embedded by one in-process ``Embedder`` (the real default model, no cache)
two ways, interleaved round by round in the same process so both see the same machine:

* ``prompt``:   ``embed(texts, prompt=P)`` — the prompt resolved, tokenised with each text,
  its length carried with every batch;
* ``prefixed``: ``embed([P + t for t in texts])`` — the user did it by hand.

Both feed the model the same tokens (tests/test_prompts.py checks the vectors are equal), so
any difference is the prompt plumbing's. Two stages are timed, each as the best of
``--rounds``: the parent's preparation alone (``Embedder._prepare``: dedupe, tokenise, plan
batches) and the whole ``embed`` call. Both wall seconds and this process's CPU seconds
(``time.process_time``, ONNX Runtime's threads included) are reported: on a shared machine
the CPU seconds are the steadier measure. Ratios are throughput, prompt / prefixed (1.0: no overhead; below 1: the prompt costs).
Corpus: Python standard-library source chunks (``corpus.stdlib_chunks``), cut to 400
characters as the CLI tests do.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def best(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """The lowest (wall, cpu) seconds of ``rounds`` calls."""
    wall = cpu = float("inf")
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default="query: ")
    ap.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from embedpool.corpus import stdlib_chunks
    from embedpool.job import Embedder

    texts = [c.text[:400] for c in stdlib_chunks(args.chunks)]
    prefixed = [args.prompt + t for t in texts]
    ids = [str(i) for i in range(len(texts))]
    n = len(texts)
    with Embedder(precision=args.precision, threads=args.threads, workers=None, device="cpu") as e:
        e.embed(texts[:64])  # warm the session
        runs: dict[str, Callable[[], object]] = {
            "prepare prompt": lambda: e._prepare(0, ids, texts, args.prompt),
            "prepare prefixed": lambda: e._prepare(0, ids, prefixed, ""),
            "embed prompt": lambda: e.embed(texts, prompt=args.prompt),
            "embed prefixed": lambda: e.embed(prefixed),
        }
        got: dict[str, tuple[float, float]] = {}
        for stage in ("prepare", "embed"):
            rounds = args.rounds * (5 if stage == "prepare" else 1)
            for r in range(2):  # alternate the order: each mode runs first once
                for mode in ("prompt", "prefixed") if r == 0 else ("prefixed", "prompt"):
                    w, c = best(runs[f"{stage} {mode}"], max(1, rounds // 2))
                    old = got.get(f"{stage} {mode}", (float("inf"), float("inf")))
                    got[f"{stage} {mode}"] = (min(old[0], w), min(old[1], c))
        tokens = e.last_report.tokens
    print(
        f"{n} chunks, {tokens} tokens each way; precision {args.precision}, "
        f"{args.threads} thread(s), in-process"
    )
    for stage in ("prepare", "embed"):
        (wp, cp), (wx, cx) = got[f"{stage} prompt"], got[f"{stage} prefixed"]
        print(
            f"{stage:<8} prompt {n / wp:9.1f} chunks/s wall, {cp * 1e3:8.1f} ms cpu | "
            f"prefixed {n / wx:9.1f} chunks/s wall, {cx * 1e3:8.1f} ms cpu | "
            f"throughput ratio (prompt/prefixed) wall {wx / wp:.3f}, cpu {cx / cp:.3f}"
        )


if __name__ == "__main__":
    main()
