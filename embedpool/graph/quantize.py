"""int8 graphs derived from fp32 ones with ONNX Runtime's dynamic quantisation.

Weights are quantised once, offline, per output channel (one scale per column of every
MatMul weight; per-tensor scales cost 0.06 of cosine on MiniLM). Activations are quantised
per batch at run time (DynamicQuantizeLinear), so no calibration set is needed and no
activation range is baked in from texts unlike the user's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnx

from embedpool.errors import ModelError

#: Ops whose weights are quantised: every dense MatMul (-> MatMulInteger, fused by ORT into
#: DynamicQuantizeMatMul / MatMulIntegerToFloat) and, in shipped graphs that have one, the
#: packed-QKV Attention (-> QAttention). Gathers (embedding tables) stay fp32: quantising
#: them saves memory, not time. MatMuls between two activations (Q.K^T, P.V) are never
#: quantised (MatMulConstBOnly).
QUANT_OPS = ("MatMul", "Attention")


def quantize_int8(src: Path | onnx.ModelProto, dst: Path, *, exclude: Sequence[str] = (),
                  reduce_range: bool = False) -> None:
    """Write the dynamic int8 version of ``src`` (a file or an in-memory model) to ``dst``;
    nodes named in ``exclude`` stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs through the root logger: per-node chatter at INFO and a
    # "consider pre-processing" WARNING on every call (shape inference, moot here).
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(max(quiet, logging.ERROR))
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude) or None,
                         extra_options={"MatMulConstBOnly": True,
                                        # com.microsoft ops defeat ONNX shape inference
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as exc:
        what = src if isinstance(src, Path) else f"graph {src.graph.name!r}"
        raise ModelError(f"int8 quantisation of {what} failed: {exc}") from exc
    finally:
        logging.getLogger().setLevel(quiet)
