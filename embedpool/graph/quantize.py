"""int8 graphs derived from fp32 ones with ONNX Runtime's quantiser.

Two recipes, both quantising MatMul weights offline per output channel (one scale per
column; per-tensor scales cost 0.06 of cosine on MiniLM) to signed 8 bits:

- ``quantize_int8_static`` (the default for graphs embedpool builds): activations are
  quantised with scales fixed at build time, calibrated (MinMax) on a small fixed token set,
  in QOperator form (QuantizeLinear -> QLinearMatMul -> DequantizeLinear, constant scales).
  A text's vector then depends on that text only, not on its batch neighbours: on MiniLM,
  cos 1.0000000 for a text alone vs the same text padded in a batch with a 256-token one,
  where the dynamic recipe gives 0.9927. embedpool needs that: a resumed job must equal an
  uninterrupted one, and a pool's retries and batch splits must not change vectors.
- ``quantize_int8`` (dynamic; kept for shipped onnx/model.onnx files, whose node names are
  unknown so no fp32 exclusion list can be given): activations are quantised per batch at
  run time (DynamicQuantizeLinear, one scale per tensor), so no calibration set is needed,
  but the scale comes from the whole padded batch, neighbours included.

Measured on MiniLM (unfused graph, FFN down-projection ``ff2`` of all 6 layers kept fp32,
64 calibration chunks of stdlib source), against sentence-transformers' vectors:
static: held-out 600-chunk eval mean 0.99426 / min 0.98876, tests' fixture mean 0.9927 /
min 0.9744, the same quality as the dynamic recipe (ff2 of layers 0-1 in fp32); and ~9%
fewer chunks/s than it, the price of reproducible vectors. The likely causes: ff2 stays fp32
in all six layers instead of two, and each quantised MatMul runs as separate QuantizeLinear
(shared by Q/K/V) -> QLinearMatMul -> DequantizeLinear kernels, where ORT fuses the dynamic
path into DynamicQuantizeMatMul. Numbers: benchmarks/eval_quality.py. The int8-ready graph
(graph/bert.py) won back more than that: 25.3 vs 23.7 chunks/s for the same recipe on the
unfused graph, and 1.23x fp32 (benchmarks/graph_variants.py, batch 4 x 2 threads).

Why ff2 stays fp32: it reads GELU output, whose rare large activations set the activation
range and crush every other value into a few int8 steps. Measured on the int8-ready graph
against fp32 (100 stdlib chunks): quantising the ff2 of one layer alone costs 0.006-0.024 of
mean cosine (layer 0 worst: 0.976), all six 0.058; SmoothQuant-style per-channel scaling of
its input (alpha 0.5 or 0.75) did not help (0.93-0.94). Also measured and rejected:
MatMulNBits with 8-bit blocked weights and int8 compute (per-row activation scales, so
batch-independent): cos 0.9998 but slower than fp32 on this AVX2 CPU (11.3 vs 12.7 chunks/s).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from embedpool.errors import ModelError
from embedpool.types import TokenIds

__all__ = ["QUANT_OPS", "TokenBatchReader", "quantize_int8", "quantize_int8_static",
           "smooth_matmul_inputs"]

#: Ops whose weights are quantised: every dense MatMul (-> MatMulInteger, fused by ORT into
#: DynamicQuantizeMatMul / MatMulIntegerToFloat) and, in shipped graphs that have one, the
#: packed-QKV Attention (-> QAttention). Gathers (embedding tables) stay fp32: quantising
#: them saves memory, not time. MatMuls between two activations (Q.K^T, P.V) are never
#: quantised (MatMulConstBOnly).
QUANT_OPS = ("MatMul", "Attention")


class TokenBatchReader(CalibrationDataReader):  # type: ignore[misc]
    """Calibration feeds from token sequences: sorted by length (ties keep input order, and
    padding, whose activations MinMax sees too, stays small), cut into fixed batches,
    right-padded with id 0 like embedpool.engine. Deterministic: the
    same sequences give the same feeds in the same order, on every ``rewind``."""

    def __init__(self, sequences: Sequence[TokenIds], input_names: Collection[str], *,
                 batch_size: int) -> None:
        if not sequences:
            raise ValueError("calibration needs at least one sequence")
        ordered = sorted(sequences, key=len)  # stable sort: deterministic
        self.feeds: list[dict[str, np.ndarray]] = []
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start:start + batch_size]
            ids = np.zeros((len(batch), max(len(s) for s in batch)), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in input_names:
                feed["token_type_ids"] = np.zeros_like(ids)
            if "prompt_length" in input_names:  # calibration texts carry no prompt
                feed["prompt_length"] = np.zeros((len(batch),), dtype=np.int64)
            self.feeds.append(feed)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)



def smooth_matmul_inputs(model: onnx.ModelProto, nodes: Collection[str],
                         calibration: TokenBatchReader, *, alpha: float) -> onnx.ModelProto:
    """SmoothQuant (Xiao et al., 2023) for the named MatMuls: a copy of ``model`` in which
    each one's input is divided per channel by ``s`` and its weight rows multiplied by ``s``,
    so the fp32 maths is unchanged while the activation's outlier channels shrink before a
    per-tensor int8 scale is fitted to them.

    ``s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)``, with ``max|X_j|`` over the
    calibration feeds. The division is an explicit Mul before the MatMul: the tensor also
    feeds the residual path, so it cannot be folded into the LayerNorm that makes it.

    Our own code because ONNX Runtime's quantiser offers SmoothQuant only through Intel's
    neural-compressor, a large dependency for some 30 lines of arithmetic.
    """
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = [n for n in out.graph.node if n.name in nodes]
    if {n.name for n in targets} != set(nodes):
        raise ModelError(f"cannot smooth: no MatMul named {sorted(set(nodes) - {n.name for n in targets})}")
    inits = {t.name: t for t in out.graph.initializer}
    inputs = sorted({n.input[0] for n in targets})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in inputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = {name: np.zeros(0, np.float32) for name in inputs}
    for feed in calibration.feeds:
        for name, value in zip(inputs, session.run(inputs, feed), strict=True):
            cur = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = cur if amax[name].size == 0 else np.maximum(amax[name], cur)
    scales: dict[str, np.ndarray] = {}
    for name in inputs:
        users = [n for n in targets if n.input[0] == name]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in users]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = (np.maximum(amax[name], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha))
        scales[name] = s.astype(np.float32)
        for n, w in zip(users, weights, strict=True):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(
                (w * scales[name][:, None]).astype(np.float32), n.input[1]))
    nodes_out: list[onnx.NodeProto] = []
    added: set[str] = set()
    for node in out.graph.node:
        if node.name in nodes:
            name = node.input[0]
            smoothed = f"{name}.smoothed"
            if name not in added:  # MatMuls sharing an input share one Mul
                added.add(name)
                out.graph.initializer.append(numpy_helper.from_array(1.0 / scales[name],
                                                                     f"{name}.smooth"))
                nodes_out.append(helper.make_node("Mul", [name, f"{name}.smooth"], [smoothed],
                                                  name=f"{name}.smooth_Mul"))
                out.graph.value_info.append(helper.make_tensor_value_info(
                    smoothed, onnx.TensorProto.FLOAT, None))
            node.input[0] = smoothed
        nodes_out.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes_out)
    return out


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantiser logs through the root logger: per-node chatter at INFO and a "consider
    pre-processing" WARNING on every call (shape inference, moot here). Silence it meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8_static(src: Path | onnx.ModelProto, dst: Path, *, exclude: Sequence[str],
                         calibration: CalibrationDataReader) -> None:
    """Write the static int8 version of ``src`` (a file or an in-memory model) to ``dst``:
    MatMul weights per-channel S8, activations U8 with MinMax ranges from ``calibration``;
    nodes named in ``exclude`` stay fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet_root_logger():
        try:
            quantize_static(src, dst, calibration, quant_format=QuantFormat.QOperator,
                            op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude) or None,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"MatMulConstBOnly": True,
                                           "DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:
            raise ModelError(f"static int8 quantisation of {_describe(src)} failed: {exc}") from exc


def quantize_int8(src: Path | onnx.ModelProto, dst: Path, *, exclude: Sequence[str] = (),
                  reduce_range: bool = False) -> None:
    """Write the dynamic int8 version of ``src`` (a file or an in-memory model) to ``dst``;
    nodes named in ``exclude`` stay fp32. Vectors depend slightly on batch neighbours."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        try:
            quantize_dynamic(src, dst, op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(exclude) or None,
                             extra_options={"MatMulConstBOnly": True,
                                            # com.microsoft ops defeat ONNX shape inference
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:
            raise ModelError(f"int8 quantisation of {_describe(src)} failed: {exc}") from exc


def _describe(src: Path | onnx.ModelProto) -> str:
    return str(src) if isinstance(src, Path) else f"graph {src.graph.name!r}"
