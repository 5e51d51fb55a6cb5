"""Build an ONNX graph for a BERT-family encoder straight from ``model.safetensors``.

No PyTorch and no exporter: the weights are read with ``safetensors.numpy`` and the graph is
written node by node with ``onnx.helper``. Two flavours come out of the same weights:

``fused=True`` (what embedpool runs)
    ONNX Runtime's transformer kernels from the ``com.microsoft`` domain, emitted directly
    rather than hoping a pattern matcher recognises our subgraphs::

        input_ids, attention_mask (int64) --Cast int32--> EmbedLayerNormalization
            -> hidden, mask_index (per-row token counts)
        per layer:  Attention(hidden, W_qkv, b_qkv, mask_index)      one packed QKV GEMM
                    MatMul W_o -> SkipLayerNormalization(+hidden, +b_o)
                    MatMul W_1 -> BiasGelu(+b_1) | FastGelu            erf or tanh GELU
                    MatMul W_2 -> SkipLayerNormalization(+hidden, +b_2)
        pooling:    mean over the mask, or the [CLS] row, then L2 normalisation

    ``mask_index`` is the 1-D "right padding" form of the mask, valid because
    embedpool.engine always pads on the right. ``token_type_ids`` is not an input:
    sentence embedding always uses segment 0, so row 0 of the token-type table is folded
    into the position table (exact: both are added before the embedding LayerNorm).

``fused=True, int8_ready=True`` (what the int8 recipe quantises)
    The fused graph with three changes. Attention's packed QKV projection becomes three
    linears (``GraphBuilder.linear``, roles q/k/v: the int8 recipe quantises linears, and
    Attention's packed weight is none) feeding MultiHeadAttention, which adds the biases,
    with the padding mask as flash attention's extra q/k column (``layers.flash_attention``:
    no mask input, so ONNX Runtime's CPU kernel takes its FlashAttention path). The
    word-embedding table (47 of MiniLM's 90 MB) is stored as int8 rows, each with its own
    scale, and dequantised after the Gather, with EmbedLayerNormalization's maths in plain
    ops. Each SkipLayerNormalization becomes Add, Add, LayerNormalization (``_dense_add_norm``:
    4x faster on ONNX Runtime's CPU provider). Against the fused fp32 graph, before
    quantising: cos >= 0.99993 (mean 0.99998).

``fused=False`` (reference and benchmark baseline)
    The same maths in standard ONNX ops (opset 17: Gather, MatMul, Softmax,
    LayerNormalization, Erf GELU), with ``token_type_ids`` as an optional input. It passes
    ``onnx.checker`` with full type inference and is what a pattern-matching optimiser would
    have to recognise.

With ``pool=True`` (the default) the graph ends in pooling + L2 normalisation and outputs
``sentence_embedding`` [batch, hidden]; this ships 1/seq of the data out of the session
and lets ORT do the reduction in its threads. With ``pool=False`` it outputs
``last_hidden_state`` [batch, seq, hidden] and the engine pools in numpy.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import (
    ATTENTION_MASK,
    GELU_FLOOR,
    INPUT_IDS,
    MS_DOMAIN,
    TOKEN_TYPE_IDS,
    Array,
    Encoder,
    GraphBuilder,
    LinearRole,
    linear_t,
)
from embedpool.graph.families import layers
from embedpool.graph.weights import HasShape, check_shapes
from embedpool.types import Pooling

if TYPE_CHECKING:
    import onnx

#: Bump when the emitted graph changes for the same weights; part of every cache key.
BUILDER_VERSION = 5  # 4: the int8-ready graph attends through flash attention; 5: and
# normalises with Add + LayerNormalization (_dense_add_norm)
#: config.json ``model_type`` values this family builds.
MODEL_TYPES = frozenset({"bert", "BertModel"})
#: Erf GELU (BERT's "gelu") and the tanh approximation ("gelu_new" and friends).
_ERF_GELU = frozenset({"gelu"})
_TANH_GELU = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})
#: Masked-out score bias of the unfused graph: large enough to zero a softmax weight in
#: fp32 and small enough not to overflow when added to a score (HF uses dtype min).
_MASK_NEG = -1e9


@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` the builder needs, validated."""

    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_act: str
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> BertConfig:
        model_type = str(config.get("model_type", ""))
        if model_type not in MODEL_TYPES:
            raise ModelError(
                f"{where}: model_type {model_type!r} is not a BERT-family encoder; "
                "embedpool builds ONNX graphs for 'bert' models only. Export an "
                "ONNX file to onnx/model.onnx and pass that directory instead."
            )
        try:
            cfg = cls(
                hidden_size=int(config["hidden_size"]),
                num_heads=int(config["num_attention_heads"]),
                num_layers=int(config["num_hidden_layers"]),
                intermediate_size=int(config["intermediate_size"]),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=str(config.get("hidden_act", "gelu")),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: missing or bad BERT field: {exc}") from exc
        for flag in ("is_decoder", "add_cross_attention"):
            if config.get(flag):
                raise ModelError(
                    f"{where}: {flag} is set: a {model_type} decoder attends "
                    "causally, and embedpool builds bidirectional encoders only"
                )
        pos_type = config.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ModelError(
                f"{where}: position_embedding_type {pos_type!r} is not supported (only 'absolute')"
            )
        if cfg.hidden_act not in _ERF_GELU | _TANH_GELU:
            raise ModelError(
                f"{where}: hidden_act {cfg.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(_ERF_GELU | _TANH_GELU))})"
            )
        if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
            raise ModelError(
                f"{where}: hidden_size {cfg.hidden_size} is not divisible by "
                f"num_attention_heads {cfg.num_heads}"
            )
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def check_weights(weights: Mapping[str, HasShape], cfg: BertConfig, where: str) -> None:
    """Raise a ModelError naming what is missing or mis-shaped if ``weights`` (arrays, or
    ``weights.tensor_infos`` from the headers alone) do not fit ``cfg``."""
    missing = [k for k in _required_keys(cfg) if k not in weights]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{where}: not a BERT checkpoint matching its config.json; missing {shown}"
        )
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if max(layers, default=-1) + 1 != cfg.num_layers:
        raise ModelError(
            f"{where}: the weights have {max(layers) + 1} layers, config.json says "
            f"num_hidden_layers={cfg.num_layers}: the config belongs to another "
            "model"
        )
    h, inter = cfg.hidden_size, cfg.intermediate_size
    vocab = weights["embeddings.word_embeddings.weight"].shape[0]
    expected: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name, shape in (
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("intermediate.dense", (inter, h)),
            ("output.dense", (h, inter)),
        ):
            expected[p + name + ".weight"] = shape
            expected[p + name + ".bias"] = shape[:1]
    check_shapes(weights, expected, where)


def load_weights(path: Any, cfg: BertConfig) -> dict[str, Array]:
    """Float32 tensors of a BERT checkpoint, keyed without any model prefix."""
    from embedpool.graph.weights import load_safetensors

    out = load_safetensors(path)
    check_weights(out, cfg, str(path))
    return out


def _required_keys(cfg: BertConfig) -> list[str]:
    keys = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(cfg.num_layers):
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


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: BertConfig,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    token_types: bool = False,
) -> Encoder:
    """The encoder's nodes in ``g``: token states ``[batch, seq, hidden]`` from the
    ``input_ids`` / ``attention_mask`` graph inputs (see the module docstring for the
    flavours). ``int8_ready`` (fused only) is the graph the int8 recipe quantises: Q/K/V as
    plain MatMuls into MultiHeadAttention, and an int8 word-embedding table.
    ``token_types``: the fused graphs take ``token_type_ids`` too and add each token's row
    of the token-type table (a cross-encoder's pair: the document is segment 1), instead of
    folding row 0 into the positions."""
    if int8_ready and not fused:
        raise ValueError("int8_ready applies to the fused graph only")
    if fused:
        mask: str | layers.PaddingColumns
        if int8_ready:
            hidden = _embeddings_int8(g, weights, cfg, token_types)
            mask = padding_columns(g, hidden, cfg)
        else:
            hidden, mask = _embeddings_fused(g, weights, cfg, token_types)
        for i in range(cfg.num_layers):
            hidden = _layer_fused(g, weights, cfg, i, hidden, mask)
        return Encoder(
            hidden, cfg.hidden_size, extra_inputs=(TOKEN_TYPE_IDS,) if token_types else ()
        )
    hidden = _embeddings_plain(g, weights, cfg)
    mask_bias = _mask_bias_plain(g)
    for i in range(cfg.num_layers):
        hidden = _layer_plain(g, weights, cfg, i, hidden, mask_bias)
    return Encoder(hidden, cfg.hidden_size, extra_inputs=(TOKEN_TYPE_IDS,))


def build_bert(
    weights: Mapping[str, Array],
    cfg: BertConfig,
    *,
    pooling: Pooling,
    fused: bool = True,
    pool: bool = True,
    normalize: bool = True,
    int8_ready: bool = False,
    name: str = "bert",
) -> onnx.ModelProto:
    """The whole model (encoder + single-mode pooling head), for tests and benchmarks."""
    from embedpool.graph.compose import compose
    from embedpool.modelspec import HeadSpec, PoolingSpec

    head = HeadSpec(PoolingSpec((pooling,)), normalize=normalize) if pool else None
    return compose(
        sys.modules[__name__], weights, cfg, head, fused=fused, int8_ready=int8_ready, name=name
    )


# --- fused (com.microsoft) -------------------------------------------------------------------


def _positions_with_segment0(w: Mapping[str, Array]) -> Array:
    """The position table with token-type row 0 added: sentence embedding always uses
    segment 0, and both tables are added before the embedding LayerNorm, so this is exact."""
    pos = w["embeddings.position_embeddings.weight"]
    type_table = w.get("embeddings.token_type_embeddings.weight")
    return pos if type_table is None else pos + type_table[0]


def _token_type_table(w: Mapping[str, Array]) -> Array:
    table = w.get("embeddings.token_type_embeddings.weight")
    if table is None:
        raise ModelError(
            "the checkpoint has no embeddings.token_type_embeddings.weight, "
            "but its tokenizer hands the model token_type_ids"
        )
    return table


def _embeddings_fused(
    g: GraphBuilder, w: Mapping[str, Array], cfg: BertConfig, token_types: bool = False
) -> tuple[str, str]:
    from onnx import TensorProto

    ids32 = g.op1("Cast", [INPUT_IDS], "ids32", to=TensorProto.INT32)
    mask32 = g.op1("Cast", [ATTENTION_MASK], "mask32", to=TensorProto.INT32)
    if token_types:
        pos = w["embeddings.position_embeddings.weight"]
        seg = g.op1("Cast", [TOKEN_TYPE_IDS], "types32", to=TensorProto.INT32)
        seg_table = g.const("emb.type", _token_type_table(w))
    else:
        pos, seg, seg_table = _positions_with_segment0(w), "", ""
    hidden, mask_index = g.op(
        "EmbedLayerNormalization",
        [
            ids32,
            seg,
            g.const("emb.word", w["embeddings.word_embeddings.weight"]),
            g.const("emb.pos", pos),
            seg_table,
            g.const("emb.ln.w", w["embeddings.LayerNorm.weight"]),
            g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
            mask32,
        ],
        "emb",
        outputs=2,
        domain=MS_DOMAIN,
        epsilon=cfg.layer_norm_eps,
    )
    return hidden, mask_index


def _embeddings_int8(
    g: GraphBuilder, w: Mapping[str, Array], cfg: BertConfig, token_types: bool = False
) -> str:
    """EmbedLayerNormalization's maths with the word table stored as int8 rows, each with
    its own fp32 scale (symmetric, row max / 127): the table is most of a small model's
    weights (47 of 90 MB on MiniLM) and only a few of its rows are read per batch."""
    from onnx import TensorProto

    table = w["embeddings.word_embeddings.weight"]
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    rows = g.op1("Gather", [g.const("emb.word.q", q, np.int8), INPUT_IDS], "emb.word_g")
    scales = g.op1("Gather", [g.const("emb.word.scale", scale), INPUT_IDS], "emb.word_s")
    word = g.op1(
        "Mul", [g.op1("Cast", [rows], "emb.word_f", to=TensorProto.FLOAT), scales], "emb.word"
    )
    pos_table = (
        w["embeddings.position_embeddings.weight"] if token_types else _positions_with_segment0(w)
    )
    seq = g.op1(
        "Unsqueeze",
        [
            g.op1(
                "Gather",
                [g.op1("Shape", [INPUT_IDS], "emb.shape"), g.const("c.one_i", 1, np.int64)],
                "emb.seq",
            ),
            g.const("c.axis0", [0], np.int64),
        ],
        "emb.seq1",
    )
    pos = g.op1(
        "Slice",
        [g.const("emb.pos", pos_table), g.const("c.zero1", [0], np.int64), seq],
        "emb.pos_s",
    )
    x = g.op1("Add", [word, pos], "emb.sum")
    if token_types:
        typ = g.op1(
            "Gather", [g.const("emb.type", _token_type_table(w)), TOKEN_TYPE_IDS], "emb.type_g"
        )
        x = g.op1("Add", [x, typ], "emb.sum_types")
    hidden = g.op1(
        "LayerNormalization",
        [
            x,
            g.const("emb.ln.w", w["embeddings.LayerNorm.weight"]),
            g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
        ],
        "emb.ln",
        axis=-1,
        epsilon=cfg.layer_norm_eps,
    )
    return hidden


def padding_columns(g: GraphBuilder, x: str, cfg: BertConfig) -> layers.PaddingColumns:
    """The int8-ready graph's padding mask, as flash attention's extra q/k column."""
    return layers.padding_columns(g, x, cfg.num_heads, cfg.hidden_size // cfg.num_heads)


def _layer_fused(
    g: GraphBuilder,
    w: Mapping[str, Array],
    cfg: BertConfig,
    i: int,
    x: str,
    mask: str | layers.PaddingColumns,
) -> str:
    """One encoder layer of the fused graph. ``mask``: Attention's ``mask_index``, or (the
    int8-ready graph) the padding columns of flash attention: its Q/K/V are three quantisable
    MatMuls into MultiHeadAttention (which adds the biases) without a mask input: ONNX
    Runtime's FlashAttention path on the CPU. Against the masked kernel (MiniLM int8, batches
    of 8 stdlib chunks, 1 thread, ORT 1.32, AMD EPYC Zen 3; median of 10 paired rounds):
    1.067x the whole graph's speed at 256 tokens, 1.056x at 128; attention's share of the
    kernel time (ORT's profiler) fell from 24% to 18.5%. The vectors stay within the int8
    bounds (cos to fp32 0.99787 / 0.99652 on 300 chunks, against 0.99788 / 0.99657)."""
    p, n = f"encoder.layer.{i}.", f"l{i}"
    qkv_b = np.concatenate([w[p + f"attention.self.{k}.bias"] for k in ("query", "key", "value")])
    if isinstance(mask, layers.PaddingColumns):
        q, k, v = (
            g.linear(x, linear_t(w, p + f"attention.self.{key}"), f"{n}.{t}", role=t, layer=i)  # type: ignore[arg-type]
            for t, key in (("q", "query"), ("k", "key"), ("v", "value"))
        )
        head_dim = cfg.hidden_size // cfg.num_heads
        attn = layers.flash_attention(
            g, q, k, v, mask, f"{n}.attn", heads=cfg.num_heads, head_dim=head_dim, bias=qkv_b
        )
    else:
        qkv_w = np.concatenate(
            [linear_t(w, p + f"attention.self.{k}") for k in ("query", "key", "value")], axis=1
        )
        attn = g.op1(
            "Attention",
            [x, g.const(f"{n}.qkv.w", qkv_w), g.const(f"{n}.qkv.b", qkv_b), mask],
            f"{n}.attn",
            domain=MS_DOMAIN,
            num_heads=cfg.num_heads,
        )
    proj = g.linear(
        attn, linear_t(w, p + "attention.output.dense"), f"{n}.o", role="attn_out", layer=i
    )
    int8_ready = isinstance(mask, layers.PaddingColumns)
    x = _dense_add_norm(
        g, w, cfg, proj, x, p + "attention.output", f"{n}.ln1", f"{n}.o.b", int8_ready=int8_ready
    )
    up = g.linear(x, linear_t(w, p + "intermediate.dense"), f"{n}.ff1", role="ffn_up", layer=i)
    gelu_op = "BiasGelu" if cfg.hidden_act in _ERF_GELU else "FastGelu"
    act = g.op1(
        gelu_op,
        [up, g.const(f"{n}.ff1.b", w[p + "intermediate.dense.bias"])],
        f"{n}.gelu",
        domain=MS_DOMAIN,
    )
    down = g.linear(
        act, linear_t(w, p + "output.dense"), f"{n}.ff2", role="ffn_down", layer=i, floor=GELU_FLOOR
    )
    return _dense_add_norm(
        g, w, cfg, down, x, p + "output", f"{n}.ln2", f"{n}.ff2.b", int8_ready=int8_ready
    )


def _dense_add_norm(
    g: GraphBuilder,
    w: Mapping[str, Array],
    cfg: BertConfig,
    x: str,
    residual: str,
    prefix: str,
    name: str,
    bias_name: str,
    *,
    int8_ready: bool,
) -> str:
    """``LayerNorm(x + dense bias + residual)``. The fused fp32 graph (also the fp16 GPU
    graph's source: one kernel there): one SkipLayerNormalization. The int8-ready (CPU)
    graph: Add the bias, then ``layers.add_norm``'s int8-ready Add and LayerNormalization
    (why, there): the int8 graph's kernel time falls by about 6% (SkipLayerNormalization was
    9.4% of it; the Adds and norms 3.5%)."""
    bias = w[prefix + ".dense.bias"]
    ln_w, ln_b = w[prefix + ".LayerNorm.weight"], w[prefix + ".LayerNorm.bias"]
    if int8_ready:
        biased = g.op1("Add", [x, g.const(bias_name, bias)], f"{name}.biased")
        eps = cfg.layer_norm_eps
        return layers.add_norm(
            g, biased, residual, ln_w, ln_b, eps, name, fused=True, int8_ready=True
        )[0]
    norm = [g.const(f"{name}.w", ln_w), g.const(f"{name}.b", ln_b)]
    return g.op1(
        "SkipLayerNormalization",
        [x, residual, *norm, g.const(bias_name, bias)],
        name,
        domain=MS_DOMAIN,
        epsilon=cfg.layer_norm_eps,
    )


# --- plain (standard ONNX) -------------------------------------------------------------------


def _embeddings_plain(g: GraphBuilder, w: Mapping[str, Array], cfg: BertConfig) -> str:
    word = g.op1(
        "Gather",
        [g.const("emb.word", w["embeddings.word_embeddings.weight"]), INPUT_IDS],
        "emb.word_g",
    )
    shape = g.op1("Shape", [INPUT_IDS], "emb.shape")
    seq = g.op1("Gather", [shape, g.const("c.one_i", 1, np.int64)], "emb.seq")
    pos_ids = g.op1(
        "Range",
        [g.const("c.zero_i", 0, np.int64), seq, g.const("c.one_i_step", 1, np.int64)],
        "emb.pos_ids",
    )
    pos = g.op1(
        "Gather",
        [g.const("emb.pos", w["embeddings.position_embeddings.weight"]), pos_ids],
        "emb.pos_g",
    )
    x = g.op1("Add", [word, pos], "emb.word_pos")
    type_table = w.get("embeddings.token_type_embeddings.weight")
    if type_table is not None:
        typ = g.op1("Gather", [g.const("emb.type", type_table), TOKEN_TYPE_IDS], "emb.type_g")
        x = g.op1("Add", [x, typ], "emb.sum")
    return g.op1(
        "LayerNormalization",
        [
            x,
            g.const("emb.ln.w", w["embeddings.LayerNorm.weight"]),
            g.const("emb.ln.b", w["embeddings.LayerNorm.bias"]),
        ],
        "emb.ln",
        axis=-1,
        epsilon=cfg.layer_norm_eps,
    )


def _mask_bias_plain(g: GraphBuilder) -> str:
    """[batch, 1, 1, seq]: 0 where attended, a large negative number at padding."""
    from onnx import TensorProto

    m = g.op1("Cast", [ATTENTION_MASK], "mask.f", to=TensorProto.FLOAT)
    inv = g.op1("Sub", [g.const("c.one_f", 1.0), m], "mask.inv")
    bias = g.op1("Mul", [inv, g.const("c.neg", _MASK_NEG)], "mask.neg")
    return g.op1("Unsqueeze", [bias, g.const("c.axes12", [1, 2], np.int64)], "mask.bias")


def _layer_plain(
    g: GraphBuilder, w: Mapping[str, Array], cfg: BertConfig, i: int, x: str, mask_bias: str
) -> str:
    p, n = f"encoder.layer.{i}.", f"l{i}"
    split_shape = g.const(f"{n}.split_shape", [0, 0, cfg.num_heads, cfg.head_dim], np.int64)

    def dense(inp: str, key: str, tag: str, role: LinearRole, floor: float | None = None) -> str:
        mm = g.linear(inp, linear_t(w, p + key), f"{n}.{tag}", role=role, layer=i, floor=floor)
        return g.op1("Add", [mm, g.const(f"{n}.{tag}.b", w[p + key + ".bias"])], f"{n}.{tag}.add")

    def heads(inp: str, tag: str, perm: list[int]) -> str:
        r = g.op1("Reshape", [inp, split_shape], f"{n}.{tag}.split")
        return g.op1("Transpose", [r], f"{n}.{tag}.t", perm=perm)

    q = heads(dense(x, "attention.self.query", "q", "q"), "q", [0, 2, 1, 3])
    k = heads(dense(x, "attention.self.key", "k", "k"), "k", [0, 2, 3, 1])
    v = heads(dense(x, "attention.self.value", "v", "v"), "v", [0, 2, 1, 3])
    scores = g.op1("MatMul", [q, k], f"{n}.qk")
    scaled = g.op1(
        "Mul", [scores, g.const(f"{n}.scale", 1.0 / math.sqrt(cfg.head_dim))], f"{n}.scaled"
    )
    probs = g.op1(
        "Softmax", [g.op1("Add", [scaled, mask_bias], f"{n}.masked")], f"{n}.probs", axis=-1
    )
    ctx = g.op1(
        "Transpose", [g.op1("MatMul", [probs, v], f"{n}.ctx")], f"{n}.ctx.t", perm=[0, 2, 1, 3]
    )
    ctx = g.op1(
        "Reshape",
        [ctx, g.const(f"{n}.merge_shape", [0, 0, cfg.hidden_size], np.int64)],
        f"{n}.ctx.merge",
    )
    attn = dense(ctx, "attention.output.dense", "o", "attn_out")
    x = _layer_norm_plain(
        g,
        w,
        cfg,
        g.op1("Add", [attn, x], f"{n}.res1"),
        p + "attention.output.LayerNorm",
        f"{n}.ln1",
    )
    up = dense(x, "intermediate.dense", "ff1", "ffn_up")
    act = _gelu_plain(g, up, cfg.hidden_act, f"{n}.gelu")
    down = dense(act, "output.dense", "ff2", "ffn_down", GELU_FLOOR)
    return _layer_norm_plain(
        g, w, cfg, g.op1("Add", [down, x], f"{n}.res2"), p + "output.LayerNorm", f"{n}.ln2"
    )


def _layer_norm_plain(
    g: GraphBuilder, w: Mapping[str, Array], cfg: BertConfig, x: str, key: str, n: str
) -> str:
    return g.op1(
        "LayerNormalization",
        [x, g.const(f"{n}.w", w[key + ".weight"]), g.const(f"{n}.b", w[key + ".bias"])],
        n,
        axis=-1,
        epsilon=cfg.layer_norm_eps,
    )


def _gelu_plain(g: GraphBuilder, x: str, act: str, n: str) -> str:
    if act in _ERF_GELU:  # 0.5 x (1 + erf(x / sqrt 2))
        erf = g.op1(
            "Erf",
            [g.op1("Mul", [x, g.const(f"{n}.rsqrt2", 1 / math.sqrt(2))], f"{n}.div")],
            f"{n}.erf",
        )
        inner = g.op1("Add", [erf, g.const(f"{n}.one", 1.0)], f"{n}.add1")
    else:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op1("Mul", [g.op1("Mul", [x, x], f"{n}.sq"), x], f"{n}.cube")
        poly = g.op1(
            "Add", [x, g.op1("Mul", [cube, g.const(f"{n}.c", 0.044715)], f"{n}.cc")], f"{n}.poly"
        )
        tanh = g.op1(
            "Tanh",
            [g.op1("Mul", [poly, g.const(f"{n}.k", math.sqrt(2 / math.pi))], f"{n}.scaled")],
            f"{n}.tanh",
        )
        inner = g.op1("Add", [tanh, g.const(f"{n}.one", 1.0)], f"{n}.add1")
    half = g.op1("Mul", [x, g.const(f"{n}.half", 0.5)], f"{n}.half_x")
    return g.op1("Mul", [half, inner], f"{n}.out")


# --- the family interface (see embedpool.graph.families) ------------------------------------

NAME = "bert"
parse_config = BertConfig.from_dict
