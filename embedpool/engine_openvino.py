"""The OpenVINO engine: the same contract as ``engine.Engine`` (token sequences in, the model's
sentence vectors out), run by OpenVINO's CPU plugin. The only module that imports openvino.

OpenVINO reads the ONNX graph embedpool builds (``graph.prepare_onnx``) or the model's
shipped ``onnx/model.onnx`` as it is. Where the fused graph holds an ONNX Runtime contrib op
that OpenVINO's ONNX frontend does not convert (``com.microsoft.RotaryEmbedding``: NomicBert,
ModernBERT; the decoders' GroupQueryAttention), it reads the family's standard-op graph
instead (``graph.ov_graph``; ``FUSED_CONVERTS`` lists the families whose fused graph
converts; tests/test_families.py checks it against the frontend).

Precisions: fp32 (``INFERENCE_PRECISION_HINT=f32``: OpenVINO's CPU plugin would otherwise
run bf16 on a CPU that has it), bf16 (the same fp32 graph, ``INFERENCE_PRECISION_HINT=
bf16``: the plugin's bf16 matrix multiplies, on avx512_bf16 or AMX only; refused by name on
another CPU, whatever OpenVINO would emulate) and int8 (that graph's weights as int8 behind
``DequantizeLinear``, ``graph.weight_int8``, run with f32 compute: OpenVINO keeps the weights
compressed). Which file it reads: ``graph.ov_graph`` (re-exported here). Which engine runs
where: ``runtimes``.

Settings: one stream, ``threads`` inference threads, latency hint, and no CPU pinning (a pool
runs several single-threaded workers side by side, and the parent tokenises on the same
cores: pinned threads would fight them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from embedpool.engine import Engine, EngineSpec, usable_cores
from embedpool.errors import ConfigError, ModelError
from embedpool.graph.ov_graph import FUSED_CONVERTS, graph_for
from embedpool.modelspec import HeadSpec
from embedpool.runtimes import BF16_FLAGS, cpu_features

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def compile_config(threads: int, precision: str) -> dict[str, Any]:
    """The CPU plugin's settings for one engine (see the module docstring)."""
    return {
        "INFERENCE_NUM_THREADS": min(threads, usable_cores()),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
    }


class OpenVinoEngine(Engine):
    """A model compiled by OpenVINO's CPU plugin; ``embed`` as ``Engine.embed``."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        head: HeadSpec,
        dim: int,
        threads: int = 1,
        head_in_graph: bool = True,
        precision: str = "fp32",
        segments: bool = False,
        vocab_rows: int | None = None,
    ) -> None:
        if precision not in _HINTS:
            raise ConfigError(f"the openvino engine runs fp32, int8 or bf16, not {precision}")
        if precision == "bf16" and not cpu_features().bf16:
            raise ConfigError(f"precision bf16 needs a CPU with {' or '.join(BF16_FLAGS)}")
        self.device = "cpu"
        self.threads = threads
        self.precision = precision
        core = ov.Core()
        try:  # compiled from the file: no ov.Model copy of the weights stays in Python
            self._compiled = core.compile_model(
                str(onnx_path), "CPU", compile_config(threads, precision)
            )
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"OpenVINO cannot load {onnx_path}: {exc}") from exc
        self._request = self._compiled.create_infer_request()
        outputs = {o.get_any_name(): o for o in self._compiled.outputs}
        out = next(
            (outputs[n] for n in ("last_hidden_state", "token_embeddings") if n in outputs),
            self._compiled.outputs[0],
        )
        shape = [d.get_length() if d.is_static else "?" for d in out.get_partial_shape()]
        self._port = out
        self._bind(
            onnx_path,
            head=head,
            dim=dim,
            head_in_graph=head_in_graph,
            inputs={i.get_any_name() for i in self._compiled.inputs},
            output=out.get_any_name(),
            output_shape=shape,
            vocab_rows=vocab_rows,
        )
        self._segments = segments  # a cross-encoder's token types (Engine.embed)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = self._request.infer(feeds)
        out: np.ndarray = np.array(result[self._port], dtype=np.float32, copy=True)
        return out

    @classmethod
    def for_spec(cls, spec: EngineSpec, onnx_path: Path) -> OpenVinoEngine:
        model = spec.model
        return cls(
            onnx_path,
            head=model.head,
            dim=model.dim,
            threads=spec.threads,
            head_in_graph=model.onnx_path is None,
            precision=spec.precision,
            segments=bool(getattr(getattr(model, "classifier", None), "token_types", False)),
            vocab_rows=model.vocab_rows,
        )


def version() -> str:
    return str(ov.get_version())


__all__ = ["FUSED_CONVERTS", "OpenVinoEngine", "compile_config", "graph_for", "version"]
