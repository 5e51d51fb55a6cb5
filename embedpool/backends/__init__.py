"""Executors that run embedpool's batches somewhere other than this machine's pool.

Each backend implements :class:`embedpool.executor.Executor` (``submit``, ``stats``,
``broken``, ``close``) and draws its work from the same ``workqueue.WorkQueue`` under the same
fault policy (``faults.py``) as the local pool, so a job plans, tokenises, caches and writes
exactly as it does locally, a failure means the same thing, and only the place where
``Engine.embed`` runs changes.

``embedpool.backends.ray``
    ``RayExecutor``: one embedpool engine per Ray actor. Needs the ``ray`` extra:
    ``pip install 'embedpool[ray]'``.

Importing this package, or any backend module, never imports a backend's heavy
dependency: ``ray`` is imported when a ``RayExecutor`` is built, and a missing extra
fails there with an error that names it.
"""
