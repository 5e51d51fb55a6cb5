"""Encoder + head -> one ONNX model: the graph inputs, a family's encoder, the model's
sentence-transformers head, and the outputs, assembled the same way for every family.

    input_ids, attention_mask (int64 [batch, seq]) [, prompt_length (int64 [batch]): see head]
        └─ family.build_encoder(g, weights, cfg) ──> token states [batch, seq, width]
              └─ head.apply_head(HeadSpec) ──> sentence_embedding [batch, out_dim]
                 (or, without a head, last_hidden_state [batch, seq, width])
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from embedpool.graph.builder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    SENTENCE_EMBEDDING,
    Array,
    GraphBuilder,
)
from embedpool.graph.head import apply_head, head_inputs
from embedpool.modelspec import HeadSpec

if TYPE_CHECKING:
    import onnx


def compose(family: ModuleType, weights: Mapping[str, Array], cfg: Any, head: HeadSpec | None,
            *, fused: bool = True, int8_ready: bool = False, name: str = "model"
            ) -> onnx.ModelProto:
    """The model for these weights; ``head=None`` outputs the token states instead."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    enc = family.build_encoder(g, weights, cfg, fused=fused, int8_ready=int8_ready)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in (INPUT_IDS, ATTENTION_MASK, *enc.extra_inputs)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, shape)
               for n, shape in (head_inputs(head) if head is not None else [])]
    if head is not None:
        out_shape: list[str | int] = ["batch", apply_head(g, enc.hidden, enc.width, head,
                                                          SENTENCE_EMBEDDING)]
        out_name = SENTENCE_EMBEDDING
    else:
        out_name, out_shape = LAST_HIDDEN_STATE, ["batch", "seq", enc.width]
        g.op("Identity", [enc.hidden], out_name)
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)]
    return g.finish(name, inputs, outputs, producer_version=str(family.BUILDER_VERSION),
                    declare_float_outputs=int8_ready)
