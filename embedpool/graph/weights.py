"""Reading a checkpoint's tensors: safetensors in, float32 numpy arrays out, keyed without
any model prefix ("embeddings.word_embeddings.weight"), whatever wrapper saved them.

Families check the keys they need (``families.<name>.check_weights``); this module only
reads and normalises names and dtypes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import Array

#: Safetensors key prefixes seen in the wild: bare BertModel, BertFor*, wrapped checkpoints.
PREFIXES = ("bert.", "model.", "encoder_model.", "0.auto_model.")


def load_safetensors(path: Path | str) -> dict[str, Array]:
    """Float32 tensors keyed without any model prefix; non-float tensors are dropped."""
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types; bf16 cannot map to numpy
        raise ModelError(f"cannot read {path}: {exc} (embedpool reads fp32/fp16 safetensors)"
                         ) from exc
    out: dict[str, Array] = {}
    for key, value in raw.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if np.issubdtype(value.dtype, np.floating):
            out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out
