"""Qwen2 decoders (jina-code-embeddings, gte-Qwen2, nomic-embed-code) and the Llama / Mistral
graphs they share, from ``model.safetensors``; also the block builder ``qwen3`` extends.

As transformers' ``Qwen2Model`` / ``LlamaModel`` / ``MistralModel`` compute it (eval mode):

    x = embed_tokens[ids]
    per layer:  h = rms(x) ;  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
                [qwen3: q, k = rms_head(q), rms_head(k)   per head, over head_dim]
                q, k = rope(q), rope(k)     half-split, theta = rope_theta, positions arange
                a = softmax(q k^T / sqrt(head_dim) + mask) v    kv heads repeated to the q
                                                                heads (GQA / MQA)
                x = x + a Wo (+bo)
                x = x + down(silu(gate(rms(x))) * up(rms(x)))
    out = rms(x)        rms(x) = x / sqrt(mean(x^2) + eps) * w

``mask`` is causal (the models' default) or, with ``is_causal: false`` in config.json
(transformers 5's bidirectional switch, what sentence-transformers 6 honours),
bidirectional over the real tokens. Nothing else decides it: gte-Qwen2 as published (its card:
bidirectional; its config.json: no ``is_causal``, ``auto_map`` to its own modeling_qwen) is
refused by ``models/remote_code.py`` before this module is reached, naming ``is_causal`` as
the explicit choice. ``head_dim`` may differ from ``hidden / heads``.
Biases: Qwen2 has them on q, k and v; Llama/Mistral/Qwen3 on q, k, v and o when
``attention_bias`` is true. Tied or untied embeddings do not matter (the LM head is unused).

Refused by name (each changes the maths and no embedder in embedpool's list needs it):
``rope_scaling`` / a ``rope_type`` other than default (linear, dynamic, yarn, llama3,
longrope), ``partial_rotary_factor`` below 1, sliding windows (``use_sliding_window`` true,
``sliding_attention`` layers, Mistral's ``sliding_window``), ``mlp_bias``, a ``hidden_act``
other than silu, ``use_bidirectional_attention`` (transformers' Qwen/Llama ignore it;
``is_causal: false`` is the switch they read).

    per layer (fused):  SkipSimplifiedLayerNormalization (residual + rms) -> q, k, v MatMuls
                        [-> SimplifiedLayerNormalization per head] -> GroupQueryAttention
                        (rotary inside, causal; memory linear in length) -> MatMul o
                        -> SkipSimplifiedLayerNormalization -> gate, up MatMuls
                        -> QuickGelu(alpha=1) = SiLU, Mul -> MatMul down
    bidirectional:      RotaryEmbedding(q, k) -> K/V heads repeated -> MultiHeadAttention
                        without a mask (FlashAttention path, padding by an extra column)

Padding: embedpool right-pads, so a real query never sees a padded key under the causal mask
(padded keys come after it), and its positions are those of the text alone.

Fused against unfused fp32, measured with ``benchmarks/decoders.py --fused-vs-plain --layers 4
--lengths 256,2048 --rounds 2`` (Qwen3-Embedding-0.6B's width, 4 of its layers, random
weights, 1 thread, both graphs interleaved in one process, chunks per CPU second; AMD EPYC
Zen 3: AVX2, no AVX-512, no VNNI; a shared machine at load ~18): at 256 tokens fused 1.52,
unfused 1.84 (0.83x; at 3 x 256 tokens GroupQueryAttention 1.71, Softmax attention in the
otherwise fused graph 1.65, the unfused graph 1.81: within that load's noise); at 2,048 tokens
0.167 against 0.123, the fused graph **1.36x faster**. It ships: faster where the time goes
(long texts), and its attention memory is linear in length where the unfused graph holds
every head's [seq, seq] scores (4.3 GB for 16 heads at 8,192 tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedpool.errors import ModelError
from embedpool.graph.builder import INPUT_IDS, Array, Encoder, GraphBuilder, linear_t
from embedpool.graph.families import decoder, layers

NAME = "qwen2"
BUILDER_VERSION = 3  # 2: GroupQueryAttention without its unused K/V cache outputs; 3: flash padding columns from layers.padding_columns
MODEL_TYPES = frozenset({"qwen2", "llama", "mistral"})


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool  # Qwen3's per-head q/k RMSNorm
    causal: bool


def parse_decoder(
    config: Mapping[str, Any],
    where: str,
    *,
    family: str,
    qkv_bias: bool,
    o_bias: bool,
    qk_norm: bool,
) -> DecoderConfig:
    """The fields every Llama-style decoder shares; refuses by name what changes the maths
    and is not built (see the module docstring)."""
    model_type = str(config.get("model_type", ""))

    def refuse(key: str, why: str) -> ModelError:
        return ModelError(
            f"{where}: {key} = {config.get(key)!r}: {why}; embedpool builds "
            f"{family} decoders without it"
        )

    act = str(config.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise refuse("hidden_act", "the MLP activation is not SiLU (SwiGLU)")
    if config.get("rope_scaling"):
        scaling = config["rope_scaling"]
        kind = (
            scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        )
        if kind not in (None, "default"):
            raise refuse("rope_scaling", f"rotary scaling {kind!r} changes the positions")
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise refuse("rope_parameters", "not an object")
    extra = sorted(set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"})
    if extra:
        raise ModelError(
            f"{where}: rope_parameters keys {extra} are not built (default "
            f"rotary positions take rope_theta only); embedpool builds {family} "
            "decoders without them"
        )
    if rope.get("rope_type", "default") != "default":
        raise ModelError(
            f"{where}: rope_parameters.rope_type = {rope['rope_type']!r}: rotary "
            f"scaling changes the positions; embedpool builds {family} decoders "
            "with the default rotary positions only"
        )
    for src in (config, rope):
        if float(src.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError(
                f"{where}: partial_rotary_factor = {src['partial_rotary_factor']!r}:"
                f" embedpool builds {family} decoders with rotary over the whole "
                "head only"
            )
    if config.get("use_sliding_window"):
        raise refuse("use_sliding_window", "sliding-window attention is not built")
    if model_type == "mistral" and config.get("sliding_window") is not None:
        raise refuse(
            "sliding_window",
            "Mistral's sliding-window attention is not built (set "
            "it to null only if the model was trained without it)",
        )
    types = config.get("layer_types")
    if types is not None and any(t != "full_attention" for t in types):
        raise refuse("layer_types", "only full_attention layers are built (no sliding window)")
    if config.get("mlp_bias"):
        raise refuse("mlp_bias", "MLP biases are not built")
    if config.get("use_bidirectional_attention"):
        raise refuse(
            "use_bidirectional_attention",
            "transformers' model ignores this field "
            "(is_causal: false is the switch it reads), so the reference attends "
            "causally; refused rather than guess which one the model was trained with",
        )
    is_causal = config.get("is_causal", True)
    if not isinstance(is_causal, bool):
        raise refuse("is_causal", "must be true or false")
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        cfg = DecoderConfig(
            model_type=model_type,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            num_layers=int(config["num_hidden_layers"]),
            intermediate_size=int(config["intermediate_size"]),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
            max_positions=int(config.get("max_position_embeddings", 32_768)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            causal=is_causal,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: missing or bad {family} field: {exc}") from exc
    if heads <= 0 or kv <= 0 or heads % kv:
        raise ModelError(
            f"{where}: {heads} attention heads are not a multiple of {kv} key/value heads"
        )
    if head_dim <= 0 or head_dim % 2:
        raise ModelError(f"{where}: head_dim {head_dim} is not even (rotary halves it)")
    return cfg


def parse_config(config: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    model_type = str(config.get("model_type", ""))
    if model_type not in MODEL_TYPES:
        raise ModelError(f"{where}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    if model_type == "qwen2":  # Qwen2Attention: q, k, v with biases, o without
        return parse_decoder(
            config, where, family="Qwen2", qkv_bias=True, o_bias=False, qk_norm=False
        )
    bias = bool(config.get("attention_bias", False))
    return parse_decoder(
        config, where, family=model_type.capitalize(), qkv_bias=bias, o_bias=bias, qk_norm=False
    )


# --- weights -------------------------------------------------------------------------------------


def required_keys(cfg: DecoderConfig) -> list[str]:
    keys = ["embed_tokens.weight", "norm.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if cfg.qkv_bias:
            keys += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if cfg.o_bias:
            keys.append(p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return keys


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv, f = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    out: dict[str, tuple[int, ...]] = {"norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
    return out


def load_weights(path: Any, cfg: DecoderConfig) -> dict[str, Array]:
    """Float32 tensors keyed without a model prefix (``layers.N.self_attn.q_proj.weight``);
    an unused ``lm_head.weight`` is dropped."""
    from embedpool.graph.weights import check_shapes, load_safetensors

    out = load_safetensors(path)
    out.pop("lm_head.weight", None)
    missing = [k for k in required_keys(cfg) if k not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{path}: not a {cfg.model_type} checkpoint matching its config.json; missing {shown}"
        )
    check_shapes(out, expected_shapes(cfg), str(path))
    return out


# --- the graph -----------------------------------------------------------------------------------


def _proj(
    g: GraphBuilder,
    x: str,
    w: Mapping[str, Array],
    key: str,
    name: str,
    *,
    role: Any,
    layer: int,
    bias: bool,
) -> str:
    y = g.linear(x, linear_t(w, key), name, role=role, layer=layer)
    if bias:
        y = g.op1("Add", [y, g.const(f"{name}.b", w[key + ".bias"])], f"{name}.biased")
    return y


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: DecoderConfig,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    attention: str = "",
) -> Encoder:
    """Token states [batch, seq, hidden] after the final norm. ``int8_ready`` (fused only):
    the token table as int8 rows; every projection is a plain MatMul either way.
    ``attention``: one of decoder.ATTENTION_KINDS (default: ``gqa`` fused causal, ``flash``
    fused bidirectional, ``plain`` unfused)."""
    kind = layers.attention_kind(
        attention, fused=fused, int8_ready=int8_ready, default="gqa" if cfg.causal else "flash"
    )
    w = weights
    nh, kvh, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_eps
    x = layers.gather_rows(g, w["embed_tokens.weight"], INPUT_IDS, "emb.word", int8=int8_ready)
    plan = decoder.plan_attention(g, kind, causal=cfg.causal, heads=nh, head_dim=hd)
    rope_fused = kind != "plain"
    rot = layers.rotary_consts(g, cfg.rope_theta, hd, cfg.max_positions, "rope", fused=rope_fused)
    residual = x
    normed = decoder.rms_norm(
        g, x, w["layers.0.input_layernorm.weight"], eps, "l0.in_norm", fused=fused
    )
    for i in range(cfg.num_layers):
        p, n = f"layers.{i}.", f"l{i}"
        q, k, v = (
            _proj(
                g,
                normed,
                w,
                p + f"self_attn.{r}_proj",
                f"{n}.{r}",
                role=r,
                layer=i,
                bias=cfg.qkv_bias,
            )
            for r in "qkv"
        )
        if cfg.qk_norm:
            q = decoder.head_rms_norm(
                g,
                q,
                w[p + "self_attn.q_norm.weight"],
                eps,
                f"{n}.q_norm",
                heads=nh,
                head_dim=hd,
                fused=fused,
            )
            k = decoder.head_rms_norm(
                g,
                k,
                w[p + "self_attn.k_norm.weight"],
                eps,
                f"{n}.k_norm",
                heads=kvh,
                head_dim=hd,
                fused=fused,
            )
        if kind != "gqa":
            q = layers.rotate(g, q, rot, f"{n}.q_rot", heads=nh, head_dim=hd, fused=rope_fused)
            k = layers.rotate(g, k, rot, f"{n}.k_rot", heads=kvh, head_dim=hd, fused=rope_fused)
        ctx = decoder.attention(
            g,
            plan,
            q,
            k,
            v,
            f"{n}.attn",
            heads=nh,
            kv_heads=kvh,
            head_dim=hd,
            rotary=rot if kind == "gqa" else None,
        )
        o = _proj(
            g, ctx, w, p + "self_attn.o_proj", f"{n}.o", role="attn_out", layer=i, bias=cfg.o_bias
        )
        normed, residual = decoder.add_rms_norm(
            g,
            o,
            residual,
            w[p + "post_attention_layernorm.weight"],
            eps,
            f"{n}.post_norm",
            fused=fused,
        )
        mlp = layers.gated_mlp(
            g,
            normed,
            {r: linear_t(w, p + f"mlp.{r}_proj") for r in ("gate", "up", "down")},
            n,
            i,
            act="silu",
            fused=fused,
        )
        last = i == cfg.num_layers - 1
        norm_key = "norm.weight" if last else f"layers.{i + 1}.input_layernorm.weight"
        normed, residual = decoder.add_rms_norm(
            g,
            mlp,
            residual,
            w[norm_key],
            eps,
            "final_norm" if last else f"l{i + 1}.in_norm",
            fused=fused,
        )
    return Encoder(normed, cfg.hidden_size)


#: The whole model (the decoder + one pooling + normalisation), for tests and benchmarks.
build_model = layers.model_builder(__name__, "qwen2")
