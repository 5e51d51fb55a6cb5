"""The sentence-transformers head in the graph: what turns the encoder's token states into
the sentence vector (``modelspec.HeadSpec``: pooling, then Dense layers, then Normalize).

Doing it in the graph ships ``1/seq`` of the data out of the session and lets ONNX Runtime
run the reductions on its threads; the engine then only copies finished vectors.
"""

from __future__ import annotations

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import ATTENTION_MASK, GraphBuilder
from embedpool.modelspec import HeadSpec
from embedpool.types import Pooling


def apply_head(g: GraphBuilder, hidden: str, width: int, head: HeadSpec, out: str) -> int:
    """The head's nodes from token states ``hidden`` [batch, seq, width] to the graph output
    ``out``; returns the output's width."""
    modes = head.pooling.modes
    if len(modes) != 1 or modes[0] not in ("mean", "cls") or head.dense \
            or not head.pooling.include_prompt:
        raise ModelError(f"the graph head supports one mean or cls pooling and no Dense "
                         f"layers, got {head}")
    pool_and_normalize(g, hidden, modes[0], head.normalize, out)  # type: ignore[arg-type]
    return head.out_dim(width)


def pool_and_normalize(g: GraphBuilder, hidden: str, pooling: Pooling, normalize: bool,
                       out: str) -> None:
    """Pool ``hidden`` [batch, seq, hidden] over the attention mask (mean) or take the [CLS]
    row, then L2-normalise, into the graph output ``out``."""
    from onnx import TensorProto

    if pooling == "cls":
        pooled = g.op1("Gather", [hidden, g.const("pool.zero", 0, np.int64)], "pool.cls", axis=1)
    else:
        m = g.op1("Cast", [ATTENTION_MASK], "pool.mask_f", to=TensorProto.FLOAT)
        m3 = g.op1("Unsqueeze", [m, g.const("pool.axis2", [2], np.int64)], "pool.mask3")
        axis1 = g.const("pool.axis1", [1], np.int64)
        summed = g.op1("ReduceSum", [g.op1("Mul", [hidden, m3], "pool.masked"), axis1],
                       "pool.sum", keepdims=0)
        count = g.op1("ReduceSum", [m3, axis1], "pool.count", keepdims=0)
        count = g.op1("Max", [count, g.const("pool.min_count", 1e-9)], "pool.count_clip")
        pooled = g.op1("Div", [summed, count], "pool.mean")
    if not normalize:
        g.op("Identity", [pooled], out)
        return
    # opset 17: ReduceL2 takes its axes as an attribute (ReduceSum as an input).
    norm = g.op1("ReduceL2", [pooled], "pool.norm", axes=[-1], keepdims=1)
    norm = g.op1("Max", [norm, g.const("pool.min_norm", 1e-12)], "pool.norm_clip")
    g.op("Div", [pooled, norm], out)
