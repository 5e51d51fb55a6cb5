"""ONNX graphs for resolved models: used as shipped, or built from safetensors, then
optimised and quantised, and cached on disk. (Being written: see prepare_onnx.)"""

from __future__ import annotations

from pathlib import Path

from embedpool.models import ResolvedModel
from embedpool.types import Precision


def prepare_onnx(model: ResolvedModel, precision: Precision, cache_dir: Path | None = None) -> Path:
    """Path to a cached ONNX file for this model and precision, building it if needed."""
    raise NotImplementedError
