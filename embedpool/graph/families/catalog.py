"""The families embedpool builds, and the choice of one: ``family_for`` picks the family
module by config.json's ``model_type`` and refuses anything else with a message that names what
it found, what embedpool builds, and the route through a shipped ``onnx/model.onnx``;
``parse_config`` parses the config with it; ``model_memory`` is the memory shape of a worker
that runs the model (the pool's estimate reads it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from embedpool.errors import ModelError
from embedpool.graph.families import bert, gemma3, modernbert, nomic, qwen2, qwen3, xlmr

if TYPE_CHECKING:
    from embedpool.executors.pool.memory import ModelMemory
    from embedpool.models import ResolvedModel

#: Every family, in the order ``embedpool models`` lists them.
FAMILIES: tuple[ModuleType, ...] = (bert, xlmr, nomic, modernbert, gemma3, qwen3, qwen2)


def family_for(config: Mapping[str, Any], where: str = "config.json") -> ModuleType:
    """The family module that builds this ``config.json``, or a ModelError that teaches."""
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES:
        if model_type in fam.MODEL_TYPES:
            return fam
    arch = config.get("architectures")
    found = (
        f"architectures {', '.join(map(str, arch))}; " if isinstance(arch, list) and arch else ""
    )
    raise ModelError(
        f"{where}: model_type {model_type!r} is not an encoder embedpool builds from safetensors "
        f"({found}it builds: {built_families()}). {ONNX_ROUTE}"
    )


#: The way around any architecture or config embedpool does not build.
ONNX_ROUTE = (
    "Export the model to ONNX (e.g. with optimum: `optimum-cli export onnx --model "
    "DIR DIR/onnx`) so that DIR/onnx/model.onnx exists, and pass that directory: "
    "embedpool runs a shipped ONNX file as is."
)


def built_families() -> str:
    """``bert (bert); xlm-roberta (roberta, xlm-roberta); ...``: what messages name."""
    return "; ".join(
        f"{fam.NAME} ({', '.join(sorted(t for t in fam.MODEL_TYPES if t.islower()))})"
        for fam in FAMILIES
    )


def parse_config(config: Mapping[str, Any], where: str = "config.json") -> tuple[ModuleType, Any]:
    """The family and its parsed config; a refusal of the family (a field it cannot honour:
    a position type, an activation, a decoder flag) also names what embedpool builds and the
    ONNX route, so the message says what to do, not only what is wrong."""
    fam = family_for(config, where)
    try:
        return fam, fam.parse_config(config, where)
    except ModelError as exc:
        raise ModelError(
            f"{str(exc).rstrip('.')}. embedpool builds {built_families()} from safetensors, each "
            f"as its reference implementation computes it. {ONNX_ROUTE}"
        ) from exc


#: int8 graph bytes per fp32 graph byte: MiniLM's 33 / 87 MiB under the static recipe. Models
#: with larger vocabularies or FFNs quantise a larger share (the word table, every MatMul but
#: the kept ones), so this errs high for them, which only delays a growth step.
INT8_WEIGHT_RATIO = 0.4
#: A decoder worker's activations per token, as a multiple of its intermediate size (the
#: estimate's ``ffn`` width): measured, one 8,192-token text through Qwen3-Embedding-0.6B's
#: shape at int8, 1 thread, peaked at 3,330 MiB RSS with 475 MiB of mapped weights (AMD EPYC
#: Zen 3, ORT 1.32), ~347 KB a token: 56 B x hidden + 6 B x 16 x intermediate covers it. The
#: SwiGLU's two intermediate tensors alone (2 x) left the estimate at 1.5 GB, half the peak.
DECODER_FFN_FACTOR = 16


def model_memory(
    model: ResolvedModel, precision: str, runtime: str = "onnxruntime"
) -> ModelMemory | None:
    """The model's memory shape for the pool's estimate (pool.memory.worker_mem_estimate) on
    ``runtime`` (OpenVINO's: ``runtimes.openvino_memory``), or None when embedpool does not
    build its graph (a shipped ONNX file's shape is unknown: the default model's constants
    apply)."""
    from embedpool.executors.pool.memory import ModelMemory
    from embedpool.graph.external import EXTERNAL_MIN_BYTES

    if model.onnx_path is not None or not model.config:
        return None
    where = str(model.directory / "config.json")
    fam, cfg = parse_config(model.config, where)
    decoder = fam in (qwen3, qwen2)
    if fam is modernbert:  # block-local windows hold 3 x half-window keys per query
        keys: int | None = (
            3 * (cfg.local_window // 2) if "sliding_attention" in cfg.layer_types else 0
        )
        ffn = 2 * cfg.intermediate_size
    elif fam is gemma3:  # as ModernBERT: block-local windows, FlashAttention elsewhere
        keys = 3 * cfg.window_half if "sliding_attention" in cfg.layer_types else 0
        ffn = 2 * cfg.intermediate_size
    elif fam is nomic:  # FlashAttention: no score tensor
        keys, ffn = 0, 2 * cfg.intermediate_size
    elif decoder:  # GroupQueryAttention: no [seq, seq] scores; measured width
        keys, ffn = 0, DECODER_FFN_FACTOR * cfg.intermediate_size
    else:  # BERT's masked Attention kernel: every head's [seq, seq] scores
        cfg = getattr(cfg, "bert", cfg)  # XLM-R wraps BERT's config
        keys, ffn = None, cfg.intermediate_size
    # the graph also holds the head's Dense modules (EmbeddingGemma's two: 18 MiB, without
    # which its fp32 estimate fell 1 MiB under a worker's measured peak)
    params = _parameter_count(model.weights_path) + sum(
        _parameter_count(d.weights) for d in model.head.dense
    )
    fp32_bytes = 4 * params
    weights = int(fp32_bytes * (INT8_WEIGHT_RATIO if precision == "int8" else 1.0))
    memory = ModelMemory(
        weights=weights,
        hidden=int(cfg.hidden_size),
        ffn=int(ffn),
        heads=int(cfg.num_heads),
        max_seq=int(model.max_length),
        score_keys=keys,
        # a graph this large is written with its weights mapped from one side file
        shared_weights=weights > EXTERNAL_MIN_BYTES,
    )
    if runtime != "openvino":
        return memory
    from embedpool.runtimes import openvino_memory

    return openvino_memory(memory, "int8" if precision == "int8" else "fp32", decoder=decoder)


def parameter_count(model: ResolvedModel) -> int | None:
    """The model's float parameters, from its checkpoint's headers (None for a shipped ONNX
    file or a directory without a checkpoint): what the hang rule sizes its deadline by
    (``faults.hang_per_token_s``)."""
    if model.onnx_path is not None or not model.config:
        return None
    return _parameter_count(model.weights_path)


def _parameter_count(path: Path) -> int:
    """Float elements of a checkpoint (shards included), from its headers alone."""
    from embedpool.graph.weights import FLOAT_DTYPES, tensor_infos

    return sum(
        math.prod(info.shape) for info in tensor_infos(path).values() if info.dtype in FLOAT_DTYPES
    )
