"""The one API every graph is written with: a node/initialiser accumulator whose helpers name
each node after its role, so that precision recipes find what to transform by name.

    family (families/*.py)              head (head.py)               recipe (quantize.py)
    encoder layers from weights ──┐     pooling -> dense ->      ┌── int8 / fp16 transforms
        g.linear(x, W, role=...)  ├──>  normalize, from the    ──┤   find linears by role
        g.op(...) fused kernels   │     model's HeadSpec         │   (GraphBuilder.linears)
                                  └───────── GraphBuilder.finish() -> onnx.ModelProto

``linear`` emits a plain ``MatMul`` against an ``[in, out]`` initialiser (biases go to the
fused op that follows, or an ``Add``) and records ``(node name, role, layer, floor)``;
recipes decide per role what to quantise and what to keep in fp32. ``floor`` is what the
family knows about the input's values (a GELU output is never below ``GELU_FLOOR``): the
int8 recipe spends its integer range where the values are. Families never branch on
precision.

onnx is imported inside the methods, not at module level: a pool worker whose graph is
cached imports this package only for cache keys, and onnx + protobuf cost it ~10-18 MB of
RSS (benchmarks/worker_rss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

OPSET = 17  # LayerNormalization; ORT >= 1.14 runs it
MS_DOMAIN = "com.microsoft"
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
SENTENCE_EMBEDDING, LAST_HIDDEN_STATE = "sentence_embedding", "last_hidden_state"

Array = npt.NDArray[np.float32]

#: The minimum of GELU, erf form and tanh approximation alike (-0.16997 at x = -0.7518),
#: rounded down: the ``floor`` of a linear that reads a GELU output.
GELU_FLOOR = -0.17

#: What a linear layer does in its block; recipes key their choices on it.
LinearRole = Literal[
    "q", "k", "v", "qkv", "attn_out", "ffn_up", "ffn_gate", "ffn_down", "head_dense"
]


@dataclass(frozen=True)
class Linear:
    """A MatMul emitted by ``GraphBuilder.linear``: its node name, role and layer index, and
    a lower bound of its input's values when the family knows one (else None)."""

    node: str
    role: LinearRole
    layer: int
    floor: float | None = None


@dataclass(frozen=True)
class Encoder:
    """What a family's ``build_encoder`` returns: the token-state tensor's name and width,
    and graph inputs it reads beyond ``input_ids`` and ``attention_mask``."""

    hidden: str  # [batch, seq, width] float
    width: int
    extra_inputs: tuple[str, ...] = ()


class GraphBuilder:
    """Accumulates nodes and initialisers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.linears: list[Linear] = []

    def const(self, name: str, value: npt.ArrayLike, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def shared_const(self, name: str, value: npt.ArrayLike, dtype: Any = np.float32) -> str:
        """A constant many nodes read (an axis, a shape, a scalar): added on first use only,
        so helpers called once per layer can name it without duplicating the initialiser."""
        if not any(t.name == name for t in self.inits):
            self.const(name, value, dtype)
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        *,
        outputs: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        from onnx import helper

        outs = [f"{name}_out{i}" if outputs > 1 else name for i in range(outputs)]
        self.nodes.append(
            helper.make_node(
                op_type, inputs, outs, name=f"{name}_{op_type}", domain=domain or None, **attrs
            )
        )
        return outs

    def op1(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        return self.op(op_type, inputs, name, **attrs)[0]

    def linear(
        self,
        x: str,
        weight: Array,
        name: str,
        *,
        role: LinearRole,
        layer: int = -1,
        floor: float | None = None,
    ) -> str:
        """``x @ weight`` (``weight`` is ``[in, out]``); the node is named ``<name>_MatMul``.
        ``floor``: no value of ``x`` is below it (e.g. ``GELU_FLOOR``); leave None if unsure
        (a wrong floor costs int8 precision, never correctness)."""
        out = self.op1("MatMul", [x, self.const(f"{name}.w", weight)], name)
        self.linears.append(Linear(f"{name}_MatMul", role, layer, floor))
        return out

    def nodes_with_role(self, *roles: LinearRole) -> list[str]:
        return [lin.node for lin in self.linears if lin.role in roles]

    def finish(
        self,
        name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        *,
        producer_version: str,
        declare_float_outputs: bool = False,
    ) -> onnx.ModelProto:
        """The model. ``declare_float_outputs``: declare every com.microsoft node's outputs
        as float, for graphs the quantiser will calibrate (ONNX shape inference knows no
        com.microsoft op, and the calibrator only records tensors whose type it knows).

        The initialisers are moved into the model one by one (``self.inits`` ends empty):
        protobuf copies on every insert, and handing over the whole list at once held the
        weights three times (list, graph, model), 110 MB more peak RSS on MiniLM's build."""
        from onnx import TensorProto, helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs)
        if declare_float_outputs:
            graph.value_info.extend(
                helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
                for node in self.nodes
                if node.domain == MS_DOMAIN
                for out in node.output
            )
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="embedpool",
            producer_version=producer_version,
        )
        # IR 8 keeps the file loadable by every ORT embedpool supports (>= 1.20).
        model.ir_version = 8
        self.inits.reverse()
        while self.inits:
            model.graph.initializer.append(self.inits.pop())
        return model


def linear_t(w: dict[str, Array] | Any, key: str) -> Array:
    """torch Linear stores ``[out, in]``; ONNX MatMul wants ``[in, out]``."""
    return np.ascontiguousarray(w[key + ".weight"].T)
