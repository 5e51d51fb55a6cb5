"""The pool's autoscaler: the manager's seam to the scaling policy (``scaling``), readings in,
the values in force out.

``Autoscaler`` holds what the pure policy (``scaling``) decided last (target workers, the batch
token budget in force, emergency mode) and the machine's ``Limits``; each call takes a
reading (``readings.Sampler``) or an event (a batch done, an OOM), asks the policy, adopts its
answer and returns the events that describe the change, for the manager to emit. Two budgets,
two names: ``batch_tokens`` is the budget in force now (lowered after an OOM, restored after
calm); ``planned_batch_tokens`` is the plan's, which it is never restored above.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any

from embedpool import events
from embedpool.executors.pool import plan, scaling
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.limits import detect_limits
from embedpool.executors.pool.machine import Reading
from embedpool.executors.pool.readings import Sampler, memory_used, own_rss

#: Readings kept for the policy: its trend window is 5 and its throughput learning looks at
#: the last two; 30 s of history is plenty and costs nothing.
HISTORY_READINGS = 30

#: (event name, fields) pairs the manager emits after a change.
Changes = list[tuple[str, dict[str, Any]]]


class Autoscaler:
    """The scaling policy's state for one pool (see the module docstring)."""

    def __init__(self, cfg: PoolConfig) -> None:
        self.limits = detect_limits(max_memory=cfg.max_memory_bytes, profile=cfg.profile)
        self.plan = plan.plan(
            self.limits,
            workers=cfg.workers,
            threads=cfg.threads,
            batch_tokens=cfg.batch_tokens,
            precision=cfg.precision,
            mem_used=memory_used(self.limits),
            pool_used=own_rss(),
            model=cfg.model_memory,
            device=cfg.device,
            budget=cfg.budget,
        )
        policy = self.plan.policy
        if cfg.emergency_exit_s is not None:
            policy = dataclasses.replace(policy, emergency_exit_s=cfg.emergency_exit_s)
        self.policy = policy
        self.state = scaling.PolicyState.of(
            workers=policy.start_workers, batch_tokens=policy.batch_tokens
        )
        self.sampler = Sampler(self.limits)
        self.history: deque[Reading] = deque(maxlen=HISTORY_READINGS)
        self.threads = policy.threads_per_worker
        self.max_workers = policy.max_workers

    @property
    def target_workers(self) -> int:
        return self.state.workers

    @property
    def batch_tokens(self) -> int:
        """The padded-token budget in force now."""
        return self.state.batch_tokens

    @property
    def planned_batch_tokens(self) -> int:
        """The plan's budget: the most ``batch_tokens`` is ever restored to."""
        return self.policy.batch_tokens

    @property
    def emergency(self) -> bool:
        return self.state.emergency

    def describe(self) -> dict[str, Any]:
        return {
            "profile": self.limits.profile,
            "cpus": self.limits.cpus,
            "memory_limit": self.limits.memory_bytes,
            "memory_source": self.limits.memory_source,
            "max_workers": self.max_workers,
            "budget_floor": self.policy.min_batch_tokens,
            "plan": list(self.plan.reasons),
        }

    def on_success(self, started_at: float) -> None:
        self.state = scaling.on_batch_success(self.state, started_at)

    def on_oom(self, forbid_tokens: int | None) -> Changes:
        """An OOM kill or an out-of-memory error (``faults.Decision.lower_budget``)."""
        return self._adopt(
            scaling.on_oom_kill(self.state, self.policy, time.monotonic(), forbid_tokens)
        )

    def sample(self, pids: list[int], queued: int, done: int) -> Changes:
        self.history.append(self.sampler.read(pids, queued, done))
        return self._adopt(
            scaling.decide(list(self.history), self.state, self.policy, time.monotonic())
        )

    def _adopt(self, d: scaling.Decision) -> Changes:
        old = self.state
        self.state = d.state
        changes: Changes = []
        reading = reading_dict(self.history[-1] if self.history else None)
        if d.emergency != old.emergency:
            changes.append(
                (events.EMERGENCY, {"on": d.emergency, "reason": d.reason, "reading": reading})
            )
        if (d.target_workers, d.batch_tokens) != (old.workers, old.batch_tokens):
            changes.append(
                (
                    events.SCALE,
                    {
                        "action": d.action,
                        "workers_from": old.workers,
                        "workers_to": d.target_workers,
                        "batch_tokens_from": old.batch_tokens,
                        "batch_tokens_to": d.batch_tokens,
                        "reason": d.reason,
                        "reading": reading,
                    },
                )
            )
        return changes


def reading_dict(reading: Reading | None) -> dict[str, Any] | None:
    """A reading as plain JSON values, for scale and emergency events."""
    if reading is None:
        return None
    return {
        "cpu_percent": round(reading.cpu_percent, 1),
        "mem_used": reading.mem_used,
        "mem_limit": reading.mem_limit,
        "mem_fraction": round(reading.mem_fraction, 3),
        "pool_cpu_percent": round(reading.pool_cpu_percent, 1),
        "mem_scope": reading.mem_scope,
        "worker_rss": list(reading.worker_rss),
        "workers": reading.workers,
        "queue_depth": reading.queue_depth,
        "throughput": round(reading.throughput, 2),
    }
