"""The scaling policy's state machine: pure functions from readings to a worker count and the
batch budget in force.

Nothing here starts a process or reads the machine; the pool's manager samples
(``readings``), asks (through ``autoscaler``), and applies the answer. The policy's numbers come
from ``pool/plan.py`` (once, at start), a worker's memory from ``pool/memory.py``, the budget's
OOM transitions from ``faults.BudgetState``. Everything is table-tested in
``tests/executors/pool/test_scaling.py``::

    Limits --plan.plan()--> Plan(policy, reasons)     once, at start (and `embedpool doctor`)
    PolicyState.of(workers=policy.start_workers, batch_tokens=policy.batch_tokens)
    every sample interval:  decide(history, state, policy, now) -> Decision(target, budget, state)
    an OOM (faults):        on_oom_kill(state, policy, now, killed_tokens) -> Decision
    a batch completed:      on_batch_success(state, started_at)  -> PolicyState

``decide()``, in order (the first rule that applies wins):

1. **Emergency** (entered by two consecutive OOM kills): hold one worker at
   ``min_batch_tokens``; leave once memory stayed below ``mem_resume`` for
   ``emergency_exit_s``.
2. **Shrink** when memory, now or two steps ahead (``predict``), is at ``mem_stop`` or above:
   one worker less (one at a time: wait until the last one has gone), or, at one worker,
   half the batch budget. This acts *before* the limit: ``mem_stop`` < 1 and the prediction
   looks ahead.
3. **Back off** from a worker count whose throughput is not 5% above one less (contention,
   or cores that other programs use), unless the user fixed the count.
4. **Grow** by one only if every gate is open: not at ``max_workers``; work is waiting
   (``queue_depth > 0``); the pool is settled at its target; memory is below the thresholds
   now and predicted, with hysteresis, *and* now-or-predicted usage plus one more worker's
   observed RSS stays below ``mem_stop x limit``; CPU taken by *other* programs is below the
   CPU thresholds (hysteresis) and leaves a core for the new worker's threads; and the last
   time we ran one more worker it was worth it (throughput rose by more than 5%). With a
   fixed ``--workers`` count (``adaptive=False``) only the memory, queue and settle gates
   apply: the pool returns to the user's count after a memory shrink.
5. **Restore the batch budget** (doubling, up to the plan's) after memory stayed calm for
   ``emergency_exit_s``, but never back to a size at which a worker was OOM-killed
   (``PolicyState.oom_tokens``): calm memory between batches says nothing about the spike
   of the batch that was killed, and restoring it only repeats the kill (seen in
   tests/executors/pool/test_pressure.py: a kill every few seconds, the job never finishing).
6. Otherwise **hold**, with the reason.

**CPU: why "other programs" and why it only gates growth.** A pool doing its job keeps its
cores ~100% busy, so a plain CPU threshold would either never let a 2-core pool reach 2
workers or make it shrink because it works. The reading therefore carries the pool's own CPU
share (supervisor + workers) and the policy looks at the rest (``foreign_cpu_percent``):
others' load at or above ``cpu_stop`` (resume below ``cpu_resume``) blocks growth, and a new
worker needs ``threads_per_worker`` cores free of others' load and of our existing workers
(half a core of slack for noisy readings). CPU never shrinks the pool: oversubscription costs
throughput, not safety, and the throughput rule (3.) already backs off when one more worker
made things slower. Memory is what kills, so memory alone shrinks.

**Throughput.** ``best_throughput[n]`` is a smoothed (EWMA, alpha 0.5) sequences/s measured
while the pool was settled at ``n`` workers with work waiting, outside emergency mode, at the
current batch budget (a new budget starts a new table). A plateau found at ``n+1`` blocks
growth for ``reprobe_s``, then the ``n+1`` entry is forgotten and growth may probe again
(another program's load may have gone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from embedpool import faults
from embedpool.executors.pool.machine import Reading
from embedpool.executors.pool.memory import MiB
from embedpool.executors.pool.plan import ProfilePolicy

#: Sample interval the thresholds and the two-step look-ahead are tuned for: at 1 s, two
#: steps see a worker's start (~1 s to load) and one batch (< 0.5 s at 2048 tokens) coming.
SAMPLE_INTERVAL_S = 1.0
#: How many readings the linear trend is fitted on: 5 s smooths one noisy sample and still
#: turns within a few seconds when a memory hog starts.
TREND_WINDOW = 5
#: Look-ahead of the prediction, in samples (the issue's "two-step linear prediction").
LOOKAHEAD_STEPS = 2


@dataclass(frozen=True)
class PolicyState:
    """Everything ``decide()`` remembers between calls. Start with
    ``PolicyState.of(workers=policy.start_workers, batch_tokens=policy.batch_tokens)``."""

    workers: int
    #: The token budget after OOM kills: ``faults.BudgetState``, the state Ray keeps too.
    budget: faults.BudgetState
    #: Since when memory has been below mem_resume (emergency exit, budget restore).
    calm_since: float | None = None
    #: Reporting only: the last decision found a throughput plateau (see plateau_since).
    growth_blocked: bool = False
    #: Smoothed sequences/s per worker count, at the current batch budget.
    best_throughput: Mapping[int, float] = field(default_factory=dict)
    #: Hysteresis: memory / others' CPU went over the stop threshold and not yet under resume.
    mem_hot: bool = False
    cpu_hot: bool = False
    plateau_since: float | None = None

    @classmethod
    def of(
        cls,
        workers: int,
        batch_tokens: int,
        *,
        emergency: bool = False,
        consecutive_oom: int = 0,
        last_oom_at: float | None = None,
        oom_tokens: int | None = None,
        **rest: Any,
    ) -> PolicyState:
        """A state from flat values (the budget's fields by their names here)."""
        return cls(
            workers,
            faults.BudgetState(batch_tokens, consecutive_oom, oom_tokens, last_oom_at, emergency),
            **rest,
        )

    @property
    def batch_tokens(self) -> int:
        return self.budget.tokens

    @property
    def emergency(self) -> bool:
        return self.budget.emergency

    @property
    def consecutive_oom(self) -> int:
        return self.budget.consecutive_oom

    @property
    def last_oom_at(self) -> float | None:
        return self.budget.last_oom_at

    @property
    def oom_tokens(self) -> int | None:
        """Smallest padded-token size of a batch whose worker was OOM-killed: rule 5 restores
        the budget only to sizes below it. None: no OOM kill yet."""
        return self.budget.forbidden


#: PolicyState's flat names of the budget's fields.
_BUDGET_FIELDS = {
    "batch_tokens": "tokens",
    "emergency": "emergency",
    "consecutive_oom": "consecutive_oom",
    "last_oom_at": "last_oom_at",
    "oom_tokens": "forbidden",
}


def _with(state: PolicyState, **changes: Any) -> PolicyState:
    """``dataclasses.replace`` that also takes the budget's fields by their flat names."""
    budget = {_BUDGET_FIELDS[k]: changes.pop(k) for k in list(changes) if k in _BUDGET_FIELDS}
    if budget:
        changes["budget"] = dataclasses.replace(state.budget, **budget)
    return dataclasses.replace(state, **changes)


Action = Literal["grow", "shrink", "hold"]


@dataclass(frozen=True)
class Decision:
    """What to do now: run ``target_workers`` workers with ``batch_tokens`` budgets.
    ``action`` compares the target with the previous state; ``reason`` gives the readings."""

    target_workers: int
    batch_tokens: int
    emergency: bool
    reason: str
    state: PolicyState
    action: Action = "hold"


def predict(values: Sequence[float], steps: int = LOOKAHEAD_STEPS) -> float:
    """The last value plus ``steps`` times the least-squares slope of ``values`` (oldest
    first). Least squares rather than the last difference: one noisy sample does not fake a
    trend. With fewer than two values the last (or 0.0) is returned."""
    n = len(values)
    if n == 0:
        return 0.0
    if n == 1:
        return float(values[0])
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return float(values[-1]) + steps * num / den


def on_oom_kill(
    state: PolicyState, policy: ProfilePolicy, now: float, killed_tokens: int | None = None
) -> Decision:
    """A worker was OOM-killed or ran out of memory (``faults.OOM_KINDS``). Halve the batch
    budget (not below ``min_batch_tokens``) and block growth until memory calms down. The
    second kill with no batch completed in between enters emergency mode: one worker,
    ``min_batch_tokens``. ``killed_tokens`` (``faults.Decision.forbid_tokens``): padded tokens
    of the multi-item batch it was running, if any; the budget is never restored to that size
    again (``faults.restored_budget``)."""
    budget = faults.budget_after_oom(
        state.budget, floor=policy.min_batch_tokens, killed_tokens=killed_tokens, now=now
    )
    count = budget.consecutive_oom
    if count >= faults.EMERGENCY_AFTER_OOMS:
        new = _with(
            state,
            workers=1,
            budget=budget,
            calm_since=None,
            mem_hot=True,
            best_throughput={},
            growth_blocked=False,
            plateau_since=None,
        )
        reason = (
            f"emergency mode on: {count} consecutive OOM kills; 1 worker, "
            f"batch budget {new.batch_tokens} tokens"
        )
    else:
        new = _with(
            state,
            budget=budget,
            calm_since=None,
            mem_hot=True,
            best_throughput={} if budget.tokens != state.batch_tokens else state.best_throughput,
        )
        reason = (
            f"OOM kill: batch budget {state.batch_tokens} -> {budget.tokens} tokens, "
            f"growth blocked until memory is below {policy.mem_resume:.0%}"
        )
    action: Action = "shrink" if new.workers < state.workers else "hold"
    return Decision(new.workers, new.batch_tokens, new.emergency, reason, new, action)


def on_batch_success(state: PolicyState, started_at: float | None = None) -> PolicyState:
    """A batch completed: OOM kills are no longer consecutive. With ``started_at`` (when the
    batch was dispatched), a batch already running before the last OOM kill does not count:
    in a pool of two, the healthy worker's batch must not hide the dying one's repeats."""
    return _with(state, budget=faults.budget_after_success(state.budget, started_at))


@dataclass(frozen=True)
class _View:
    """The numbers one decision looks at, computed once."""

    r: Reading
    mem_now: float
    mem_pred: float
    used_pred: float
    cpu_now: float
    cpu_pred: float
    worker_rss: int

    def describe(self) -> str:
        return (
            f"memory {self.mem_now:.0%} (predicted {self.mem_pred:.0%}) of "
            f"{_mib(self.r.mem_limit)}, others' CPU {self.cpu_now:.0%} (predicted "
            f"{self.cpu_pred:.0%}), queue {self.r.queue_depth}, workers {self.r.workers}, "
            f"{self.r.throughput:.1f} seq/s"
        )


def _view(history: Sequence[Reading], policy: ProfilePolicy) -> _View:
    recent = history[-TREND_WINDOW:]
    r = recent[-1]
    observed = [max(h.worker_rss) for h in recent if h.worker_rss]
    return _View(
        r=r,
        mem_now=r.mem_fraction,
        mem_pred=predict([h.mem_fraction for h in recent]),
        used_pred=predict([float(h.mem_used) for h in recent]),
        cpu_now=r.foreign_cpu_percent / 100,
        cpu_pred=predict([h.foreign_cpu_percent / 100 for h in recent]),
        worker_rss=max(observed) if observed else policy.worker_mem_estimate,
    )


def _hysteresis(hot: bool, now: float, pred: float, stop: float, resume: float) -> bool:
    if max(now, pred) >= stop:
        return True
    if max(now, pred) < resume:
        return False
    return hot


def _settled(history: Sequence[Reading], workers: int, n: int) -> bool:
    tail = history[-n:]
    return len(tail) >= n and all(h.workers == workers for h in tail)


def _learn(history: Sequence[Reading], state: PolicyState) -> dict[int, float]:
    best = dict(state.best_throughput)
    if len(history) < 2 or state.emergency:
        return best
    prev, r = history[-2], history[-1]
    if r.workers == prev.workers == state.workers and r.queue_depth > 0 and prev.queue_depth > 0:
        old = best.get(r.workers)
        best[r.workers] = r.throughput if old is None else 0.5 * old + 0.5 * r.throughput
    return best


def decide(
    history: Sequence[Reading], state: PolicyState, policy: ProfilePolicy, now: float
) -> Decision:
    """The target worker count and batch budget for now (rules in the module docstring)."""
    if not history:
        return _decision(state, state, "hold", "no readings yet")
    if state.plateau_since is not None and now - state.plateau_since >= policy.reprobe_s:
        # Conditions may have changed (another program's load went): forget this count and
        # those above it, so that they are measured again and growth may probe once more.
        state = _with(
            state,
            plateau_since=None,
            growth_blocked=False,
            best_throughput={k: t for k, t in state.best_throughput.items() if k < state.workers},
        )
    v = _view(history, policy)
    calm = v.mem_now < policy.mem_resume
    state = _with(
        state,
        mem_hot=_hysteresis(
            state.mem_hot, v.mem_now, v.mem_pred, policy.mem_stop, policy.mem_resume
        ),
        cpu_hot=_hysteresis(
            state.cpu_hot, v.cpu_now, v.cpu_pred, policy.cpu_stop, policy.cpu_resume
        ),
        calm_since=(state.calm_since if state.calm_since is not None else now) if calm else None,
        best_throughput=_learn(history, state),
    )
    if state.emergency:
        return _emergency(state, policy, now, v)
    shrink = _shrink(history, state, policy, v)
    if shrink is not None:
        return shrink
    back = _back_off(history, state, policy, now, v)
    if back is not None:
        return back
    return _grow_or_hold(history, state, policy, now, v)


def _decision(old: PolicyState, new: PolicyState, action: Action, reason: str) -> Decision:
    return Decision(new.workers, new.batch_tokens, new.emergency, reason, new, action)


def _emergency(state: PolicyState, policy: ProfilePolicy, now: float, v: _View) -> Decision:
    if state.calm_since is not None and now - state.calm_since >= policy.emergency_exit_s:
        # Leave with the small budget; rule 5 doubles it back after each further calm period
        # (faults.budget_after_calm: Ray's steps are the same).
        new = _with(
            state,
            budget=faults.budget_after_calm(state.budget, policy.batch_tokens),
            workers=1,
            calm_since=now,
            best_throughput={},
        )
        return _decision(
            state,
            new,
            "hold",
            f"emergency mode off: memory below {policy.mem_resume:.0%} for "
            f"{policy.emergency_exit_s:.0f} s; {v.describe()}",
        )
    new = _with(state, workers=1, batch_tokens=min(state.batch_tokens, policy.min_batch_tokens))
    waited = "" if state.calm_since is None else f", calm for {now - state.calm_since:.0f} s"
    return _decision(
        state, new, "hold", f"emergency mode: holding 1 worker{waited}; {v.describe()}"
    )


def _shrink(
    history: Sequence[Reading], state: PolicyState, policy: ProfilePolicy, v: _View
) -> Decision | None:
    if max(v.mem_now, v.mem_pred) < policy.mem_stop:
        return None
    why = f"memory at or heading over {policy.mem_stop:.0%}: {v.describe()}"
    if v.r.workers > state.workers:
        return _decision(state, state, "hold", f"hold: a worker is still leaving; {why}")
    if state.workers > 1:
        new = _with(state, workers=state.workers - 1, calm_since=None)
        return _decision(state, new, "shrink", f"shrink {state.workers} -> {new.workers}: {why}")
    if state.batch_tokens > policy.min_batch_tokens:
        bt = faults.lowered_budget(state.batch_tokens, policy.min_batch_tokens)
        new = _with(state, batch_tokens=bt, calm_since=None, best_throughput={})
        return _decision(
            state,
            new,
            "hold",
            f"batch budget {state.batch_tokens} -> {bt} tokens at 1 worker: {why}",
        )
    return _decision(state, state, "hold", f"hold at 1 worker and the smallest budget: {why}")


def _back_off(
    history: Sequence[Reading], state: PolicyState, policy: ProfilePolicy, now: float, v: _View
) -> Decision | None:
    """Throughput at n workers vs n-1: a plateau blocks growth; a loss goes back to n-1."""
    n = state.workers
    best = state.best_throughput
    if not policy.adaptive or n < 2 or n not in best or n - 1 not in best:
        return None
    if not _settled(history, n, policy.settle_readings):
        return None
    if best[n] <= best[n - 1] * policy.plateau_gain:
        # The n-th worker does not earn its memory and CPU (contention, or a core that others
        # use): give it back. From n-1 the same table blocks growth until reprobe_s.
        new = _with(state, workers=n - 1, growth_blocked=True, plateau_since=now)
        return _decision(
            state,
            new,
            "shrink",
            f"shrink {n} -> {n - 1}: throughput plateau, {n} workers did "
            f"{best[n]:.1f} seq/s, {n - 1} did {best[n - 1]:.1f}; {v.describe()}",
        )
    return None


def _grow_or_hold(
    history: Sequence[Reading], state: PolicyState, policy: ProfilePolicy, now: float, v: _View
) -> Decision:
    n = state.workers
    best = state.best_throughput
    blocked = _growth_blocker(history, state, policy, v)
    if blocked is None and policy.adaptive:
        # The last worker added brought nothing (n vs n-1), or one more was tried and brought
        # nothing (n+1 vs n, after a back-off or a memory shrink): stop adding.
        for more in (n, n + 1):
            if (
                more in best
                and more - 1 in best
                and best[more] <= best[more - 1] * policy.plateau_gain
            ):
                blocked = (
                    f"throughput plateau: {more} workers did {best[more]:.1f} seq/s vs "
                    f"{best[more - 1]:.1f} at {more - 1}"
                )
                state = _with(
                    state,
                    growth_blocked=True,
                    plateau_since=(state.plateau_since if state.plateau_since is not None else now),
                )
                break
    if blocked is None:
        new = _with(state, workers=n + 1, growth_blocked=False, plateau_since=None)
        return _decision(state, new, "grow", f"grow {n} -> {n + 1}: {v.describe()}")
    # Rule 5: restore a lowered batch budget once memory has been calm long enough, up to
    # (not including) a size that was OOM-killed.
    restored = faults.budget_after_calm(state.budget, policy.batch_tokens)
    if (
        restored.tokens > state.batch_tokens
        and state.calm_since is not None
        and now - state.calm_since >= policy.emergency_exit_s
    ):
        bt = restored.tokens
        new = _with(state, budget=restored, calm_since=now, best_throughput={})
        return _decision(
            state,
            new,
            "hold",
            f"batch budget {state.batch_tokens} -> {bt} tokens: "
            f"memory calm for {policy.emergency_exit_s:.0f} s; "
            f"{v.describe()}",
        )
    return _decision(state, state, "hold", f"hold at {n}: {blocked}; {v.describe()}")


def _growth_blocker(
    history: Sequence[Reading], state: PolicyState, policy: ProfilePolicy, v: _View
) -> str | None:
    """Why the pool may not grow by one now, or None."""
    n = state.workers
    if n >= policy.max_workers:
        return f"at max workers {policy.max_workers}"
    if v.r.queue_depth <= 0:
        return "queue empty"
    if not _settled(history, n, policy.settle_readings):
        return f"settling at {n} workers (live {v.r.workers})"
    if state.mem_hot:
        return (
            f"memory went over {policy.mem_stop:.0%} and is not yet under {policy.mem_resume:.0%}"
        )
    ceiling = policy.mem_stop * v.r.mem_limit
    worst = max(float(v.r.mem_used), v.used_pred) + v.worker_rss
    if worst >= ceiling:
        return (
            f"one more worker (~{_mib(v.worker_rss)}) would take memory to "
            f"{worst / v.r.mem_limit:.0%}, over {policy.mem_stop:.0%}"
        )
    if not policy.adaptive:
        # The user fixed the count: the pool starts at it whatever the CPU, and after a memory
        # shrink it comes back to it once memory allows. Others' CPU load and throughput are
        # the adaptive pool's business (with them, a busy machine kept a fixed 2-worker pool
        # at 1 for good after a memory hog left: tests/executors/pool/test_pressure.py).
        return None
    if state.cpu_hot:
        return (
            f"other programs use {max(v.cpu_now, v.cpu_pred):.0%} CPU (growth stops at "
            f"{policy.cpu_stop:.0%}, resumes under {policy.cpu_resume:.0%})"
        )
    if policy.cpus > 0:
        others = policy.cpus * max(v.cpu_now, v.cpu_pred)
        free = policy.cpus - others - n * policy.threads_per_worker
        # Half a core of slack: readings are noisy, and the throughput rule catches a miss.
        if free + 0.5 < policy.threads_per_worker:
            return (
                f"no free core for {policy.threads_per_worker} more thread(s): others use "
                f"{others:.1f} of {policy.cpus} cores, {n} workers use "
                f"{n * policy.threads_per_worker}"
            )
    return None


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n < 10 * 1024 * MiB else f"{n / (1024 * MiB):.1f} GiB"


__all__ = [
    "LOOKAHEAD_STEPS",
    "SAMPLE_INTERVAL_S",
    "TREND_WINDOW",
    "Decision",
    "PolicyState",
    "decide",
    "on_batch_success",
    "on_oom_kill",
    "predict",
]
