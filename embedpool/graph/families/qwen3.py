"""Qwen3 decoders (Qwen3-Embedding-0.6B/4B/8B, voyage-4-nano and harrier-style Qwen3
embedders) from ``model.safetensors``.

Qwen2's block (``qwen2``'s docstring has the whole maths) with one change, as transformers'
``Qwen3Model`` computes it: q and k get an **RMSNorm per head** (weights ``q_norm`` /
``k_norm`` of ``head_dim`` values, eps ``rms_norm_eps``) after their projections and before
the rotary positions. q/k/v/o biases only with ``attention_bias`` true (none in the released
models). ``head_dim`` (128 in every Qwen3) is apart from ``hidden / heads`` (1024 / 16 = 64 in
the 0.6B). Qwen3-Embedding attends causally and pools the last token, the ``<|endoftext|>``
its tokenizer.json's post-processor appends (tokenization.py keeps it on truncation).

The same refusals as ``qwen2`` (rotary scaling, sliding windows, ``mlp_bias``, other
activations, ``use_bidirectional_attention``); ``is_causal: false`` builds it
bidirectional.

    per layer (fused):  SkipSimplifiedLayerNormalization -> q, k, v MatMuls
                        -> SimplifiedLayerNormalization per head (q, k)
                        -> GroupQueryAttention (rotary inside, causal) -> MatMul o
                        -> SkipSimplifiedLayerNormalization -> SwiGLU (QuickGelu alpha 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embedpool.errors import ModelError
from embedpool.graph.families import layers, qwen2
from embedpool.graph.families.qwen2 import DecoderConfig

NAME = "qwen3"
BUILDER_VERSION = 3  # 2: GroupQueryAttention without its unused K/V cache outputs; 3: flash padding columns from layers.padding_columns
MODEL_TYPES = frozenset({"qwen3"})


def parse_config(config: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    if str(config.get("model_type", "")) not in MODEL_TYPES:
        raise ModelError(f"{where}: model_type {config.get('model_type')!r} is not qwen3")
    bias = bool(config.get("attention_bias", False))
    return qwen2.parse_decoder(
        config, where, family="Qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True
    )


load_weights = qwen2.load_weights
build_encoder = qwen2.build_encoder


#: The whole model (the decoder + one pooling + normalisation), for tests and benchmarks.
build_model = layers.model_builder(__name__, "qwen3")
