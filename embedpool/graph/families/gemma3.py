"""Gemma 3 text backbones (``gemma3_text``: EmbeddingGemma-300m) from ``model.safetensors``.

As transformers 5's ``Gemma3TextModel`` computes it with ``use_bidirectional_attention``
(what EmbeddingGemma's config sets; sentence-transformers then mean-pools, applies its two
Dense modules and normalises, all in the shared head):

- **Embeddings** ``embed_tokens[ids] * sqrt(hidden_size)``, the scale a float32 constant
  (folded into the table: the same float32 product).
- **Gemma RMSNorm** ``x / sqrt(mean(x^2) + eps) * (1 + w)`` (the stored weight is centred
  on 0), everywhere a norm appears; no biases anywhere.
- **Sandwich layers**::

      h = x + post_attention_norm(attn(input_norm(x)))
      x = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))

  and a final ``norm`` after the last layer.
- **Attention**: ``heads`` query heads and ``num_key_value_heads`` key/value heads (one for
  EmbeddingGemma: multi-query; each key/value head serves ``heads / kv_heads`` query heads,
  transformers' ``repeat_kv`` order), each ``head_dim`` wide, independent of
  ``hidden / heads`` (256 against 768 / 3). Per-head RMSNorm of q and k (``q_norm``,
  ``k_norm``, with ``1 + w``) before the rotary positions; scores scaled by
  ``query_pre_attn_scalar ** -0.5`` (the graph's kernels scale by ``head_dim ** -0.5``, so the
  factor ``sqrt(head_dim / query_pre_attn_scalar)`` is folded into ``q_norm``'s weight: 1 for
  EmbeddingGemma, exact).
- **Rotary positions** (half-split), base ``rope_parameters.full_attention.rope_theta``
  (``rope_theta``, 1e6) in global layers and ``sliding_attention.rope_theta``
  (``rope_local_base_freq``, 1e4) in local ones; positions ``arange(seq)``.
- **Layer types**: ``layer_types``, else every ``sliding_window_pattern``-th layer (default
  6) global, the rest local. Bidirectional local layers see keys with
  ``|i - j| <= sliding_window // 2`` (transformers stores ``sliding_window // 2 + 1`` as an
  exclusive bound when the attention is bidirectional); global layers see every real token.
- **MLP** ``down(gelu_tanh(gate(x)) * up(x))`` (``gelu_pytorch_tanh``; ``gelu`` is the erf
  form).

Config fields that change these maths and that embedpool does not build are refused by name:
causal attention (``use_bidirectional_attention`` false: no Gemma 3 embedder is causal),
``attn_logit_softcapping``, ``attention_bias``, rotary scaling (``rope_scaling``, a
``rope_type`` other than ``default``), other activations, a null ``sliding_window`` with
local layers. ``final_logit_softcapping`` and ``tie_word_embeddings`` act on the language-model
head only, which an embedder does not have: they change no vector, and are accepted.

No fp16 graph (``FP16_UNSAFE``): EmbeddingGemma's model card says its activations do not
support float16 (float32 or bfloat16 only), and a random-weight fixture cannot show where a
trained model's activations overflow; so on a GPU ``auto`` runs the fp32 graph, and an
explicit fp16 is refused naming why.

Padding: embedpool right-pads, so real tokens keep the unpadded reference's positions;
padded keys are hidden in every layer (global: FlashAttention with the padding riding on an
extra dimension; local: block-local attention with a key bias, layers.local_attention, or,
when the padded batch is at most ``window // 2 + 1`` long, an ``If`` takes the global
layers' FlashAttention: every key is in every window then), so
each real token's state equals the unpadded one. Attention memory is linear in length: no
[seq, seq] score tensor is ever held.

    per layer (fused):  q, k, v MatMuls -> q/k SimplifiedLayerNormalization (per head)
                        -> RotaryEmbedding(q), RotaryEmbedding(k) (this layer's base)
                        -> k, v repeated to the query heads
                        -> MultiHeadAttention (flash: global layers, and local ones while the
                           sequence fits one window) | block-local attention (local layers)
                        -> MatMul o -> SimplifiedLayerNormalization (post-attention)
                        -> SkipSimplifiedLayerNormalization (pre-feedforward; 4th output:
                           the residual sum) -> MatMul gate -> FastGelu, * MatMul up
                        -> MatMul down -> SimplifiedLayerNormalization (post-feedforward)
                        -> SkipSimplifiedLayerNormalization (next input norm / final norm)

Fused against unfused, measured with ``benchmarks/families.py --families gemma3 --variants
fp32,fp32-plain --lengths 256,2048 --repeat 2 --chunks 6 --long-chunks 1`` (embeddinggemma-300m's
shape, random weights, 1 thread, both graphs interleaved in one process, chunks per CPU second;
AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI; the machine was shared, load 17-23 on 2 cores): at
256 tokens 1.20 fused vs 1.19 unfused, the same speed (before local layers switched to
FlashAttention within one window, block-local attention scored 3 blocks of keys per query and
the fused graph was 0.87x the unfused one); at 2,048 tokens 0.106 vs 0.072, the fused graph
**1.48x faster** (768 keys per query in local layers instead of 2,048), and its attention
memory linear in length where the unfused graph holds [heads, seq, seq] scores. At 512 tokens
(another run, ``--lengths 512 --chunks 4``, load 16-18) the unfused graph is 1.11x faster:
block-local attention scores 768 keys per query where 512 would do. A third branch for up to
3 half-windows (Softmax attention with the window as a bias, the unfused graph's own) was
tried and measured 1.09x there, no gain, so it is not built: the gap is not the local layers'
kernel alone. A pool
worker's peak RSS at one 2,048-token text: 1,142 MiB fused, 1,434 MiB unfused. Built at that
shape: the fp32 graph is 1,178 MiB, int8 314 MiB (the word table as int8 rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import INPUT_IDS, Array, Encoder, GraphBuilder, linear_t
from embedpool.graph.families import decoder, layers

if TYPE_CHECKING:
    import onnx

NAME = "gemma3"
BUILDER_VERSION = (
    3  # 2: local layers flash within one window; 3: a window wider than positions is global
)
MODEL_TYPES = frozenset({"gemma3_text"})
LAYER_TYPES = ("full_attention", "sliding_attention")
#: Why embedpool builds no fp16 graph of this family (graph.model_precisions): on a GPU
#: ``auto`` runs fp32, and an explicit fp16 is refused with this reason.
FP16_UNSAFE = (
    "EmbeddingGemma's model card: its activations do not support float16 (float32 or bfloat16)"
)
#: hidden_activation values: the tanh approximation (what Gemma uses) and the erf form.
ACTIVATIONS = decoder.TANH_GELU | {"gelu"}
#: transformers' Gemma3TextConfig defaults (EmbeddingGemma's config sets each of these).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class Gemma3Config:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    norm_eps: float
    max_positions: int
    sliding_window: int  # as config.json says it; local layers see |i - j| <= window // 2
    global_theta: float
    local_theta: float
    layer_types: tuple[str, ...]  # per layer: full_attention | sliding_attention
    activation: str  # gelu_pytorch_tanh | gelu_new | gelu
    vocab_size: int

    @property
    def window_half(self) -> int:
        """A local layer's query sees keys within this distance (transformers: the exclusive
        bound ``sliding_window // 2 + 1`` of a bidirectional window)."""
        return self.sliding_window // 2

    @property
    def query_scale(self) -> float:
        """What q is multiplied by so that kernels scaling by ``head_dim ** -0.5`` compute
        ``query_pre_attn_scalar ** -0.5``."""
        return math.sqrt(self.head_dim / self.query_pre_attn_scalar)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> Gemma3Config:
        if str(config.get("model_type", "")) not in MODEL_TYPES:
            raise ModelError(f"{where}: model_type {config.get('model_type')!r} is not gemma3_text")
        _refuse_unbuilt(config, where)

        def get(key: str) -> Any:
            value = config.get(key)
            return DEFAULTS[key] if value is None and key in DEFAULTS else value

        try:
            n_layers = int(get("num_hidden_layers"))
            global_theta, local_theta = _rope_thetas(config, where)
            heads, kv_heads = int(get("num_attention_heads")), int(get("num_key_value_heads"))
            cfg = cls(
                hidden_size=int(get("hidden_size")),
                intermediate_size=int(get("intermediate_size")),
                num_layers=n_layers,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=int(get("head_dim")),
                query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
                norm_eps=float(get("rms_norm_eps")),
                max_positions=int(get("max_position_embeddings")),
                sliding_window=_sliding_window(config),
                global_theta=global_theta,
                local_theta=local_theta,
                layer_types=_layer_types(config, n_layers, where),
                activation=str(get("hidden_activation")),
                vocab_size=int(config["vocab_size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: missing or bad Gemma 3 field: {exc}") from exc
        if cfg.activation not in ACTIVATIONS:
            raise ModelError(
                f"{where}: hidden_activation {cfg.activation!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        if "sliding_attention" in cfg.layer_types and cfg.sliding_window < 2:
            raise ModelError(
                f"{where}: sliding_window {config.get('sliding_window')!r} leaves "
                "the local layers no window"
            )
        if (
            min(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) <= 0
            or cfg.num_heads % cfg.num_kv_heads
            or cfg.head_dim % 2
        ):
            raise ModelError(
                f"{where}: num_attention_heads {cfg.num_heads}, "
                f"num_key_value_heads {cfg.num_kv_heads} and head_dim "
                f"{cfg.head_dim} must be positive, the heads a multiple of the "
                "key/value heads and head_dim even"
            )
        if cfg.query_pre_attn_scalar <= 0:
            raise ModelError(
                f"{where}: query_pre_attn_scalar must be positive, got {cfg.query_pre_attn_scalar}"
            )
        return cfg


def _refuse_unbuilt(config: Mapping[str, Any], where: str) -> None:
    """Fields whose maths embedpool does not build, each named."""
    if not config.get("use_bidirectional_attention", False):
        raise ModelError(
            f"{where}: use_bidirectional_attention is {config.get('use_bidirectional_attention')!r}"
            ": a causal Gemma 3 (a chat model's backbone) is not an embedder embedpool builds; "
            "EmbeddingGemma's config sets it true"
        )
    if config.get("attn_logit_softcapping") is not None:
        raise ModelError(
            f"{where}: attn_logit_softcapping "
            f"{config['attn_logit_softcapping']!r} is not supported (tanh-capped "
            "attention scores; EmbeddingGemma sets null)"
        )
    if config.get("attention_bias"):
        raise ModelError(
            f"{where}: attention_bias is true: embedpool builds Gemma 3 without "
            "projection biases, as every released Gemma 3 is"
        )


def _sliding_window(config: Mapping[str, Any]) -> int:
    """config.json's window; absent: transformers' default; null: 0 (refused when some layer
    is local, as transformers refuses to build its mask)."""
    if "sliding_window" not in config:
        return int(DEFAULTS["sliding_window"])
    value = config["sliding_window"]
    return 0 if value is None else int(value)


def _layer_types(config: Mapping[str, Any], n_layers: int, where: str) -> tuple[str, ...]:
    types = layers.listed_layer_types(config, n_layers, where, LAYER_TYPES)
    if types is not None:
        return types
    # transformers reads `sliding_window_pattern` (not the `_sliding_window_pattern` it saves)
    every = config.get("sliding_window_pattern")
    every = DEFAULTS["sliding_window_pattern"] if every is None else int(every)
    if every < 1:
        raise ModelError(f"{where}: sliding_window_pattern must be >= 1, got {every}")
    return tuple(
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)
    )


def _rope_thetas(config: Mapping[str, Any], where: str) -> tuple[float, float]:
    """(global, local) rotary bases from transformers 5's ``rope_parameters`` per layer type
    or the older ``rope_theta`` / ``rope_local_base_freq`` (EmbeddingGemma's hub config)."""
    if config.get("rope_scaling"):
        raise ModelError(
            f"{where}: rope_scaling {config['rope_scaling']} is not supported "
            "(plain rotary positions only)"
        )
    params = config.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or set(params) - set(LAYER_TYPES):
        raise ModelError(
            f"{where}: rope_parameters {params!r} must map full_attention and "
            "sliding_attention to their rotary parameters"
        )
    thetas = []
    for kind, old_key in (
        ("full_attention", "rope_theta"),
        ("sliding_attention", "rope_local_base_freq"),
    ):
        p = params.get(kind) or {}
        if p.get("rope_type", "default") != "default":
            raise ModelError(
                f"{where}: rope_type {p['rope_type']!r} for {kind} is not "
                "supported (plain rotary positions only)"
            )
        extra = sorted(set(p) - {"rope_type", "rope_theta"})
        if extra:
            raise ModelError(
                f"{where}: rope_parameters.{kind} keys {extra} are not supported "
                "(plain rotary positions: rope_type default and rope_theta)"
            )
        theta = p.get("rope_theta", config.get(old_key))
        thetas.append(float(DEFAULTS[old_key] if theta is None else theta))
    return thetas[0], thetas[1]


# --- weights -------------------------------------------------------------------------------------

LAYER_KEYS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "pre_feedforward_layernorm": (h,),
        "post_feedforward_layernorm": (h,),
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "self_attn.q_norm": (hd,),
        "self_attn.k_norm": (hd,),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    out = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_layers):
        out.update({f"layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return out


def load_weights(path: Any, cfg: Gemma3Config) -> dict[str, Array]:
    """Float32 tensors keyed as ``Gemma3TextModel`` names them (a ``model.`` prefix, as a
    ``Gemma3ForCausalLM`` save has, is dropped), checked against config.json's shapes."""
    from embedpool.graph.weights import load_safetensors

    out = load_safetensors(path)
    for prefix in ("language_model.model.", "language_model."):
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in out.items()}
    expected = _shapes(cfg)
    missing = [k for k in expected if k not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{path}: not a Gemma 3 checkpoint matching its config.json; missing {shown}"
        )
    wrong = [
        f"{k} is {list(out[k].shape)}, config.json implies {list(s)}"
        for k, s in expected.items()
        if tuple(out[k].shape) != s
    ]
    if wrong:
        raise ModelError(f"{path}: does not match its config.json: {'; '.join(wrong[:3])}")
    return out


# --- the graph -----------------------------------------------------------------------------------


def _gamma(w: Array, factor: float = 1.0) -> Array:
    """Gemma's norm scale ``1 + w`` in float32 (as transformers computes it), times
    ``factor`` where one is folded in."""
    g = (np.float32(1.0) + w.astype(np.float32)).astype(np.float32)
    return g if factor == 1.0 else (g.astype(np.float64) * factor).astype(np.float32)


def window_attention(
    g: GraphBuilder,
    plan: layers.AttentionPlan,
    fits: str,
    q: str,
    k: str,
    v: str,
    name: str,
    *,
    heads: int,
    head_dim: int,
) -> str:
    """A local layer's attention, chosen at run time by an ``If`` on ``fits`` (the sequence is
    at most ``window_half + 1`` long): then every key is within every query's window, and the
    mask-free FlashAttention of a global layer computes the same context as block-local
    attention, which pads the sequence to a whole block and scores 3 blocks of keys per
    query (3x the work at 256 tokens with EmbeddingGemma's 256-token half-window)."""
    from onnx import TensorProto, helper

    cols, local_blocks = plan.cols, plan.blocks
    assert cols is not None and local_blocks is not None

    def branch(tag: str, build: Callable[[], str]) -> onnx.GraphProto:
        start = len(g.nodes)
        out = build()
        nodes = g.nodes[start:]
        del g.nodes[start:]
        return helper.make_graph(
            nodes,
            f"{name}.{tag}",
            [],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        )

    whole = branch(
        "whole",
        lambda: layers.flash_attention(
            g, q, k, v, cols, f"{name}.whole", heads=heads, head_dim=head_dim
        ),
    )
    blocks = branch(
        "blocks",
        lambda: layers.local_attention(
            g, q, k, v, local_blocks, f"{name}.blocks", heads=heads, head_dim=head_dim
        ),
    )
    return g.op1("If", [fits], name, then_branch=whole, else_branch=blocks)


def build_encoder(
    g: GraphBuilder,
    weights: Mapping[str, Array],
    cfg: Gemma3Config,
    *,
    fused: bool = True,
    int8_ready: bool = False,
    attention: str = "",
) -> Encoder:
    """Token states [batch, seq, hidden] after the final norm. ``int8_ready`` (fused only):
    the word table as int8 rows; every projection is already a plain MatMul. ``attention``:
    one of layers.ATTENTION_KINDS (default: ``flash`` fused, ``plain`` unfused)."""
    kind = layers.attention_kind(attention, fused=fused, int8_ready=int8_ready)
    w, eps = weights, cfg.norm_eps
    nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table = (w["embed_tokens.weight"] * np.float32(math.sqrt(cfg.hidden_size))).astype(np.float32)
    x = layers.gather_rows(g, table, INPUT_IDS, "emb.word", int8=int8_ready)
    rope = {
        lt: layers.rotary_consts(g, theta, hd, cfg.max_positions, f"rope.{lt}", fused=fused)
        for lt, theta in (
            ("full_attention", cfg.global_theta),
            ("sliding_attention", cfg.local_theta),
        )
        if lt in cfg.layer_types
    }
    # local layers whose window spans every position the model has attend globally
    windowed = "sliding_attention" in cfg.layer_types and cfg.window_half + 1 < cfg.max_positions
    plan = layers.plan_attention(
        g,
        x,
        kind,
        heads=nh,
        head_dim=hd,
        window_half=cfg.window_half if windowed else None,
        has_global="full_attention" in cfg.layer_types or not windowed or kind == "flash",
    )
    # a sequence within one window: every local layer sees every key (see window_attention)
    fits = (
        g.op1(
            "Less",
            [
                layers.seq_len(g, INPUT_IDS),
                g.const("window.fits_below", [cfg.window_half + 2], np.int64),
            ],
            "window.fits",
        )
        if windowed and kind == "flash"
        else ""
    )
    residual = x
    normed = decoder.rms_norm(
        g, x, _gamma(w["layers.0.input_layernorm.weight"]), eps, "l0.input_norm", fused=fused
    )
    for i, layer_type in enumerate(cfg.layer_types):
        p, n = f"layers.{i}.", f"l{i}"
        q, k, v = layers.qkv(
            g, normed, {r: linear_t(w, p + f"self_attn.{r}_proj") for r in "qkv"}, n, i
        )
        q = decoder.head_rms_norm(
            g,
            q,
            _gamma(w[p + "self_attn.q_norm.weight"], cfg.query_scale),
            eps,
            f"{n}.q_norm",
            heads=nh,
            head_dim=hd,
            fused=fused,
        )
        k = decoder.head_rms_norm(
            g,
            k,
            _gamma(w[p + "self_attn.k_norm.weight"]),
            eps,
            f"{n}.k_norm",
            heads=kvh,
            head_dim=hd,
            fused=fused,
        )
        q = layers.rotate(g, q, rope[layer_type], f"{n}.q_rot", fused=fused, heads=nh, head_dim=hd)
        k = layers.rotate(g, k, rope[layer_type], f"{n}.k_rot", fused=fused, heads=kvh, head_dim=hd)
        k = decoder.repeat_kv(g, k, f"{n}.k_rep", kv_heads=kvh, groups=nh // kvh, head_dim=hd)
        v = decoder.repeat_kv(g, v, f"{n}.v_rep", kv_heads=kvh, groups=nh // kvh, head_dim=hd)
        local = windowed and layer_type == "sliding_attention"
        if fits and local:
            ctx = window_attention(g, plan, fits, q, k, v, f"{n}.attn", heads=nh, head_dim=hd)
        else:
            ctx = layers.self_attention(
                g, plan, q, k, v, f"{n}.attn", heads=nh, head_dim=hd, local=local
            )
        o = g.linear(ctx, linear_t(w, p + "self_attn.o_proj"), f"{n}.o", role="attn_out", layer=i)
        o = decoder.rms_norm(
            g,
            o,
            _gamma(w[p + "post_attention_layernorm.weight"]),
            eps,
            f"{n}.post_attn_norm",
            fused=fused,
        )
        normed, residual = decoder.add_rms_norm(
            g,
            o,
            residual,
            _gamma(w[p + "pre_feedforward_layernorm.weight"]),
            eps,
            f"{n}.pre_ff_norm",
            fused=fused,
        )
        gate = g.linear(
            normed, linear_t(w, p + "mlp.gate_proj"), f"{n}.gate", role="ffn_gate", layer=i
        )
        up = g.linear(normed, linear_t(w, p + "mlp.up_proj"), f"{n}.up", role="ffn_up", layer=i)
        act = decoder.activation(g, gate, cfg.activation, f"{n}.act", fused=fused)
        glu = g.op1("Mul", [act, up], f"{n}.glu")
        mlp = g.linear(glu, linear_t(w, p + "mlp.down_proj"), f"{n}.down", role="ffn_down", layer=i)
        mlp = decoder.rms_norm(
            g,
            mlp,
            _gamma(w[p + "post_feedforward_layernorm.weight"]),
            eps,
            f"{n}.post_ff_norm",
            fused=fused,
        )
        last = i == cfg.num_layers - 1
        next_key = "norm.weight" if last else f"layers.{i + 1}.input_layernorm.weight"
        normed, residual = decoder.add_rms_norm(
            g,
            mlp,
            residual,
            _gamma(w[next_key]),
            eps,
            "final_norm" if last else f"l{i + 1}.input_norm",
            fused=fused,
        )
    return Encoder(normed, cfg.hidden_size)


#: The whole model (the encoder + one pooling + normalisation), for tests and benchmarks.
build_model = layers.model_builder(__name__, "gemma3")


# --- the family interface (see embedpool.graph.families) ------------------------------------

parse_config = Gemma3Config.from_dict
