"""ModernBERT encoders (gte-modernbert-base, modernbert-embed-base) from ``model.safetensors``.

As transformers' ``ModernBertModel`` computes it (its SDPA/eager path; the flash-attention path
unpads, which for an encoder with a padding mask gives the same vectors):

- **Pre-norm** layers: ``x += attn(attn_norm(x)); x += mlp(mlp_norm(x))``; layer 0 has no
  ``attn_norm`` (the embedding norm precedes it), and a ``final_norm`` follows the last layer.
  Norms and projections have **no biases**.
- **Rotary positions with two bases**: global layers use ``global_rope_theta`` (160000),
  local ones ``local_rope_theta`` (10000); half-split convention, positions ``arange(seq)``.
- **Alternating attention**: every ``global_attn_every_n_layers``-th layer (from layer 0) is
  global; the others see only keys within ``local_attention // 2`` positions (a
  bidirectional sliding window). Newer configs say the same with ``layer_types``.
- **GeGLU**: ``Wi`` projects to ``2 x intermediate``; ``Wo(gelu(first half) * second half)``.

Padding: embedpool right-pads, so real tokens keep the unpadded reference's positions; padded
keys are masked in every layer, which makes each real token's state equal the unpadded one.

    per layer (fused):  [SkipLayerNormalization: attn_norm] -> q, k, v MatMuls
                        -> RotaryEmbedding(q), RotaryEmbedding(k) (this layer's base)
                        -> MultiHeadAttention(mask [+ window bias]) -> MatMul Wo
                        -> SkipLayerNormalization: mlp_norm (4th output: the residual sum)
                        -> MatMul gate -> Gelu, * MatMul up -> MatMul down

Fused against unfused, measured with ``benchmarks/families.py --families modernbert
--variants fp32,fp32-plain --lengths 256,2048 --repeat 2 --chunks 6 --long-chunks 1``
(gte-modernbert-base's shape, random weights, 1 thread, both graphs interleaved in one
process, chunks per CPU second; AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI; the machine was
shared, load 15-20 on 2 cores): at 256 tokens 1.01 fused vs 1.09 unfused (8% for the unfused
graph, at the edge of what that load tells apart); at 2,048 tokens 0.103 vs 0.074, the fused
graph **1.39x faster**: block-local attention computes 3 x 64 keys per query where the
unfused graph scores all [seq, seq] pairs and masks the window. Both give the reference's
vectors (tests/test_families.py). The fused graph ships: it wins where time goes (long
texts), and its memory grows linearly with length (see layers.flash_attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import INPUT_IDS, Array, Encoder, GraphBuilder
from embedpool.graph.families import layers

NAME = "modernbert"
BUILDER_VERSION = 2  # 2: the int8-ready graph's norms are Add + LayerNormalization
MODEL_TYPES = frozenset({"modernbert"})
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModernBertConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    norm_eps: float
    local_window: int  # local_attention: a key is seen within local_window // 2 positions
    global_theta: float
    local_theta: float
    max_positions: int
    layer_types: tuple[str, ...]  # per layer: full_attention | sliding_attention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> ModernBertConfig:
        if str(config.get("model_type", "")) not in MODEL_TYPES:
            raise ModelError(f"{where}: model_type {config.get('model_type')!r} is not modernbert")
        for flag in ("norm_bias", "attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ModelError(
                    f"{where}: {flag} is true: embedpool builds ModernBERT without "
                    "biases, as every released ModernBERT is"
                )
        act = str(config.get("hidden_activation", "gelu"))
        if act not in layers.ERF_GELU:
            raise ModelError(
                f"{where}: hidden_activation {act!r} is not supported "
                "(supported: gelu, ModernBERT's GeGLU)"
            )
        try:
            n_layers = int(config.get("num_hidden_layers", 22))
            global_theta, local_theta = _rope_thetas(config, where)
            cfg = cls(
                hidden_size=int(config.get("hidden_size", 768)),
                num_heads=int(config.get("num_attention_heads", 12)),
                num_layers=n_layers,
                intermediate_size=int(config.get("intermediate_size", 1152)),
                norm_eps=float(config.get("norm_eps", 1e-5)),
                local_window=int(config.get("local_attention", 128)),
                global_theta=global_theta,
                local_theta=local_theta,
                max_positions=int(config.get("max_position_embeddings", 8192)),
                layer_types=_layer_types(config, n_layers, where),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: missing or bad ModernBERT field: {exc}") from exc
        if cfg.local_window < 2 and "sliding_attention" in cfg.layer_types:
            raise ModelError(f"{where}: local_attention {cfg.local_window} leaves no window")
        if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads or cfg.head_dim % 2:
            raise ModelError(
                f"{where}: hidden size {cfg.hidden_size} with {cfg.num_heads} "
                "heads does not give an even head size"
            )
        return cfg


def _layer_types(config: Mapping[str, Any], n_layers: int, where: str) -> tuple[str, ...]:
    types = layers.listed_layer_types(config, n_layers, where, LAYER_TYPES)
    if types is not None:
        return types
    every = int(config.get("global_attn_every_n_layers", 3))
    if every < 1:
        raise ModelError(f"{where}: global_attn_every_n_layers must be >= 1, got {every}")
    return tuple("sliding_attention" if i % every else "full_attention" for i in range(n_layers))


def _rope_thetas(config: Mapping[str, Any], where: str) -> tuple[float, float]:
    """(global, local) rotary bases from either config format (the old ``*_rope_theta``
    fields or transformers 5's ``rope_parameters`` per layer type)."""
    if config.get("rope_scaling"):
        raise ModelError(f"{where}: rope_scaling {config['rope_scaling']} is not supported")
    params = config.get("rope_parameters") or {}
    thetas = []
    for kind, old_key, default in (
        ("full_attention", "global_rope_theta", 160_000.0),
        ("sliding_attention", "local_rope_theta", 10_000.0),
    ):
        p = params.get(kind) or {}
        if p.get("rope_type", "default") != "default":
            raise ModelError(
                f"{where}: rope_type {p['rope_type']!r} for {kind} is not "
                "supported (plain rotary positions only)"
            )
        theta = p.get("rope_theta", config.get(old_key, default))
        if theta is None:
            raise ModelError(
                f"{where}: {old_key} is null; transformers has no meaning for it "
                "either, so embedpool will not guess"
            )
        thetas.append(float(theta))
    return thetas[0], thetas[1]


# --- weights -------------------------------------------------------------------------------------


def _required_keys(cfg: ModernBertConfig) -> list[str]:
    keys = ["embeddings.tok_embeddings.weight", "embeddings.norm.weight", "final_norm.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keys += [
            p + k
            for k in (
                "attn.Wqkv.weight",
                "attn.Wo.weight",
                "mlp_norm.weight",
                "mlp.Wi.weight",
                "mlp.Wo.weight",
            )
        ]
        if i:
            keys.append(p + "attn_norm.weight")
    return keys


def load_weights(path: Any, cfg: ModernBertConfig) -> dict[str, Array]:
    """Float32 tensors of a ModernBERT checkpoint, keyed without any model prefix."""
    from embedpool.graph.weights import load_safetensors

    out = load_safetensors(path)
    missing = [k for k in _required_keys(cfg) if k not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{path}: not a ModernBERT checkpoint matching its config.json; missing {shown}"
        )
    return out


# --- the graph -----------------------------------------------------------------------------------


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: ModernBertConfig,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    attention: str = "",
) -> Encoder:
    """Token states [batch, seq, hidden] after the final norm. ``int8_ready`` (fused only):
    the word table as int8 rows; every projection is already a plain MatMul. ``attention``:
    one of layers.ATTENTION_KINDS (default: ``flash`` fused, ``plain`` unfused)."""
    kind = layers.attention_kind(attention, fused=fused, int8_ready=int8_ready)
    w, h, inter = weights, cfg.hidden_size, cfg.intermediate_size
    x = layers.gather_rows(
        g, w["embeddings.tok_embeddings.weight"], INPUT_IDS, "emb.word", int8=int8_ready
    )
    x = layers.layer_norm(g, x, w["embeddings.norm.weight"], None, cfg.norm_eps, "emb.ln")
    rope = {
        lt: layers.rotary_consts(
            g, theta, cfg.head_dim, cfg.max_positions, f"rope.{lt}", fused=fused
        )
        for lt, theta in (
            ("full_attention", cfg.global_theta),
            ("sliding_attention", cfg.local_theta),
        )
        if lt in cfg.layer_types
    }
    nh, hd = cfg.num_heads, cfg.head_dim
    plan = layers.plan_attention(
        g,
        x,
        kind,
        heads=nh,
        head_dim=hd,
        window_half=cfg.local_window // 2 if "sliding_attention" in cfg.layer_types else None,
        has_global="full_attention" in cfg.layer_types,
    )
    residual, normed = x, x  # layer 0 has no attn_norm
    for i, layer_type in enumerate(cfg.layer_types):
        p, n = f"layers.{i}.", f"l{i}"
        wqkv = w[p + "attn.Wqkv.weight"]  # [3h, h]: q rows, then k, then v
        q, k, v = layers.qkv(
            g,
            normed,
            {r: np.ascontiguousarray(wqkv[j * h : (j + 1) * h].T) for j, r in enumerate("qkv")},
            n,
            i,
        )
        q = layers.rotate(g, q, rope[layer_type], f"{n}.q_rot", fused=fused, heads=nh, head_dim=hd)
        k = layers.rotate(g, k, rope[layer_type], f"{n}.k_rot", fused=fused, heads=nh, head_dim=hd)
        ctx = layers.self_attention(
            g,
            plan,
            q,
            k,
            v,
            f"{n}.attn",
            heads=nh,
            head_dim=hd,
            local=layer_type == "sliding_attention",
        )
        o = g.linear(
            ctx, np.ascontiguousarray(w[p + "attn.Wo.weight"].T), f"{n}.o", role="attn_out", layer=i
        )
        normed, residual = layers.add_norm(
            g,
            o,
            residual,
            w[p + "mlp_norm.weight"],
            None,
            cfg.norm_eps,
            f"{n}.mlp_norm",
            fused=fused,
            int8_ready=int8_ready,
        )
        wi = w[p + "mlp.Wi.weight"]  # [2 inter, h]: the activated half first
        mlp = layers.gated_mlp(
            g,
            normed,
            {
                "gate": np.ascontiguousarray(wi[:inter].T),
                "up": np.ascontiguousarray(wi[inter:].T),
                "down": np.ascontiguousarray(w[p + "mlp.Wo.weight"].T),
            },
            n,
            i,
            act="gelu",
            fused=fused,
        )
        last = i == cfg.num_layers - 1
        norm_key = "final_norm.weight" if last else f"layers.{i + 1}.attn_norm.weight"
        normed, residual = layers.add_norm(
            g,
            mlp,
            residual,
            w[norm_key],
            None,
            cfg.norm_eps,
            "final_norm" if last else f"l{i + 1}.attn_norm",
            fused=fused,
            int8_ready=int8_ready,
        )
    return Encoder(normed, cfg.hidden_size)


#: The whole model (the encoder + one pooling + normalisation), for tests and benchmarks.
build_model = layers.model_builder(__name__, "modernbert")


# --- the family interface (see embedpool.graph.families) ------------------------------------

parse_config = ModernBertConfig.from_dict
