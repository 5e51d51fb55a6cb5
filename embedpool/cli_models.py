"""``serve --model A --model B``: the models after the first, each resolved, placed and its
graph built before the server starts (as the first's), its executor deferred to its first
load (server/registry.py decides when)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedpool.errors import CacheError, ConfigError, EmbedpoolError
from embedpool.server.registry import ModelSetup, planned_bytes


def extra_model_setup(
    name: str,
    *,
    device: str,
    precision: str,
    engine: str,
    cpu_workers: int | None,
    batch_tokens: int,
    long_text: str,
    workers: int | str | None,
    pool_options: dict[str, Any],
    backend: str,
    ray_address: str | None,
    actors: int | None,
    cache_path: Path | None,
    no_cache: bool,
) -> ModelSetup:
    """One more ``--model``: exits 2 (naming it) when it cannot be served."""
    from embedpool.cli import EXIT_USAGE, _fail, _ready_graphs
    from embedpool.models import resolve_model
    from embedpool.models.crossencoder import refuse_cross_encoder
    from embedpool.placement import executor_factory, place

    try:
        model = resolve_model(name)
        refuse_cross_encoder(model)
        placement = place(
            model,
            device=device,
            precision=precision,
            cpu_workers=cpu_workers,
            batch_tokens=batch_tokens,
            backend=backend,
            profile=pool_options.get("profile"),
            engine=engine,
        )
    except (EmbedpoolError, ConfigError) as exc:
        _fail(f"--model {name}: {exc}", EXIT_USAGE)
        raise  # unreachable
    placement = _ready_graphs(model, placement, pool_options.get("max_memory_bytes"))
    hook = None
    if not no_cache:
        from embedpool.cache import BoundCache, VectorCache
        from embedpool.graph import graph_id

        try:
            hook = BoundCache(
                VectorCache.open(cache_path),
                model.fingerprint(
                    placement.precision,
                    long_text,
                    graph=graph_id(model, placement.precision, placement.runtime),
                ),
            )
        except CacheError as exc:
            _fail(str(exc), EXIT_USAGE)
    factory = executor_factory(
        model,
        placement,
        workers=actors if backend == "ray" else workers,
        pool_options=pool_options,
        backend=backend,
        ray_address=ray_address,
    )
    start_workers = workers if isinstance(workers, int) else 1
    return ModelSetup(
        model,
        factory,
        hook,
        planned_bytes(
            model, placement.precision, placement.batch_tokens, start_workers, placement.runtime
        ),
        aliases=(name,),
        precision=placement.precision,
    )
