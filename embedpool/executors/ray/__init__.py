"""The Ray backend: embedpool's engine in Ray actors, under embedpool's own fault policy.

    shipping.py   the model's ONNX graph to every node, once, checked by sha256
    actor.py      EmbedActor: one engine in one Ray worker process
    actors.py     ActorSet: the executor's actors (start, ready, grow, replace) and their queues
    cluster.py    joining a cluster; what Ray's exception types say about a failure
    executor.py   RayExecutor: the executor contract over a pool of actors

Importing any of these never imports ``ray``: it is imported when a ``RayExecutor`` is built.
"""

from __future__ import annotations

from embedpool.executors.ray.cluster import INSTALL_HINT, require_ray
from embedpool.executors.ray.executor import RayExecutor

__all__ = ["INSTALL_HINT", "RayExecutor", "require_ray"]
