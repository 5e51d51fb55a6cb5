"""A cross-encoder's classification head in the graph: token states of each pair in, its
``num_labels`` logits out (``modelspec.ClassifierSpec``), as transformers computes them.

    token states [batch, seq, width], attention_mask (right padding)
      pooler      BertForSequenceClassification     [CLS] -> pooler.dense -> tanh
                                                    -> classifier
      roberta     XLMRobertaForSequenceClassification  <s> -> classifier.dense -> tanh
                                                    -> classifier.out_proj
      modernbert  ModernBertForSequenceClassification  [CLS] or the masked mean (sum / count)
                                                    -> head.dense -> act -> head.norm
                                                    -> classifier
      causal_lm   a *ForCausalLM reranker (Qwen3-Reranker): the last real token (right
                  padding, so the mask's last 1; causal attention means no pad is seen)
                  -> its lm_head logits of the true and false tokens only (two rows of
                  lm_head, or of the token table when tied) -> true - false
                  (sentence-transformers' LogitScore; the vocabulary's other logits are
                  never computed)
      └─ ``logits`` [batch, num_labels]

The causal LM's body is its decoder family's builder (``compose`` builds it like an
embedder's); the last token is ``head.apply_head``'s lasttoken pooling.

Dropout is the identity at inference. The head's MatMuls are plain nodes, not
``GraphBuilder.linear``: the int8 recipe quantises encoder linears, and the head (a few
thousand weights per pair) stays float32. The activation CrossEncoder.predict applies
(Sigmoid, Identity) is applied outside the graph (``rerank``), so the graph's output is the
raw logits that TEI's ``raw_scores`` and the vector cache keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import ATTENTION_MASK, Array, GraphBuilder
from embedpool.graph.weights import FLOAT_DTYPES, check_shapes, tensor_infos
from embedpool.graph.weights import _to_float32 as to_float32
from embedpool.modelspec import ClassifierSpec

#: The graph output of a cross-encoder.
LOGITS = "logits"


#: The key of a causal-LM reranker's scoring rows ([true, false] rows of lm_head) in the
#: weights ``apply_classifier`` reads (``lm_rows`` adds it).
LM_ROWS = "lm_head.score_rows"


def score_tokens(spec: ClassifierSpec) -> list[int]:
    """A causal_lm head's vocabulary ids, in the order of its rows: true[, false]."""
    return [spec.true_token] + ([spec.false_token] if spec.false_token >= 0 else [])


def lm_rows(
    spec: ClassifierSpec, weights_path: Path, weights: Mapping[str, Array]
) -> dict[str, Array]:
    """What a head needs beyond the family's weights: a causal_lm head's lm_head rows
    (``LM_ROWS``), read alone from the checkpoint (an untied lm_head of 150k rows is not
    loaded for two), or the token table's rows when the checkpoint has no lm_head and
    config.json ties it (transformers 5 ties only then: a saved lm_head that differs from
    the table is kept untied); {} for other heads."""
    if spec.kind != "causal_lm":
        return {}
    ids = score_tokens(spec)
    infos = tensor_infos(weights_path)
    lm = infos.get("lm_head.weight")
    if lm is None:
        if not spec.tied_lm_head:
            raise ModelError(
                f"{weights_path}: no lm_head.weight, and config.json does not "
                "tie it to the token table (tie_word_embeddings)"
            )
        return {LM_ROWS: np.ascontiguousarray(weights["embed_tokens.weight"][ids])}
    if lm.dtype not in FLOAT_DTYPES or len(lm.shape) != 2:
        raise ModelError(
            f"{weights_path}: lm_head.weight is {lm.dtype} {list(lm.shape)}, not a float matrix"
        )
    width = lm.shape[1]
    size = width * int(np.dtype(FLOAT_DTYPES[lm.dtype]).itemsize)
    rows = []
    with lm.file.open("rb") as f:
        for i in ids:
            if not 0 <= i < lm.shape[0]:
                raise ModelError(
                    f"{weights_path}: token id {i} is outside lm_head's {lm.shape[0]} rows"
                )
            f.seek(lm.start + i * size)
            buf = f.read(size)
            if len(buf) != size:
                raise ModelError(f"{lm.file} is truncated: lm_head row {i} is cut short")
            rows.append(to_float32(buf, replace(lm, shape=(width,))))
    return {LM_ROWS: np.stack(rows)}


def head_weights(spec: ClassifierSpec, width: int) -> dict[str, tuple[int, ...]]:
    """The head's tensors (normalised keys) and their shapes."""
    n = spec.num_labels
    if spec.kind == "causal_lm":
        return {LM_ROWS: (len(score_tokens(spec)), width)}
    if spec.kind == "pooler":
        return {
            "pooler.dense.weight": (width, width),
            "pooler.dense.bias": (width,),
            "classifier.weight": (n, width),
            "classifier.bias": (n,),
        }
    if spec.kind == "roberta":
        return {
            "classifier.dense.weight": (width, width),
            "classifier.dense.bias": (width,),
            "classifier.out_proj.weight": (n, width),
            "classifier.out_proj.bias": (n,),
        }
    shapes: dict[str, tuple[int, ...]] = {
        "head.dense.weight": (width, width),
        "head.norm.weight": (width,),
        "classifier.weight": (n, width),
        "classifier.bias": (n,),
    }
    if spec.head_bias:
        shapes["head.dense.bias"] = (width,)
    if spec.norm_bias:
        shapes["head.norm.bias"] = (width,)
    return shapes


def check_head(weights: Mapping[str, Array], spec: ClassifierSpec, width: int, where: str) -> None:
    """A ModelError naming what is missing or mis-shaped in the head's weights."""
    need = head_weights(spec, width)
    missing = [k for k in need if k not in weights]
    if missing:
        raise ModelError(
            f"{where}: the {spec.kind} classification head needs "
            f"{', '.join(missing)}, which the checkpoint lacks"
        )
    check_shapes(weights, need, where)


def apply_classifier(
    g: GraphBuilder,
    hidden: str,
    width: int,
    spec: ClassifierSpec,
    weights: Mapping[str, Array],
    *,
    norm_eps: float = 1e-5,
    out: str = LOGITS,
) -> int:
    """The head's nodes from ``hidden`` to the graph output ``out`` [batch, num_labels];
    returns num_labels. ``norm_eps``: ModernBERT's (head.norm's) epsilon."""
    check_head(weights, spec, width, "classification head")
    if spec.kind == "causal_lm":
        _causal_lm_score(g, hidden, width, spec, weights[LM_ROWS], out)
        return spec.num_labels
    if spec.kind == "modernbert" and spec.pooling == "mean":
        x = _masked_mean(g, hidden)
    else:
        x = g.op1("Gather", [hidden, g.const("cls.first", 0, np.int64)], "cls.first_token", axis=1)
    if spec.kind in ("pooler", "roberta"):
        dense, proj = (
            ("pooler.dense", "classifier")
            if spec.kind == "pooler"
            else ("classifier.dense", "classifier.out_proj")
        )
        x = g.op1("Tanh", [_dense(g, x, weights, dense, bias=True)], "cls.tanh")
        logits = _dense(g, x, weights, proj, bias=True)
    else:
        x = _dense(g, x, weights, "head.dense", bias=spec.head_bias)
        x = _activation(g, x, spec.head_activation)
        scale = g.const("cls.norm.w", weights["head.norm.weight"])
        bias = g.const(
            "cls.norm.b",
            weights["head.norm.bias"] if spec.norm_bias else np.zeros(width, dtype=np.float32),
        )
        x = g.op1("LayerNormalization", [x, scale, bias], "cls.norm", axis=-1, epsilon=norm_eps)
        logits = _dense(g, x, weights, "classifier", bias=True)
    g.op("Identity", [logits], out)
    return spec.num_labels


def _causal_lm_score(
    g: GraphBuilder, hidden: str, width: int, spec: ClassifierSpec, rows: Array, out: str
) -> None:
    """The last token's [true, false] logits (a float32 MatMul with the two rows), then
    true - false (a MatMul with [[1], [-1]]), as LogitScore; the true logit alone without a
    false token."""
    from embedpool.graph.head import apply_head
    from embedpool.modelspec import HeadSpec, PoolingSpec

    last = apply_head(
        g, hidden, width, HeadSpec(PoolingSpec(("lasttoken",)), normalize=False), "cls.last_token"
    )
    assert last == width
    logits = g.op1(
        "MatMul",
        ["cls.last_token", g.const("cls.lm_rows", np.ascontiguousarray(rows.T))],
        "cls.lm_logits",
    )
    if rows.shape[0] == 2:
        logits = g.op1(
            "MatMul",
            [logits, g.const("cls.true_minus_false", np.array([[1.0], [-1.0]], np.float32))],
            "cls.log_odds",
        )
    g.op("Identity", [logits], out)


def _dense(g: GraphBuilder, x: str, weights: Mapping[str, Array], key: str, *, bias: bool) -> str:
    w = np.ascontiguousarray(weights[key + ".weight"].T)
    y = g.op1("MatMul", [x, g.const(f"cls.{key}.w", w)], f"cls.{key}")
    if bias:
        y = g.op1("Add", [y, g.const(f"cls.{key}.b", weights[key + ".bias"])], f"cls.{key}.add")
    return y


def _masked_mean(g: GraphBuilder, hidden: str) -> str:
    """transformers' ``(h * mask).sum(1) / mask.sum(1)``."""
    from onnx import TensorProto

    mask = g.op1("Cast", [ATTENTION_MASK], "cls.mask_f", to=TensorProto.FLOAT)
    mask3 = g.op1("Unsqueeze", [mask, g.const("cls.axis2", [2], np.int64)], "cls.mask3")
    axis1 = g.const("cls.axis1", [1], np.int64)
    total = g.op1(
        "ReduceSum", [g.op1("Mul", [hidden, mask3], "cls.masked"), axis1], "cls.sum", keepdims=0
    )
    count = g.op1("ReduceSum", [mask, axis1], "cls.count", keepdims=1)
    return g.op1("Div", [total, count], "cls.mean")


def _activation(g: GraphBuilder, x: str, act: str) -> str:
    """transformers' ACT2FN for ModernBERT's classifier_activation."""
    if act in ("silu", "swish"):
        return g.op1("Mul", [x, g.op1("Sigmoid", [x], "cls.act_sig")], "cls.act")
    if act == "relu":
        return g.op1("Relu", [x], "cls.act")
    if act == "tanh":
        return g.op1("Tanh", [x], "cls.act")
    if act == "gelu":  # erf form
        half = g.op1("Mul", [x, g.const("cls.half", 0.5)], "cls.act_half")
        erf = g.op1(
            "Erf",
            [g.op1("Mul", [x, g.const("cls.rsqrt2", 1 / np.sqrt(2.0))], "cls.act_scaled")],
            "cls.act_erf",
        )
        return g.op1(
            "Mul", [half, g.op1("Add", [erf, g.const("cls.one", 1.0)], "cls.act_1p")], "cls.act"
        )
    # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    cube = g.op1("Mul", [g.op1("Mul", [x, x], "cls.act_sq"), x], "cls.act_cube")
    inner = g.op1(
        "Add", [x, g.op1("Mul", [cube, g.const("cls.c", 0.044715)], "cls.act_c")], "cls.act_inner"
    )
    t = g.op1(
        "Tanh",
        [g.op1("Mul", [inner, g.const("cls.k", np.sqrt(2 / np.pi))], "cls.act_k")],
        "cls.act_tanh",
    )
    half = g.op1("Mul", [x, g.const("cls.half", 0.5)], "cls.act_half")
    return g.op1("Mul", [half, g.op1("Add", [t, g.const("cls.one", 1.0)], "cls.act_1p")], "cls.act")
