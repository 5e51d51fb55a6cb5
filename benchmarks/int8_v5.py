"""The int8 recipe embedpool shipped before recipe 6 (INT8_RECIPE_VERSION 5), kept only so that
benchmarks/graph_variants.py can measure the new recipe against it (speed, quality, and the
cold build's time and memory). Not used by embedpool.

Recipe 5: the int8-ready fused graph; SmoothQuant (alpha 0.5) on the FFN up-projection's
input; ONNX Runtime's ``quantize_static`` (QOperator, per-channel int8 weights, uint8
activations with MinMax ranges) on every linear except the FFN down-projection, calibrated
on 64 chunks evenly spaced through the local Python standard library (so the graph
depended on the machine's stdlib), in length-sorted batches of 16.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from embedpool.graph import _family
from embedpool.graph.builder import MS_DOMAIN
from embedpool.graph.compose import compose
from embedpool.models import ResolvedModel
from embedpool.types import TokenIds

SMOOTH_ALPHA = 0.5
CALIBRATION_CHUNKS = 64
CALIBRATION_BATCH = 16


class TokenBatchReader(CalibrationDataReader):  # type: ignore[misc]
    """Length-sorted, right-padded calibration feeds (as recipe 5 had them)."""

    def __init__(self, sequences: Sequence[TokenIds], batch_size: int) -> None:
        ordered = sorted(sequences, key=len)
        self.feeds: list[dict[str, np.ndarray]] = []
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            ids = np.zeros((len(batch), max(len(s) for s in batch)), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            self.feeds.append({"input_ids": ids, "attention_mask": mask})
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def calibration(model: ResolvedModel) -> TokenBatchReader:
    from embedpool.corpus import stdlib_chunks
    from embedpool.tokenization import TextTokenizer

    chunks = stdlib_chunks(sys.maxsize)
    step = len(chunks) / CALIBRATION_CHUNKS
    picked = [chunks[int(i * step)].text for i in range(CALIBRATION_CHUNKS)]
    seqs = TextTokenizer.for_model(model).encode(picked).sequences
    return TokenBatchReader(seqs, CALIBRATION_BATCH)


def smooth(
    model: onnx.ModelProto, nodes: Sequence[str], reader: TokenBatchReader
) -> onnx.ModelProto:
    """SmoothQuant on the named MatMuls' inputs (recipe 5's smooth_matmul_inputs)."""
    import onnxruntime as ort

    targets = [n for n in model.graph.node if n.name in nodes]
    inits = {t.name: t for t in model.graph.initializer}
    inputs = sorted({n.input[0] for n in targets})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inputs
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax: dict[str, np.ndarray] = {}
    for feed in reader.feeds:
        for name, value in zip(inputs, session.run(inputs, feed), strict=True):
            cur = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = np.maximum(amax[name], cur) if name in amax else cur
    nodes_out: list[onnx.NodeProto] = []
    for name in inputs:
        users = [n for n in targets if n.input[0] == name]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in users]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = (
            np.maximum(amax[name], 1e-5) ** SMOOTH_ALPHA
            / np.maximum(wmax, 1e-5) ** (1 - SMOOTH_ALPHA)
        ).astype(np.float32)
        for n, w in zip(users, weights, strict=True):
            inits[n.input[1]].CopyFrom(
                numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1])
            )
        model.graph.initializer.append(numpy_helper.from_array(1.0 / s, f"{name}.smooth"))
    for node in model.graph.node:
        if node.name in nodes:
            name = node.input[0]
            if not any(o.output[0] == f"{name}.smoothed" for o in nodes_out):
                nodes_out.append(
                    helper.make_node(
                        "Mul",
                        [name, f"{name}.smooth"],
                        [f"{name}.smoothed"],
                        name=f"{name}.smooth_Mul",
                    )
                )
                model.graph.value_info.append(
                    helper.make_tensor_value_info(f"{name}.smoothed", onnx.TensorProto.FLOAT, None)
                )
            node.input[0] = f"{name}.smoothed"
        nodes_out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes_out)
    return model


def build(model: ResolvedModel, dst: Path) -> None:
    """Write recipe 5's int8 graph of ``model`` (a safetensors model) to ``dst``."""
    fam, cfg = _family(model)
    graph = compose(
        fam,
        fam.load_weights(model.weights_path, cfg),
        cfg,
        model.head,
        fused=True,
        int8_ready=True,
        name=model.name,
    )
    # the calibrator records only tensors of known type; ONNX inference knows no MS op
    graph.graph.value_info.extend(
        helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
        for node in graph.graph.node
        if node.domain == MS_DOMAIN
        for out in node.output
    )
    layers = range(cfg.num_layers)
    reader = calibration(model)
    graph = smooth(graph, [f"l{i}.ff1_MatMul" for i in layers], reader)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's per-node chatter
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                graph,
                dst,
                reader,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=[f"l{i}.ff2_MatMul" for i in layers],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "MatMulConstBOnly": True,
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                },
            )
    finally:
        root.setLevel(level)


def main(argv: list[str]) -> Any:
    """``python benchmarks/int8_v5.py OUT.onnx``: build recipe 5 for the default model."""
    from embedpool.models import resolve_model

    build(resolve_model(), Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
