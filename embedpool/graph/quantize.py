"""int8 graphs: per-channel int8 weights, per-row int8 activations, written by our own numpy
code as plain ONNX Runtime ops. No calibration, no onnxruntime at build time.

Every quantised ``x @ W`` (``x`` [.., K] float, ``W`` [K, N] a constant) becomes::

    x ─ReduceMax, ReduceMin over K─> s = max(max / (255 - zp), -min / zp)   one scale per row
    x ─Mul(1 / s)─QuantizeLinear(1, zp)─> u8 ─┐                             (shared by the
                                              │                              linears of one x)
    W (int8, per-column scale w_s) ───────────┴─ MatMulIntegerToFloat(a_scale = s,
                                                    b_scale = w_s, a_zero_point = zp) ─> y

- **Per row** (one scale per token): a text's vector depends on that text only, never on its
  batch neighbours or their padding (tested). ORT's dynamic quantisation takes one scale per
  batch (cos 0.988 for a text alone vs beside a long one) and its static one needs a
  calibration pass (31 s and 1.7 GB peak RSS on MiniLM, and a calibration set every machine
  must share). ORT has no per-row op, hence these few; ``MatMulIntegerToFloat`` scales its
  output by a per-row ``a_scale`` itself (ORT >= 1.20; checked with 1.20.1 and 1.32).
- **Zero point**: 128 (symmetric) unless the family gave the linear a ``floor`` (a GELU
  output never goes below -0.17): then 16, so 239 of the 256 steps cover the positive side.
  A row that goes further below still quantises correctly (its scale widens), only coarser.
- **Pair-bounded weights**: without VNNI, ONNX Runtime's x86 u8 x s8 kernels (AVX2,
  AVX-512BW) multiply with ``vpmaddubsw``, which adds the products of K-adjacent pairs
  ``(2j, 2j+1)`` in *saturating* int16: ``255 * 127 * 2`` does not fit, so a row of large
  activations against two large weights came out wrong by up to 2.7x the true value
  (measured on ORT 1.32 with random u8 x s8: MatMulInteger against numpy). The weights are
  therefore scaled so that ``|q[2j]| + |q[2j+1]| <= 128`` in every column: then ``255 * 128
  = 32640`` fits and the kernel is exact on every CPU (tested), at ~0.3 bit of weight
  precision (the column scale grows by the largest pair sum over 128 instead of the largest
  weight over 127).

Measured on MiniLM, ``benchmarks/graph_variants.py --chunks 150 --threads 1 --batch 8
--repeat 2`` (150 stdlib chunks, mean 251 tokens, and the accuracy fixture's 54 short and
odd texts; cosine to the fp32 graph; speed in chunks per CPU second, 1 thread, the measure
that holds on a shared machine; AMD EPYC Zen 3, AVX2/FMA, no AVX-512, no VNNI; ORT 1.32)::

    variant (one change from this recipe)       chunks mean/min   fixture mean/min  x fp32
    this recipe                                 0.9979 / 0.9968   0.9966 / 0.9848   1.42
    weights max/127, not pair-bounded           0.9968 / 0.9951   0.9952 / 0.9781   1.43
    the same weights stored u8 (exact kernel)   0.9983 / 0.9975   0.9967 / 0.9821   1.13
    7-bit weights (ORT's reduce_range)          0.9966 / 0.9933   0.9950 / 0.9812   1.25
    zero point 128 for the GELU input too       0.9978 / 0.9964   0.9963 / 0.9823   1.35
    static per-tensor scales (64-chunk MinMax)  0.9936 / 0.9867   0.9906 / 0.9726   1.40
    ORT dynamic (per-batch scale, cos 0.988     0.9921 / 0.9850   0.9894 / 0.9706   1.36
      alone vs batched)
    MatMulNBits 8-bit, int8 compute             0.9997 / 0.9995   0.9995 / 0.9977   0.71
    recipe 5 (static, calibrated, ff2 fp32)     0.9967 / 0.9944   0.9953 / 0.9807   1.23

On the held-out set against sentence-transformers (``benchmarks/eval_quality.py``: 600 code
and prose chunks and 500 docstring -> code pairs from non-stdlib site-packages): mean
0.99777, min 0.99574, MRR@10 0.8148 (sentence-transformers 0.8142); recipe 5 gave 0.99669 /
0.99300 / 0.8151.

Cross-encoders (``zero_points(classifier=True)``, its own cache key): the same recipe but for
the last two encoder layers (at most half), which stay float32. The score reads one row of
the last layer (CLS, or the pooled rows), and the last layers' rounding reaches it least
averaged; measured per role and per layer (``benchmarks/rerank_int8_layers.py``), no role
dominates, the last layers cost the most (CLASSIFIER_FP32_LAYERS). The embedders' graphs
are unchanged by it.

Graphs whose node names are unknown (a shipped ``onnx/model.onnx``) get the same recipe on
every MatMul with a constant 2-D float weight, zero point 128 throughout.

Our own code, not ORT's quantiser: none of its recipes is per-row, and building this one
takes numpy a fraction of a second (the whole cold build 1.5 s, 232 MB peak RSS, against 31 s
and 1.7 GB for recipe 5's quantize_static: ``graph_variants.py --build-cost``). Everything is
exact IEEE arithmetic in a fixed order (rint, division, max), so the bytes are the same on
every machine (tested across processes, hash seeds and locales).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from embedpool.errors import ModelError
from embedpool.graph.builder import MS_DOMAIN, Linear, LinearRole

if TYPE_CHECKING:
    import onnx

# onnx is imported where a graph is written: graph/__init__ reads this module's constants
# for cache keys in pool workers, which must not pay onnx's ~10-18 MB of RSS.

__all__ = [
    "CLASSIFIER_FP32_LAYERS",
    "INT8_ROLES",
    "PAIR_LIMIT",
    "ZERO_POINT",
    "ZERO_POINT_FLOORED",
    "quantize_linears",
    "quantize_shipped",
    "quantize_weight",
    "recipe_key",
    "zero_points",
]

#: Roles the recipe quantises: every linear of the encoder. ``head_dense`` (a
#: sentence-transformers Dense layer after pooling) stays fp32: it runs once per text, not
#: per token, so int8 would save nothing measurable and its error would land on the vector.
INT8_ROLES: frozenset[LinearRole] = frozenset(
    {"q", "k", "v", "qkv", "attn_out", "ffn_up", "ffn_gate", "ffn_down"}
)
#: A cross-encoder's int8 graph keeps its last encoder layers in float32: this many, at most
#: half of its layers (every other layer as above). The score is one row of the last layer
#: (CLS, or the pooled rows): the last layers' rounding reaches it least averaged. Measured
#: (``benchmarks/rerank_int8_layers.py`` on ``benchmarks/rerank.py``'s model, MiniLM-L6's
#: trained encoder weights; logits against the fp32 graph, logit std ~2.4 per query): on 8
#: queries x 24 stdlib chunks, every layer int8: Spearman worst 0.987 (of the first 4), rms
#: error 0.104; all but the last: worst 0.9896, rms 0.079; all but the last two: worst
#: 0.9965, rms 0.040. Per group alone (first 4 queries): layer 0 rms 0.020, the last 0.051;
#: no role dominates (all but one role at a time: worst 0.985-0.993).
CLASSIFIER_FP32_LAYERS = 2
#: Activation zero points (uint8). 128 splits the range evenly (inputs of either sign).
ZERO_POINT = 128
#: For an input with a ``floor``: 16 measured best of 8/16/32/128 for MiniLM's FFN
#: down-projection (GELU input). Prototype, 100 site-packages chunks against fp32: mean
#: 0.99768 / 0.99778 / 0.99776 / 0.99755, fixture min 0.9831 / 0.9852 / 0.9796 / 0.9825;
#: graph_variants.py, 16 vs 128: 0.99792 vs 0.99776 mean, fixture min 0.9848 vs 0.9823.
#: Lower leaves too few steps for the negative side of rows with a small maximum; higher
#: spends steps on a side GELU barely uses.
ZERO_POINT_FLOORED = 16
#: |q[2j]| + |q[2j+1]| in every weight column stays within this (see the module docstring).
PAIR_LIMIT = 128
#: Smallest row scale: keeps an all-zero row finite (it quantises to the zero point, 0 out).
_MIN_SCALE = 1e-12

Int8 = npt.NDArray[np.int8]
F32 = npt.NDArray[np.float32]


def recipe_key(*, classifier: bool = False) -> dict[str, object]:
    """What the int8 bytes depend on besides the fp32 graph, for cache keys. ``classifier``:
    a cross-encoder's graph (``zero_points(classifier=True)``); an embedder's key is
    unchanged by it."""
    key: dict[str, object] = {
        "activations": "per-row",
        "zero_points": [ZERO_POINT, ZERO_POINT_FLOORED],
        "weights": "per-column",
        "pair_limit": PAIR_LIMIT,
        "roles": sorted(INT8_ROLES),
    }
    if classifier:
        key["fp32_layers"] = CLASSIFIER_FP32_LAYERS
    return key


def zero_points(linears: Iterable[Linear], *, classifier: bool = False) -> dict[str, int]:
    """The recipe for a built graph: node name -> activation zero point, for every linear
    whose role is in INT8_ROLES. ``classifier`` (a cross-encoder's graph, whose score reads
    one row of the last layer): the last CLASSIFIER_FP32_LAYERS encoder layers' linears (at
    most half the layers) stay float32."""
    lins = [lin for lin in linears if lin.role in INT8_ROLES]
    layers = sorted({lin.layer for lin in lins if lin.layer >= 0})
    keep = min(CLASSIFIER_FP32_LAYERS, len(layers) // 2) if classifier else 0
    fp32 = set(layers[len(layers) - keep :]) if keep else set()
    return {
        lin.node: ZERO_POINT if lin.floor is None else ZERO_POINT_FLOORED
        for lin in lins
        if lin.layer not in fp32
    }


def quantize_weight(w: npt.NDArray[np.floating]) -> tuple[Int8, F32]:
    """``w`` [K, N] -> (int8 [K, N], float32 scale [N]), one symmetric scale per column, with
    ``|q[2j]| + |q[2j+1]| <= PAIR_LIMIT`` and ``|q| <= 127``; ``q * scale`` approximates w."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [in, out], got shape {w.shape}")
    k, n = w.shape
    a = np.abs(w)
    padded = np.concatenate([a, np.zeros((1, n), np.float32)]) if k % 2 else a
    pair_max = (padded[0::2] + padded[1::2]).max(axis=0) if k else np.zeros(n, np.float32)
    scale = np.maximum(
        np.maximum(a.max(axis=0, initial=0.0) / np.float32(127), pair_max / np.float32(PAIR_LIMIT)),
        np.float32(_MIN_SCALE),
    ).astype(np.float32)
    exact = w / scale
    q = np.clip(np.rint(exact), -127, 127)
    # Rounding can lift a pair just over the limit (64.5 + 63.5 -> 64 + 64 is fine, 64.6 +
    # 63.4 -> 65 + 63 too, but two halves rounded up are not): step the element that rounding
    # moved furthest from its exact value one step toward zero.
    qp = np.concatenate([q, np.zeros((1, n))]) if k % 2 else q
    ep = np.concatenate([exact, np.zeros((1, n), np.float32)]) if k % 2 else exact
    over = np.abs(qp[0::2]) + np.abs(qp[1::2]) > PAIR_LIMIT
    if over.any():
        up0 = np.abs(qp[0::2]) - np.abs(ep[0::2])
        up1 = np.abs(qp[1::2]) - np.abs(ep[1::2])
        even, odd = qp[0::2], qp[1::2]  # views into qp
        fix0 = over & (up0 >= up1)
        fix1 = over & ~(up0 >= up1)
        even[fix0] -= np.sign(even[fix0])
        odd[fix1] -= np.sign(odd[fix1])
    return np.ascontiguousarray(qp[:k], dtype=np.int8), scale


class _Emitter:
    """Writes the quantised replacement of one MatMul at a time; one activation
    quantisation per (input, zero point), shared by the linears that read it."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.inits: list[onnx.TensorProto] = []
        self._quantised: dict[tuple[str, int], tuple[str, str]] = {}
        self._consts: set[str] = set()

    def _const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike) -> str:
        from onnx import numpy_helper

        if name not in self._consts:
            self._consts.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def _reduce(self, op: str, x: str, out: str) -> onnx.NodeProto:
        from onnx import helper

        # opset 18 moved ReduceMax/ReduceMin's axes from an attribute to an input
        if self.opset >= 18:
            axes = self._const("int8.axes_last", [-1], np.int64)
            return helper.make_node(op, [x, axes], [out], name=f"{out}_{op}", keepdims=1)
        return helper.make_node(op, [x], [out], name=f"{out}_{op}", axes=[-1], keepdims=1)

    def activation(self, x: str, zp: int, nodes: list[onnx.NodeProto]) -> tuple[str, str]:
        """(uint8 tensor, row scale) for ``x``, emitting the nodes on first use."""
        from onnx import helper

        key = (x, zp)
        if key in self._quantised:
            return self._quantised[key]
        base = f"{x}.q{zp}"
        hi, lo, scale, inv = f"{base}.max", f"{base}.min", f"{base}.scale", f"{base}.inv"
        nodes += [
            self._reduce("ReduceMax", x, hi),
            self._reduce("ReduceMin", x, lo),
            helper.make_node(
                "Mul",
                [hi, self._const(f"int8.k{zp}", 1 / (255 - zp), np.float32)],
                [f"{hi}.s"],
                name=f"{hi}.s_Mul",
            ),
            helper.make_node(
                "Mul",
                [lo, self._const(f"int8.nk{zp}", -1 / zp, np.float32)],
                [f"{lo}.s"],
                name=f"{lo}.s_Mul",
            ),
            helper.make_node(
                "Max",
                [f"{hi}.s", f"{lo}.s", self._const("int8.min_scale", _MIN_SCALE, np.float32)],
                [scale],
                name=f"{scale}_Max",
            ),
            helper.make_node("Reciprocal", [scale], [inv], name=f"{inv}_Reciprocal"),
            helper.make_node("Mul", [x, inv], [f"{base}.scaled"], name=f"{base}.scaled_Mul"),
            helper.make_node(
                "QuantizeLinear",
                [
                    f"{base}.scaled",
                    self._const("int8.one", 1.0, np.float32),
                    self._const(f"int8.zp{zp}", zp, np.uint8),
                ],
                [f"{base}.u8"],
                name=f"{base}.u8_QuantizeLinear",
            ),
        ]
        self._quantised[key] = (f"{base}.u8", scale)
        return self._quantised[key]

    def linear(
        self, node: onnx.NodeProto, weight: npt.NDArray[np.floating], zp: int
    ) -> list[onnx.NodeProto]:
        """The nodes replacing ``node`` (a MatMul of input 0 by the constant ``weight``)."""
        from onnx import helper

        nodes: list[onnx.NodeProto] = []
        x_u8, row_scale = self.activation(node.input[0], zp, nodes)
        q, w_scale = quantize_weight(weight)
        w = node.input[1]
        nodes.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [
                    x_u8,
                    self._const(f"{w}.q", q, np.int8),
                    row_scale,
                    self._const(f"{w}.scale", w_scale, np.float32),
                    f"int8.zp{zp}",
                ],
                list(node.output),
                name=f"{node.name}.int8",
                domain=MS_DOMAIN,
            )
        )
        return nodes


def quantize_linears(
    model: onnx.ModelProto, recipe: Mapping[str, int] | Callable[[onnx.NodeProto], int | None]
) -> onnx.ModelProto:
    """Rewrite ``model`` in place (and return it): each MatMul the recipe names (a mapping
    node name -> zero point, or a function returning a zero point or None) becomes the int8
    subgraph of the module docstring; its fp32 weight is dropped unless something else reads
    it. A named node that is not a MatMul of a constant 2-D float weight is a ModelError."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ModelError(
            f"int8: graph {graph.name!r} uses opset {opset}; the int8 recipe needs opset >= 13"
        )
    inits = {t.name: t for t in graph.initializer}
    if callable(recipe):
        zero_point_of, wanted = recipe, set[str]()
    else:
        named = dict(recipe)
        zero_point_of, wanted = (lambda node: named.get(node.name)), set(named)
    emit = _Emitter(opset)
    out: list[onnx.NodeProto] = []
    done: set[str] = set()
    for node in graph.node:
        zp = zero_point_of(node)
        if zp is None:
            out.append(node)
            continue
        weight = inits.get(node.input[1]) if len(node.input) == 2 else None
        if (
            node.op_type != "MatMul"
            or weight is None
            or len(weight.dims) != 2
            or weight.data_type != TensorProto.FLOAT
        ):
            raise ModelError(
                f"int8: node {node.name!r} is not a MatMul by a constant 2-D float weight"
            )
        out.extend(emit.linear(node, numpy_helper.to_array(weight), zp))
        done.add(node.name)
    if missing := wanted - done:
        raise ModelError(f"int8: no node named {sorted(missing)} in graph {graph.name!r}")
    still_read = {i for n in out for i in _reads(n)}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(emit.inits)
    del graph.node[:]
    graph.node.extend(out)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The tensors ``node`` reads, with those its subgraphs (an If's branches) read from the
    outer scope: an initialiser only a branch reads is still read."""
    yield from node.input
    for attr in node.attribute:
        for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
            for inner in sub.node:
                yield from _reads(inner)


def quantize_shipped(src: Path, dst: Path) -> None:
    """The int8 graph of a shipped ONNX file, whose node names are unknown: every MatMul by
    a constant 2-D float weight, zero point 128 (see the module docstring). Per-row scales, so
    its vectors are batch-independent too."""
    import onnx
    from onnx import TensorProto

    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise ModelError(f"cannot read {src}: {exc}") from exc
    consts = {
        t.name
        for t in model.graph.initializer
        if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT
    }

    def recipe(node: onnx.NodeProto) -> int | None:
        constant_weight = len(node.input) == 2 and node.input[1] in consts
        return ZERO_POINT if node.op_type == "MatMul" and constant_weight else None

    quantize_linears(model, recipe)
    if not any(
        n.domain == MS_DOMAIN and n.op_type == "MatMulIntegerToFloat" for n in model.graph.node
    ):
        raise ModelError(
            f"{src}: no MatMul with a constant weight to quantise; use "
            "--precision fp32 for this model"
        )
    onnx.save(model, str(dst))
