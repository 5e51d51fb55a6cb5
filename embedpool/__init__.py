"""embedpool: fast, memory-safe local embeddings.

    >>> import embedpool
    >>> vecs = embedpool.embed(["def f(): pass", "hello"])        # (2, 384) float32
    >>> with embedpool.Embedder(workers="auto") as e:              # the adaptive process pool
    ...     vecs = e.embed(texts)
    >>> with embedpool.Reranker("cross-encoder-dir") as r:        # a cross-encoder
    ...     best = r.rank("query", documents, top_n=3)            # [Ranked(index, score, document)]

Heavy modules (onnxruntime, the server, Ray, pyarrow) load only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "JobReport",
    "Reranker",
    "__version__",
    "embed",
    "rerank",
    "resolve_model",
]

if TYPE_CHECKING:
    from embedpool.job import Embedder, JobReport, embed
    from embedpool.models import DEFAULT_MODEL, resolve_model
    from embedpool.rerank import Reranker, rerank

_LAZY = {
    "Embedder": "embedpool.job",
    "JobReport": "embedpool.job",
    "embed": "embedpool.job",
    "resolve_model": "embedpool.models",
    "DEFAULT_MODEL": "embedpool.models",
    "Reranker": "embedpool.rerank",
    "rerank": "embedpool.rerank",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embedpool' has no attribute {name!r}")
