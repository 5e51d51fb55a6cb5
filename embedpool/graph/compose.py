"""Encoder + head -> one ONNX model: the graph inputs, a family's encoder, the model's
sentence-transformers head, and the outputs, assembled the same way for every family.

    input_ids, attention_mask (int64 [batch, seq]) [, prompt_length (int64 [batch]): see head]
        └─ family.build_encoder(g, weights, cfg) ──> token states [batch, seq, width]
              └─ head.apply_head(HeadSpec) ──> sentence_embedding [batch, out_dim]
                 (or, without a head, last_hidden_state [batch, seq, width];
                 for a cross-encoder, classifier.apply_classifier(ClassifierSpec) ──>
                 logits [batch, num_labels], with token_type_ids an input where the
                 tokenizer hands them to the model)
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
from embedpool.modelspec import ClassifierSpec, HeadSpec

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


def compose(
    family: ModuleType,
    weights: Mapping[str, Array],
    cfg: Any,
    head: HeadSpec | None,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    name: str = "model",
) -> onnx.ModelProto:
    """The model for these weights; ``head=None`` outputs the token states instead."""
    return compose_parts(
        family, weights, cfg, head, fused=fused, int8_ready=int8_ready, name=name
    ).model


def compose_parts(
    family: ModuleType,
    weights: Mapping[str, Array],
    cfg: Any,
    head: HeadSpec | ClassifierSpec | None,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    name: str = "model",
) -> Composed:
    """``compose``, with what the precision recipes need (see ``Composed``). A
    ``ClassifierSpec`` head makes a cross-encoder's graph (``logits`` out)."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    classifier = head if isinstance(head, ClassifierSpec) else None
    if classifier is not None and classifier.token_types:  # only BERT reads token types
        enc = family.build_encoder(
            g, weights, cfg, fused=fused, int8_ready=int8_ready, token_types=True
        )
    else:
        enc = family.build_encoder(g, weights, cfg, fused=fused, int8_ready=int8_ready)
    encoder_nodes = len(g.nodes)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
        for n in (INPUT_IDS, ATTENTION_MASK, *enc.extra_inputs)
    ]
    out_shape: list[str | int]
    if classifier is not None:
        from embedpool.graph.classifier import LOGITS, apply_classifier

        width = apply_classifier(
            g,
            enc.hidden,
            enc.width,
            classifier,
            weights,
            norm_eps=float(getattr(cfg, "norm_eps", 1e-5)),
        )
        out_name, out_shape = LOGITS, ["batch", width]
    elif isinstance(head, HeadSpec):
        inputs += [
            helper.make_tensor_value_info(n, TensorProto.INT64, shape)
            for n, shape in head_inputs(head)
        ]
        out_shape = ["batch", apply_head(g, enc.hidden, enc.width, head, SENTENCE_EMBEDDING)]
        out_name = SENTENCE_EMBEDDING
    else:
        out_name, out_shape = LAST_HIDDEN_STATE, ["batch", "seq", enc.width]
        g.op("Identity", [enc.hidden], out_name)
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)]
    head_nodes = [n.name for n in g.nodes[encoder_nodes:]]
    model = g.finish(name, inputs, outputs, producer_version=str(family.BUILDER_VERSION))
    return Composed(model, g.linears, head_nodes, enc.hidden)
