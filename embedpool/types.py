"""Type aliases shared by every module (one place, imported everywhere)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

#: One embedding matrix: float32, shape (n, dim); rows L2-normalised when the model has a
#: Normalize module (as sentence-transformers returns them), as computed otherwise.
Vectors = npt.NDArray[np.float32]
#: One tokenised sequence, special tokens included, never longer than the model's max length.
TokenIds = npt.NDArray[np.int32]

#: int8 runs on the CPU only, fp16 on a GPU only (embedpool.device_choice), fp32 on both; bf16 on a
#: CPU with avx512_bf16 or AMX, in OpenVINO (embedpool.runtimes).
Precision = Literal["fp32", "int8", "fp16", "bf16"]
#: The inference runtime behind ``engine.EngineSpec`` (embedpool.runtimes chooses it).
Runtime = Literal["onnxruntime", "openvino"]
Pooling = Literal["mean", "cls"]
LongTextMode = Literal["truncate", "window"]
Profile = Literal["cloud", "local", "wsl2"]

#: Structured event (see embedpool.events): a dict with at least "event" and "ts".
Event = dict[str, Any]
EventCallback = Callable[[Event], None]
