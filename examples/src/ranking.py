"""Rank documents by cosine similarity to a query embedding."""

import numpy as np


def top_k(query: np.ndarray, docs: np.ndarray, k: int = 5) -> list[int]:
    """Indices of the k rows of ``docs`` most similar to ``query`` (rows L2-normalised)."""
    scores = docs @ query
    return [int(i) for i in np.argsort(-scores)[:k]]
