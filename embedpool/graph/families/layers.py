"""Transformer pieces the XLM-RoBERTa, NomicBert and ModernBERT builders share, each emitted in
the two flavours every family has:

``fused=True``
    ONNX Runtime's com.microsoft kernels where one exists for the piece:
    RotaryEmbedding, MultiHeadAttention (scores, mask, softmax and context in one kernel),
    QuickGelu (alpha 1 is SiLU) and Gelu for the gated MLPs, SkipLayerNormalization for
    residual + norm.
``fused=False``
    The same maths in standard opset-17 ops (the reference a pattern matcher would have to
    recognise, and the benchmark baseline).

Conventions: activations are ``[batch, seq, hidden]``; sequences are right-padded (what
``embedpool.engine`` feeds), so every position id is ``arange(seq)`` and the padding mask only
has to hide padded *keys*. Every linear goes through ``GraphBuilder.linear`` with its role
(q, k, v, attn_out, ffn_up, ffn_gate, ffn_down), the names the int8 recipe keys on.

Also what every family module would otherwise repeat: the checked ``layer_types`` list of a
config, and the ``build_model`` of each family module (``model_builder``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import ATTENTION_MASK, MS_DOMAIN, Array, GraphBuilder, LinearRole
from embedpool.types import Pooling

if TYPE_CHECKING:
    import onnx

#: Masked-out score bias of the plain graphs: zeroes a softmax weight in fp32 and cannot
#: overflow when added to a score (HF uses dtype min, which two masks added would overflow).
MASK_NEG = -1e9

#: Gated-MLP activations (the function of the gate branch), by the config names they have.
SILU = frozenset({"silu", "swish", "swiglu"})
ERF_GELU = frozenset({"gelu", "geglu"})


# --- masks -------------------------------------------------------------------------------------


def mask_int32(g: GraphBuilder) -> str:
    """The 2-D padding mask as MultiHeadAttention's ``key_padding_mask`` (int32, 1 = token)."""
    from onnx import TensorProto

    return g.op1("Cast", [ATTENTION_MASK], "mask32", to=TensorProto.INT32)


def mask_bias_plain(g: GraphBuilder) -> str:
    """[batch, 1, 1, seq]: 0 where attended, MASK_NEG at padding (plain graphs)."""
    from onnx import TensorProto

    m = g.op1("Cast", [ATTENTION_MASK], "mask.f", to=TensorProto.FLOAT)
    inv = g.op1("Sub", [g.shared_const("c.one_f", 1.0), m], "mask.inv")
    bias = g.op1("Mul", [inv, g.shared_const("c.neg", MASK_NEG)], "mask.neg")
    return g.op1("Unsqueeze", [bias, g.shared_const("c.axes12", [1, 2], np.int64)], "mask.bias")


def seq_len(g: GraphBuilder, x: str, axis: int = 1) -> str:
    """Dimension ``axis`` of ``x`` as a 1-element int64 tensor."""
    shape = g.op1("Shape", [x], f"{x}.shape")
    return g.op1(
        "Slice",
        [
            shape,
            g.shared_const(f"c.ax{axis}", [axis], np.int64),
            g.shared_const(f"c.ax{axis}_end", [axis + 1], np.int64),
        ],
        f"{x}.len{axis}",
    )


def window_bias(g: GraphBuilder, x: str, half: int, name: str) -> str:
    """[1, 1, seq, seq] additive bias: 0 where ``|i - j| <= half`` (a bidirectional sliding
    window, as transformers' ``sliding_window_bidirectional_overlay``), MASK_NEG elsewhere."""
    n = g.op1("Squeeze", [seq_len(g, x), g.shared_const("c.axes0", [0], np.int64)], f"{name}.n")
    pos = g.op1(
        "Range",
        [g.shared_const("c.zero_i", 0, np.int64), n, g.shared_const("c.one_i", 1, np.int64)],
        f"{name}.pos",
    )
    rows = g.op1("Unsqueeze", [pos, g.shared_const("c.axes1", [1], np.int64)], f"{name}.rows")
    cols = g.op1("Unsqueeze", [pos, g.shared_const("c.axes0b", [0], np.int64)], f"{name}.cols")
    dist = g.op1("Abs", [g.op1("Sub", [rows, cols], f"{name}.diff")], f"{name}.dist")
    outside = g.op1("Greater", [dist, g.const(f"{name}.half", half, np.int64)], f"{name}.out")
    bias = g.op1(
        "Where",
        [outside, g.shared_const("c.neg", MASK_NEG), g.shared_const("c.zero_f", 0.0)],
        f"{name}.bias2",
    )
    return g.op1("Unsqueeze", [bias, g.shared_const("c.axes01", [0, 1], np.int64)], name)


# --- embeddings ----------------------------------------------------------------------------------


def gather_rows(g: GraphBuilder, table: Array, ids: str, name: str, *, int8: bool) -> str:
    """``table[ids]``. With ``int8`` the table is stored as int8 rows, each with its own fp32
    scale (symmetric, row max / 127), dequantised after the Gather: the word table is a large
    share of an encoder's weights (250k x 384 floats, 384 MB, for multilingual-e5-small) and a
    batch reads only a few of its rows."""
    from onnx import TensorProto

    if not int8:
        return g.op1("Gather", [g.const(f"{name}.table", table), ids], name)
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    rows = g.op1("Gather", [g.const(f"{name}.q", q, np.int8), ids], f"{name}_g")
    scales = g.op1("Gather", [g.const(f"{name}.scale", scale.astype(np.float32)), ids], f"{name}_s")
    return g.op1("Mul", [g.op1("Cast", [rows], f"{name}_f", to=TensorProto.FLOAT), scales], name)


def layer_norm(
    g: GraphBuilder, x: str, weight: Array, bias: Array | None, eps: float, name: str
) -> str:
    inputs = [x, g.const(f"{name}.w", weight)]
    if bias is not None:
        inputs.append(g.const(f"{name}.b", bias))
    return g.op1("LayerNormalization", inputs, name, axis=-1, epsilon=eps)


def add_norm(
    g: GraphBuilder,
    x: str,
    residual: str,
    weight: Array,
    bias: Array | None,
    eps: float,
    name: str,
    *,
    fused: bool,
    int8_ready: bool = False,
) -> tuple[str, str]:
    """``(norm(x + residual), x + residual)``: SkipLayerNormalization when fused (its fourth
    output is the sum, which pre-norm layers carry on as the residual stream), else Add and
    LayerNormalization. The int8-ready graphs (CPU only) take the latter: ONNX Runtime's CPU
    SkipLayerNormalization is 4-5x slower than Add + LayerNormalization (1.35 against 0.33 ms
    on [2, 256, 384], 3.5 against 0.63 ms with the sum output at 1024 wide; 1 thread, ORT 1.32,
    AMD EPYC Zen 3), and ORT does not fuse them back. The fused fp32 graph keeps the one op:
    it is also the fp16 GPU graph's source."""
    if not fused or int8_ready:
        total = g.op1("Add", [x, residual], f"{name}.sum")
        return layer_norm(g, total, weight, bias, eps, name), total
    inputs = [x, residual, g.const(f"{name}.w", weight)]
    if bias is not None:
        inputs.append(g.const(f"{name}.b", bias))
    outs = g.op("SkipLayerNormalization", inputs, name, outputs=4, domain=MS_DOMAIN, epsilon=eps)
    return outs[0], outs[3]


# --- rotary positions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotary:
    """Cos/sin tables of one rotary base, as graph initialisers (names)."""

    cos: str  # [max_positions, head_dim / 2]
    sin: str
    cos_full: str  # [max_positions, head_dim]: the halves repeated (plain graphs only)
    sin_full: str


def rotary_tables(theta: float, head_dim: int, max_positions: int) -> tuple[Array, Array]:
    """``cos`` and ``sin`` of ``position * inv_freq``, ``[max_positions, head_dim / 2]``,
    computed as transformers' default RoPE computes them: ``inv_freq = 1 / theta **
    (arange(0, dim, 2) / dim)`` and the product in float32, the cos/sin of that float32 angle."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = angles.astype(np.float32).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_consts(
    g: GraphBuilder, theta: float, head_dim: int, max_positions: int, name: str, *, fused: bool
) -> Rotary:
    cos, sin = rotary_tables(theta, head_dim, max_positions)
    if fused:
        return Rotary(g.const(f"{name}.cos", cos), g.const(f"{name}.sin", sin), "", "")
    return Rotary(
        "",
        "",
        g.const(f"{name}.cos2", np.concatenate([cos, cos], axis=1)),
        g.const(f"{name}.sin2", np.concatenate([sin, sin], axis=1)),
    )


def rotate(
    g: GraphBuilder, x: str, rot: Rotary, name: str, *, heads: int, head_dim: int, fused: bool
) -> str:
    """Rotary position embedding of ``x`` [batch, seq, heads * head_dim], the half-split
    ("rotate_half", GPT-NeoX) convention, positions ``arange(seq)``."""
    if fused:
        start = g.shared_const("c.pos0", [0], np.int64)  # positions start at 0 for every row
        return g.op1(
            "RotaryEmbedding", [x, start, rot.cos, rot.sin], name, domain=MS_DOMAIN, num_heads=heads
        )
    half = head_dim // 2
    shape = g.shared_const(f"c.heads{heads}x{head_dim}", [0, 0, heads, head_dim], np.int64)
    x4 = g.op1("Reshape", [x, shape], f"{name}.x4")
    x1 = g.op1(
        "Slice",
        [
            x4,
            g.shared_const("c.s0", [0], np.int64),
            g.shared_const(f"c.s{half}", [half], np.int64),
            g.shared_const("c.am1", [-1], np.int64),
        ],
        f"{name}.x1",
    )
    x2 = g.op1(
        "Slice",
        [
            x4,
            g.shared_const(f"c.s{half}", [half], np.int64),
            g.shared_const(f"c.s{head_dim}", [head_dim], np.int64),
            g.shared_const("c.am1", [-1], np.int64),
        ],
        f"{name}.x2",
    )
    rotated = g.op1("Concat", [g.op1("Neg", [x2], f"{name}.neg"), x1], f"{name}.rot", axis=-1)
    n = seq_len(g, x)
    zero = g.shared_const("c.s0", [0], np.int64)
    axis1 = g.shared_const("c.axes1", [1], np.int64)
    cos = g.op1(
        "Unsqueeze",
        [g.op1("Slice", [rot.cos_full, zero, n], f"{name}.cos_s"), axis1],
        f"{name}.cos",
    )
    sin = g.op1(
        "Unsqueeze",
        [g.op1("Slice", [rot.sin_full, zero, n], f"{name}.sin_s"), axis1],
        f"{name}.sin",
    )
    out = g.op1(
        "Add",
        [g.op1("Mul", [x4, cos], f"{name}.xc"), g.op1("Mul", [rotated, sin], f"{name}.rs")],
        f"{name}.sum",
    )
    return g.op1("Reshape", [out, g.shared_const("c.merge3", [0, 0, -1], np.int64)], name)


# --- attention -----------------------------------------------------------------------------------


def attention(
    g: GraphBuilder,
    q: str,
    k: str,
    v: str,
    name: str,
    *,
    heads: int,
    head_dim: int,
    fused: bool,
    mask32: str = "",
    mask_bias: str = "",
    extra_bias: str = "",
) -> str:
    """Bidirectional scaled dot-product attention over ``q``, ``k``, ``v`` [batch, seq,
    heads * head_dim] -> context [batch, seq, heads * head_dim]. Padded keys are hidden by
    ``mask32`` (fused) or ``mask_bias`` (plain); ``extra_bias`` [1, 1, seq, seq] is added to
    the scores (a sliding window)."""
    if fused:
        inputs = [q, k, v, "", mask32] + ([extra_bias] if extra_bias else [])
        return g.op1("MultiHeadAttention", inputs, name, domain=MS_DOMAIN, num_heads=heads)
    shape = g.shared_const(f"c.heads{heads}x{head_dim}", [0, 0, heads, head_dim], np.int64)

    def split(x: str, tag: str, perm: list[int]) -> str:
        return g.op1(
            "Transpose",
            [g.op1("Reshape", [x, shape], f"{name}.{tag}4")],
            f"{name}.{tag}t",
            perm=perm,
        )

    scores = g.op1(
        "MatMul", [split(q, "q", [0, 2, 1, 3]), split(k, "k", [0, 2, 3, 1])], f"{name}.qk"
    )
    scores = g.op1(
        "Mul",
        [scores, g.shared_const(f"c.scale{head_dim}", 1.0 / math.sqrt(head_dim))],
        f"{name}.scaled",
    )
    scores = g.op1("Add", [scores, mask_bias], f"{name}.masked")
    if extra_bias:
        scores = g.op1("Add", [scores, extra_bias], f"{name}.windowed")
    probs = g.op1("Softmax", [scores], f"{name}.probs", axis=-1)
    ctx = g.op1("MatMul", [probs, split(v, "v", [0, 2, 1, 3])], f"{name}.ctx")
    ctx = g.op1("Transpose", [ctx], f"{name}.ctxt", perm=[0, 2, 1, 3])
    return g.op1("Reshape", [ctx, g.shared_const("c.merge3", [0, 0, -1], np.int64)], name)


# --- memory-efficient attention -----------------------------------------------------------------

#: The score a padded key gets in ``flash_attention`` (after the scale): exp(-1e5) is 0 in any
#: float, while real scores of trained models stay within +-100.
PAD_SCORE = 1e5


@dataclass(frozen=True)
class PaddingColumns:
    """Per-graph tensors that let MultiHeadAttention mask padded keys without a mask input."""

    q: str  # [batch, seq, heads, 1]: ones
    k: str  # [batch, seq, heads, 1]: 0 at tokens, -PAD_SCORE / scale at padding


def padding_columns(
    g: GraphBuilder, x: str, heads: int, head_dim: int, scale: float | None = None
) -> PaddingColumns:
    """The extra query/key column of ``flash_attention``, built once per graph from the mask
    (``x`` is any [batch, seq, ...] tensor, for the shape). ``scale``: the attention's, when
    not 1 / sqrt(head_dim) (a padded key's scaled score is then still -PAD_SCORE)."""
    from onnx import TensorProto

    shape = g.op1(
        "Concat",
        [
            g.op1(
                "Slice",
                [
                    g.op1("Shape", [x], "pad_cols.xshape"),
                    g.shared_const("c.s0", [0], np.int64),
                    g.shared_const("c.s2", [2], np.int64),
                ],
                "pad_cols.bs",
            ),
            g.shared_const(f"c.heads{heads}_1", [heads, 1], np.int64),
        ],
        "pad_cols.shape",
        axis=0,
    )
    m = g.op1("Cast", [ATTENTION_MASK], "pad_cols.mask", to=TensorProto.FLOAT)
    neg = g.op1(
        "Mul",
        [
            g.op1("Sub", [m, g.shared_const("c.one_f", 1.0)], "pad_cols.inv"),
            g.shared_const(
                "pad_cols.big",
                PAD_SCORE * math.sqrt(head_dim) if scale is None else PAD_SCORE / scale,
            ),
        ],
        "pad_cols.neg",
    )
    k = g.op1(
        "Expand",
        [
            g.op1("Unsqueeze", [neg, g.shared_const("c.axes23", [2, 3], np.int64)], "pad_cols.k4"),
            shape,
        ],
        "pad_cols.k",
    )
    q = g.op1("Expand", [g.shared_const("c.one_f", 1.0), shape], "pad_cols.q")
    return PaddingColumns(q, k)


def flash_attention(
    g: GraphBuilder,
    q: str,
    k: str,
    v: str,
    cols: PaddingColumns,
    name: str,
    *,
    heads: int,
    head_dim: int,
    scale: float | None = None,
    bias: Array | None = None,
) -> str:
    """Bidirectional attention through MultiHeadAttention *without* a mask input, which is
    what sends ONNX Runtime's CPU kernel down its FlashAttention path (MlasFlashAttention:
    block by block, never the [heads, seq, seq] score tensor). Padding is masked by one extra
    dimension per head instead: queries get a 1, keys 0 (tokens) or -PAD_SCORE * sqrt(d)
    (padding), so a padded key's score drops by PAD_SCORE and a real one's is unchanged
    (``+ 1 * 0``); the scale is 1 / sqrt(head_dim) unless ``scale`` says otherwise (a
    decoder's ``query_pre_attn_scalar``: a padded key's score still drops by orders of
    magnitude more than any real one's). ``bias`` (q, k and v biases, concatenated): added
    by MultiHeadAttention, q's and k's widened by the extra column's 0.

    Measured on one 12-head, 64-dim attention, 1 thread (this machine's EPYC, AVX2): at 8,192
    tokens 3.6 s and +58 MB peak RSS, against 8.6 s and +3.3 GB for MultiHeadAttention with
    a padding mask and 25 s and +6.4 GB for Softmax attention in standard ops; at 2,048
    tokens 0.29 s / +19 MB vs 0.68 s / +224 MB vs 0.85 s / +406 MB."""
    split = g.shared_const(f"c.heads{heads}x{head_dim}", [0, 0, heads, head_dim], np.int64)
    merge = g.shared_const("c.merge3", [0, 0, -1], np.int64)

    def widen(x: str, col: str, tag: str) -> str:
        x4 = g.op1("Reshape", [x, split], f"{name}.{tag}4")
        return g.op1(
            "Reshape",
            [g.op1("Concat", [x4, col], f"{name}.{tag}c", axis=3), merge],
            f"{name}.{tag}w",
        )

    inputs = [widen(q, cols.q, "q"), widen(k, cols.k, "k"), v]
    if bias is not None:  # MultiHeadAttention adds it: q's and k's with the extra column's 0
        q_b, k_b, v_b = np.split(np.asarray(bias, np.float32), 3)
        wide = [np.pad(b.reshape(heads, head_dim), ((0, 0), (0, 1))).ravel() for b in (q_b, k_b)]
        inputs.append(g.const(f"{name}.bias", np.concatenate([*wide, v_b])))
    return g.op1(
        "MultiHeadAttention",
        inputs,
        name,
        domain=MS_DOMAIN,
        num_heads=heads,
        scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
    )


@dataclass(frozen=True)
class LocalBlocks:
    """Per-graph tensors of ``local_attention`` for one window size."""

    block: int  # keys within `block` positions are seen; also the query block length
    pad: str  # Pad's pads for [batch, seq, hidden]: seq up to a multiple of block
    seq: str  # [1] int64: the real sequence length (to slice the padding off again)
    key_bias: str  # [batch, 1, blocks, 1, 3 * block]: 0 at tokens, MASK_NEG elsewhere
    pattern: str  # [block, 3 * block]: 0 within the window, MASK_NEG outside


def local_blocks(g: GraphBuilder, x: str, half: int, name: str) -> LocalBlocks:
    """Shared tensors of ``local_attention`` with window ``|i - j| <= half``."""
    from onnx import TensorProto

    c = half
    seq = seq_len(g, x)
    cst = g.shared_const(f"{name}.c", [c], np.int64)
    extra = g.op1(
        "Mod",
        [g.op1("Sub", [cst, g.op1("Mod", [seq, cst], f"{name}.rem")], f"{name}.short"), cst],
        f"{name}.extra",
    )
    zero = g.shared_const("c.s0", [0], np.int64)
    pad3 = g.op1("Concat", [zero, zero, zero, zero, extra, zero], f"{name}.pad3", axis=0)
    m = g.op1("Cast", [ATTENTION_MASK], f"{name}.maskf", to=TensorProto.FLOAT)
    bias = g.op1(
        "Mul",
        [
            g.op1("Sub", [g.shared_const("c.one_f", 1.0), m], f"{name}.inv"),
            g.shared_const("c.neg", MASK_NEG),
        ],
        f"{name}.bias",
    )
    bias = g.op1(
        "Pad",
        [
            bias,
            g.op1("Concat", [zero, zero, zero, extra], f"{name}.pad2", axis=0),
            g.shared_const("c.neg", MASK_NEG),
        ],
        f"{name}.biasp",
        mode="constant",
    )
    blocks = g.op1(
        "Reshape", [bias, g.shared_const(f"{name}.bshape", [0, -1, c], np.int64)], f"{name}.bblocks"
    )
    ends = g.op1(
        "Pad",
        [
            blocks,
            g.shared_const("c.pad_b1", [0, 1, 0, 0, 1, 0], np.int64),
            g.shared_const("c.neg", MASK_NEG),
        ],
        f"{name}.bends",
        mode="constant",
    )
    key_bias = g.op1(
        "Unsqueeze",
        [
            _three_blocks(g, ends, 1, 2, f"{name}.bext"),
            g.shared_const("c.axes13", [1, 3], np.int64),
        ],
        f"{name}.kbias",
    )
    a = np.arange(c)[:, None]
    t = np.arange(3 * c)[None, :]
    pattern = np.where((t >= a) & (t <= a + 2 * c), 0.0, MASK_NEG).astype(np.float32)
    return LocalBlocks(c, pad3, seq, key_bias, g.const(f"{name}.pattern", pattern))


def _three_blocks(g: GraphBuilder, x: str, axis: int, cat_axis: int, name: str) -> str:
    """``x`` padded by one block at each end of ``axis`` -> each block next to its two
    neighbours, concatenated on ``cat_axis`` (previous, own, next)."""
    ax = g.shared_const(f"c.ax_{axis}", [axis], np.int64)
    parts = [
        g.op1(
            "Slice",
            [
                x,
                g.shared_const(f"c.s{lo}", [lo], np.int64),
                g.shared_const(f"c.e{hi}", [hi], np.int64),
                ax,
            ],
            f"{name}.{lo}",
        )
        for lo, hi in ((0, -2), (1, -1), (2, 2**62))
    ]
    return g.op1("Concat", parts, name, axis=cat_axis)


def local_attention(
    g: GraphBuilder,
    q: str,
    k: str,
    v: str,
    lb: LocalBlocks,
    name: str,
    *,
    heads: int,
    head_dim: int,
) -> str:
    """Sliding-window attention (keys within ``lb.block`` positions) computed block by block
    in standard ops: the sequence is cut into blocks of ``block`` queries, each attending to
    its own and its two neighbouring key blocks (3 x block keys, the window masked exactly
    by ``lb.pattern``). Scores are [batch, heads, seq, 3 x block], not [.., seq, seq]: 75 MB
    instead of 3.2 GB for 12 heads at 8,192 tokens with ModernBERT's 64-token half-window, and
    a 40th of the score FLOPs."""
    c = lb.block
    blocks5 = g.shared_const(
        f"c.blocks{c}x{heads}x{head_dim}", [0, -1, c, heads, head_dim], np.int64
    )

    def blocked(x: str, tag: str) -> str:  # [B, S, D] -> [B, N, nb, c, H]
        padded = g.op1("Pad", [x, lb.pad], f"{name}.{tag}p", mode="constant")
        return g.op1(
            "Transpose",
            [g.op1("Reshape", [padded, blocks5], f"{name}.{tag}5")],
            f"{name}.{tag}b",
            perm=[0, 3, 1, 2, 4],
        )

    ends = g.shared_const("c.pad_n1", [0, 0, 1, 0, 0, 0, 0, 1, 0, 0], np.int64)

    def extended(x: str, tag: str) -> str:  # [B, N, nb, c, H] -> [B, N, nb, 3c, H]
        return _three_blocks(
            g,
            g.op1("Pad", [blocked(x, tag), ends], f"{name}.{tag}e", mode="constant"),
            2,
            3,
            f"{name}.{tag}x",
        )

    kt = g.op1("Transpose", [extended(k, "k")], f"{name}.kt", perm=[0, 1, 2, 4, 3])
    scores = g.op1("MatMul", [blocked(q, "q"), kt], f"{name}.qk")
    scores = g.op1(
        "Mul",
        [scores, g.shared_const(f"c.scale{head_dim}", 1.0 / math.sqrt(head_dim))],
        f"{name}.scaled",
    )
    scores = g.op1(
        "Add",
        [g.op1("Add", [scores, lb.pattern], f"{name}.windowed"), lb.key_bias],
        f"{name}.masked",
    )
    probs = g.op1("Softmax", [scores], f"{name}.probs", axis=-1)
    ctx = g.op1("MatMul", [probs, extended(v, "v")], f"{name}.ctx")  # [B, N, nb, c, H]
    ctx = g.op1("Transpose", [ctx], f"{name}.ctxt", perm=[0, 2, 3, 1, 4])
    ctx = g.op1(
        "Reshape",
        [ctx, g.shared_const(f"c.flat{heads * head_dim}", [0, -1, heads * head_dim], np.int64)],
        f"{name}.ctxf",
    )
    return g.op1(
        "Slice",
        [
            ctx,
            g.shared_const("c.s0", [0], np.int64),
            lb.seq,
            g.shared_const("c.axes1", [1], np.int64),
        ],
        name,
    )


# --- choosing the attention kernel -----------------------------------------------------------------

#: How a graph computes attention (``AttentionPlan.kind``):
#: ``flash``  fused, memory-efficient: ``flash_attention`` for global layers,
#:            ``local_attention`` for sliding-window ones (what embedpool ships);
#: ``mha``    fused MultiHeadAttention with the padding mask (and a [seq, seq] window bias):
#:            ONNX Runtime's masked kernel, which holds every head's scores at once;
#: ``plain``  standard ops (Softmax attention), the unfused reference.
ATTENTION_KINDS = ("flash", "mha", "plain")


def attention_kind(attention: str, *, fused: bool, int8_ready: bool, default: str = "flash") -> str:
    """A ``build_encoder``'s attention kind: ``attention`` when given, else ``default`` in the
    fused graph and ``plain`` in the unfused one. ``int8_ready`` is refused unfused."""
    if int8_ready and not fused:
        raise ValueError("int8_ready applies to the fused graph only")
    return attention or (default if fused else "plain")


@dataclass(frozen=True)
class AttentionPlan:
    """What every attention of one graph shares: its kind and the per-graph mask tensors."""

    kind: str
    mask32: str = ""
    mask_bias: str = ""
    cols: PaddingColumns | None = None
    window_bias: str = ""
    blocks: LocalBlocks | None = None


def plan_attention(
    g: GraphBuilder,
    x: str,
    kind: str,
    *,
    heads: int,
    head_dim: int,
    window_half: int | None = None,
    has_global: bool = True,
) -> AttentionPlan:
    """The shared tensors for ``kind`` (see ATTENTION_KINDS); ``window_half`` when some layers
    use a sliding window, ``has_global`` when some do not."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    if kind == "flash":
        cols = padding_columns(g, x, heads, head_dim) if has_global else None
        blocks = local_blocks(g, x, window_half, "local") if window_half else None
        return AttentionPlan(kind, cols=cols, blocks=blocks)
    window = window_bias(g, x, window_half, "window") if window_half else ""
    if kind == "mha":
        return AttentionPlan(kind, mask32=mask_int32(g), window_bias=window)
    return AttentionPlan(kind, mask_bias=mask_bias_plain(g), window_bias=window)


def self_attention(
    g: GraphBuilder,
    plan: AttentionPlan,
    q: str,
    k: str,
    v: str,
    name: str,
    *,
    heads: int,
    head_dim: int,
    local: bool = False,
) -> str:
    """Attention of one layer as ``plan`` says; ``local``: this layer uses the window."""
    dims = {"heads": heads, "head_dim": head_dim}
    if plan.kind == "flash":
        if local:
            assert plan.blocks is not None
            return local_attention(g, q, k, v, plan.blocks, name, **dims)
        assert plan.cols is not None
        return flash_attention(g, q, k, v, plan.cols, name, heads=heads, head_dim=head_dim)
    return attention(
        g,
        q,
        k,
        v,
        name,
        fused=plan.kind == "mha",
        mask32=plan.mask32,
        mask_bias=plan.mask_bias,
        extra_bias=plan.window_bias if local else "",
        **dims,
    )


# --- gated MLP -----------------------------------------------------------------------------------


def activation(g: GraphBuilder, x: str, act: str, name: str, *, fused: bool) -> str:
    """SiLU or erf GELU of ``x`` (the gate branch of SwiGLU / GeGLU)."""
    if act in SILU:
        if fused:  # QuickGelu(x) = x * sigmoid(alpha * x): SiLU at alpha 1
            return g.op1("QuickGelu", [x], name, domain=MS_DOMAIN, alpha=1.0)
        return g.op1("Mul", [x, g.op1("Sigmoid", [x], f"{name}.sig")], name)
    if act in ERF_GELU:
        if fused:
            return g.op1("Gelu", [x], name, domain=MS_DOMAIN)
        erf = g.op1(
            "Erf",
            [g.op1("Mul", [x, g.shared_const("c.rsqrt2", 1 / math.sqrt(2))], f"{name}.div")],
            f"{name}.erf",
        )
        half_x = g.op1("Mul", [x, g.shared_const("c.half", 0.5)], f"{name}.half_x")
        return g.op1(
            "Mul",
            [half_x, g.op1("Add", [erf, g.shared_const("c.one_f", 1.0)], f"{name}.add1")],
            name,
        )
    raise ValueError(f"unknown gated activation {act!r}")


def gated_mlp(
    g: GraphBuilder, x: str, w: Mapping[str, Array], name: str, layer: int, *, act: str, fused: bool
) -> str:
    """``down(act(gate(x)) * up(x))`` with weights ``w["gate"]``, ``w["up"]``, ``w["down"]``
    (``[in, out]``, no biases): SwiGLU with SiLU, GeGLU with GELU."""
    gate = g.linear(x, w["gate"], f"{name}.gate", role="ffn_gate", layer=layer)
    up = g.linear(x, w["up"], f"{name}.up", role="ffn_up", layer=layer)
    hidden = g.op1("Mul", [activation(g, gate, act, f"{name}.act", fused=fused), up], f"{name}.glu")
    return g.linear(hidden, w["down"], f"{name}.down", role="ffn_down", layer=layer)


def qkv(
    g: GraphBuilder, x: str, w: Mapping[str, Array], name: str, layer: int
) -> tuple[str, str, str]:
    """Three projections of ``x`` (``w["q"]``, ``w["k"]``, ``w["v"]``, ``[in, out]``, no
    biases): three MatMuls rather than one packed one, so that each is a plain quantisable
    MatMul with its own role, and MultiHeadAttention takes them as they are."""
    roles: tuple[LinearRole, ...] = ("q", "k", "v")
    q, k, v = (g.linear(x, w[r], f"{name}.{r}", role=r, layer=layer) for r in roles)
    return q, k, v


# --- what every family module has ------------------------------------------------------------


def listed_layer_types(
    config: Mapping[str, Any], n_layers: int, where: str, allowed: tuple[str, ...]
) -> tuple[str, ...] | None:
    """config.json's ``layer_types``, checked (one a layer, each one of ``allowed``); None
    when the config has none (the family derives them from its own field)."""
    given = config.get("layer_types")
    if given is None:
        return None
    types = tuple(str(t) for t in given)
    bad = sorted(set(types) - set(allowed))
    if bad or len(types) != n_layers:
        raise ModelError(
            f"{where}: layer_types {list(types)} must name {n_layers} layers, "
            f"each one of {list(allowed)}"
        )
    return types


class BuildModel(Protocol):
    def __call__(
        self,
        weights: Mapping[str, Array],
        cfg: Any,
        *,
        pooling: Pooling,
        fused: bool = True,
        int8_ready: bool = False,
        name: str = ...,
    ) -> onnx.ModelProto: ...


def model_builder(module: str, default_name: str) -> BuildModel:
    """A family module's ``build_model``: the whole model (the family's encoder + one pooling
    + normalisation) through ``compose``, for tests and benchmarks. ``module`` is the family
    module's ``__name__`` (looked up when called: the module is still loading here)."""

    def build_model(
        weights: Mapping[str, Array],
        cfg: Any,
        *,
        pooling: Pooling,
        fused: bool = True,
        int8_ready: bool = False,
        name: str = default_name,
    ) -> onnx.ModelProto:
        from embedpool.graph.compose import compose
        from embedpool.modelspec import HeadSpec, PoolingSpec

        return compose(
            sys.modules[module],
            weights,
            cfg,
            HeadSpec(PoolingSpec((pooling,))),
            fused=fused,
            int8_ready=int8_ready,
            name=name,
        )

    return build_model
