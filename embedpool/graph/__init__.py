"""ONNX graphs for resolved models: used as shipped, or built from safetensors, then
quantised, and cached on disk.

The package: ``builder`` (GraphBuilder, the one API graphs are written with), ``families/``
(one module per encoder architecture, picked by ``families.catalog.family_for``), ``head`` (pooling,
dense, normalise), ``weights`` (safetensors in, float32 out), ``quantize`` (the int8 recipe),
``fp16`` (the GPU graph), ``store`` (the atomic, locked on-disk cache).

    ResolvedModel --prepare_onnx(model, precision)--> Path of a ready .onnx file

    shipped onnx/model.onnx ── fp32 ──> the shipped file, as is
                             └─ int8 ──> quantize.quantize_shipped: every constant-weight
                                         MatMul, per-row activations ──> cache
    model.safetensors ─┬─ fp32: compose(family, fused=True) ──> cache
                       ├─ int8: compose(family, fused=True, int8_ready=True)
                       │          └─ quantize.quantize_linears(zero_points(linears))
                       │               every encoder linear, by role ──> cache
                       └─ fp16: compose(family, fused=True)
                                  └─ fp16.to_fp16: encoder float16, head float32 ──> cache

int8 quantises weights per output channel and activations per row (token) at run time
(quantize.py): a text's vector does not depend on its batch neighbours, no calibration set is
needed, and the build is numpy arithmetic on the weights. A cold build in a fresh process with
an empty cache dir, imports and model resolution included (``benchmarks/graph_variants.py
--build-cost``, best of 2, AMD EPYC Zen 3, 2 cores): int8 1.5 s and 232 MB peak RSS, against
31 s and 1.7 GB for the calibrated static recipe it replaced (recipe 5, whose calibration set
was the local stdlib, so two machines could build two graphs under one id); fp32 1.3 s /
381 MB, fp16 1.8 s / 335 MB. A shipped graph gets the same recipe on every MatMul it has with
a constant weight: batch-independent too.

fp16 (graph/fp16.py) is for GPU execution providers: the fused graph's encoder in float16, its
head in float32; the engine runs it on a GPU only (``EngineSpec`` refuses fp16 on the CPU,
whose precision is int8), though ORT's CPU provider runs it too (tests/test_placement.py).

Why int8 starts from the int8-ready graph (fused ops, Q/K/V as three linears into
MultiHeadAttention, int8 word embeddings): fused bias, GELU, LayerNorm and softmax kernels
around the quantised MatMuls (7-9% faster than the unfused graph under recipe 5), and the
word table as int8 rows makes the file 23 instead of 90 MB. For fp32 the fused graph is
emitted directly because ORT's own optimiser (onnxruntime.transformers.optimizer) needs torch
or sympy, neither of which embedpool depends on; measured, fused and unfused fp32 run at the
same speed on this CPU (the unfused one keeps Softmax attention and Erf GELU even after
ORT's session-level passes), so the fused graph buys no speed here; it stays the fp32
default as the smaller node count and the layout ORT's kernels are tuned for.
Numbers: benchmarks/graph_variants.py.

Cache files live in ``cache_dir`` or ``config.cache_root() / "onnx"`` and are named
``<model>-<precision>-<key>.onnx``. The key hashes everything the bytes depend on (the
files they are built from (ResolvedModel.files: the shipped ONNX file when there is one, else
the safetensors, plus tokenizer, config.json and the sentence-transformers configs and Dense
weights), canonical config.json, the head and text specs, builder version, precision, and for
int8 the recipe: INT8_RECIPE_VERSION and quantize.recipe_key()), so a changed input gets a new
file and a stale one is never reused. Nothing else goes in: the build reads no local files
but the model's, uses no randomness, and its arithmetic is exact IEEE in a fixed order, so
two machines build the same bytes (tested: two cold builds, identical bytes and vectors).
``store.get_or_build`` makes concurrent first calls from several processes build once and
never expose a partial file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from embedpool.config import cache_root
from embedpool.errors import ConfigError
from embedpool.graph import external, quantize
from embedpool.graph.compose import compose_parts
from embedpool.graph.families.catalog import family_for
from embedpool.graph.store import cache_key, get_or_build
from embedpool.models import ResolvedModel

# onnx is imported where a graph is built (quantize imports it lazily too): a pool worker
# that finds its graph cached never needs it, and it costs ~10-18 MB of RSS.

#: ResolvedModel.files roles that do not shape the graph's bytes (config_sentence_transformers
#: .json: prompts); every other file the vectors are computed from is part of the key.
GRAPH_FREE_ROLES = ("st:prompts",)

__all__ = [
    "BUILD_STAGES",
    "FP16_RECIPE_VERSION",
    "GRAPH_PRECISIONS",
    "INT8_RECIPE_VERSION",
    "GraphPrecision",
    "built_path",
    "cache_path",
    "graph_id",
    "model_precisions",
    "prepare_onnx",
]

#: What prepare_onnx builds: embedpool's precisions (types.Precision); fp16 is the graph for
#: GPU execution providers (graph/fp16.py, ``placement``).
GraphPrecision = Literal["fp32", "int8", "fp16"]
GRAPH_PRECISIONS: tuple[GraphPrecision, ...] = ("fp32", "int8", "fp16")

#: The int8 recipe, part of the int8 cache key (with quantize.recipe_key()).
#: 3: static, calibrated QOperator quantisation with ff2 of every layer in fp32.
#: 4: the same quantisation of the int8-ready fused graph (bert.build_bert(int8_ready=True)).
#: 5: and SmoothQuant on the input of ff1, calibrated on local stdlib chunks.
#: 6: no calibration: per-row activation scales and pair-bounded per-column int8 weights for
#:    every encoder linear (quantize.py), ff2 included.
INT8_RECIPE_VERSION = 6
#: The fp16 recipe (graph/fp16.py), part of the fp16 cache key. 1: the fused fp32 graph's
#: encoder in float16, its head in float32.
FP16_RECIPE_VERSION = 1


#: The stages of a build from safetensors, in order, as ``prepare_onnx`` reports them
#: (``on_stage``); a shipped graph's int8 build has only the last two.
BUILD_STAGES = ("loading weights", "composing the graph", "quantising", "writing")


def prepare_onnx(
    model: ResolvedModel,
    precision: GraphPrecision,
    cache_dir: Path | None = None,
    *,
    on_stage: Callable[[str], None] | None = None,
    fused: bool = True,
) -> Path:
    """Path to a cached ONNX file for this model and precision, building it if needed.
    ``fused=False`` (fp32 only): the family's standard-op graph, for runtimes that do not
    convert ONNX Runtime's contrib ops (``engine_openvino``); cached under its own name.
    ``on_stage(name)`` is called as a build enters each of ``BUILD_STAGES`` (the third is
    "converting to fp16" for fp16, skipped for fp32) and with "waiting" when another
    process is building the same file; never when the file is already there."""
    if precision not in GRAPH_PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(GRAPH_PRECISIONS)}, got {precision!r}"
        )
    stage = on_stage or (lambda name: None)
    if not fused and (precision != "fp32" or model.onnx_path is not None):
        raise ConfigError("only embedpool's own fp32 graphs come unfused")
    if model.onnx_path is not None:
        if precision == "fp32":
            return model.onnx_path
        if precision == "fp16":
            raise ConfigError(
                f"{model.name} ships its own ONNX file; embedpool builds fp16 "
                "graphs from safetensors only (use fp32 or int8)"
            )
        shipped = model.onnx_path

        def quantize_shipped(tmp: Path) -> None:
            stage("quantising")
            quantize.quantize_shipped(shipped, tmp)

        return get_or_build(
            cache_path(model, "int8", cache_dir), quantize_shipped, on_wait=lambda: stage("waiting")
        )

    fam, cfg = _family(model)
    unsafe: str = getattr(fam, "FP16_UNSAFE", "")
    if precision == "fp16" and unsafe:
        raise ConfigError(
            f"{model.name}: embedpool builds no fp16 graph of a {fam.NAME} model: "
            f"{unsafe}; use fp32 (or int8 on the CPU)"
        )

    final = cache_path(model, precision, cache_dir, fused=fused)

    def build(tmp: Path) -> None:
        stage("loading weights")
        weights = fam.load_weights(model.weights_path, cfg)
        if model.classifier is not None:  # a causal-LM reranker's two lm_head rows
            from embedpool.graph.classifier import lm_rows

            weights.update(lm_rows(model.classifier, model.weights_path, weights))
        stage("composing the graph")
        parts = compose_parts(
            fam,
            weights,
            cfg,
            model.classifier or model.head,
            fused=fused,
            int8_ready=precision == "int8",
            name=model.name,
        )
        del weights  # the graph holds its own copy; the build's peak is the graph, once
        if precision == "int8":
            stage("quantising")
            quantize.quantize_linears(
                parts.model,
                quantize.zero_points(parts.linears, classifier=model.classifier is not None),
            )
        elif precision == "fp16":
            from embedpool.graph.fp16 import to_fp16

            stage("converting to fp16")
            to_fp16(parts.model, parts.head_nodes, [parts.hidden])
        stage("writing")
        external.save(parts.model, tmp, final)  # a large graph's weights: mapped, shared

    return get_or_build(final, build, on_wait=lambda: stage("waiting"))


def built_path(
    model: ResolvedModel, precision: GraphPrecision, cache_dir: Path | None = None
) -> Path | None:
    """The graph ``prepare_onnx`` would return if it needs no build now (a shipped fp32
    file, or a cached one), else None. Reads no weights."""
    if model.onnx_path is not None and precision == "fp32":
        return model.onnx_path
    if model.onnx_path is not None and precision == "fp16":
        return None
    path = cache_path(model, precision, cache_dir)
    return path if path.is_file() else None


def cache_path(
    model: ResolvedModel,
    precision: GraphPrecision,
    cache_dir: Path | None = None,
    *,
    fused: bool = True,
) -> Path:
    """Where ``prepare_onnx`` keeps (or would keep) this model's graph; builds nothing.
    For a shipped fp32 ONNX file this is unused: the shipped file is returned as is."""
    root = cache_dir if cache_dir is not None else cache_root() / "onnx"
    text = model.text.key()
    text.pop("prompts", None)  # prompts change the texts, not the graph
    text.pop("default_prompt_name", None)
    parts: dict[str, object] = {
        "weights": model.weights_sha256,
        "config": model.config,
        "files": model.files.digest(exclude_roles=GRAPH_FREE_ROLES),
        "head": model.head.key(),
        "text": text,
        "precision": precision,
    }
    if model.classifier is not None:  # a cross-encoder's graph: logits, maybe token types
        parts["classifier"] = model.classifier.key()
    if model.onnx_path is not None:
        parts["source"] = "shipped"
    else:
        fam, _ = _family(model)
        parts["builder"] = f"{fam.NAME}:{fam.BUILDER_VERSION}"
    if precision == "int8":
        parts["int8"] = {
            "recipe": INT8_RECIPE_VERSION,
            **quantize.recipe_key(classifier=model.classifier is not None),
        }
    elif precision == "fp16":
        parts["fp16"] = FP16_RECIPE_VERSION
    variant: str = precision
    if not fused:  # the standard-op graph (engine_openvino); the fused key stays as it was
        parts["fused"] = False
        variant = f"{precision}-unfused"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("._") or "model"
    return root / f"{slug}-{variant}-{cache_key(parts)[:20]}.onnx"


def model_precisions(model: ResolvedModel) -> tuple[GraphPrecision, ...]:
    """The precisions ``prepare_onnx`` builds for this model: GRAPH_PRECISIONS, less fp16 for
    a family whose activations overflow float16 (its ``FP16_UNSAFE`` says why). Reads
    config.json only."""
    if model.onnx_path is None and model.config:
        fam = family_for(model.config, str(model.directory / "config.json"))
        if getattr(fam, "FP16_UNSAFE", ""):
            return tuple(p for p in GRAPH_PRECISIONS if p != "fp16")
    return GRAPH_PRECISIONS


def graph_id(model: ResolvedModel, precision: str, runtime: str = "onnxruntime") -> str:
    """The id of the graph ``prepare_onnx`` would run (its cache file's name, without building
    anything): it changes whenever the graph's bytes would, e.g. a new int8 recipe. Part of
    the vector cache's fingerprint. bf16 (OpenVINO's, on the fp32 graph) gets an id of its
    own: its vectors are not fp32's; so does OpenVINO's int8 (``graph.weight_int8``: another
    recipe than ONNX Runtime's)."""
    stem = cache_path(model, precision).stem  # type: ignore[arg-type]
    if runtime == "openvino" and precision == "int8":
        from embedpool.graph.weight_int8 import RECIPE_VERSION

        return f"{stem}-ovw8v{RECIPE_VERSION}"
    return stem


def _family(model: ResolvedModel) -> tuple[ModuleType, Any]:
    """The model's encoder family module and its parsed config."""
    where = str(model.directory / "config.json")
    fam = family_for(model.config, where)
    return fam, fam.parse_config(model.config, where)
