"""The sentence-transformers head: what turns the encoder's token states into the sentence
vector (``modelspec.HeadSpec``), in the graph and, for shipped graphs, in numpy.

    token states [batch, seq, width], attention_mask [batch, seq] (right padding)
      └─ pooling mask: the attention mask, minus the first prompt_length positions when the
         Pooling module has include_prompt=False (graph input ``prompt_length`` [batch])
      └─ every pooling mode, concatenated in the spec's order:
           cls           the first unmasked token           (ArgMax of the mask)
           mean          sum / max(count, 1e-9)
           mean_sqrt_len_tokens  sum / sqrt(max(count, 1e-9))
           max           max over unmasked tokens (-inf where masked)
           weightedmean  tokens weighted by position + 1
           lasttoken     the last unmasked token            (ArgMax, last index)
      └─ Dense*       x @ W.T + b, activation, (+ residual)   (MatMul role "head_dense")
      └─ Normalize?   x / max(||x||, 1e-12), only when the model has the module
      └─ truncate_dim first N values (after Normalize, as sentence-transformers does)

Each step follows sentence-transformers 6.2's ``Pooling._forward_padded`` / ``Dense`` /
``Normalize`` exactly, including the cases that look odd (a prompt covering every token
gives CLS the first token and lasttoken a zero vector). Doing it in the graph ships ``1/seq``
of the data out of the session and lets ONNX Runtime run the reductions on its threads.
``head_numpy`` is the same maths for a shipped ``onnx/model.onnx`` whose output is token
states, and the reference the graph is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import ATTENTION_MASK, Array, GraphBuilder
from embedpool.modelspec import DenseSpec, HeadSpec

#: Graph input carrying each sequence's prompt length in tokens (sentence-transformers'
#: ``prompt_length``: the prompt's tokens with [CLS], without a trailing [SEP]); present only
#: in graphs of models whose Pooling has include_prompt=False. 0 means no prompt.
PROMPT_LENGTH = "prompt_length"
#: torch's Softplus returns x itself above this (beta 1): exact in fp32 either way, and it
#: keeps exp() from overflowing.
SOFTPLUS_THRESHOLD = 20.0
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def head_inputs(head: HeadSpec) -> list[tuple[str, list[str]]]:
    """Graph inputs the head reads beyond input_ids / attention_mask: (name, shape)."""
    return [] if head.pooling.include_prompt else [(PROMPT_LENGTH, ["batch"])]


def apply_head(g: GraphBuilder, hidden: str, width: int, head: HeadSpec, out: str) -> int:
    """The head's nodes from token states ``hidden`` [batch, seq, width] to the graph output
    ``out``; returns the output's width."""
    from onnx import TensorProto

    mask = g.op1("Cast", [ATTENTION_MASK], "pool.mask_f", to=TensorProto.FLOAT)
    if not head.pooling.include_prompt:
        mask = _without_prompt(g, mask)
    pooled = [
        _pool(g, hidden, mask, mode, i, default_cls=head.pooling.include_prompt)
        for i, mode in enumerate(head.pooling.modes)
    ]
    x = pooled[0] if len(pooled) == 1 else g.op1("Concat", pooled, "pool.concat", axis=-1)
    x_width = width * len(pooled)
    for i, dense in enumerate(head.dense):
        if dense.in_features != x_width:
            raise ModelError(
                f"Dense {i} takes {dense.in_features} values, the head before it gives {x_width}"
            )
        x = _dense(g, x, dense, load_dense(dense), i)
        x_width = dense.out_features
    if head.normalize:
        # opset 17: ReduceL2 takes its axes as an attribute (ReduceSum as an input).
        norm = g.op1("ReduceL2", [x], "pool.norm", axes=[-1], keepdims=1)
        norm = g.op1("Max", [norm, g.const("pool.min_norm", 1e-12)], "pool.norm_clip")
        x = g.op1("Div", [x, norm], "pool.normalized")
    if head.truncate_dim is not None and head.truncate_dim < x_width:
        x = g.op1(
            "Slice",
            [
                x,
                g.const("head.trunc.start", [0], np.int64),
                g.const("head.trunc.end", [head.truncate_dim], np.int64),
                g.const("head.trunc.axis", [-1], np.int64),
            ],
            "head.truncate",
        )
        x_width = head.truncate_dim
    g.op("Identity", [x], out)
    return x_width


def load_dense(dense: DenseSpec) -> dict[str, Array]:
    """A Dense module's tensors (``linear.weight`` [out, in], ``linear.bias``,
    ``residual.weight``), checked against its spec."""
    from embedpool.graph.weights import load_safetensors

    w = load_safetensors(dense.weights)
    need: dict[str, tuple[int, ...]] = {"linear.weight": (dense.out_features, dense.in_features)}
    if dense.bias:
        need["linear.bias"] = (dense.out_features,)
    if dense.residual and dense.in_features != dense.out_features:
        need["residual.weight"] = (dense.out_features, dense.in_features)
    for key, shape in need.items():
        if key not in w or w[key].shape != shape:
            got = list(w[key].shape) if key in w else "missing"
            raise ModelError(
                f"{dense.weights}: {key} is {got}, the Dense config implies {list(shape)}"
            )
    return w


# --- pooling --------------------------------------------------------------------------------


def _without_prompt(g: GraphBuilder, mask: str) -> str:
    """The pooling mask with positions < prompt_length zeroed (right padding, so this is
    sentence-transformers' ``attention_mask[:, :prompt_length] = 0``)."""
    from onnx import TensorProto

    seq = g.op1(
        "Gather",
        [g.op1("Shape", [ATTENTION_MASK], "pool.shape"), g.const("pool.one_i", 1, np.int64)],
        "pool.seq",
    )
    pos = g.op1(
        "Range",
        [g.const("pool.zero_i", 0, np.int64), seq, g.const("pool.step_i", 1, np.int64)],
        "pool.pos",
    )
    plen = g.op1("Unsqueeze", [PROMPT_LENGTH, g.const("pool.axis1_", [1], np.int64)], "pool.plen")
    keep = g.op1(
        "Cast",
        [g.op1("GreaterOrEqual", [pos, plen], "pool.after_prompt")],
        "pool.keep",
        to=TensorProto.FLOAT,
    )
    return g.op1("Mul", [mask, keep], "pool.mask_np")


def _pool(g: GraphBuilder, hidden: str, mask: str, mode: str, i: int, *, default_cls: bool) -> str:
    """One pooling mode over ``mask`` [batch, seq] (float, 1 where pooled)."""
    n = f"pool{i}.{mode}"
    if mode == "cls" and default_cls:
        # right padding and no prompt masking: the first unmasked token is position 0
        return g.op1("Gather", [hidden, g.const(f"{n}.zero", 0, np.int64)], n, axis=1)
    if mode in ("cls", "lasttoken"):
        return _pick(g, hidden, mask, n, last=mode == "lasttoken")
    if mode == "max":
        cond = g.op1("Greater", [_mask3(g, mask, n), g.const(f"{n}.zero_f", 0.0)], f"{n}.on")
        filled = g.op1("Where", [cond, hidden, g.const(f"{n}.neg_inf", -np.inf)], f"{n}.filled")
        return g.op1("ReduceMax", [filled], n, axes=[1], keepdims=0)
    if mode == "weightedmean":  # weights: position + 1 (right padding: no offset)
        from onnx import TensorProto

        seq = g.op1(
            "Gather",
            [g.op1("Shape", [mask], f"{n}.mshape"), g.const(f"{n}.one_i", 1, np.int64)],
            f"{n}.seq",
        )
        pos = g.op1(
            "Range",
            [
                g.const(f"{n}.one_s", 1, np.int64),
                g.op1("Add", [seq, g.const(f"{n}.one_a", 1, np.int64)], f"{n}.seq1"),
                g.const(f"{n}.step", 1, np.int64),
            ],
            f"{n}.pos",
        )
        weights = g.op1(
            "Mul", [mask, g.op1("Cast", [pos], f"{n}.pos_f", to=TensorProto.FLOAT)], f"{n}.w"
        )
        return _masked_mean(g, hidden, _mask3(g, weights, n), n)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        return _masked_mean(g, hidden, _mask3(g, mask, n), n, sqrt=mode == "mean_sqrt_len_tokens")
    raise ModelError(f"pooling mode {mode!r} has no graph implementation")


def _mask3(g: GraphBuilder, mask: str, n: str) -> str:
    return g.op1("Unsqueeze", [mask, g.const(f"{n}.axis2", [2], np.int64)], f"{n}.mask3")


def _masked_mean(g: GraphBuilder, hidden: str, w3: str, n: str, *, sqrt: bool = False) -> str:
    """sum(hidden * w) / max(sum(w), 1e-9) over the sequence (sqrt of the denominator for
    mean_sqrt_len_tokens)."""
    axis1 = g.const(f"{n}.axis1", [1], np.int64)
    summed = g.op1(
        "ReduceSum", [g.op1("Mul", [hidden, w3], f"{n}.weighted"), axis1], f"{n}.sum", keepdims=0
    )
    total = g.op1("ReduceSum", [w3, axis1], f"{n}.total", keepdims=0)
    total = g.op1("Max", [total, g.const(f"{n}.min", 1e-9)], f"{n}.total_clip")
    if sqrt:
        total = g.op1("Sqrt", [total], f"{n}.sqrt")
    return g.op1("Div", [summed, total], n)


def _pick(g: GraphBuilder, hidden: str, mask: str, n: str, *, last: bool) -> str:
    """The first (cls) or last (lasttoken) token where ``mask`` is 1, as ST's argmax picks
    them; lasttoken multiplies by the mask first, so a fully masked row gives zeros."""
    idx = g.op1("ArgMax", [mask], f"{n}.idx", axis=1, keepdims=1, select_last_index=int(last))
    shape = g.op1("Shape", [hidden], f"{n}.shape")
    batch = g.op1(
        "Slice",
        [shape, g.const(f"{n}.s0", [0], np.int64), g.const(f"{n}.s1", [1], np.int64)],
        f"{n}.batch",
    )
    width = g.op1(
        "Slice",
        [shape, g.const(f"{n}.s2", [2], np.int64), g.const(f"{n}.s3", [3], np.int64)],
        f"{n}.width",
    )
    idx_shape = g.op1(
        "Concat", [batch, g.const(f"{n}.one", [1], np.int64), width], f"{n}.idx_shape", axis=0
    )
    idx3 = g.op1(
        "Expand",
        [g.op1("Unsqueeze", [idx, g.const(f"{n}.axis2b", [2], np.int64)], f"{n}.idx3"), idx_shape],
        f"{n}.idx_b",
    )
    src = g.op1("Mul", [hidden, _mask3(g, mask, n)], f"{n}.masked") if last else hidden
    picked = g.op1("GatherElements", [src, idx3], f"{n}.pick", axis=1)
    return g.op1("Squeeze", [picked, g.const(f"{n}.axis1", [1], np.int64)], n)


# --- Dense ----------------------------------------------------------------------------------


def _dense(g: GraphBuilder, x: str, spec: DenseSpec, w: Mapping[str, Array], i: int) -> str:
    n = f"head.dense{i}"
    y = g.linear(x, np.ascontiguousarray(w["linear.weight"].T), n, role="head_dense", layer=i)
    if spec.bias:
        y = g.op1("Add", [y, g.const(f"{n}.b", w["linear.bias"])], f"{n}.add")
    y = _activation(g, y, spec.activation, f"{n}.act")
    if spec.residual:
        res = (
            x
            if spec.in_features == spec.out_features
            else g.linear(
                x,
                np.ascontiguousarray(w["residual.weight"].T),
                f"{n}.res",
                role="head_dense",
                layer=i,
            )
        )
        y = g.op1("Add", [y, res], f"{n}.residual")
    return y


def _softplus(g: GraphBuilder, x: str, n: str) -> str:
    big = g.op1("Greater", [x, g.const(f"{n}.thr", SOFTPLUS_THRESHOLD)], f"{n}.big")
    return g.op1("Where", [big, x, g.op1("Softplus", [x], f"{n}.sp")], f"{n}.softplus")


def _activation(g: GraphBuilder, x: str, act: str, n: str) -> str:
    simple = {
        "tanh": "Tanh",
        "relu": "Relu",
        "sigmoid": "Sigmoid",
        "softsign": "Softsign",
        "hardswish": "HardSwish",
    }
    if act == "identity":
        return x
    if act in simple:
        return g.op1(simple[act], [x], n)
    if act == "gelu":  # torch GELU(): 0.5 x (1 + erf(x / sqrt 2))
        erf = g.op1(
            "Erf",
            [g.op1("Mul", [x, g.const(f"{n}.rsqrt2", 1 / math.sqrt(2))], f"{n}.scaled")],
            f"{n}.erf",
        )
        half = g.op1("Mul", [x, g.const(f"{n}.c_half", 0.5)], f"{n}.half")
        return g.op1("Mul", [half, g.op1("Add", [erf, g.const(f"{n}.one", 1.0)], f"{n}.erf1")], n)
    if act == "silu":
        return g.op1("Mul", [x, g.op1("Sigmoid", [x], f"{n}.sig")], n)
    if act == "leakyrelu":
        return g.op1("LeakyRelu", [x], n, alpha=0.01)
    if act in ("elu", "celu"):  # alpha 1: CELU and ELU coincide
        return g.op1("Elu", [x], n, alpha=1.0)
    if act == "selu":
        return g.op1("Selu", [x], n, alpha=_SELU_ALPHA, gamma=_SELU_SCALE)
    if act == "softplus":
        return _softplus(g, x, n)
    if act == "mish":
        return g.op1("Mul", [x, g.op1("Tanh", [_softplus(g, x, n)], f"{n}.tanh")], n)
    if act in ("hardtanh", "relu6"):
        lo, hi = (-1.0, 1.0) if act == "hardtanh" else (0.0, 6.0)
        return g.op1("Clip", [x, g.const(f"{n}.lo", lo), g.const(f"{n}.hi", hi)], n)
    if act == "tanhshrink":
        return g.op1("Sub", [x, g.op1("Tanh", [x], f"{n}.tanh")], n)
    if act == "hardsigmoid":  # relu6(x + 3) / 6
        return g.op1("HardSigmoid", [x], n, alpha=1 / 6, beta=0.5)
    if act == "logsigmoid":  # -softplus(-x)
        neg = g.op1("Neg", [x], f"{n}.neg")
        return g.op1("Neg", [_softplus(g, neg, n)], n)
    raise ModelError(f"Dense activation {act!r} has no graph implementation")


# --- the same head in numpy -------------------------------------------------------------------


def head_numpy(
    hidden: np.ndarray,
    mask: np.ndarray,
    head: HeadSpec,
    dense_weights: Sequence[Mapping[str, Array]],
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """``apply_head``'s maths on token states [batch, seq, width] (a shipped graph's output)
    with its right-padded attention mask; float32 [batch, out_dim]."""
    h = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)
    if not head.pooling.include_prompt and prompt_lengths is not None:
        pl = np.asarray(prompt_lengths, dtype=np.int64)[:, None]
        m = m * (np.arange(m.shape[1])[None, :] >= pl)
    m3 = m[:, :, None]
    rows = np.arange(h.shape[0])
    parts: list[np.ndarray] = []
    for mode in head.pooling.modes:
        if mode == "cls":
            parts.append(h[rows, m.argmax(axis=1)])
        elif mode == "lasttoken":
            last = m.shape[1] - 1 - m[:, ::-1].argmax(axis=1)
            parts.append((h * m3)[rows, last])
        elif mode == "max":
            parts.append(np.where(m3 > 0, h, -np.inf).max(axis=1))
        elif mode == "weightedmean":
            w3 = m3 * np.arange(1, m.shape[1] + 1, dtype=np.float32)[None, :, None]
            parts.append((h * w3).sum(axis=1) / np.maximum(w3.sum(axis=1), 1e-9))
        else:
            count = np.maximum(m3.sum(axis=1), 1e-9)
            denom = count if mode == "mean" else np.sqrt(count)
            parts.append((h * m3).sum(axis=1) / denom)
    x = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    for spec, w in zip(head.dense, dense_weights, strict=True):
        y = x @ w["linear.weight"].T
        if spec.bias:
            y = y + w["linear.bias"]
        y = _activation_numpy(y, spec.activation)
        if spec.residual:
            y = y + (x if spec.in_features == spec.out_features else x @ w["residual.weight"].T)
        x = y
    if head.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if head.truncate_dim is not None:
        x = x[:, : head.truncate_dim]
    return np.ascontiguousarray(x, dtype=np.float32)


def _softplus_np(x: np.ndarray) -> Any:
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))


def _activation_numpy(x: np.ndarray, act: str) -> Any:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    table: dict[str, Callable[[np.ndarray], Any]] = {
        "identity": lambda v: v,
        "tanh": np.tanh,
        "relu": lambda v: np.maximum(v, 0),
        "gelu": lambda v: 0.5 * v * (1 + erf(v / math.sqrt(2))),
        "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
        "silu": lambda v: v / (1 + np.exp(-v)),
        "leakyrelu": lambda v: np.where(v > 0, v, 0.01 * v),
        "elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0))),
        "celu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0))),
        "selu": lambda v: (
            _SELU_SCALE * np.where(v > 0, v, _SELU_ALPHA * np.expm1(np.minimum(v, 0)))
        ),
        "softplus": _softplus_np,
        "mish": lambda v: v * np.tanh(_softplus_np(v)),
        "hardtanh": lambda v: np.clip(v, -1, 1),
        "relu6": lambda v: np.clip(v, 0, 6),
        "softsign": lambda v: v / (1 + np.abs(v)),
        "tanhshrink": lambda v: v - np.tanh(v),
        "hardsigmoid": lambda v: np.clip(v / 6 + 0.5, 0, 1),
        "hardswish": lambda v: v * np.clip(v / 6 + 0.5, 0, 1),
        "logsigmoid": lambda v: -_softplus_np(-v),
    }
    if act not in table:
        raise ModelError(f"Dense activation {act!r} has no numpy implementation")
    return np.asarray(table[act](x.astype(np.float64)), dtype=np.float32)
