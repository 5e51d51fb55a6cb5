"""ONNX graphs for resolved models: used as shipped, or built from safetensors, then
quantised, and cached on disk.

The package: ``builder`` (GraphBuilder, the one API graphs are written with), ``families/``
(one module per encoder architecture, picked by ``families.family_for``), ``head`` (pooling,
dense, normalise), ``weights`` (safetensors in, float32 out), ``quantize`` (precision
recipes), ``store`` (the atomic, locked on-disk cache).

    ResolvedModel --prepare_onnx(model, precision)--> Path of a ready .onnx file

    shipped onnx/model.onnx ── fp32 ──> the shipped file, as is
                             └─ int8 ──> quantize.quantize_int8(shipped), dynamic ──> cache
    model.safetensors ─┬─ fp32: family.build(fused=True, pool=True) ──> cache
                       └─ int8: family.build(fused=True, int8_ready=True, pool=True)
                                  └─ quantize.smooth_matmul_inputs(int8_smoothed_nodes)
                                  └─ quantize.quantize_int8_static(keep int8_fp32_nodes,
                                       calibrated on stdlib chunks) ──> cache

int8 is static (activation scales calibrated at build time, see quantize.py) so that a
text's vector does not depend on its batch neighbours. A shipped graph's node names are
unknown, so it cannot say which nodes to keep fp32; it gets the dynamic recipe, whose vectors
move slightly with their batch (cos ~0.993 for a short text next to a 256-token one).

Why int8 starts from the int8-ready graph (fused ops, Q/K/V as plain MatMuls into
MultiHeadAttention, int8 word embeddings): against the unfused graph it was the same
quality (held-out mean 0.9955), 7-9% faster (benchmarks/graph_variants.py, int8 vs
int8-plain, 2 threads, batch 4) because bias, GELU, LayerNorm and softmax run fused, and its
file is 34 instead of 69 MB, 34 MiB less RSS per worker. For fp32 the fused graph is emitted
directly because ORT's own optimiser (onnxruntime.transformers.optimizer) needs torch or
sympy, neither of which embedpool depends on; measured, fused and unfused fp32 run at the
same speed on this CPU (the unfused one keeps Softmax attention and Erf GELU even after
ORT's session-level passes), so the fused graph buys no speed here; it stays the fp32
default as the smaller node count and the layout ORT's kernels are tuned for.
Numbers: benchmarks/graph_variants.py.

Cache files live in ``cache_dir`` or ``config.cache_root() / "onnx"`` and are named
``<model>-<precision>-<key>.onnx``. The key hashes everything the bytes depend on (the
files they are built from (ResolvedModel.files: the shipped ONNX file when there is one, else
the safetensors, plus tokenizer, config.json and the sentence-transformers configs and Dense
weights), canonical config.json, the head and text specs, builder version, precision, and for
int8 the quantisation recipe, the calibration set's recipe and Python version (the stdlib
source it reads varies with it) and ONNX Runtime's major.minor, whose quantiser writes it), so a
changed input gets a new file and a stale one is never reused. ``store.get_or_build`` makes
concurrent first calls from several processes build once and never expose a partial file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from embedpool.config import cache_root
from embedpool.errors import ConfigError, ModelError
from embedpool.graph.compose import compose
from embedpool.graph.families import family_for
from embedpool.graph.store import cache_key, get_or_build
from embedpool.models import ResolvedModel
from embedpool.types import Precision

# onnx (and quantize, which imports it) are imported where a graph is built: a pool worker
# that finds its graph cached never needs them, and they cost it ~10-18 MB of RSS.

#: ResolvedModel.files roles that do not shape the graph's bytes (config_sentence_transformers
#: .json: prompts); every other file the vectors are computed from is part of the key.
GRAPH_FREE_ROLES = ("st:prompts",)

__all__ = ["cache_path", "graph_id", "int8_fp32_nodes", "int8_smoothed_nodes", "prepare_onnx"]

#: The int8 recipe, part of the int8 cache key: static or dynamic, which node names stay
#: fp32 (see ``int8_fp32_nodes``) and whether weights use 7 bits (see quantize.py).
#: 3: static, calibrated QOperator quantisation with ff2 of every layer in fp32.
#: 4: the same quantisation of the int8-ready fused graph (bert.build_bert(int8_ready=True)).
#: 5: and SmoothQuant on the input of ff1 (see int8_smoothed_nodes).
INT8_RECIPE_VERSION = 5
#: SmoothQuant's migration strength (0 = all on the activation, 1 = all on the weights).
#: Measured 0.5 and 0.75; 0.5 was as good and is the paper's default.
INT8_SMOOTH_ALPHA = 0.5
#: 7-bit weights: no measurable quality gain with per-channel scales on MiniLM (0.9919 vs
#: 0.9925 mean cosine), so the full 8 bits. Dynamic recipe (shipped graphs) only.
INT8_REDUCE_RANGE = False
#: Calibration set: this many chunks evenly spaced through embedpool.corpus.stdlib_chunks
#: (code and docstrings, the mix embedpool is for). 64 matched the measured quality of
#: larger sets and keeps the build near 10-20 s; the held-out eval set is never used.
INT8_CALIBRATION_CHUNKS = 64
#: Calibration batch size (texts sorted by length first, so little padding): 16 bounds the
#: memory of each calibration run (the augmented graph outputs every MatMul input) and is
#: what the measured recipe used.
INT8_CALIBRATION_BATCH = 16


def int8_fp32_nodes(model: ResolvedModel) -> list[str]:
    """Nodes of the model's built graph that the int8 recipe keeps in fp32 (its family says)."""
    fam, cfg = _family(model)
    return list(fam.int8_fp32_nodes(cfg))


def int8_smoothed_nodes(model: ResolvedModel) -> list[str]:
    """MatMuls whose input the int8 recipe smooths (its family says)."""
    fam, cfg = _family(model)
    return list(fam.int8_smoothed_nodes(cfg))


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

    fam, cfg = _family(model)

    def build_fp32(tmp: Path) -> None:
        import onnx

        weights = fam.load_weights(model.weights_path, cfg)
        graph = compose(fam, weights, cfg, model.head, fused=True, name=model.name)
        onnx.save(graph, tmp)

    def build_int8(tmp: Path) -> None:
        from embedpool.graph.quantize import smooth_matmul_inputs

        weights = fam.load_weights(model.weights_path, cfg)
        graph = compose(fam, weights, cfg, model.head, fused=True, int8_ready=True,
                        name=model.name)
        calibration = _calibration(model, [i.name for i in graph.graph.input])
        graph = smooth_matmul_inputs(graph, fam.int8_smoothed_nodes(cfg), calibration,
                                     alpha=INT8_SMOOTH_ALPHA)
        quantize_int8_static(graph, tmp, exclude=fam.int8_fp32_nodes(cfg),
                             calibration=calibration)

    if precision == "fp32":
        return get_or_build(cache_path(model, "fp32", cache_dir), build_fp32)
    return get_or_build(cache_path(model, "int8", cache_dir), build_int8)


def cache_path(model: ResolvedModel, precision: Precision, cache_dir: Path | None = None
               ) -> Path:
    """Where ``prepare_onnx`` keeps (or would keep) this model's graph; builds nothing.
    For a shipped fp32 ONNX file this is unused: the shipped file is returned as is."""
    root = cache_dir if cache_dir is not None else cache_root() / "onnx"
    text = model.text.key()
    text.pop("prompts", None)  # prompts change the texts, not the graph (calibration has none)
    text.pop("default_prompt_name", None)
    parts: dict[str, object] = {"weights": model.weights_sha256, "config": model.config,
                                "files": model.files.digest(exclude_roles=GRAPH_FREE_ROLES),
                                "head": model.head.key(), "text": text,
                                "precision": precision}
    if model.onnx_path is not None:
        parts["source"] = "shipped"
        keep: list[str] = []
    else:
        fam, _ = _family(model)
        parts["builder"] = f"{fam.NAME}:{fam.BUILDER_VERSION}"
        keep = int8_fp32_nodes(model)
    if precision == "int8":
        parts.update(_int8_parts(keep, static=model.onnx_path is None))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("._") or "model"
    return root / f"{slug}-{precision}-{cache_key(parts)[:20]}.onnx"


def graph_id(model: ResolvedModel, precision: Precision) -> str:
    """The id of the graph ``prepare_onnx`` would run (its cache file's name, without building
    anything): it changes whenever the graph's bytes would, e.g. a new int8 recipe. Part of
    the vector cache's fingerprint."""
    return cache_path(model, precision).stem


def _family(model: ResolvedModel) -> tuple[ModuleType, Any]:
    """The model's encoder family module and its parsed config."""
    where = str(model.directory / "config.json")
    fam = family_for(model.config, where)
    return fam, fam.parse_config(model.config, where)


def _int8_parts(keep: list[str], *, static: bool) -> dict[str, object]:
    ort_minor = ".".join(_onnxruntime_version().split(".")[:2])
    parts: dict[str, object] = {"recipe": INT8_RECIPE_VERSION, "keep_fp32": keep,
                                "onnxruntime": ort_minor}
    if static:
        parts["smooth"] = {"nodes": "ff1", "alpha": INT8_SMOOTH_ALPHA}
        parts["calibration"] = {"corpus": "stdlib", "chunks": INT8_CALIBRATION_CHUNKS,
                                "batch": INT8_CALIBRATION_BATCH, "method": "minmax",
                                "python": list(sys.version_info[:3])}
    else:
        parts["reduce_range"] = INT8_REDUCE_RANGE
    return parts


def _onnxruntime_version() -> str:
    """Without importing onnxruntime (~20 MB of RSS), which a pool's parent never needs."""
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return str(onnxruntime.__version__)


def _calibration(model: ResolvedModel, input_names: list[str]) -> Any:
    """The int8 calibration reader: INT8_CALIBRATION_CHUNKS chunks evenly spaced through
    the stdlib corpus, tokenised with the model's own tokenizer at its max length."""
    from embedpool.corpus import stdlib_chunks
    from embedpool.graph.quantize import TokenBatchReader
    from embedpool.tokenization import TextTokenizer

    chunks = stdlib_chunks(sys.maxsize)
    if not chunks:
        raise ModelError("int8 calibration found no stdlib sources to calibrate on")
    step = len(chunks) / INT8_CALIBRATION_CHUNKS
    picked = [chunks[int(i * step)].text
              for i in range(min(INT8_CALIBRATION_CHUNKS, len(chunks)))]
    # the model's own tokenisation (lower-casing, max length), without a prompt
    sequences = TextTokenizer.for_model(model).encode(picked, prompt="").sequences
    return TokenBatchReader(sequences, input_names, batch_size=INT8_CALIBRATION_BATCH)


def quantize_int8(*args: Any, **kwargs: Any) -> None:
    """``quantize.quantize_int8``, imported on first use (see the imports)."""
    from embedpool.graph.quantize import quantize_int8 as quantize

    quantize(*args, **kwargs)


def quantize_int8_static(*args: Any, **kwargs: Any) -> None:
    """``quantize.quantize_int8_static``, imported on first use (see the imports)."""
    from embedpool.graph.quantize import quantize_int8_static as quantize

    quantize(*args, **kwargs)
