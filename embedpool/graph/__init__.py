"""ONNX graphs for resolved models: used as shipped, or built from safetensors, then
quantised, and cached on disk.

    ResolvedModel --prepare_onnx(model, precision)--> Path of a ready .onnx file

    shipped onnx/model.onnx ── fp32 ──> the shipped file, as is
                             └─ int8 ──> quantize.quantize_int8(shipped) ──> cache
    model.safetensors ─┬─ fp32: bert.build_bert(fused=True, pool=True) ──> cache
                       └─ int8: bert.build_bert(fused=False, pool=True)
                                  └─ quantize.quantize_int8(keep int8_fp32_nodes) ──> cache

Why int8 starts from the *unfused* fp32 graph: quantising the fused graph turns Attention
into QAttention, which measured 15% slower here than the unfused graph's Q/K/V
MatMulIntegers (ORT shares one DynamicQuantizeLinear between them and fuses
SkipLayerNormalization itself at session start). For fp32 the fused graph is emitted
directly because ORT's own optimiser (onnxruntime.transformers.optimizer) needs torch or
sympy, neither of which embedpool depends on; measured, fused and unfused fp32 run at the
same speed on this CPU (the unfused one keeps Softmax attention and Erf GELU even after
ORT's session-level passes), so the fused graph buys no speed here; it stays the fp32
default as the smaller node count and the layout ORT's kernels are tuned for.
Numbers: benchmarks/graph_variants.py.

Cache files live in ``cache_dir`` or ``config.cache_root() / "onnx"`` and are named
``<model>-<precision>-<key>.onnx``. The key hashes everything the bytes depend on (weights
sha256, canonical config.json, pooling, max length, builder version, precision, and for
int8 the quantisation recipe and ONNX Runtime's major.minor, whose quantiser writes it), so a
changed input gets a new file and a stale one is never reused. ``store.get_or_build`` makes
concurrent first calls from several processes build once and never expose a partial file.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from embedpool.config import cache_root
from embedpool.errors import ConfigError
from embedpool.graph.bert import BUILDER_VERSION, BertConfig, build_bert, load_weights
from embedpool.graph.quantize import quantize_int8
from embedpool.graph.store import cache_key, get_or_build
from embedpool.models import ResolvedModel
from embedpool.types import Precision

__all__ = ["cache_path", "int8_fp32_nodes", "prepare_onnx"]

#: The int8 recipe, part of the int8 cache key: which node names stay fp32 (see
#: ``int8_fp32_nodes``) and whether weights use 7 bits (see quantize.py).
INT8_RECIPE_VERSION = 2
#: 7-bit weights: no measurable quality gain with per-channel scales on MiniLM (0.9919 vs
#: 0.9925 mean cosine), so the full 8 bits.
INT8_REDUCE_RANGE = False
#: How many leading layers keep their FFN down-projection in fp32 (see int8_fp32_nodes).
INT8_FP32_FF2_LAYERS = 2


def int8_fp32_nodes(cfg: BertConfig) -> list[str]:
    """Nodes of a built BERT graph that the int8 recipe keeps in fp32.

    The FFN down-projection (``ff2``) reads GELU output, whose rare large activations set
    the per-batch activation scale of DynamicQuantizeLinear and crush every other value.
    Measured on MiniLM against sentence-transformers (600 held-out chunks): all int8 0.9921
    mean / 0.9831 min cosine; ff2 of layers 0-1 in fp32 0.9944 / 0.9866 at the same speed;
    ff2 of every layer in fp32 0.9962 / 0.9905 but 10% slower. Early layers matter most
    (their error propagates through the rest), so the first two layers it is.
    """
    return [f"l{i}.ff2_MatMul" for i in range(min(INT8_FP32_FF2_LAYERS, cfg.num_layers))]


def prepare_onnx(model: ResolvedModel, precision: Precision, cache_dir: Path | None = None
                 ) -> Path:
    """Path to a cached ONNX file for this model and precision, building it if needed."""
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"precision must be fp32 or int8, got {precision!r}")
    if model.onnx_path is not None:
        if precision == "fp32":
            return model.onnx_path
        shipped = model.onnx_path
        return get_or_build(cache_path(model, "int8", cache_dir),
                            lambda tmp: quantize_int8(shipped, tmp,
                                                      reduce_range=INT8_REDUCE_RANGE))

    cfg = _bert_config(model)

    def build_fp32(tmp: Path) -> None:
        weights = load_weights(model.weights_path, cfg)
        # normalize=True whatever the model says: the engine's contract is L2-normalised
        # vectors, and normalising in the graph saves it a pass.
        graph = build_bert(weights, cfg, pooling=model.pooling, fused=True, pool=True,
                           normalize=True, name=model.name)
        onnx.save(graph, tmp)

    def build_int8(tmp: Path) -> None:
        weights = load_weights(model.weights_path, cfg)
        graph = build_bert(weights, cfg, pooling=model.pooling, fused=False, pool=True,
                           normalize=True, name=model.name)
        quantize_int8(graph, tmp, exclude=int8_fp32_nodes(cfg), reduce_range=INT8_REDUCE_RANGE)

    if precision == "fp32":
        return get_or_build(cache_path(model, "fp32", cache_dir), build_fp32)
    return get_or_build(cache_path(model, "int8", cache_dir), build_int8)


def cache_path(model: ResolvedModel, precision: Precision, cache_dir: Path | None = None
               ) -> Path:
    """Where ``prepare_onnx`` keeps (or would keep) this model's graph; builds nothing.
    For a shipped fp32 ONNX file this is unused: the shipped file is returned as is."""
    root = cache_dir if cache_dir is not None else cache_root() / "onnx"
    parts: dict[str, object] = {"weights": model.weights_sha256, "config": model.config,
                                "pooling": model.pooling, "max_length": model.max_length,
                                "precision": precision}
    if model.onnx_path is not None:
        parts["source"] = "shipped"
        keep: list[str] = []
    else:
        parts["builder"] = BUILDER_VERSION
        keep = int8_fp32_nodes(_bert_config(model))
    if precision == "int8":
        parts.update(_int8_parts(keep))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("._") or "model"
    return root / f"{slug}-{precision}-{cache_key(parts)[:20]}.onnx"


def _bert_config(model: ResolvedModel) -> BertConfig:
    return BertConfig.from_dict(model.config, where=str(model.directory / "config.json"))


def _int8_parts(keep: list[str]) -> dict[str, object]:
    import onnxruntime

    ort_minor = ".".join(onnxruntime.__version__.split(".")[:2])
    return {"recipe": INT8_RECIPE_VERSION, "keep_fp32": keep,
            "reduce_range": INT8_REDUCE_RANGE, "onnxruntime": ort_minor}
