"""The failure policy every backend follows: what went wrong in, what to do out.

A transport (the local pool's manager, the Ray executor, the in-process executor) observes a
failure and names its kind from evidence; this module decides. Nothing here starts a process,
reads a file or sends a byte, so every rule is tested by a table (``tests/test_faults.py``)::

    evidence (the transport's)                        kind              decide(): 2+ items | 1 item
    ------------------------------------------------  ----------------  --------------------------
    the worker's cgroup oom_kill counter rose with    OOM_KILL          split      | retry, then give up
      its SIGKILL, or Ray's OutOfMemoryError                            + halve the token budget, never
                                                                          run the killed size again
    SIGKILL from outside, no OOM evidence             EXTERNAL_SIGKILL  split      | retry, then give up
    any other death (signal, exit without Leaving)    CRASH             split      | retry, then give up
    silent past its deadline, killed by us            HUNG              split      | retry, then give up
    a Python exception in embed (the worker lives)    ENGINE_ERROR      split      | give up at once
    an out-of-memory error raised in a live worker    DEVICE_OOM        split      | retry, then give up
      (MemoryError; ONNX Runtime's CUDA/cuDNN/cuBLAS                    + halve the token budget
      allocation failures, ``ort_error_kind``)
    ONNX Runtime reports the GPU lost (a sticky       DEVICE_LOST       fall back: the task goes back,
      CUDA error: launch failure, device-side assert,                   unblamed, and the transport
      illegal address, ECC, error 999, ...)                             moves off the device (the
                                                                        pool: to the CPU); a second
                                                                        time it counts as ENGINE_ERROR

Every retry is bounded: a split halves a task, so a batch of n items costs at most log2(n)
failures before each of its items runs alone, and one item gets ``1 + max_retries`` tries (one
for an engine error) before it is given up with a per-item error naming it, its size, the tries
and the last error. Every other item of its batch is still embedded.

Why one rule each, where the two backends used to disagree:

- A failed task of several items is split at once, whatever the kind (the pool retried it whole
  once first). When an input is the cause, a whole retry costs one more death, or one more hang
  deadline (30 s and more); when it is not, two halves cost about what the whole did.
- One item whose engine raised is given up at once (Ray retried it): the same input raises again.
- ``max_retries`` is 2 by default on both (Ray had 3): three tries of one input.
- OOM is decided from evidence, never from an error's text: Ray's "ActorDied" message mentions
  the OOM killer for any unexpected exit, and a substring "oom" matches "room". The one
  exception is ONNX Runtime, whose errors have no type per cause: for its own exception types
  only (``onnxruntime.capi``), the CUDA runtime's, cuDNN's and cuBLAS's status in the message is
  the evidence (``ort_error_kind``: status codes and names as those libraries spell them).
- A lost GPU is not the input's fault: its task is not split or charged a try; the executor
  breaks with ``DeviceLost`` (the pool, the in-process executor and Ray alike: none can leave
  its device), and the device executor above the GPU pools moves their batches to the other
  devices and the CPU (``falls_back``). Ray has no device fallback: its actors run the CPU
  recipe, and one that reports a lost GPU (a recipe of the caller's) breaks it with the
  reason. Should the same task report a lost device again (a transport that did not stop),
  it is an engine error, so the loop is bounded.
- A death is charged by one rule (``blame``): an idle worker's to nobody (an OOM kill still
  lowers the budget), one task's to it, and two or more unfinished tasks' (a Ray actor
  queues two) to none, each run alone next; after an out-of-memory death the budget is
  lowered anyway and the smaller of the two oldest sizes is never run again.
- Start failures (``start_failure``): break at once before any worker was ever ready; later
  back off 0.25 s doubling to 10 s, and break only after three in a row with none alive (Ray
  used to break after three with live actors and retry at once).
- Recycling (``recycle``) is the local pool's: a Ray actor reports no RSS to the driver.
- After an OOM the budget is halved (not below the floor), doubled back after a calm period,
  and never restored to a size that was killed (Ray kept the halved budget for the whole run);
  two in a row enter emergency mode at the floor (Ray only halved again); the first calm
  period in emergency mode only ends it. One state for every backend (``BudgetState``).
  "Calm" is the scaling policy's memory calm on the local pool, and time without an OOM
  (``TimedBudget``) on Ray, which has no memory readings of the cluster, and in process.

Every rule as the backends use it::

    rule                  pool manager              Ray executor / actors      device executor
    decide                WorkQueue.fail            WorkQueue.fail             (members decide)
    blame                 one task or none          up to two tasks            -
    exit_kind             sentinel: left/start/...  - (Ray reports deaths)     -
    start_failure         _on_start_failure         ActorSet.on_started        -
    start_interrupted     via exit_kind             -                          -
    budget_after_*        scaling (memory calm)     TimedBudget (time calm)    (members' own)
    hang_verdicts,wait_s  check_deadlines, wait     _check_deadlines, wait     -
    recycle               _maybe_recycle            - (no RSS reported)        -
    falls_back            -                         -                          _settle
    device_start          -                         -                          start

The in-process executor uses ``decide`` (WorkQueue) and ``TimedBudget``; it has no worker to
lose, and breaks with ``DeviceLost`` when its GPU is lost.

Also here: the task record every backend moves (``Task``: some positions of one batch), the
reassembly of a batch from its pieces (``Assembly``), cutting a task to a token budget, the hang
deadline, and attributing a SIGKILL to the OOM killer from a counter.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import re
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from embedpool.batching import plan_batches
from embedpool.errors import ConfigError

if TYPE_CHECKING:
    from embedpool.executor import BatchResult, WorkBatch
    from embedpool.types import TokenIds, Vectors


class FailureKind(enum.StrEnum):
    """What went wrong with a task, as the transport could tell from evidence."""

    OOM_KILL = "oom_kill"
    EXTERNAL_SIGKILL = "external_sigkill"
    CRASH = "crash"
    HUNG = "hung"
    ENGINE_ERROR = "engine_error"
    DEVICE_OOM = "device_oom"
    DEVICE_LOST = "device_lost"


#: Kinds whose cause is memory: the batch size is the problem, so the budget goes down.
OOM_KINDS = frozenset({FailureKind.OOM_KILL, FailureKind.DEVICE_OOM})
#: Kinds in which the worker died (or was killed by us) and must be replaced.
DEATH_KINDS = frozenset(
    {FailureKind.OOM_KILL, FailureKind.EXTERNAL_SIGKILL, FailureKind.CRASH, FailureKind.HUNG}
)

#: What the failure did to the worker, in words, for the per-item error of a given-up input.
_WHAT = {
    FailureKind.OOM_KILL: "was killed by the OOM killer while embedding it",
    FailureKind.EXTERNAL_SIGKILL: "was killed (SIGKILL) while embedding it",
    FailureKind.CRASH: "died while embedding it",
    FailureKind.HUNG: "hung on it and was killed",
    FailureKind.ENGINE_ERROR: "raised in the engine on it",
    FailureKind.DEVICE_OOM: "ran out of memory in the engine on it",
    FailureKind.DEVICE_LOST: "lost its GPU on it",
}


@dataclass(frozen=True)
class FaultPolicy:
    """The numbers of the policy. Both backends take one (``PoolConfig.fault_policy``)."""

    #: Retries of a single input after a death, hang or out-of-memory error (so up to
    #: 1 + max_retries tries). Two: an input that kills three fresh workers in a row is the
    #: cause, and a transient kill (another program's OOM, an operator) is rarely repeated
    #: three times on the same input.
    max_retries: int = 2
    #: Hung-worker deadline = base + per_token x padded tokens of its task. Batches run at
    #: ~30k tokens/s per core here, so 10 ms/token is a >100x margin; the base covers a busy
    #: machine and page faults after a swap-in.
    hang_base_s: float = 30.0
    hang_per_token_s: float = 0.01
    #: Fraction of the deadline after which a worker_hung_warning is emitted.
    hang_warn_fraction: float = 0.6
    #: Replacement workers that fail to start in a row, with no worker alive, before the
    #: executor breaks: a model file that stopped loading fails the job instead of looping.
    max_start_failures: int = 3
    #: Wait before the next start after a failed one, doubled per failure in a row up to the
    #: cap: a broken model file must not become a fork bomb, a transient failure must not
    #: stall the pool for long.
    start_backoff_s: float = 0.25
    start_backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.hang_base_s > 0:
            raise ConfigError(f"hang_base_s must be > 0, got {self.hang_base_s}")
        if self.hang_per_token_s < 0:
            raise ConfigError(f"hang_per_token_s must be >= 0, got {self.hang_per_token_s}")
        if not 0 < self.hang_warn_fraction < 1:
            raise ConfigError(
                f"hang_warn_fraction must be in (0, 1), got {self.hang_warn_fraction}"
            )
        if self.max_start_failures < 1:
            raise ConfigError(f"max_start_failures must be >= 1, got {self.max_start_failures}")
        if not 0 < self.start_backoff_s <= self.start_backoff_max_s:
            raise ConfigError(
                f"need 0 < start_backoff_s <= start_backoff_max_s, got "
                f"{self.start_backoff_s}, {self.start_backoff_max_s}"
            )

    def deadline_s(self, padded_tokens: int) -> float:
        """Seconds a worker may stay silent on a task of ``padded_tokens``."""
        return self.hang_base_s + self.hang_per_token_s * padded_tokens

    def hang_check(
        self, silent_s: float, padded_tokens: int, warned: bool
    ) -> Literal["ok", "warn", "kill"]:
        """What to do about a busy worker silent for ``silent_s``: warn once at the warning
        fraction of its deadline, kill (and retry its task) at the deadline."""
        deadline = self.deadline_s(padded_tokens)
        if silent_s >= deadline:
            return "kill"
        if not warned and silent_s >= deadline * self.hang_warn_fraction:
            return "warn"
        return "ok"

    def next_hang_check_s(self, padded_tokens: int, warned: bool) -> float:
        """Seconds after a task started when ``hang_check`` next changes its answer."""
        deadline = self.deadline_s(padded_tokens)
        return deadline if warned else deadline * self.hang_warn_fraction


#: The slowest compute rate the hang rule allows a worker, in floating-point operations a
#: second: a 20th of the slowest rate measured per core here (int8 GEMMs ~100-150 GFLOP/s,
#: fp32 ~76 at 1 thread on an AVX2 Zen 3, benchmarks/decoders.py), so a machine 10x
#: overloaded still finishes well inside the deadline. At the default model's 22.7M
#: parameters it gives the policy's own 10 ms a token.
HANG_MIN_FLOPS = 5e9


def hang_per_token_s(parameters: int | None, floor: float = FaultPolicy.hang_per_token_s) -> float:
    """The hang deadline's allowance per padded token for a model of ``parameters`` weights
    (None: unknown, e.g. a shipped ONNX file): a token costs about 2 x parameters operations,
    so a 0.6B decoder gets ~0.24 s a token and an 8B one ~3.2 s, where one constant sized for
    the small encoders (10 ms) killed a healthy 0.6B worker on a busy machine. Never below
    ``floor``."""
    if not parameters or parameters <= 0:
        return floor
    return max(floor, 2.0 * parameters / HANG_MIN_FLOPS)


#: fall_back: the task goes back unblamed and the transport leaves the device (DEVICE_LOST).
Action = Literal["split", "retry", "give_up", "fall_back"]


@dataclass(frozen=True)
class Decision:
    """What to do with a failed task."""

    action: Action
    #: Halve the token budget now (an out-of-memory failure: the size is the problem).
    lower_budget: bool = False
    #: Padded tokens never to run again (the size that ran out of memory); None: none. The
    #: death of one item says the item, or another program, is the cause, not the size.
    forbid_tokens: int | None = None


def decide(
    kind: FailureKind, *, items: int, tries: int, padded_tokens: int, policy: FaultPolicy
) -> Decision:
    """The decision for a task of ``items`` items that failed ``tries`` times at this size
    (this failure included), per the table in the module docstring."""
    if items < 1 or tries < 1:
        raise ValueError(f"a failed task has items >= 1 and tries >= 1, got {items}, {tries}")
    oom = kind in OOM_KINDS
    forbid = padded_tokens if oom and items > 1 else None
    action: Action
    if kind is FailureKind.DEVICE_LOST:
        if tries <= 1:
            return Decision("fall_back")
        kind = FailureKind.ENGINE_ERROR  # reported again: the transport did not fall back
    if items > 1:
        action = "split"
    elif kind is FailureKind.ENGINE_ERROR or tries > policy.max_retries:
        action = "give_up"
    else:
        action = "retry"
    return Decision(action, lower_budget=oom, forbid_tokens=forbid)


def death_kind(*, hung: bool, oom_confirmed: bool, sigkill: bool) -> FailureKind:
    """The kind of a worker's death: killed by us for a hang; an OOM kill with evidence; a
    SIGKILL from outside without it (``sigkill`` False where the transport cannot tell the
    signal, as on Ray); else a crash."""
    if hung:
        return FailureKind.HUNG
    if oom_confirmed:
        return FailureKind.OOM_KILL
    if sigkill:
        return FailureKind.EXTERNAL_SIGKILL
    return FailureKind.CRASH


def engine_error_kind(exc: BaseException) -> FailureKind:
    """The kind of an exception raised by a live engine: by its type, and for ONNX Runtime's
    own exception types by the CUDA status in its message (``ort_error_kind``)."""
    if isinstance(exc, MemoryError):
        return FailureKind.DEVICE_OOM
    cls = type(exc)
    return ort_error_kind(cls.__module__, cls.__name__, str(exc)) or FailureKind.ENGINE_ERROR


#: Where ONNX Runtime's Python exceptions live (Fail, RuntimeException, EPFail, ...).
ORT_EXCEPTION_MODULE = "onnxruntime.capi"
#: cudaError_t codes that leave the CUDA context unusable (sticky errors) or the device gone,
#: as ORT prints them ("CUDA failure 719: unspecified launch failure ; GPU=0 ; ..."):
#: 3 initialization error, 4 driver shutting down, 46 devices unavailable, 100 no device,
#: 101 invalid device ordinal, 214 uncorrectable ECC error, 700 illegal address, 702 launch
#: timeout, 710 device-side assert, 719 launch failure, 999 unknown error (what a GPU that
#: fell off the bus, Xid 79, returns).
CUDA_LOST_CODES = frozenset({3, 4, 46, 100, 101, 214, 700, 702, 710, 719, 999})
#: cudaError_t 2, cudaErrorMemoryAllocation ("out of memory").
CUDA_OOM_CODE = 2
_CUDA_CODE = re.compile(r"\bCUDA (?:failure|error) (\d+)\b")
#: The same conditions by name or message, as other ORT code paths word them.
DEVICE_OOM_MARKS = (
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA out of memory",
    "Failed to allocate memory for requested buffer",
    "is smaller than requested bytes",
)  # BFCArena: "Available memory of ..."
DEVICE_LOST_MARKS = (
    "unspecified launch failure",
    "device-side assert",
    "illegal memory access",
    "uncorrectable ECC error",
    "GPU has fallen off the bus",
    "cudaErrorLaunchFailure",
    "cudaErrorIllegalAddress",
    "cudaErrorAssert",
    "cudaErrorUnknown",
    "cudaErrorECCUncorrectable",
    "cudaErrorDevicesUnavailable",
)
_XID = re.compile(r"\bXid\b")  # the driver's name for a GPU fault, quoted by some messages


def ort_error_kind(module: str, name: str, message: str) -> FailureKind | None:
    """DEVICE_OOM or DEVICE_LOST for an exception of ONNX Runtime's (its class's ``module``
    and ``name``) whose message carries that CUDA condition; None for anything else, which is
    an engine error. A lost device wins over out-of-memory: after a sticky error, allocations
    fail too, and only leaving the device helps."""
    if not module.startswith(ORT_EXCEPTION_MODULE):
        return None
    if name == "DeviceReset":  # ORT's own status for a device that was reset
        return FailureKind.DEVICE_LOST
    codes = {int(c) for c in _CUDA_CODE.findall(message)}
    if (
        codes & CUDA_LOST_CODES
        or any(m in message for m in DEVICE_LOST_MARKS)
        or _XID.search(message)
    ):
        return FailureKind.DEVICE_LOST
    if CUDA_OOM_CODE in codes or any(m in message for m in DEVICE_OOM_MARKS):
        return FailureKind.DEVICE_OOM
    return None


def attribute_sigkill(credited: int | None, counter: int | None) -> tuple[bool, int | None]:
    """Whether one SIGKILL death was the OOM killer's, from an ``oom_kill`` counter.

    ``credited`` is the counter value already accounted for (read when the worker started, or
    after the last death credited to it); ``counter`` is its value now, after the death (the
    kernel counts an OOM kill before it sends the SIGKILL). A rise confirms one OOM kill and is
    used up, so two deaths at once need two kills. Returns (confirmed, credited now); an
    unreadable counter confirms nothing."""
    if counter is None:
        return False, credited
    if credited is None:
        return False, counter
    if counter > credited:
        return True, credited + 1
    return False, counter


# --- deaths and starts: the rules beside a failed task's --------------------------------------


def idle_death_lowers_budget(kind: FailureKind) -> bool:
    """A worker died holding no task: is the budget lowered? Only for an OOM kill (with
    evidence): memory is tight whatever it was doing, and the next batch would add to it. Any
    other idle death only costs a replacement. The same on every backend (Ray used to do
    nothing; the pool halved)."""
    return kind is FailureKind.OOM_KILL


@dataclass(frozen=True)
class Blame:
    """What a worker's death does to its unfinished tasks (oldest first): which one was running
    (``running``: its index, charged with the failure through ``decide``; None: none is, or
    it is unknown), whether the others go back as suspects (run alone next, so that a repeat
    is charged for sure), and, when no task is charged, whether the budget is lowered anyway
    (``lower_budget``) and which size is never run again (``forbid_tokens``)."""

    running: int | None
    suspects: bool
    forbid_tokens: int | None = None
    lower_budget: bool = False


def blame(
    padded_tokens: tuple[int, ...] | list[int], kind: FailureKind, *, hung: bool = False
) -> Blame:
    """Who killed the worker, from its unfinished tasks' sizes in submission order; the one
    rule of every backend (a pool worker holds one task, a Ray actor up to two).

    None (an idle worker): nobody is charged; an OOM kill lowers the budget all the same
    (``idle_death_lowers_budget``). One task: that one. Several on a transport that queues (a
    Ray actor runs them one at a time): the oldest may already have finished with its result
    lost in the death, so the one running is unknown; none is charged, each runs alone next,
    and after an out-of-memory death the budget is lowered and the smaller of the two oldest
    sizes is never run again (one of them was running). A hang kill knows its task: the
    oldest, the one whose clock ran out."""
    if not padded_tokens:
        return Blame(None, False, lower_budget=idle_death_lowers_budget(kind))
    if len(padded_tokens) == 1 or hung:
        return Blame(0, False)
    oom = kind in OOM_KINDS
    return Blame(None, True, min(padded_tokens[:2]) if oom else None, lower_budget=oom)


@dataclass(frozen=True)
class StartDecision:
    """After a worker failed to start: ``break`` the executor, or ``retry`` after
    ``backoff_s``."""

    action: Literal["retry", "break"]
    backoff_s: float
    reason: str


def start_failure(
    policy: FaultPolicy, *, failures_in_row: int, ever_ready: bool, alive: int
) -> StartDecision:
    """A worker (or actor) failed while loading its engine. Before any was ever ready the
    recipe is bad: break at once (the first start fails the job, not N of them). Later, retry
    after a backoff (``start_backoff_s`` doubling per failure in a row, up to the cap), and
    break only after ``max_start_failures`` in a row with no worker alive: while one lives,
    the work goes on at a smaller size (Ray used to break after 3 even with live actors)."""
    if failures_in_row < 1 or alive < 0:
        raise ValueError(
            f"need failures_in_row >= 1 and alive >= 0, got {failures_in_row}, {alive}"
        )
    backoff = min(policy.start_backoff_max_s, policy.start_backoff_s * 2 ** (failures_in_row - 1))
    if not ever_ready:
        return StartDecision(
            "break", 0.0, "no worker has ever started: the engine recipe does not load"
        )
    if alive == 0 and failures_in_row >= policy.max_start_failures:
        return StartDecision(
            "break",
            0.0,
            f"no worker could be started ({failures_in_row} failures in a row) and none is alive",
        )
    return StartDecision(
        "retry",
        backoff,
        f"retry in {backoff:g} s ({failures_in_row} failure(s) in a row, {alive} worker(s) alive)",
    )


#: Signals a running worker ignores (pool.worker.IGNORED_SIGNALS: the parent decides how a
#: Ctrl-C or a group's SIGTERM ends the work).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def start_interrupted(exit_code: int | None) -> bool:
    """A worker that died of SIGINT or SIGTERM before it was ready was stopped from outside
    (``kill -TERM -PGID`` or systemd's KillMode=control-group reach it before its handlers are
    in place), not failed to load its engine: it is not a start failure. The pool starts
    another if it still wants one."""
    return exit_code is not None and -exit_code in STOP_SIGNALS


#: How a worker process ended, as the local pool's manager reads it from its sentinel.
ExitKind = Literal["left", "stopped_while_starting", "start_failure", "death"]


def exit_kind(
    *,
    said_leaving: bool,
    asked_to_leave: bool,
    holding_task: bool,
    starting: bool,
    exit_code: int | None,
) -> ExitKind:
    """What a worker's end means: ``left`` when it said so, or was asked to leave and held
    no task (a worker asked between tasks may be gone before its Leaving is read; one asked
    while it was starting is killed by the pool: a scale-down, not a start failure that
    would count and back off); a worker that had not started: stopped from outside
    (``start_interrupted``) or a start failure (``start_failure``); anything else is a death
    (``death_kind``, ``blame``)."""
    if said_leaving or (asked_to_leave and not holding_task):
        return "left"
    if starting:
        return "stopped_while_starting" if start_interrupted(exit_code) else "start_failure"
    return "death"


#: Why an executor of one device broke, as the device executor sees it.
BreakCause = Literal["device_lost", "start_failures", "other"]


def falls_back(
    cause: BreakCause, *, on_gpu: bool, lost: bool = False, closing: bool = False
) -> bool:
    """Whether the device executor puts a batch that a member failed back in its queue, for
    the other devices (and the CPU), rather than failing it: when the member ran on a GPU and
    its GPU is lost, or no worker can start on it any more (a GPU that fell off the bus fails
    every CUDA init); and whatever the error, when the member already left its device
    (``lost``: its pool is closing under the batches it still held). A CPU member's break,
    or a failure of embedpool's own (a manager that crashed), fails the batch: it would fail
    on the next device too. Nothing goes back while the executor itself is ``closing``."""
    if closing:
        return False
    return lost or (on_gpu and cause in ("device_lost", "start_failures"))


#: What a device executor does with a GPU whose pool did not start: ``drop`` it with a note
#: (the others, or the CPU, run the job), ``refuse`` the start (``DeviceError``: the user
#: asked for that device), or ``fail`` with the pool's own error.
DeviceStart = Literal["drop", "refuse", "fail"]


def device_start(*, unavailable: bool, on_gpu: bool, strict: bool) -> DeviceStart:
    """A member's pool failed to start. ``unavailable``: its worker raised
    ``DeviceUnavailable`` (ONNX Runtime's CUDA provider does not load here). Such a GPU is
    dropped under ``--device auto`` and refused under ``--device cuda`` (``strict``); any
    other start failure, and any failure of the CPU member, fails the start: the recipe
    would fail on the next device too."""
    if not unavailable or not on_gpu:
        return "fail"
    return "refuse" if strict else "drop"


def recycle_limit(
    *, ready_rss: int, rss_limit: int | None, growth_limit: int | None, arena_bytes: int
) -> int | None:
    """The RSS above which a worker is recycled between batches (None: never): the absolute
    ``rss_limit``, and its RSS when ready plus ``growth_limit`` beyond ``arena_bytes`` (the
    activations of one batch of the planned budget, which ONNX Runtime's arena keeps on
    purpose): growth past that is a leak (loky's rule), whichever is lower."""
    limit = rss_limit
    if growth_limit is not None:
        grown = ready_rss + growth_limit + arena_bytes
        limit = grown if limit is None else min(limit, grown)
    return limit


def recycle(
    *,
    rss: int,
    ready_rss: int,
    rss_limit: int | None,
    growth_limit: int | None,
    arena_bytes: int,
    leaving: bool = False,
) -> int | None:
    """After a batch: the limit a worker's ``rss`` passed, so that it is asked to leave and
    is replaced (a ``recycle`` event); None: it stays (under its ``recycle_limit``, or already
    leaving). Only the local pool recycles: a Ray actor reports no RSS to the driver, and Ray
    restarts nothing it is not told to (``max_restarts=0``), so its actors are never
    recycled."""
    limit = recycle_limit(
        ready_rss=ready_rss, rss_limit=rss_limit, growth_limit=growth_limit, arena_bytes=arena_bytes
    )
    if limit is None or leaving or rss <= limit:
        return None
    return limit


@dataclass(frozen=True)
class Running:
    """A worker's running task as the hang rule sees it: who (``key``, the transport's), since
    when (monotonic seconds), how big, and whether it was warned about already."""

    key: Any
    started: float
    padded_tokens: int
    warned: bool


@dataclass(frozen=True)
class HangVerdict:
    """A busy worker past its warning point (``warn``) or its deadline (``kill``)."""

    key: Any
    verdict: Literal["warn", "kill"]
    silent_s: float
    deadline_s: float

    @property
    def reason(self) -> str:
        return f"hung: silent {self.silent_s:.1f} s, deadline {self.deadline_s:.1f} s"

    def fields(self) -> dict[str, Any]:
        """The fields of its worker_hung_warning / worker_hung_kill event."""
        return {"silent_s": round(self.silent_s, 2), "deadline_s": round(self.deadline_s, 2)}


def hang_verdicts(policy: FaultPolicy, running: list[Running], now: float) -> list[HangVerdict]:
    """The one hang loop of every backend: for each running task, warn once at the warning
    fraction of its deadline, kill (and retry its task) at the deadline."""
    out = []
    for r in running:
        silent = now - r.started
        verdict = policy.hang_check(silent, r.padded_tokens, r.warned)
        if verdict != "ok":
            out.append(HangVerdict(r.key, verdict, silent, policy.deadline_s(r.padded_tokens)))
    return out


def next_hang_check(policy: FaultPolicy, running: list[Running]) -> float | None:
    """The monotonic time at which ``hang_verdicts`` next changes its answer (None: no task
    runs): what a transport's wait may block until."""
    return min(
        (r.started + policy.next_hang_check_s(r.padded_tokens, r.warned) for r in running),
        default=None,
    )


def wait_s(
    policy: FaultPolicy, running: list[Running], now: float, due: list[float | None], cap: float
) -> float:
    """How long a transport's manager may block now (the pool's ``wait``, Ray's
    ``ray.wait``): until the hang rule next changes its answer (``next_hang_check``) or the
    transport's own next due time (``due``; None: none), at most ``cap``, never negative.
    Results and deaths wake it earlier."""
    times = [t for t in (*due, next_hang_check(policy, running)) if t is not None]
    return max(0.0, min(cap, min(times, default=now + cap) - now))


# --- the token budget after an OOM ----------------------------------------------------------


def lowered_budget(current: int, floor: int) -> int:
    """The budget after an out-of-memory failure: halved, never below ``floor``."""
    return max(floor, current // 2)


def forbidden_after(forbidden: int | None, killed_tokens: int | None) -> int | None:
    """The smallest size known to run out of memory, after one more such failure."""
    if killed_tokens is None or killed_tokens <= 0:
        return forbidden
    return killed_tokens if forbidden is None else min(forbidden, killed_tokens)


def restored_budget(current: int, planned: int, forbidden: int | None) -> int:
    """The budget after a calm period: doubled up to the planned one, but never to a size
    that ran out of memory (calm between batches says nothing about one batch's spike, and
    restoring a killed size only repeats the kill)."""
    restore = min(planned, current * 2)
    if forbidden is not None and restore >= forbidden:
        return current
    return restore


#: OOM failures in a row (no batch completed in between) that switch to emergency mode: the
#: budget at its floor (and, on the local pool, one worker) until calm.
EMERGENCY_AFTER_OOMS = 2


@dataclass(frozen=True)
class BudgetState:
    """The token budget after out-of-memory failures: the one state every backend keeps (the
    local pool's scaling policy inside its ``PolicyState``, Ray's executor on its own).

    ``tokens`` is the budget in force; ``forbidden`` the smallest size that ran out of memory
    (never run again); ``consecutive_oom`` the OOM failures with no batch completed since;
    ``emergency`` is on after ``EMERGENCY_AFTER_OOMS`` of them: the budget sits at its floor
    until calm. What "calm" is belongs to the transport: memory below the resume threshold on
    the local pool, time without an OOM on Ray (no memory readings of the cluster)."""

    tokens: int
    consecutive_oom: int = 0
    forbidden: int | None = None
    last_oom_at: float | None = None
    emergency: bool = False


def budget_after_oom(
    state: BudgetState, *, floor: int, killed_tokens: int | None, now: float
) -> BudgetState:
    """An out-of-memory failure: the budget halved (not below ``floor``), the killed size
    (``Decision.forbid_tokens``) never run again; the second in a row (no batch completed in
    between) enters emergency mode at the floor."""
    count = state.consecutive_oom + 1
    forbidden = forbidden_after(state.forbidden, killed_tokens)
    if count >= EMERGENCY_AFTER_OOMS:
        return BudgetState(floor, count, forbidden, now, emergency=True)
    return BudgetState(lowered_budget(state.tokens, floor), count, forbidden, now, state.emergency)


def budget_after_success(state: BudgetState, started_at: float | None = None) -> BudgetState:
    """A batch completed: OOM failures are no longer consecutive. With ``started_at`` (when the
    batch was dispatched), a batch already running before the last OOM does not count: in a
    pool of two, the healthy worker's batch must not hide the dying one's repeats."""
    if state.consecutive_oom == 0:
        return state
    if started_at is not None and state.last_oom_at is not None and started_at < state.last_oom_at:
        return state
    return dataclasses.replace(state, consecutive_oom=0)


def budget_after_calm(state: BudgetState, planned: int) -> BudgetState:
    """A calm period passed. In emergency mode, the first one only ends it, at the floor;
    each further one doubles the budget towards ``planned``, never to a forbidden size
    (``restored_budget``). One step per calm period on every backend (the local pool's calm is
    its memory's, Ray's is time without an OOM)."""
    if state.emergency:
        return dataclasses.replace(state, emergency=False, consecutive_oom=0)
    return dataclasses.replace(
        state, consecutive_oom=0, tokens=restored_budget(state.tokens, planned, state.forbidden)
    )


#: Time without an out-of-memory failure that counts as calm where a transport has no memory
#: readings (Ray's cluster, the in-process engine): the local pool's calm period (scaling: 20 s
#: on the cloud and local profiles).
BUDGET_CALM_S = 20.0

#: (event name, fields) of a budget change, for the transport to emit.
BudgetChanges = list[tuple[str, dict[str, Any]]]


@dataclass
class TimedBudget:
    """``BudgetState`` where calm is time alone (``calm_s`` without an OOM failure): Ray's
    executor and the in-process one keep one. The local pool keeps the same state in its
    scaling policy, whose calm is its memory readings'. Each step returns the events that
    describe it (``scale``, ``emergency``); ``workers`` is only reported in them."""

    planned: int
    floor: int
    state: BudgetState
    calm_s: float = BUDGET_CALM_S
    calm_since: float = 0.0

    @classmethod
    def of(cls, planned: int, floor: int, calm_s: float = BUDGET_CALM_S) -> TimedBudget:
        return cls(planned, min(floor, planned), BudgetState(planned), calm_s)

    @property
    def tokens(self) -> int:
        return self.state.tokens

    def after_oom(
        self, kind: FailureKind, forbid_tokens: int | None, now: float, workers: int
    ) -> BudgetChanges:
        """An out-of-memory failure (``Decision.lower_budget`` or ``Blame.lower_budget``)."""
        old = self.state
        self.state = budget_after_oom(old, floor=self.floor, killed_tokens=forbid_tokens, now=now)
        self.calm_since = now
        entered = self.state.emergency and not old.emergency
        what = (
            f"emergency mode: {self.state.consecutive_oom} consecutive out-of-memory "
            "failures, the floor"
            if entered
            else "budget halved"
        )
        forbidden = self.state.forbidden
        changes: BudgetChanges = []
        if entered:
            changes.append(
                ("emergency", {"on": True, "reason": f"{kind}: {what}", "reading": None})
            )
        changes.append(
            self._scale(
                f"{kind}: {what}"
                + (f"; never again {forbidden} tokens or more" if forbidden else ""),
                old.tokens,
                workers,
            )
        )
        return changes

    def after_success(self, started_at: float | None) -> None:
        """A batch completed (``budget_after_success``)."""
        self.state = budget_after_success(self.state, started_at)

    def after_time(self, now: float, workers: int) -> BudgetChanges:
        """Once per ``calm_s`` without an OOM failure: emergency mode ends, then the budget
        doubles towards ``planned`` (``budget_after_calm``)."""
        old = self.state
        if (
            old.tokens >= self.planned and not old.emergency
        ) or now - self.calm_since < self.calm_s:
            return []
        self.state = budget_after_calm(old, self.planned)
        self.calm_since = now
        why = f"no out-of-memory failure for {self.calm_s:.0f} s"
        changes: BudgetChanges = []
        if old.emergency:
            changes.append(("emergency", {"on": False, "reason": why, "reading": None}))
        if self.state.tokens != old.tokens:
            changes.append(self._scale(why, old.tokens, workers))
        return changes

    def _scale(self, reason: str, old_tokens: int, workers: int) -> tuple[str, dict[str, Any]]:
        return (
            "scale",
            {
                "action": "hold",
                "workers_from": workers,
                "workers_to": workers,
                "batch_tokens_from": old_tokens,
                "batch_tokens_to": self.state.tokens,
                "reason": reason,
                "reading": None,
            },
        )


# --- tasks and reassembly -----------------------------------------------------------------


@dataclass(eq=False)
class Assembly:
    """One batch being filled by its pieces: complete when every position has a row or an
    error. Rows of given-up positions stay zeros."""

    batch: WorkBatch
    vectors: Vectors
    remaining: int
    failed: dict[int, str] = field(default_factory=dict)
    #: The precision that made its rows where not the job's (``BatchResult.precision``).
    precision: str | None = None

    @classmethod
    def of(cls, batch: WorkBatch, dim: int) -> Assembly:
        import numpy as np

        n = len(batch.sequences)
        return cls(batch, np.zeros((n, dim), dtype=np.float32), n)

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def fill(self, positions: tuple[int, ...], rows: Vectors) -> bool:
        """Rows for ``positions``; returns whether the batch is now complete."""
        self.vectors[list(positions)] = rows
        self.remaining -= len(positions)
        return self.complete

    def give_up(self, position: int, message: str) -> bool:
        """An error instead of a row at ``position``; returns whether the batch is complete."""
        self.failed[position] = message
        self.remaining -= 1
        return self.complete

    def result(self) -> BatchResult:
        from embedpool.executor import BatchResult

        return BatchResult(self.batch.batch_id, self.vectors, dict(self.failed), self.precision)


_task_ids = itertools.count()


@dataclass(eq=False)
class Task:
    """Some positions of one batch, sent to one worker at a time."""

    assembly: Assembly
    positions: tuple[int, ...]
    #: Failures of exactly these positions (at this size) so far.
    tries: int = 0
    last_error: str = ""
    #: It failed, or the task it was split from did: a transport that queues several tasks
    #: on one worker runs it alone, so that a failure is charged to it for sure.
    suspect: bool = False
    task_id: int = field(default_factory=lambda: next(_task_ids))

    @property
    def batch_id(self) -> int:
        return self.assembly.batch.batch_id

    @property
    def sequences(self) -> tuple[TokenIds, ...]:
        seqs = self.assembly.batch.sequences
        return tuple(seqs[p] for p in self.positions)

    @property
    def prompt_lengths(self) -> tuple[int, ...] | None:
        """The prompt lengths of the task's sequences; None when the batch has none."""
        lengths = self.assembly.batch.prompt_lengths
        return tuple(lengths[p] for p in self.positions) if lengths else None

    @property
    def tokens(self) -> int:
        seqs = self.assembly.batch.sequences
        return sum(len(seqs[p]) for p in self.positions)

    @property
    def padded_tokens(self) -> int:
        seqs = self.assembly.batch.sequences
        return len(self.positions) * max((len(seqs[p]) for p in self.positions), default=0)

    def item_id(self, i: int = 0) -> str:
        """The id of the task's ``i``-th item, for messages."""
        pos = self.positions[i]
        ids = self.assembly.batch.item_ids
        return ids[pos] if pos < len(ids) else f"batch {self.batch_id} item {pos}"

    def describe(self) -> dict[str, Any]:
        """The fields every event about this task carries."""
        return {"batch_id": self.batch_id, "items": len(self.positions), "tokens": self.tokens}


def whole(assembly: Assembly) -> Task:
    """One task of every position of a batch."""
    return Task(assembly, tuple(range(len(assembly.batch.sequences))))


def halves(task: Task) -> tuple[Task, Task]:
    """Two halves of a task of two or more items, in order."""
    n = len(task.positions)
    if n < 2:
        raise ValueError("cannot split a task of one item")
    mid = n // 2
    return (
        Task(task.assembly, task.positions[:mid], suspect=True),
        Task(task.assembly, task.positions[mid:], suspect=True),
    )


def cut_to_budget(task: Task, budget: int | None) -> list[Task]:
    """Tasks of at most ``budget`` padded tokens (length-sorted, as ``plan_batches`` plans);
    a task that fits stays whole, with its tries. An item longer than the budget goes alone."""
    if budget is None or len(task.positions) < 2 or task.padded_tokens <= budget:
        return [task]
    seqs = task.assembly.batch.sequences
    groups = plan_batches(
        [len(seqs[p]) for p in task.positions], budget, max_items=len(task.positions)
    )
    return [
        Task(task.assembly, tuple(task.positions[i] for i in g.indices), suspect=task.suspect)
        for g in groups
    ]


def give_up_message(task: Task, kind: FailureKind, error: str) -> str:
    """The per-item error of an input that was given up."""
    tries = task.tries
    return (
        f"input {task.item_id()!r} ({task.tokens} tokens) could not be embedded: its worker "
        f"{_WHAT[kind]} {tries} time{'' if tries == 1 else 's'} (isolated by bisection; every "
        f"other input was embedded). Last error: {error}"
    )


_CAUSES = {
    FailureKind.OOM_KILL: "OOM kill ({evidence}): its task is split and the token budget halved",
    FailureKind.EXTERNAL_SIGKILL: "SIGKILL from outside, no evidence of the OOM killer "
    "({evidence}): its task is split, or retried if it holds one "
    "item",
    FailureKind.CRASH: "died unexpectedly ({evidence}): its task is split, or retried if it "
    "holds one item",
    FailureKind.HUNG: "killed by us: hung, silent past its deadline ({evidence}); its task is "
    "split, or retried if it holds one item",
}


def death_cause(kind: FailureKind, evidence: str) -> str:
    """The ``cause`` of a worker_death event: the kind, the evidence for it, what happens."""
    return _CAUSES.get(kind, "{evidence}").format(evidence=evidence)
