"""Helpers of the pool tests (imported as ``pool_support`` here, ``tests.executors.pool.pool_support``
from other test directories): fast configs, a clean real-model run, deadlines, event capture."""

from __future__ import annotations

import threading
from typing import Any

from embedpool.executors.pool.config import PoolConfig
from embedpool.types import Event

#: Deadline for anything a test waits for. Generous: other engineers' tests share 2 cores.
DEADLINE_S = 60.0


def fast_config(**overrides: Any) -> PoolConfig:
    """A PoolConfig for tests: 2 fixed workers, short timers, no periodic status noise."""
    base: dict[str, Any] = dict(
        workers=2,
        sample_interval_s=0.2,
        status_interval_s=0,
        leave_timeout_s=3.0,
        start_timeout_s=60.0,
        hang_base_s=30.0,
        emergency_exit_s=0.5,
    )
    base.update(overrides)
    return PoolConfig(**base)


def clean_real_run(
    texts: list[str], max_tokens: int | None = None, runtime: str = "onnxruntime"
) -> tuple[Any, Any, Any]:
    """(EngineSpec of the default model at its default precision (int8), 1 thread, on
    ``runtime`` (ONNX Runtime or OpenVINO, tests/engines.py); the token
    sequences of ``texts``; their vectors from one clean in-process engine): what the
    real-model pool tests compare a faulty pool run against. int8 is static, so a vector does
    not depend on its batch mates (test_graph checks >= 0.99999): the batch splits and
    retries a death causes must not move it."""
    import numpy as np

    from embedpool.engine import EngineSpec
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    model = resolve_model()
    spec = EngineSpec(model, threads=1, runtime=runtime)  # type: ignore[arg-type]
    engine = spec.build()
    seqs = (
        TextTokenizer(model.tokenizer_path, max_tokens or model.max_length).encode(texts).sequences
    )
    clean = np.concatenate([engine.embed(seqs[i : i + 64]) for i in range(0, len(seqs), 64)])
    return spec, seqs, clean


class EventLog:
    """Thread-safe list of events (they arrive on the supervisor's manager thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def named(self, name: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e["event"] == name]

    def names(self) -> list[str]:
        with self._lock:
            return [e["event"] for e in self.events]
