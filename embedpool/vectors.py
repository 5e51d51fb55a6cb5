"""Arithmetic on finished embedding vectors, numpy only: normalise, average windows, truncate.

Every vector embedpool returns is float32 and what sentence-transformers returns for the
model: L2-normalised (cosine = dot product) when the model has a Normalize module, as
computed otherwise. A long text embedded as several windows (``long_text="window"``) becomes
the mean of its windows' vectors, normalised when the model normalises, whether the windows
came back through a job or a server request (both fold them with ``prepare.Assembly``, which
calls ``combine_windows``); a model trained for it (Matryoshka) may be cut to its first N
dimensions and normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedpool.types import Vectors

#: Norm below which a row is left as it is instead of divided: an all-zero row (a given-up
#: input) must stay zeros, not become NaN.
MIN_NORM = 1e-12


def l2_normalize(x: np.ndarray) -> Vectors:
    """Rows scaled to unit length, as float32 (all-zero rows stay zeros)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: Vectors = (x / np.clip(norms, MIN_NORM, None)).astype(np.float32, copy=False)
    return out


def combine_windows(
    vectors: Vectors, owner: Sequence[int], n_items: int, normalize: bool = True
) -> Vectors:
    """One vector per item: the mean of its windows' vectors, L2-normalised when the model
    normalises (``normalize``: ``ResolvedModel.normalize``).

    ``owner[i]`` is the item of row ``i`` (``tokenization.Encoded.owner``). With one row per
    item the rows come back unchanged (the mean of one row is itself).
    """
    if len(owner) == n_items:
        return vectors
    idx = np.asarray(owner, dtype=np.intp)
    sums = np.zeros((n_items, vectors.shape[1]), dtype=np.float32)
    np.add.at(sums, idx, vectors)
    if normalize:
        return l2_normalize(sums)
    counts = np.bincount(idx, minlength=n_items).clip(1)
    means: Vectors = (sums / counts[:, None]).astype(np.float32)
    return means


def truncate_dims(vectors: Vectors, dims: int, normalize: bool = True) -> Vectors:
    """The first ``dims`` dimensions of each row (Matryoshka truncation), normalised again
    when the model normalises its vectors (``normalize``: a cosine model's truncated vectors
    are unit vectors again; a model without Normalize keeps its own values, as
    sentence-transformers' ``truncate_dim`` does). Only meaningful for models trained for it
    (``options.check_dimensions``); ``dims`` must be between 1 and the width."""
    width = vectors.shape[-1]
    if not 1 <= dims <= width:
        raise ValueError(f"dims must be between 1 and the vectors' {width} dimensions, got {dims}")
    if dims == width:
        return vectors
    if normalize:
        return l2_normalize(vectors[..., :dims])
    out: Vectors = np.ascontiguousarray(vectors[..., :dims], dtype=np.float32)
    return out
