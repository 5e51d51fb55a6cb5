"""Joining a Ray cluster, and reading what Ray says about a failure.

Connecting (``connect``)
    ``address=None``: reuse ``ray.init`` if the caller already connected; else join
    ``$RAY_ADDRESS`` if set; else start a private local instance (all usable cores,
    dashboard off, workers at nice 0 like the local pool's rather than Ray's default 15)
    that the executor shuts down at close. ``address="auto"`` or ``"host:port"`` joins an
    existing cluster; ``"ray://host:10001"`` goes through Ray Client. A ``host:port`` where
    nothing answers for 10 s is refused at once (``unreachable``), not after Ray's retries.

Failures (``failure_of``)
    Ray's exception *types* say what happened, never their text: ``OutOfMemoryError`` is
    Ray's memory monitor killing the worker (an OOM kill with evidence); ``RayActorError`` and
    ``WorkerCrashedError`` a dead actor (Ray does not tell a SIGKILL from a SIGSEGV: both read
    "connection error code 2", and its message mentions the OOM killer for any unexpected
    exit); ``RayTaskError`` an exception in ``embed``, whose ``cause`` is classified like a
    pool worker's (``faults.engine_error_kind``).
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from types import ModuleType
from typing import Literal

from embedpool.errors import ConfigError, MissingExtraError
from embedpool.faults import FailureKind, engine_error_kind

INSTALL_HINT = "pip install 'embedpool[ray]'"
#: Ray's knob for its worker processes' niceness (default 15), read when a raylet starts.
RAY_NICENESS_ENV = "RAY_worker_niceness"
#: How long a ``host:port`` address may refuse connections before we give up on it (a head
#: that is still starting opens its port within seconds), and one TCP connect's timeout.
GCS_PROBE_WINDOW_S = 10.0
GCS_PROBE_CONNECT_S = 5.0


def require_ray() -> ModuleType:
    """The ``ray`` module, or an error that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(
            f"the Ray backend needs the 'ray' extra, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    return ray


def connect(ray: ModuleType, address: str | None) -> bool:
    """Join or start Ray (see the module docstring); True if the caller must shut it down."""
    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        from embedpool.engine import usable_cores

        # Ray runs its workers at nice 15 by default, which on a machine shared with other
        # work (the single-machine case this instance serves) halved throughput against the
        # nice-0 local pool in ray_bench.py. Ours get the pool's priority.
        saved = os.environ.get(RAY_NICENESS_ENV)
        os.environ.setdefault(RAY_NICENESS_ENV, "0")
        try:
            ray.init(
                address="local",
                num_cpus=usable_cores(),
                include_dashboard=False,
                log_to_driver=False,
            )
        finally:
            if saved is None:
                os.environ.pop(RAY_NICENESS_ENV, None)
        return True
    target = address or os.environ.get("RAY_ADDRESS") or ""
    refused = unreachable(target)
    if refused is not None:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {target!r}: {refused}. Check the address "
            "(`ray status` on the head prints it) and that the head is running."
        )
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {target!r}: {first_line(exc)}. Check "
            "the address (`ray status` on the head prints it). A cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token "
            "(~/.ray/auth_token or RAY_AUTH_TOKEN) on this machine."
        ) from exc
    return True


def unreachable(address: str, window_s: float = GCS_PROBE_WINDOW_S) -> str | None:
    """Why nothing answers a ``host:port`` address, or None (it answers, or the address is
    ``auto`` or ``ray://``, which Ray resolves itself). A TCP connect, retried for
    ``window_s``: Ray itself retries its GCS connection 20 times with a 40 s timeout each, so
    a mistyped address would otherwise hang for about 13 minutes without a word."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    deadline = time.monotonic() + window_s
    while True:
        try:
            with socket.create_connection(
                (host.strip("[]"), int(port)), timeout=GCS_PROBE_CONNECT_S
            ):
                return None
        except OSError as exc:
            if time.monotonic() >= deadline:
                return f"nothing answers at {host}:{port} ({exc.strerror or exc})"
        time.sleep(0.5)


def actor_range(
    actors: int | tuple[int, int] | None, cluster_cpus: float, cpus_per_actor: float
) -> tuple[int, int]:
    """(actors to start, most actors to grow to)."""
    if actors is None:
        n = max(1, math.floor(cluster_cpus / cpus_per_actor + 1e-9))
        return n, n
    lo, hi = (actors, actors) if isinstance(actors, int) else actors
    if lo < 1 or hi < lo:
        raise ConfigError(
            f"actors must be N >= 1 or (min, max) with 1 <= min <= max, got {actors!r}"
        )
    return lo, hi


Failure = Literal["oom_death", "death", "task_error", "lost"]


def failure_of(exc: BaseException, ray: ModuleType) -> Failure:
    """What a failed ``ray.get`` of an ``embed`` result means, by the exception's type:
    the actor was killed by Ray's memory monitor, the actor died, ``embed`` raised (the actor
    lives), or the result was lost with its node."""
    e = ray.exceptions
    if isinstance(exc, e.OutOfMemoryError):
        return "oom_death"
    if isinstance(exc, e.RayActorError | e.WorkerCrashedError):
        return "death"
    if isinstance(exc, e.RayTaskError):
        return "task_error"
    return "lost"


def task_error_kind(exc: BaseException) -> FailureKind:
    """The kind of an exception ``embed`` raised in an actor (``RayTaskError.cause``)."""
    return engine_error_kind(getattr(exc, "cause", None) or exc)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


def exit_detail(exc: BaseException) -> dict[str, str]:
    """Ray's 'Worker exit type/detail' of a dead actor, when it gives them: shown in the
    worker_death event for people, never used to decide anything."""
    text = " ".join(str(exc).split())
    out: dict[str, str] = {}
    for key, pattern in (
        ("exit_type", r"Worker exit type: (\w+)"),
        ("exit_detail", r"Worker exit detail: (.{1,200}?)(?: Some common|$)"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1).strip()
    return out
