"""fp16 graphs for GPUs: the fused fp32 graph with its encoder in float16 (weights and
activations), its head (pooling, Dense, normalisation) in float32, int64 inputs and a float32
output, the layout ONNX Runtime's CUDA kernels take (every fused com.microsoft op embedpool
emits has a float16 CUDA kernel; LayerNorm, softmax and the reductions inside them
accumulate in float32).

    input_ids, attention_mask (int64)
        └─ encoder: every float tensor float16 ──Cast float32──> head in float32 ──> output

The head stays float32 because a mean pooling sums up to ``max_length`` token states: 8,192
tokens of |x| ~ 20 pass float16's 65,504. Constants are clipped to +-65,504 on the way (a
-1e9 mask bias becomes -65,504, still exp() = 0).

Our own code, not ORT's float16 converter (onnxruntime.transformers.float16): it types each
tensor through ONNX shape inference, which knows no com.microsoft op, so on the fused graphs
it left the head reading a float16 tensor as float32 (ORT refused the file) and took 8.7 s
for MiniLM; here the caller names the boundary (compose knows it) and numpy casts the
weights in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["FP16_MAX", "to_fp16"]

#: The largest finite float16.
FP16_MAX = 65504.0


def _half(array: np.ndarray) -> np.ndarray:
    half: np.ndarray = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
    return half


def to_fp16(
    model: onnx.ModelProto, fp32_nodes: Collection[str], boundary: Collection[str]
) -> onnx.ModelProto:
    """Rewrite ``model`` in place (and return it): every node not named in ``fp32_nodes``
    computes in float16; the float tensors in ``boundary`` (made by float16 nodes, read by
    float32 ones) are cast back to float32 for their float32 readers. Graph inputs and
    outputs keep their types, so an output made by a float16 node is a ValueError."""
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    graph = model.graph
    keep = set(fp32_nodes)
    half_nodes = [n for n in graph.node if n.name not in keep]
    if missing := keep - {n.name for n in graph.node}:
        raise ValueError(f"fp16: no node named {sorted(missing)}")
    made_half = {o for n in half_nodes for o in n.output}
    if bad := made_half & {o.name for o in graph.output}:
        raise ValueError(f"fp16: graph output {sorted(bad)} would be float16")
    read_half = {i for n in half_nodes for i in n.input}
    read_full = {i for n in graph.node if n.name in keep for i in n.input}

    # Weights: float32 initialisers read by float16 nodes become float16 (a copy under a new
    # name where float32 nodes read them too).
    renamed: dict[str, str] = {}
    extra = []
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT or t.name not in read_half:
            continue
        half = numpy_helper.from_array(_half(numpy_helper.to_array(t)), t.name)
        if t.name in read_full:
            renamed[t.name] = half.name = f"{t.name}.fp16"
            extra.append(half)
        else:
            t.CopyFrom(half)
    graph.initializer.extend(extra)

    cast_back = {b: f"{b}.fp32" for b in boundary}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in keep:
            for i, name in enumerate(node.input):
                if name in cast_back:
                    node.input[i] = cast_back[name]
        else:
            for i, name in enumerate(node.input):
                node.input[i] = renamed.get(name, name)
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                elif attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(
                        numpy_helper.from_array(_half(numpy_helper.to_array(attr.t)), attr.t.name)
                    )
        nodes.append(node)
        for out in node.output:
            if out in cast_back:
                nodes.append(
                    helper.make_node(
                        "Cast",
                        [out],
                        [cast_back[out]],
                        name=f"{out}.fp32_Cast",
                        to=TensorProto.FLOAT,
                    )
                )
    if unmade := set(cast_back) - made_half:
        raise ValueError(f"fp16: boundary tensor {sorted(unmade)} is not made by a float16 node")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float32 declarations of what is now float16; all optional
    return model
