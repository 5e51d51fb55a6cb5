"""Executors that run embedpool's batches somewhere other than this machine's pool.

Each backend implements :class:`embedpool.executor.Executor` (``dim``, ``run``, ``close``),
so a job plans, tokenises, caches and writes exactly as it does locally and only the place
where ``Engine.embed`` runs changes.

``embedpool.backends.ray``
    ``RayExecutor``: one embedpool engine per Ray actor, with embedpool's own fault
    handling on top of Ray's (split on a dead actor, bounded retries, poison inputs
    reported per item). Needs the ``ray`` extra: ``pip install 'embedpool[ray]'``.

Importing this package, or any backend module, never imports a backend's heavy
dependency: ``ray`` is imported when a ``RayExecutor`` is built, and a missing extra
fails there with an error that names it.
"""
