"""Which ONNX file OpenVINO reads for a model, and building it: without importing openvino, so
that the graph prebuild (``graph.prebuild``, the parent of every job) can find or build
OpenVINO's graph before any worker starts (``engine_openvino`` loads it).

fp32 and bf16 read the shipped file as is, else embedpool's fused fp32 graph where OpenVINO's
ONNX frontend converts it (``FUSED_CONVERTS``), else the family's standard-op graph
(``prepare_onnx(..., fused=False)``: ONNX Runtime's contrib ops such as
``com.microsoft.RotaryEmbedding`` or ``GroupQueryAttention`` do not convert). int8 reads that
graph's weight-only int8 form (``graph.weight_int8``), cached beside it as
``<its name>-ovw8v<recipe>.onnx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedpool.graph import GraphPrecision
    from embedpool.models import ResolvedModel

#: Families whose fused fp32 graph OpenVINO's ONNX frontend converts (the rest use the
#: standard-op graph the families build with ``fused=False``); tests/test_families.py checks
#: it against the frontend.
FUSED_CONVERTS = frozenset({"bert", "xlm-roberta"})


def reads_fused(model: ResolvedModel) -> bool:
    """OpenVINO reads the graph ONNX Runtime reads (a shipped file, or a family in
    FUSED_CONVERTS), not the family's standard-op graph."""
    from embedpool.graph import _family

    return model.onnx_path is not None or _family(model)[0].NAME in FUSED_CONVERTS


def _fp32(model: ResolvedModel, cache_dir: Path | None, build: bool) -> tuple[Path | None, Path]:
    """OpenVINO's fp32 graph (None when it is not built and ``build`` is False) and the
    cache path its int8 form is named after."""
    from embedpool.graph import cache_path, prepare_onnx

    if model.onnx_path is not None:
        return model.onnx_path, cache_path(model, "fp32", cache_dir)
    fused = reads_fused(model)
    path = cache_path(model, "fp32", cache_dir, fused=fused)
    if build:
        path = prepare_onnx(model, "fp32", cache_dir, fused=fused)
    return (path if path.is_file() else None), path


def graph_precision(precision: str) -> GraphPrecision:
    """The graph OpenVINO reads at ``precision``: int8's own, else the fp32 graph (bf16 is
    the plugin's inference precision on it)."""
    return "int8" if precision == "int8" else "fp32"


def int8_path(key: Path) -> Path:
    from embedpool.graph.weight_int8 import RECIPE_VERSION

    return key.with_name(f"{key.stem}-ovw8v{RECIPE_VERSION}.onnx")


def graph_for(model: ResolvedModel, cache_dir: Path | None = None, precision: str = "fp32") -> Path:
    """The ONNX file OpenVINO reads for ``model`` at ``precision``, built (and cached) if
    need be."""
    fp32, key = _fp32(model, cache_dir, build=True)
    assert fp32 is not None
    if precision != "int8":
        return fp32
    from embedpool.graph import weight_int8
    from embedpool.graph.store import get_or_build

    final = int8_path(key)
    return get_or_build(final, lambda tmp: weight_int8.build(fp32, tmp, final))


def built(model: ResolvedModel, precision: str, cache_dir: Path | None = None) -> Path | None:
    """``graph_for``'s file if it needs no build now, else None. Builds nothing."""
    fp32, key = _fp32(model, cache_dir, build=False)
    if precision != "int8" or fp32 is None:
        return fp32
    path = int8_path(key)
    return path if path.is_file() else None


__all__ = ["FUSED_CONVERTS", "built", "graph_for", "graph_precision", "int8_path", "reads_fused"]
