"""graph.families.decoder: every attention kind, causal and bidirectional, with grouped K/V
heads and a head_dim apart from hidden / heads, against numpy; RMSNorms fused and plain."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from embedpool.graph.builder import ATTENTION_MASK, INPUT_IDS, GraphBuilder
from embedpool.graph.families import decoder, layers

H, KV, D, B, S, SCALE, THETA = 4, 2, 16, 2, 9, 0.3, 10_000.0


def _run(g: GraphBuilder, out: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    g.op("Identity", [out], "out")

    def vi(n: str) -> Any:
        t = TensorProto.INT64 if feeds[n].dtype == np.int64 else TensorProto.FLOAT
        return helper.make_tensor_value_info(n, t, None)

    model = g.finish(
        "t",
        [vi(n) for n in feeds],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        producer_version="0",
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def _rope_np(x: np.ndarray, heads: int) -> np.ndarray:
    cos, sin = layers.rotary_tables(THETA, D, S)
    x4 = x.reshape(B, S, heads, D)
    c = np.concatenate([cos, cos], 1)[None, :, None]
    s = np.concatenate([sin, sin], 1)[None, :, None]
    rot = np.concatenate([-x4[..., D // 2 :], x4[..., : D // 2]], -1)
    return np.asarray((x4 * c + rot * s).reshape(B, S, heads * D))


def _reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, causal: bool
) -> np.ndarray:
    """transformers' eager attention: repeat_kv, scores * scale + masks, softmax."""
    qh = q.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(B, S, KV, D).transpose(0, 2, 1, 3), H // KV, axis=1)
    vh = np.repeat(v.reshape(B, S, KV, D).transpose(0, 2, 1, 3), H // KV, axis=1)
    scores = qh @ kh.transpose(0, 1, 3, 2) * SCALE
    allowed = mask[:, None, None, :].astype(bool)
    if causal:
        allowed = allowed & np.tril(np.ones((S, S), bool))[None, None]
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.asarray((p @ vh).transpose(0, 2, 1, 3).reshape(B, S, H * D))


@pytest.mark.parametrize(
    ("kind", "causal"), [("gqa", True), ("plain", True), ("flash", False), ("plain", False)]
)
@pytest.mark.parametrize("rotary", [False, True])
def test_attention_kinds_equal_the_reference(kind: str, causal: bool, rotary: bool) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, S, H * D)).astype(np.float32)
    k = rng.standard_normal((B, S, KV * D)).astype(np.float32)
    v = rng.standard_normal((B, S, KV * D)).astype(np.float32)
    mask = np.ones((B, S), np.int64)
    mask[1, 5:] = 0  # right padding
    g = GraphBuilder()
    plan = decoder.plan_attention(g, kind, causal=causal, heads=H, head_dim=D, scale=SCALE)
    fused = kind != "plain"
    rot = layers.rotary_consts(g, THETA, D, 64, "rope", fused=fused) if rotary else None
    qn, kn = "q", "k"
    if rot is not None and kind != "gqa":
        qn = layers.rotate(g, qn, rot, "q_rot", heads=H, head_dim=D, fused=fused)
        kn = layers.rotate(g, kn, rot, "k_rot", heads=KV, head_dim=D, fused=fused)
    out = decoder.attention(
        g,
        plan,
        qn,
        kn,
        "v",
        "attn",
        heads=H,
        kv_heads=KV,
        head_dim=D,
        scale=SCALE,
        rotary=rot if kind == "gqa" else None,
    )
    got = _run(
        g,
        out,
        {INPUT_IDS: np.zeros((B, S), np.int64), ATTENTION_MASK: mask, "q": q, "k": k, "v": v},
    )
    if rotary:
        q, k = _rope_np(q, H), _rope_np(k, KV)
    want = _reference(q, k, v, mask, causal)
    real = mask.astype(bool)  # padded queries are never pooled
    np.testing.assert_allclose(got[real], want[real], atol=2e-5)


def test_gqa_refuses_bidirectional_and_flash_refuses_causal() -> None:
    with pytest.raises(ValueError, match="causal only"):
        decoder.plan_attention(GraphBuilder(), "gqa", causal=False, heads=H, head_dim=D)
    with pytest.raises(ValueError, match="bidirectional"):
        decoder.plan_attention(GraphBuilder(), "flash", causal=True, heads=H, head_dim=D)


@pytest.mark.parametrize("fused", [True, False])
def test_rms_norms(fused: bool) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, S, H * D)).astype(np.float32)
    r = rng.standard_normal((B, S, H * D)).astype(np.float32)
    w = rng.standard_normal(H * D).astype(np.float32)
    hw = rng.standard_normal(D).astype(np.float32)

    def rms(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return np.asarray(a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6) * weight)

    g = GraphBuilder()
    normed, total = decoder.add_rms_norm(g, "x", "r", w, 1e-6, "n", fused=fused)
    both = g.op1("Concat", [normed, total], "both", axis=-1)
    got = _run(g, both, {"x": x, "r": r})
    np.testing.assert_allclose(got[..., : H * D], rms(x + r, w), atol=1e-5)
    np.testing.assert_allclose(got[..., H * D :], x + r, atol=1e-6)
    g = GraphBuilder()
    out = decoder.head_rms_norm(g, "x", hw, 1e-6, "hn", heads=H, head_dim=D, fused=fused)
    want = rms(x.reshape(B, S, H, D), hw).reshape(B, S, H * D)
    np.testing.assert_allclose(_run(g, out, {"x": x}), want, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_tanh_gelu(fused: bool) -> None:
    x = np.linspace(-6, 6, 97, dtype=np.float32).reshape(1, 1, 97)
    g = GraphBuilder()
    got = _run(g, decoder.activation(g, "x", "gelu_pytorch_tanh", "a", fused=fused), {"x": x})
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(got, want, atol=1e-5)
