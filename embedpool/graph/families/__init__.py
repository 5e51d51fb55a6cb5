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
                      nodes in a GraphBuilder (compose.compose adds inputs, head, outputs)
    int8_fp32_nodes(cfg), int8_smoothed_nodes(cfg)  what the int8 recipe keeps / smooths

Families: ``bert``, ``xlmr`` (XLM-RoBERTa/RoBERTa: BERT's layers, its own positions),
``nomic`` (NomicBert) and ``modernbert``; ``layers`` holds the pieces the rotary families
share (rotary positions, memory-efficient attention, gated MLPs, norms).

``family_for`` picks the module by ``model_type`` and refuses anything else with a message
that names what it found, what embedpool builds, and the route through a shipped
``onnx/model.onnx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from embedpool.errors import ModelError
from embedpool.graph.families import bert, modernbert, nomic, xlmr

#: Every family, in the order ``embedpool models`` lists them.
FAMILIES: tuple[ModuleType, ...] = (bert, xlmr, nomic, modernbert)


def family_for(config: Mapping[str, Any], where: str = "config.json") -> ModuleType:
    """The family module that builds this ``config.json``, or a ModelError that teaches."""
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES:
        if model_type in fam.MODEL_TYPES:
            return fam
    built = "; ".join(f"{fam.NAME} ({', '.join(sorted(t for t in fam.MODEL_TYPES if t.islower()))})"
                      for fam in FAMILIES)
    arch = config.get("architectures")
    found = f"architectures {', '.join(map(str, arch))}; " if isinstance(arch, list) and arch else ""
    raise ModelError(
        f"{where}: model_type {model_type!r} is not an encoder embedpool builds from safetensors "
        f"({found}it builds: {built}). Export the model to ONNX (e.g. with optimum: "
        "`optimum-cli export onnx --model DIR DIR/onnx`) so that DIR/onnx/model.onnx exists, "
        "and pass that directory: embedpool runs a shipped ONNX file as is.")
