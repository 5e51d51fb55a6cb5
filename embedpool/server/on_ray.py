"""``serve --backend ray``: the server's executor is a ``RayExecutor``, built by the lifespan.

Nothing else in the server changes with the backend: the micro-batcher submits ``WorkBatch``es
through the executor contract (``executor.Executor``), so the API, the errors (422 naming a
poison input, 429 + Retry-After, 503), the metrics (the executor's ``ExecutorStats``), /ready
(the probe is a ``WorkBatch`` that runs on an actor) and /health (``RayExecutor.broken``)
are the local server's. What Ray adds, ``RayExecutor`` handles under ``faults.py``'s rules:
the model shipped once through the object store, dead and hung actors replaced, their
batches split and retried, a poison input given up alone.

Start-up and shutdown::

    lifespan start (a worker thread) -> RayExecutor: ray.init, or join --ray-address;
                                        ship the graph; start the actors; first one ready
    SIGTERM (uvicorn)                -> stop accepting; finish the requests in flight
    lifespan stop                    -> batcher drained -> RayExecutor.close: kill the
                                        actors; ray.shutdown if embedpool started Ray

Several models (``serve --backend ray --model A --model B``, ``--reranker``): each model's
``RayExecutor`` joins one Ray that the server holds for its whole life (:func:`hold_ray`, the
lifespan's first step, on its worker thread), so that unloading a model (registry.py: idle
past its keep-alive, or making room) stops its actors and never the Ray the other models'
actors run on.

SIGTERM stays uvicorn's, against two handlers Ray installs:

* ``ray.init`` on the main thread replaces the Python SIGTERM handler with one that exits at
  once. Ray is joined on the lifespan's worker thread instead, where it leaves the handler
  alone and logs a warning saying so; ``placement.ray_executor`` filters that warning out.
* The driver's core worker (C++) installs abseil's failure handler for SIGTERM, whatever the
  thread; it aborted the server mid-drain. The lifespan puts the Python handlers back on the
  main thread once the executor is built (``app.reinstall_signal_handlers``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from embedpool.budget import DEFAULT_BATCH_TOKENS
from embedpool.executor import EngineRecipe
from embedpool.faults import FaultPolicy
from embedpool.microbatcher import SubmitExecutor
from embedpool.types import EventCallback


def ray_executor_factory(
    spec: EngineRecipe,
    *,
    address: str | None = None,
    actors: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    policy: FaultPolicy | None = None,
    on_event: EventCallback | None = None,
) -> Callable[[], SubmitExecutor]:
    """A factory for ``create_app``/``run_server`` around any engine recipe: a
    ``RayExecutor`` built by ``placement.ray_executor``, the Ray branch of the one
    construction path (``embedpool serve --backend ray`` goes through
    ``placement.start_executor``)."""
    from embedpool.placement import ray_executor

    return functools.partial(
        ray_executor,
        spec,
        address=address,
        actors=actors,
        batch_tokens=batch_tokens,
        policy=policy,
        on_event=on_event,
    )


def hold_ray(address: str | None) -> Callable[[], None]:
    """Join ``address`` (None: ``$RAY_ADDRESS``, else start a private local Ray) for the
    server's life, before any executor: every ``RayExecutor`` then joins it and none shuts it
    down at close. Returns what lets it go at the server's stop (``ray.shutdown`` where this
    call joined or started it). Call it off the main thread (see the module docstring)."""
    import logging

    from embedpool.executors.ray.cluster import connect, require_ray
    from embedpool.placement import _SIGTERM_NOTE_FILTER

    ray = require_ray()
    logging.getLogger("ray._private.worker").addFilter(_SIGTERM_NOTE_FILTER)
    if connect(ray, address):
        return lambda: ray.shutdown()
    return lambda: None
