"""One embedpool engine in one Ray worker process: the Ray counterpart of ``pool/worker.py``.

``EmbedActor`` is a plain class, made remote with ``ray.remote`` by the executor at run time
(so defining it needs no ray import). It builds its engine once, from the shipped graph
(``shipping.locate_model``) for an ``EngineSpec``, or with ``spec.build()`` for any other
recipe (test engines), and then answers ``embed`` calls one at a time
(``max_concurrency=1``). It says who it is in ``ready()``: pid, node, dim, where the model came
from and how long it took, which the driver needs to tie a death to the OOM killer (the pid's
memory cgroup, on the driver's own node).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from embedpool.executor import EmbeddingEngine, EngineRecipe, embed_sequences, with_threads
from embedpool.executors.ray.shipping import ModelShipment, locate_model
from embedpool.types import TokenIds, Vectors


class EmbedActor:
    def __init__(self, spec: EngineRecipe, shipment: ModelShipment | None, threads: int) -> None:
        started = time.perf_counter()
        import ray

        spec = with_threads(spec, threads)
        source = "built on the node"
        if shipment is None:
            self.engine: EmbeddingEngine = spec.build()
        else:  # an EngineSpec: its runtime's engine on the shipped graph
            from embedpool.engine import EngineSpec

            assert isinstance(spec, EngineSpec), "a shipment comes with an EngineSpec only"
            where, source = locate_model(shipment, lambda: ray.get(shipment.payload[0]))
            self.engine = spec.load(where / shipment.graph_name)
        self.info: dict[str, Any] = {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "dim": int(self.engine.dim),
            "model_source": source,
            "startup_s": round(time.perf_counter() - started, 3),
        }

    def ready(self) -> dict[str, Any]:
        return self.info

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        return embed_sequences(self.engine, sequences, prompt_lengths)
