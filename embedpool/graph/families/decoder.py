"""Pieces the decoder families (Qwen3, Qwen2/Llama/Mistral, Gemma3) share: RMSNorm (whole
width or per head), residual + RMSNorm, and self-attention with grouped K/V heads (GQA/MQA),
causal or bidirectional, with a ``head_dim`` apart from ``hidden / heads`` and any scale.
Rotary positions and gated MLPs are ``layers.rotary_consts`` / ``layers.rotate`` (which take
``heads`` and ``head_dim`` explicitly) and ``layers.gated_mlp`` (SwiGLU with ``act="silu"``;
``gelu_tanh`` here adds the tanh GELU of GeGLU).

Each piece has the two flavours of ``layers`` (see there): ``fused`` ONNX Runtime kernels
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention,
MultiHeadAttention), or the same maths in standard opset-17 ops (the reference and benchmark
baseline).

Conventions (as ``layers``): activations ``[batch, seq, width]``, right padding (what
``embedpool.engine`` feeds), positions ``arange(seq)`` for every row. Right padding is what
makes causal attention need no padding mask: a padded key sits after every real query of
its row, so the causal mask hides it already (a padded query's output is never pooled).
Left padding would shift a row's rotary positions, which cancels in q.k (RoPE scores depend
on ``i - j`` only), but embedpool never left-pads.

Attention plans (``plan_attention``; ``DecoderPlan.kind``):

``gqa``    causal, fused: ``GroupQueryAttention`` (kv heads as they are; rotary applied by
           the kernel from ``cos``/``sin`` caches when ``rotary`` is given). Its CPU kernel
           computes scores per head and block, so memory grows linearly with length
           (measured on this machine's EPYC, 1 thread, 16 q / 8 kv heads of 128: +119 MB
           at 2,048 tokens, +207 MB at 4,096, +407 MB at 8,192, inputs and outputs
           included; MultiHeadAttention with ``unidirectional=1`` took +1,391 MB and 3.9x
           the time at 4,096, ONNX's opset-23 ``Attention(is_causal)`` +1,256 MB).
``flash``  bidirectional, fused: MultiHeadAttention without a mask input (ORT's
           FlashAttention path, no [heads, seq, seq] tensor), K/V heads repeated to the q
           heads, padding masked by one extra q/k column (as ``layers.flash_attention``,
           with any scale).
``plain``  standard ops, K/V heads repeated, Softmax over [batch, heads, seq, seq] with the
           causal and padding biases: the unfused reference (quadratic memory).

Unused outputs. A fused node's optional outputs that nothing reads are left unnamed
(GroupQueryAttention's ``present_key`` / ``present_value``, SkipSimplifiedLayerNormalization's
mean and inverse deviation): ONNX Runtime keeps a named output that nothing reads in its arena
until the run ends, so every layer's K/V cache stayed resident. Measured at
Qwen3-Embedding-0.6B's shape (int8, one session, 1 thread; AMD EPYC Zen 3): activations held
after 2 x 256 tokens 185 -> 72 MiB, after 8 x 256 tokens 715 -> 281 MiB (360 -> 137 KB a
token); the session's peak RSS 698 -> 586 MiB and 1,229 -> 795 MiB.

Public API (kept stable; the Gemma3 family builds on it): ``rms_norm``, ``add_rms_norm``,
``head_rms_norm``, ``activation``, ``plan_attention``, ``DecoderPlan``, ``attention``,
``repeat_kv``, ``ATTENTION_KINDS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from embedpool.graph.builder import INPUT_IDS, MS_DOMAIN, Array, GraphBuilder
from embedpool.graph.families import layers

#: How a decoder graph computes attention (see the module docstring).
ATTENTION_KINDS = ("gqa", "flash", "plain")

#: Gated-MLP activations beyond ``layers``: the tanh approximation of GELU (Gemma's
#: ``gelu_pytorch_tanh``), ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
TANH_GELU = frozenset({"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"})


# --- norms ---------------------------------------------------------------------------------------


def rms_norm(g: GraphBuilder, x: str, weight: Array, eps: float, name: str, *, fused: bool) -> str:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last axis, in float32 (as
    Qwen3RMSNorm / LlamaRMSNorm compute it). Gemma's ``(1 + weight)``: pass ``weight + 1``."""
    w = g.const(f"{name}.w", weight)
    if fused:  # ORT registers it in the ONNX domain (a contrib op), opset 1
        return g.op1("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=eps)
    sq = g.op1("Mul", [x, x], f"{name}.sq")
    mean = g.op1("ReduceMean", [sq], f"{name}.ms", axes=[-1], keepdims=1)
    rms = g.op1(
        "Sqrt", [g.op1("Add", [mean, g.const(f"{name}.eps", eps)], f"{name}.mse")], f"{name}.rms"
    )
    return g.op1("Mul", [g.op1("Div", [x, rms], f"{name}.x_n"), w], name)


def add_rms_norm(
    g: GraphBuilder, x: str, residual: str, weight: Array, eps: float, name: str, *, fused: bool
) -> tuple[str, str]:
    """``(rms_norm(x + residual), x + residual)``: SkipSimplifiedLayerNormalization when
    fused (its fourth output is the sum, the residual stream of a pre-norm decoder).

    The int8 graphs keep it too, unlike the encoders' (``layers.add_norm``): the op is 2x
    slower than Add + SimplifiedLayerNormalization on ORT 1.32's CPU provider (0.78 against
    0.38 ms on [2, 256, 1024], 1 thread, AMD EPYC Zen 3), but at a decoder's width it is
    1.3% of the int8 graph's kernel time (Qwen3-0.6B's shape, 2 x 256 tokens; MiniLM's
    SkipLayerNormalization was 9.4%): a 0.7% gain, not worth rebuilding every cached graph."""
    if not fused:
        total = g.op1("Add", [x, residual], f"{name}.sum")
        return rms_norm(g, total, weight, eps, name, fused=False), total
    outs = g.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.const(f"{name}.w", weight)],
        name,
        outputs=4,
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    # its mean and inverse deviation (outputs 1, 2) left unnamed: "Unused outputs" above
    g.nodes[-1].output[1] = g.nodes[-1].output[2] = ""
    return outs[0], outs[3]


def head_rms_norm(
    g: GraphBuilder,
    x: str,
    weight: Array,
    eps: float,
    name: str,
    *,
    heads: int,
    head_dim: int,
    fused: bool,
) -> str:
    """RMSNorm of every head of ``x`` [batch, seq, heads * head_dim] over its ``head_dim``
    values, one ``weight`` [head_dim] shared by the heads (Qwen3's and Gemma3's q/k norms)."""
    x4 = g.op1(
        "Reshape",
        [x, g.shared_const(f"c.heads{heads}x{head_dim}", [0, 0, heads, head_dim], np.int64)],
        f"{name}.x4",
    )
    y = rms_norm(g, x4, weight, eps, f"{name}.n", fused=fused)
    return g.op1("Reshape", [y, g.shared_const("c.merge3", [0, 0, -1], np.int64)], name)


def activation(g: GraphBuilder, x: str, act: str, name: str, *, fused: bool) -> str:
    """The gate activation of a gated MLP: ``layers.activation``'s (SiLU, erf GELU) or the
    tanh GELU (TANH_GELU; FastGelu when fused)."""
    if act not in TANH_GELU:
        return layers.activation(g, x, act, name, fused=fused)
    if fused:
        return g.op1("FastGelu", [x], name, domain=MS_DOMAIN)
    cube = g.op1("Mul", [g.op1("Mul", [x, x], f"{name}.x2"), x], f"{name}.x3")
    inner = g.op1(
        "Add",
        [x, g.op1("Mul", [cube, g.shared_const("c.gelu_c", 0.044715)], f"{name}.cx3")],
        f"{name}.in",
    )
    t = g.op1(
        "Tanh",
        [g.op1("Mul", [inner, g.shared_const("c.gelu_s", math.sqrt(2 / math.pi))], f"{name}.arg")],
        f"{name}.tanh",
    )
    half_x = g.op1("Mul", [x, g.shared_const("c.half", 0.5)], f"{name}.half_x")
    return g.op1(
        "Mul", [half_x, g.op1("Add", [t, g.shared_const("c.one_f", 1.0)], f"{name}.t1")], name
    )


# --- attention -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderPlan:
    """What every attention of one graph shares: its kind, causality and per-graph tensors."""

    kind: str
    causal: bool
    seqlens_k: str = ""  # gqa: int32 [batch], seq - 1 for every row
    total_len: str = ""  # gqa: int32 scalar, seq
    cols: layers.PaddingColumns | None = None  # flash: the padding as an extra q/k column
    bias: str = ""  # plain: [batch, 1, seq, seq] (causal and padding) or [batch, 1, 1, seq]


def plan_attention(
    g: GraphBuilder,
    kind: str,
    *,
    causal: bool,
    heads: int,
    head_dim: int,
    scale: float | None = None,
) -> DecoderPlan:
    """The shared tensors of ``kind`` (ATTENTION_KINDS). ``gqa`` is causal only; a
    bidirectional graph's fused kind is ``flash``. ``scale`` defaults to 1/sqrt(head_dim)."""
    from onnx import TensorProto

    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    if kind == "gqa" and not causal:
        raise ValueError("GroupQueryAttention is causal only; use 'flash' for bidirectional")
    if kind == "flash" and causal:
        raise ValueError("'flash' is bidirectional; use 'gqa' for causal attention")
    s = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    shape = g.op1("Shape", [INPUT_IDS], "attn.ids_shape")
    if kind == "gqa":
        seq = g.op1(
            "Slice",
            [shape, g.shared_const("c.s1", [1], np.int64), g.shared_const("c.s2", [2], np.int64)],
            "attn.seq",
        )
        batch = g.op1(
            "Slice",
            [shape, g.shared_const("c.s0", [0], np.int64), g.shared_const("c.s1", [1], np.int64)],
            "attn.batch",
        )
        last = g.op1("Sub", [seq, g.shared_const("c.one_i1", [1], np.int64)], "attn.last")
        seqlens = g.op1(
            "Cast",
            [g.op1("Expand", [last, batch], "attn.lasts")],
            "attn.seqlens_k",
            to=TensorProto.INT32,
        )
        total = g.op1(
            "Cast",
            [g.op1("Squeeze", [seq, g.shared_const("c.axes0", [0], np.int64)], "attn.seq0")],
            "attn.total_len",
            to=TensorProto.INT32,
        )
        return DecoderPlan(kind, causal, seqlens_k=seqlens, total_len=total)
    if kind == "flash":
        cols = layers.padding_columns(g, INPUT_IDS, heads, head_dim, scale=s)
        return DecoderPlan(kind, causal, cols=cols)
    bias = layers.mask_bias_plain(g)  # [batch, 1, 1, seq]
    if causal:
        n = g.op1("Gather", [shape, g.shared_const("c.one_i", 1, np.int64)], "attn.n")
        pos = g.op1(
            "Range",
            [g.shared_const("c.zero_i", 0, np.int64), n, g.shared_const("c.one_i", 1, np.int64)],
            "attn.pos",
        )
        rows = g.op1("Unsqueeze", [pos, g.shared_const("c.axes1", [1], np.int64)], "attn.rows")
        future = g.op1("Greater", [pos, rows], "attn.future")  # [seq, seq]: key after query
        tri = g.op1(
            "Where",
            [future, g.shared_const("c.neg", layers.MASK_NEG), g.shared_const("c.zero_f", 0.0)],
            "attn.causal",
        )
        bias = g.op1("Add", [bias, tri], "attn.bias")
    return DecoderPlan(kind, causal, bias=bias)


def repeat_kv(
    g: GraphBuilder, x: str, name: str, *, kv_heads: int, groups: int, head_dim: int
) -> str:
    """[batch, seq, kv_heads * head_dim] -> [batch, seq, kv_heads * groups * head_dim], each
    K/V head repeated for the ``groups`` query heads that read it (transformers' repeat_kv:
    query head ``h`` reads kv head ``h // groups``)."""
    if groups == 1:
        return x
    x5 = g.op1(
        "Reshape",
        [
            x,
            g.shared_const(f"c.kv{kv_heads}x1x{head_dim}", [0, 0, kv_heads, 1, head_dim], np.int64),
        ],
        f"{name}.x5",
    )
    shape = g.op1(
        "Concat",
        [
            g.op1(
                "Slice",
                [
                    g.op1("Shape", [x], f"{name}.shape"),
                    g.shared_const("c.s0", [0], np.int64),
                    g.shared_const("c.s2", [2], np.int64),
                ],
                f"{name}.bs",
            ),
            g.shared_const(
                f"c.kv{kv_heads}x{groups}x{head_dim}", [kv_heads, groups, head_dim], np.int64
            ),
        ],
        f"{name}.rshape",
        axis=0,
    )
    wide = g.op1("Expand", [x5, shape], f"{name}.wide")
    return g.op1("Reshape", [wide, g.shared_const("c.merge3", [0, 0, -1], np.int64)], name)


def attention(
    g: GraphBuilder,
    plan: DecoderPlan,
    q: str,
    k: str,
    v: str,
    name: str,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float | None = None,
    rotary: layers.Rotary | None = None,
) -> str:
    """Self-attention of q [batch, seq, heads * head_dim] over k, v [batch, seq, kv_heads *
    head_dim] -> [batch, seq, heads * head_dim]. ``rotary`` (``gqa`` only, a fused
    ``layers.rotary_consts``): the kernel rotates q and k itself (half-split convention,
    positions ``arange(seq)``); other kinds take q and k already rotated."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    s = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if plan.kind == "gqa":
        inputs = [q, k, v, "", "", plan.seqlens_k, plan.total_len]
        attrs: dict[str, object] = {}
        if rotary is not None:
            inputs += [rotary.cos, rotary.sin]
            attrs = {"do_rotary": 1, "rotary_interleaved": 0}
        # output 0 only: see "Unused outputs" in the module docstring
        return g.op1(
            "GroupQueryAttention",
            inputs,
            name,
            domain=MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=s,
            **attrs,
        )
    if rotary is not None:
        raise ValueError("only the gqa kernel applies rotary itself; rotate q and k first")
    groups = heads // kv_heads
    k = repeat_kv(g, k, f"{name}.k_rep", kv_heads=kv_heads, groups=groups, head_dim=head_dim)
    v = repeat_kv(g, v, f"{name}.v_rep", kv_heads=kv_heads, groups=groups, head_dim=head_dim)
    split = g.shared_const(f"c.heads{heads}x{head_dim}", [0, 0, heads, head_dim], np.int64)
    merge = g.shared_const("c.merge3", [0, 0, -1], np.int64)
    if plan.kind == "flash":
        assert plan.cols is not None
        return layers.flash_attention(
            g, q, k, v, plan.cols, name, heads=heads, head_dim=head_dim, scale=s
        )

    def heads_first(x: str, tag: str, perm: list[int]) -> str:
        return g.op1(
            "Transpose",
            [g.op1("Reshape", [x, split], f"{name}.{tag}4")],
            f"{name}.{tag}t",
            perm=perm,
        )

    scores = g.op1(
        "MatMul",
        [heads_first(q, "q", [0, 2, 1, 3]), heads_first(k, "k", [0, 2, 3, 1])],
        f"{name}.qk",
    )
    scores = g.op1("Mul", [scores, g.const(f"{name}.scale", s)], f"{name}.scaled")
    scores = g.op1("Add", [scores, plan.bias], f"{name}.masked")
    probs = g.op1("Softmax", [scores], f"{name}.probs", axis=-1)
    ctx = g.op1("MatMul", [probs, heads_first(v, "v", [0, 2, 1, 3])], f"{name}.ctx")
    ctx = g.op1("Transpose", [ctx], f"{name}.ctxt", perm=[0, 2, 1, 3])
    return g.op1("Reshape", [ctx, merge], name)
