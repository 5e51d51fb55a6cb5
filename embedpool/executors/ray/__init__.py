"""The Ray backend: embedpool's engine in Ray actors, under embedpool's own fault policy.

    shipping.py   the model's ONNX graph to every node, once, checked by sha256
    actor.py      EmbedActor: one engine in one Ray worker process
    actors.py     ActorSet: the executor's actors (start, ready, grow, replace) and their queues
    cluster.py    joining a cluster; what Ray's exception types say about a failure
    executor.py   RayExecutor: the executor contract over a pool of actors

Importing any of these never imports ``ray``: it is imported when a ``RayExecutor`` is built.
This ``__init__`` imports none of them (they import from each other and from the package, so
re-exporting here would make a circle): ``from embedpool.executors.ray.executor import
RayExecutor``, ``from embedpool.executors.ray.cluster import require_ray``.
"""
