"""NomicBert encoders (nomic-embed-text-v1/v1.5, CodeRankEmbed) from ``model.safetensors``.

BERT's post-norm block with three changes, as transformers' ``NomicBertModel`` computes it:

- **Rotary positions** instead of a position table: half-split ("rotate_half") over the whole
  head, base ``rotary_emb_base`` (1000 in the nomic models), positions ``arange(seq)``.
- **SwiGLU**: ``fc2(silu(fc12(x)) * fc11(x))`` (``fc12`` is the gate).
- **No biases** in the projections (``qkv_proj_bias``, ``mlp_fc1_bias``, ``mlp_fc2_bias``
  false); the LayerNorms keep theirs.

Embeddings are ``LayerNorm(word + token_type[0])``; the type row is folded into the word table
(exact: both are added before the norm).

Two layouts are read, for the config and for the tensors separately: nomic-ai's own
(``n_embd``; ``emb_ln``, ``encoder.layers.N.attn.Wqkv``, ``mlp.fc11``..., every checkpoint on
the hub) and transformers' native one (``hidden_size``; ``layers.N.self_attn.q_proj``...).
transformers 5 saves a native config beside nomic-ai's tensor names, so the tensors' layout is
read from their names, never from the config. Config fields that change the maths and
that no released model sets (partial or interleaved rotary, rotary scaling, pre-norm, parallel
blocks, RMSNorm, biases, causal attention, other activations) are refused by name.

    per layer (fused):  q, k, v MatMuls -> RotaryEmbedding(q), RotaryEmbedding(k)
                        -> MultiHeadAttention(mask) -> MatMul o -> SkipLayerNormalization
                        -> MatMul gate -> QuickGelu(alpha=1) = SiLU, * MatMul up
                        -> MatMul down -> SkipLayerNormalization

Fused against unfused, measured with ``benchmarks/families.py --families nomic --variants
fp32,fp32-plain --lengths 256,2048 --repeat 2 --chunks 6 --long-chunks 1``
(nomic-embed-text-v1.5's shape, random weights, 1 thread, both graphs interleaved in one
process, chunks per CPU second; AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI; the machine was
shared, load 15-20 on 2 cores): 1.107 fused vs 1.116 unfused at 256 tokens, 0.0950 vs
0.0991 at 2,048: **the same speed** within that load's noise. The fused graph ships for
memory: its FlashAttention never holds the [heads, seq, seq] scores, +58 MB against +6.4 GB
for one Softmax attention at 8,192 tokens (layers.flash_attention), which is what makes
8,192 tokens fit a worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import INPUT_IDS, Array, Encoder, GraphBuilder, linear_t
from embedpool.graph.families import layers

NAME = "nomic_bert"
BUILDER_VERSION = 2  # 2: the int8-ready graph's norms are Add + LayerNormalization
MODEL_TYPES = frozenset({"nomic_bert"})


@dataclass(frozen=True)
class NomicConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    layer_norm_eps: float
    rotary_base: float
    max_positions: int
    hub_layout: bool  # the config in nomic-ai's format (the tensors' layout: tensor_layout)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> NomicConfig:
        if str(config.get("model_type", "")) not in MODEL_TYPES:
            raise ModelError(f"{where}: model_type {config.get('model_type')!r} is not nomic_bert")
        hub = "n_embd" in config
        try:
            cfg = _hub_fields(config, where) if hub else _native_fields(config, where)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: missing or bad NomicBert field: {exc}") from exc
        if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads or cfg.head_dim % 2:
            raise ModelError(
                f"{where}: hidden size {cfg.hidden_size} with {cfg.num_heads} "
                "heads does not give an even head size"
            )
        return cfg


#: nomic-ai layout: fields whose value changes the computation, and the value embedpool
#: builds. Their defaults are those of nomic-ai's NomicBertConfig (a missing field means it).
_HUB_REQUIRED: dict[str, Any] = {
    "activation_function": "swiglu",
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "prenorm": False,
    "parallel_block": False,
    "use_rms_norm": False,
    "causal": False,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
_HUB_DEFAULTS: dict[str, Any] = {
    "activation_function": "gelu_new",
    "rotary_emb_fraction": 0.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "qkv_proj_bias": True,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
    "prenorm": False,
    "parallel_block": False,
    "use_rms_norm": False,
    "causal": False,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}


def _hub_fields(config: Mapping[str, Any], where: str) -> NomicConfig:
    for key, want in _HUB_REQUIRED.items():
        got = config.get(key, _HUB_DEFAULTS[key])
        if got != want and not (isinstance(want, float) and got == want):
            raise ModelError(
                f"{where}: {key} = {got!r}{'' if key in config else ' (its default)'}: embedpool "
                f"builds NomicBert with {key} = {want!r} only (as nomic-embed-text and "
                "CodeRankEmbed have it)"
            )
    return NomicConfig(
        hidden_size=int(config["n_embd"]),
        num_heads=int(config["n_head"]),
        num_layers=int(config["n_layer"]),
        intermediate_size=int(config.get("n_inner") or 4 * int(config["n_embd"])),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        rotary_base=float(config.get("rotary_emb_base", 10_000)),
        max_positions=int(config.get("n_positions", 2048)),
        hub_layout=True,
    )


def _native_fields(config: Mapping[str, Any], where: str) -> NomicConfig:
    act = str(config.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise ModelError(
            f"{where}: hidden_act {act!r} is not supported for NomicBert "
            "(supported: silu, the SwiGLU of the nomic models)"
        )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ModelError(
            f"{where}: rope {rope or config.get('rope_scaling')} is not supported "
            "(plain rotary positions only)"
        )
    hidden, heads = int(config.get("hidden_size", 768)), int(config.get("num_attention_heads", 12))
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ModelError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    return NomicConfig(
        hidden_size=hidden,
        num_heads=heads,
        num_layers=int(config.get("num_hidden_layers", 12)),
        intermediate_size=int(config.get("intermediate_size", 3072)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        rotary_base=float(rope.get("rope_theta", config.get("rope_theta", 1000.0))),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        hub_layout=False,
    )


# --- weights -------------------------------------------------------------------------------------


def _hub_to_canonical(w: Mapping[str, Array], cfg: NomicConfig) -> dict[str, Array]:
    """nomic-ai key names -> the names this module builds from (transformers' native ones)."""
    out: dict[str, Array] = {}
    for key, value in w.items():
        key = key.replace("emb_ln.", "embeddings.LayerNorm.")
        if key.startswith("encoder.layers."):
            _, _, i, rest = key.split(".", 3)
            p = f"layers.{i}."
            if rest == "attn.Wqkv.weight":
                for part, chunk in zip("qkv", np.split(value, 3, axis=0), strict=True):
                    out[p + f"self_attn.{part}_proj.weight"] = chunk
                continue
            rest = (
                rest.replace("attn.out_proj", "self_attn.o_proj")
                .replace("mlp.fc11", "mlp.up_proj")
                .replace("mlp.fc12", "mlp.gate_proj")
                .replace("mlp.fc2", "mlp.down_proj")
                .replace("norm1", "post_attention_layernorm")
                .replace("norm2", "post_mlp_layernorm")
            )
            key = p + rest
        out[key] = value
    return out


def hub_tensor_names(names: Any) -> bool:
    """Whether the tensors carry nomic-ai's names (``emb_ln``, ``encoder.layers.N.attn.Wqkv``),
    whatever the config's format: transformers 5 saves them under a native config."""
    return any(str(k).startswith(("emb_ln.", "encoder.layers.")) for k in names)


def _required_keys(cfg: NomicConfig) -> list[str]:
    keys = [
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        keys += [
            p + f"{n}.{t}"
            for n in ("post_attention_layernorm", "post_mlp_layernorm")
            for t in ("weight", "bias")
        ]
    return keys


def load_weights(path: Any, cfg: NomicConfig) -> dict[str, Array]:
    """Float32 tensors keyed by transformers' native NomicBert names, whatever the layout."""
    from embedpool.graph.weights import load_safetensors

    raw = load_safetensors(path)
    out = _hub_to_canonical(raw, cfg) if hub_tensor_names(raw) else dict(raw)
    missing = [k for k in _required_keys(cfg) if k not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{path}: not a NomicBert checkpoint matching its config.json; missing {shown}"
        )
    return out


# --- the graph -----------------------------------------------------------------------------------


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: NomicConfig,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    attention: str = "",
) -> Encoder:
    """Token states [batch, seq, hidden]. ``int8_ready`` (fused only): the word table as int8
    rows; every projection is already a plain MatMul. ``attention``: one of
    layers.ATTENTION_KINDS (default: ``flash`` fused, ``plain`` unfused)."""
    kind = layers.attention_kind(attention, fused=fused, int8_ready=int8_ready)
    w = weights
    word = w["embeddings.word_embeddings.weight"]
    types = w.get("embeddings.token_type_embeddings.weight")
    table = word if types is None else word + types[0]
    x = layers.gather_rows(g, table, INPUT_IDS, "emb.word", int8=int8_ready)
    x = layers.layer_norm(
        g,
        x,
        w["embeddings.LayerNorm.weight"],
        w["embeddings.LayerNorm.bias"],
        cfg.layer_norm_eps,
        "emb.ln",
    )
    nh, hd = cfg.num_heads, cfg.head_dim
    plan = layers.plan_attention(g, x, kind, heads=nh, head_dim=hd)
    rot = layers.rotary_consts(
        g, cfg.rotary_base, cfg.head_dim, cfg.max_positions, "rope", fused=fused
    )
    for i in range(cfg.num_layers):
        p, n = f"layers.{i}.", f"l{i}"
        q, k, v = layers.qkv(g, x, {r: linear_t(w, p + f"self_attn.{r}_proj") for r in "qkv"}, n, i)
        q = layers.rotate(g, q, rot, f"{n}.q_rot", fused=fused, heads=nh, head_dim=hd)
        k = layers.rotate(g, k, rot, f"{n}.k_rot", fused=fused, heads=nh, head_dim=hd)
        ctx = layers.self_attention(g, plan, q, k, v, f"{n}.attn", heads=nh, head_dim=hd)
        o = g.linear(ctx, linear_t(w, p + "self_attn.o_proj"), f"{n}.o", role="attn_out", layer=i)
        x, _ = layers.add_norm(
            g,
            o,
            x,
            w[p + "post_attention_layernorm.weight"],
            w[p + "post_attention_layernorm.bias"],
            cfg.layer_norm_eps,
            f"{n}.ln1",
            fused=fused,
            int8_ready=int8_ready,
        )
        mlp = layers.gated_mlp(
            g,
            x,
            {r: linear_t(w, p + f"mlp.{r}_proj") for r in ("gate", "up", "down")},
            n,
            i,
            act="silu",
            fused=fused,
        )
        x, _ = layers.add_norm(
            g,
            mlp,
            x,
            w[p + "post_mlp_layernorm.weight"],
            w[p + "post_mlp_layernorm.bias"],
            cfg.layer_norm_eps,
            f"{n}.ln2",
            fused=fused,
            int8_ready=int8_ready,
        )
    return Encoder(x, cfg.hidden_size)


#: The whole model (the encoder + one pooling + normalisation), for tests and benchmarks.
build_model = layers.model_builder(__name__, "nomic")


# --- the family interface (see embedpool.graph.families) ------------------------------------

parse_config = NomicConfig.from_dict
