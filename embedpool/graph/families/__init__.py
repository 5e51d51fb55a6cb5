"""Encoder families: one module per architecture, each turning a checkpoint into the encoder
part of an ONNX graph with ``GraphBuilder`` (the head and the precision recipes are shared).

A family module provides:

    NAME              the family's name (cache keys, messages)
    MODEL_TYPES       config.json ``model_type`` values it builds
    BUILDER_VERSION   bumped whenever its emitted graph changes (part of every cache key)
    parse_config(config, where) -> its frozen config dataclass; a ModelError names any field
                      it cannot honour (an unknown position type, activation, ...)
    load_weights(path, cfg) -> float32 tensors, checked against cfg
    build_encoder(g, weights, cfg, *, fused, int8_ready) -> builder.Encoder: the encoder's
                      nodes in a GraphBuilder (compose.compose adds inputs, head, outputs);
                      with ``int8_ready`` every dense projection goes through ``g.linear``
                      (with ``floor=GELU_FLOOR`` where it reads a GELU output): the int8
                      recipe (graph/quantize.py) quantises linears by role, nothing else

Families: ``bert``, ``xlmr`` (XLM-RoBERTa/RoBERTa: BERT's layers, its own positions),
``nomic`` (NomicBert), ``modernbert``, ``gemma3`` (Gemma 3 text: EmbeddingGemma), ``qwen3``
and ``qwen2`` (Qwen2, Llama, Mistral: Qwen2-based code embedders);
``layers`` holds the pieces the rotary families share (rotary positions, memory-efficient
attention, gated MLPs, norms), ``decoder`` those of the decoder backbones (RMSNorm, grouped
key/value heads, causal attention).

``catalog`` lists the families and picks one (``family_for``, ``parse_config``, and the
memory shape a worker of the model needs, ``model_memory``). This ``__init__`` imports nothing:
the family modules import each other from the package, so a package that imported them back
would be an import circle.
"""
