"""Which int8 linears cost a cross-encoder its ranking: quantise one group of linears at a time
(a role: q, k, v, attn_out, ffn_up, ffn_down; or a layer), and all but one group, score every
pair, and compare with the fp32 graph per query.

    python benchmarks/rerank_int8_layers.py MODEL_DIR PAIRS_JSON [--by roles|layers|both]

MODEL_DIR: a cross-encoder (e.g. benchmarks/rerank.py's ms-marco-MiniLM-L6-v2-shaped model in
its work dir, or tests/fixtures/rerankers/NAME/model); PAIRS_JSON: ``[[query, document], ...]``
with every query paired with the same documents in one block each (benchmarks/rerank.py
writes one). Reported per variant: Spearman per query (min, mean) against the fp32 graph
(which equals CrossEncoder.predict within 1e-6 there), the logits' error (max, rms) and the
largest per-query ratio of the error's std to the logits' std. The first line gives each
query's logit std: a ranking measure on scores that bunch within int8's error is noise.

The variants start from the int8-ready graph (its int8 word table included: the "nothing
quantised" line) and quantise the named linears with the shipped recipe (graph/quantize.py).
Single-threaded scoring per variant, so the figures hold on a loaded machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from embedpool.graph import _family, quantize
    from embedpool.graph.builder import Linear
    from embedpool.graph.compose import compose_parts
    from embedpool.models import resolve_model
    from embedpool.rerank import PairTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("--by", choices=("roles", "layers", "both"), default="both")
    args = ap.parse_args()
    pairs = [(str(q), str(d)) for q, d in json.loads(args.pairs.read_text())]
    queries = list(dict.fromkeys(q for q, _ in pairs))
    per = len(pairs) // len(queries)
    model = resolve_model(args.model)
    fam, cfg = _family(model)
    weights = fam.load_weights(model.weights_path, cfg)
    fp32 = compose_parts(fam, weights, cfg, model.classifier, name="fp32").model
    ready = compose_parts(fam, weights, cfg, model.classifier, int8_ready=True, name="int8")
    enc = PairTokenizer.for_model(model).encode(pairs)
    inputs = {i.name for i in fp32.graph.input}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1

    def score(graph: Any) -> np.ndarray:
        sess = ort.InferenceSession(
            graph.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        order = np.argsort([len(s) for s in enc.sequences])
        out = np.zeros(len(pairs), np.float32)
        for b in range(0, len(order), 16):
            rows = order[b : b + 16]
            width = max(len(enc.sequences[i]) for i in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            for r, i in enumerate(rows):
                n = len(enc.sequences[i])
                ids[r, :n], mask[r, :n], types[r, enc.segments[i] : n] = enc.sequences[i], 1, 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in inputs:
                feed["token_type_ids"] = types
            out[rows] = sess.run(None, feed)[0][:, 0]
        return out

    def spearman(a: np.ndarray, b: np.ndarray) -> float:
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra.astype(float), rb.astype(float))[0, 1])

    ref = score(fp32).reshape(len(queries), per)
    spread = ref.std(axis=1)
    print(
        f"{len(queries)} queries x {per} documents; logit std per query: "
        f"{' '.join(f'{s:.2f}' for s in spread)}"
    )

    def report(label: str, graph: Any) -> None:
        t = time.perf_counter()
        got = score(graph).reshape(ref.shape)
        rho = [spearman(g, r) for g, r in zip(got, ref, strict=True)]
        err = got - ref
        print(
            f"{label:34} Spearman min {min(rho):.4f} mean {np.mean(rho):.4f}  |err| max "
            f"{np.abs(err).max():.3f} rms {np.sqrt((err**2).mean()):.3f}  err/spread "
            f"{(err.std(axis=1) / spread).max():.3f}  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )

    linears = ready.linears
    zps = quantize.zero_points(linears)

    def only(keep: Callable[[Linear], bool]) -> Any:
        recipe = {lin.node: zps[lin.node] for lin in linears if lin.node in zps and keep(lin)}
        return quantize.quantize_linears(copy.deepcopy(ready.model), recipe)

    report("nothing quantised (int8 word table)", ready.model)
    report("every linear (embedders' recipe)", only(lambda lin: True))
    report(
        "cross-encoder recipe (shipped)",
        quantize.quantize_linears(
            copy.deepcopy(ready.model), quantize.zero_points(linears, classifier=True)
        ),
    )

    def role_is(role: str) -> Callable[[Linear], bool]:
        return lambda lin: lin.role == role

    def layer_is(layer: int) -> Callable[[Linear], bool]:
        return lambda lin: lin.layer == layer

    def negated(member: Callable[[Linear], bool]) -> Callable[[Linear], bool]:
        return lambda lin: not member(lin)

    groups: list[tuple[str, Callable[[Linear], bool]]] = []
    if args.by in ("roles", "both"):
        groups += [
            (f"role {r}", role_is(r))
            for r in sorted({lin.role for lin in linears if lin.node in zps})
        ]
    if args.by in ("layers", "both"):
        groups += [
            (f"layer {i}", layer_is(i))
            for i in sorted({lin.layer for lin in linears if lin.node in zps})
        ]
    for label, member in groups:
        report(f"only {label}", only(member))
    for label, member in groups:
        report(f"all but {label}", only(negated(member)))


if __name__ == "__main__":
    main()
