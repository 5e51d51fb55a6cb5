"""XLM-RoBERTa and RoBERTa encoders (multilingual-e5, paraphrase-multilingual-MiniLM, bge-m3's
dense output) from ``model.safetensors``.

The encoder layers are BERT's, key for key, and are emitted by ``bert``'s own layer functions
(fused: Attention or MultiHeadAttention, SkipLayerNormalization, BiasGelu; plain: standard
ops), so the two families cannot drift apart and the int8 recipe finds the same node names.
What differs is the embedding:

- **Positions** start at ``padding_idx + 1`` and skip pad tokens: transformers'
  ``create_position_ids_from_input_ids`` is ``cumsum(ids != pad) * (ids != pad) + pad``. The
  graph computes exactly that, also zeroing padded rows of the batch (``attention_mask``), so
  it does not matter which id the engine pads with (it pads with 0, which is ``<s>`` here), and
  a literal ``<pad>`` inside a text is skipped as transformers skips it.
- The **token-type table** has one row (``type_vocab_size`` 1); it is folded into the position
  table, exactly, as BERT's row 0 is.

Fused, the positions go into EmbedLayerNormalization's ``position_ids`` input; int8-ready, the
word table is stored as int8 rows (250k x 384 floats, 384 MB fp32, in multilingual-e5-small).

Fused against unfused, measured with ``benchmarks/families.py --families xlmr --variants
fp32,fp32-plain --lengths 256,2048 --repeat 2 --chunks 6 --long-chunks 1``
(multilingual-e5-small's shape, random weights, 1 thread, both graphs interleaved in one
process, chunks per CPU second; AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI; the machine was
shared, load 15-20 on 2 cores): 4.39 fused vs 4.29 unfused at 256 tokens, 1.74 vs 1.56 at
its max length of 512: the fused graph 2% and **11% faster**, as BERT's (bert.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import (
    ATTENTION_MASK,
    INPUT_IDS,
    MS_DOMAIN,
    Array,
    Encoder,
    GraphBuilder,
)
from embedpool.graph.families import bert
from embedpool.graph.families.layers import PaddingColumns, gather_rows, model_builder

NAME = "xlm-roberta"
#: Bump when the emitted graph changes for the same weights; part of every cache key.
BUILDER_VERSION = 3  # 2: the int8-ready graph attends through flash attention (bert); 3: its
# norms are Add + LayerNormalization (bert._dense_add_norm)
MODEL_TYPES = frozenset({"xlm-roberta", "roberta"})


@dataclass(frozen=True)
class RobertaConfig:
    """BERT's fields plus where positions start."""

    bert: bert.BertConfig
    padding_idx: int
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> RobertaConfig:
        model_type = str(config.get("model_type", ""))
        if model_type not in MODEL_TYPES:
            raise ModelError(f"{where}: model_type {model_type!r} is not XLM-RoBERTa/RoBERTa")
        for flag in ("is_decoder", "add_cross_attention"):
            if config.get(flag):
                raise ModelError(
                    f"{where}: {flag} is set: a {model_type} decoder attends "
                    "causally, and embedpool builds bidirectional encoders only"
                )
        try:
            padding_idx = int(config.get("pad_token_id", 1))
            max_pos = int(config.get("max_position_embeddings", 514))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: bad {model_type} field: {exc}") from exc
        # BERT's checks (sizes, hidden_act, position_embedding_type 'absolute') apply as is.
        return cls(
            bert.BertConfig.from_dict({**config, "model_type": "bert"}, where), padding_idx, max_pos
        )


def _required_keys(cfg: RobertaConfig) -> list[str]:
    keys = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(cfg.bert.num_layers):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "attention.output.LayerNorm",
            "output.LayerNorm",
        ):
            keys += [p + name + ".weight", p + name + ".bias"]
    return keys


def load_weights(path: Any, cfg: RobertaConfig) -> dict[str, Array]:
    """Float32 tensors of an (XLM-)RoBERTa checkpoint, keyed without any model prefix."""
    from embedpool.graph.weights import load_safetensors

    out = load_safetensors(path)
    missing = [k for k in _required_keys(cfg) if k not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{path}: not an XLM-RoBERTa/RoBERTa checkpoint matching its "
            f"config.json; missing {shown}"
        )
    rows = out["embeddings.position_embeddings.weight"].shape[0]
    if rows <= cfg.padding_idx:
        raise ModelError(
            f"{path}: {rows} position embeddings, but positions start at "
            f"pad_token_id + 1 = {cfg.padding_idx + 1}"
        )
    return out


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: RobertaConfig,
    *,
    fused: bool = True,
    int8_ready: bool = False,
) -> Encoder:
    """The encoder's nodes in ``g``; the flavours are BERT's (see bert.build_encoder)."""
    if int8_ready and not fused:
        raise ValueError("int8_ready applies to the fused graph only")
    pos_ids = _position_ids(g, cfg.padding_idx)
    mask: str | PaddingColumns
    if fused and not int8_ready:
        hidden, mask = _embeddings_fused(g, weights, cfg, pos_ids)
    else:
        hidden = _embeddings_gather(g, weights, cfg, pos_ids, int8=int8_ready)
        mask = bert.padding_columns(g, hidden, cfg.bert) if fused else bert._mask_bias_plain(g)
    for i in range(cfg.bert.num_layers):
        if fused:
            hidden = bert._layer_fused(g, weights, cfg.bert, i, hidden, mask)
        else:
            assert isinstance(mask, str)
            hidden = bert._layer_plain(g, weights, cfg.bert, i, hidden, mask)
    return Encoder(hidden, cfg.bert.hidden_size)


#: The whole model (the encoder + one pooling + normalisation), for tests and benchmarks.
build_model = model_builder(__name__, "xlmr")


# --- embeddings ----------------------------------------------------------------------------------


def _position_ids(g: GraphBuilder, pad: int) -> str:
    """int64 [batch, seq]: ``cumsum(m) * m + pad`` with ``m = (ids != pad) * attention_mask``."""
    from onnx import TensorProto

    is_pad = g.op1("Equal", [INPUT_IDS, g.const("pos.pad", pad, np.int64)], "pos.is_pad")
    real = g.op1("Cast", [g.op1("Not", [is_pad], "pos.not_pad")], "pos.real", to=TensorProto.INT64)
    m = g.op1("Mul", [real, ATTENTION_MASK], "pos.m")
    count = g.op1("CumSum", [m, g.const("pos.axis", 1, np.int64)], "pos.cumsum")
    return g.op1(
        "Add",
        [g.op1("Mul", [count, m], "pos.counted"), g.const("pos.start", pad, np.int64)],
        "pos.ids",
    )


def _position_table(w: Mapping[str, Array]) -> Array:
    """Positions with token-type row 0 folded in (both are added before the LayerNorm)."""
    pos = w["embeddings.position_embeddings.weight"]
    types = w.get("embeddings.token_type_embeddings.weight")
    return pos if types is None else pos + types[0]


def _mask_int32(g: GraphBuilder) -> str:
    from onnx import TensorProto

    return g.op1("Cast", [ATTENTION_MASK], "mask32", to=TensorProto.INT32)


def _embeddings_fused(
    g: GraphBuilder, w: Mapping[str, Array], cfg: RobertaConfig, pos_ids: str
) -> tuple[str, str]:
    from onnx import TensorProto

    ids32 = g.op1("Cast", [INPUT_IDS], "ids32", to=TensorProto.INT32)
    pos32 = g.op1("Cast", [pos_ids], "pos32", to=TensorProto.INT32)
    hidden, mask_index = g.op(
        "EmbedLayerNormalization",
        [
            ids32,
            "",
            g.const("emb.word", w["embeddings.word_embeddings.weight"]),
            g.const("emb.pos", _position_table(w)),
            "",
            g.const("emb.ln.w", w["embeddings.LayerNorm.weight"]),
            g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
            _mask_int32(g),
            pos32,
        ],
        "emb",
        outputs=2,
        domain=MS_DOMAIN,
        epsilon=cfg.bert.layer_norm_eps,
    )
    return hidden, mask_index


def _embeddings_gather(
    g: GraphBuilder, w: Mapping[str, Array], cfg: RobertaConfig, pos_ids: str, *, int8: bool
) -> str:
    word = gather_rows(g, w["embeddings.word_embeddings.weight"], INPUT_IDS, "emb.word", int8=int8)
    pos = g.op1("Gather", [g.const("emb.pos", _position_table(w)), pos_ids], "emb.pos_g")
    return g.op1(
        "LayerNormalization",
        [
            g.op1("Add", [word, pos], "emb.sum"),
            g.const("emb.ln.w", w["embeddings.LayerNorm.weight"]),
            g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
        ],
        "emb.ln",
        axis=-1,
        epsilon=cfg.bert.layer_norm_eps,
    )


# --- the family interface (see embedpool.graph.families) ------------------------------------

parse_config = RobertaConfig.from_dict
