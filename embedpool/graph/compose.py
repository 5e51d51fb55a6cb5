"""Encoder + head -> one ONNX model: the graph inputs, a family's encoder, the model's
sentence-transformers head, and the outputs, assembled the same way for every family.

    input_ids, attention_mask (int64 [batch, seq]) [, prompt_length (int64 [batch]): see head]
        └─ family.build_encoder(g, weights, cfg) ──> token states [batch, seq, width]
              └─ head.apply_head(HeadSpec) ──> sentence_embedding [batch, out_dim]
                 (or, without a head, last_hidden_state [batch, seq, width])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from embedpool.graph.builder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    SENTENCE_EMBEDDING,
    Array,
    GraphBuilder,
    Linear,
)
from embedpool.graph.head import apply_head, head_inputs
from embedpool.modelspec import HeadSpec

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Composed:
    """A composed model and what precision recipes need to know of it: the linears the
    builder recorded (int8 keys on their roles), the nodes after the encoder (head and
    output; fp16 keeps them float32) and the encoder's output tensor between the two."""

    model: onnx.ModelProto
    linears: list[Linear]
    head_nodes: list[str]
    hidden: str


def compose(family: ModuleType, weights: Mapping[str, Array], cfg: Any, head: HeadSpec | None,
            *, fused: bool = True, int8_ready: bool = False, name: str = "model"
            ) -> onnx.ModelProto:
    """The model for these weights; ``head=None`` outputs the token states instead."""
    return compose_parts(family, weights, cfg, head, fused=fused, int8_ready=int8_ready,
                         name=name).model


def compose_parts(family: ModuleType, weights: Mapping[str, Array], cfg: Any,
                  head: HeadSpec | None, *, fused: bool = True, int8_ready: bool = False,
                  name: str = "model") -> Composed:
    """``compose``, with what the precision recipes need (see ``Composed``)."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    enc = family.build_encoder(g, weights, cfg, fused=fused, int8_ready=int8_ready)
    encoder_nodes = len(g.nodes)
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
    head_nodes = [n.name for n in g.nodes[encoder_nodes:]]
    model = g.finish(name, inputs, outputs, producer_version=str(family.BUILDER_VERSION))
    return Composed(model, g.linears, head_nodes, enc.hidden)
