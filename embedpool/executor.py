"""The contract between a job and whatever runs the model: in-process, pool or Ray.

A job cuts its sequences into ``WorkBatch``es; an executor turns each into a ``BatchResult``
(possibly out of order, possibly streaming). Per-item failures (a poison input) come back in
``failed`` instead of failing the batch, so one bad text never costs the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from embedpool.types import TokenIds, Vectors

if TYPE_CHECKING:
    from embedpool.engine import EngineSpec


@dataclass(frozen=True)
class WorkBatch:
    batch_id: int
    sequences: tuple[TokenIds, ...]
    keys: tuple[str, ...] = ()  # human-readable item ids, for error messages

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def padded_tokens(self) -> int:
        return len(self.sequences) * max((len(s) for s in self.sequences), default=0)


@dataclass
class BatchResult:
    batch_id: int
    vectors: Vectors  # (len(sequences), dim); rows listed in ``failed`` are zeros
    failed: dict[int, str] = field(default_factory=dict)  # position in batch -> error


class Executor(Protocol):
    """Runs batches; ``run`` yields one result per batch, in any order."""

    dim: int

    def run(self, batches: Iterable[WorkBatch]) -> Iterator[BatchResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The engine in this process, one batch at a time."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine: Any = spec.build()  # an Engine, or any object with .embed() and .dim
        self.dim = self.engine.dim

    def run(self, batches: Iterable[WorkBatch]) -> Iterator[BatchResult]:
        for b in batches:
            yield BatchResult(b.batch_id, self.engine.embed(b.sequences))

    def close(self) -> None:
        pass


def empty_vectors(n: int, dim: int) -> Vectors:
    return np.zeros((n, dim), dtype=np.float32)
