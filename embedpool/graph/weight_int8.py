"""OpenVINO's int8 graph: the fp32 graph OpenVINO reads, its weights stored as int8 behind
ONNX ``DequantizeLinear`` (weight-only int8: activations and compute stay float).

OpenVINO's ONNX frontend turns ``DequantizeLinear`` on an int8 constant feeding a MatMul into
its compressed-weights pattern: the CPU plugin keeps the weights int8 in memory and
dequantises them inside its matrix multiply. Every 2-D float weight read by a ``MatMul`` (as
its second input) or by a fused ``Attention`` (its QKV weight) becomes 8-bit per output
column, asymmetric (uint8 with a zero point: the range [min(w, 0), max(w, 0)] in 255 steps,
NNCF's INT8_ASYM); the word-embedding table (``EmbedLayerNormalization``'s or a ``Gather``'s)
per row. Biases, norms and the small tensors stay float.

Why this recipe (``benchmarks/openvino_int8.py``, the default model, AMD EPYC Zen 3): it keeps
embedpool's quality bar (cos mean >= 0.997, min >= 0.99 against fp32) with margin, needs no
calibration set (deterministic bytes, numpy arithmetic on the weights: a first run's build is
the fp32 graph's plus about a second), and no NNCF at build or run time; static int8 (NNCF,
or ONNX Runtime's QDQ ``quantize_static``) quantises activations too and missed the bar or
the first run's 5 s. Own code because no library writes this form: ONNX Runtime's quantiser
writes QDQ pairs around activations as well, and NNCF works on OpenVINO's IR, not ONNX.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedpool.graph import external

if TYPE_CHECKING:
    import onnx

#: Part of the cache name: a new recipe gets a new file.
RECIPE_VERSION = 1
#: Weights smaller than this stay float (nothing to gain; the tests' tiny fixtures are above it).
MIN_ELEMENTS = 256
#: (op_type, input index) -> the axis the scales run along: MatMul's and Attention's weight
#: [in, out] per output column; an embedding table [rows, dim] per row.
_WEIGHT_INPUTS = {
    ("MatMul", 1): 1,
    ("Attention", 1): 1,
    ("Gather", 0): 0,
    ("EmbedLayerNormalization", 2): 0,
}


def quantize_weights(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place: each eligible weight (see the module docstring) as int8
    plus a ``DequantizeLinear`` that yields the original name. Returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    readers: dict[str, set[int | None]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, set()).add(_WEIGHT_INPUTS.get((node.op_type, k)))
    for out in graph.output:
        readers.setdefault(out.name, set()).add(None)
    dequant = []
    for tensor in list(graph.initializer):
        axes = readers.get(tensor.name, {None})
        if (
            len(tensor.dims) != 2
            or tensor.data_type != TensorProto.FLOAT
            or int(np.prod(tensor.dims)) < MIN_ELEMENTS
            or len(axes) != 1
            or None in axes
        ):
            continue
        axis = next(iter(axes))
        assert axis is not None
        w = numpy_helper.to_array(tensor).astype(np.float32)
        lo = np.minimum(w.min(axis=1 - axis), 0)
        hi = np.maximum(w.max(axis=1 - axis), 0)
        scale = ((hi - lo) / np.float32(255)).astype(np.float32)
        scale[scale == 0] = 1
        zero = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
        shape = (1, -1) if axis == 1 else (-1, 1)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zero.reshape(shape), 0, 255)
        names = [f"{tensor.name}.{part}" for part in ("uint8", "scale", "zero_point")]
        graph.initializer.remove(tensor)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q.astype(np.uint8), names[0]),
                numpy_helper.from_array(scale, names[1]),
                numpy_helper.from_array(zero, names[2]),
            ]
        )
        dequant.append(
            helper.make_node(
                "DequantizeLinear",
                names,
                [tensor.name],
                name=f"{tensor.name}.dequantize",
                axis=axis,
            )
        )
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*dequant, *nodes])
    return len(dequant)


def build(src: Path, tmp: Path, final: Path) -> None:
    """Write the weight-only int8 form of the graph at ``src`` to ``tmp`` (the store renames
    it to ``final``; a large graph's weights go to ``final``'s side file, ``external``)."""
    import onnx

    model = onnx.load(str(src))
    quantize_weights(model)
    external.save(model, tmp, final)


__all__ = ["MIN_ELEMENTS", "RECIPE_VERSION", "build", "quantize_weights"]
