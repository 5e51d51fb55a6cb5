"""The fault policy (embedpool/faults.py) as tables, with no process anywhere.

The seven behaviours on which the local pool and Ray used to disagree (issue 13), and the row
or test that now pins the one rule for both:

    a multi-item batch fails (not OOM)    DECIDE rows "*-many"          split at once
    a Python error on one item            DECIDE row "engine_error-one" given up at once
    default max_retries                   test_default_max_retries      2
    is it an OOM?                         DEATH, ENGINE_ERRORS, SIGKILL_EVIDENCE rows; Ray's
                                          classification by type: tests/executors/ray/test_ray_executor.py
    budget after an OOM                   BUDGET rows                   halved, restored after calm,
                                                                        never to a killed size
    event names                           test_emitter_rejects_unknown_names (and the backend
                                          parity tests, which read the same names from both)
    an on_event callback raises           test_emitter_survives_a_raising_callback

And the rules beside a failed task's (issue 20), each one table for both backends:

    a death with no task (idle OOM kill)  BLAME rows "idle-*"           lower the budget (OOM only)
    several unfinished tasks on a death   BLAME rows "two-*"            none charged, suspects;
                                                                        OOM: lower, forbid a size
    a replacement fails to start          START rows                    backoff; break with none alive
    repeated OOM failures                 test_one_budget_state_...     one BudgetState, emergency
    a device executor's member breaks     FALLBACK rows                 GPU lost / cannot start only
    a GPU pool does not start             test_device_start             auto drops, cuda refuses
    when a worker is recycled             RECYCLE rows                  the local pool's only
    a hung worker                         test_one_hang_loop_...        one loop for both
    how a pool worker ended               EXITS rows                    left / start failure / death

Each of these also runs on real processes, both backends: tests/executors/test_fault_parity.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from embedpool import events, faults
from embedpool.errors import ConfigError
from embedpool.executor import WorkBatch
from embedpool.faults import Assembly, FailureKind, FaultPolicy, Task
from embedpool.models import ResolvedModel
from embedpool.testing import ort_error

K = FailureKind
POLICY = FaultPolicy(max_retries=2)

# kind, items, tries (this failure included) -> action, lower_budget, forbid the size
DECIDE: list[Any] = [
    pytest.param(K.OOM_KILL, 8, 1, "split", True, True, id="oom_kill-many"),
    pytest.param(K.OOM_KILL, 1, 1, "retry", True, False, id="oom_kill-one"),
    pytest.param(K.OOM_KILL, 1, 3, "give_up", True, False, id="oom_kill-one-exhausted"),
    pytest.param(K.EXTERNAL_SIGKILL, 8, 1, "split", False, False, id="external_sigkill-many"),
    pytest.param(K.EXTERNAL_SIGKILL, 1, 2, "retry", False, False, id="external_sigkill-one"),
    pytest.param(
        K.EXTERNAL_SIGKILL, 1, 3, "give_up", False, False, id="external_sigkill-one-exhausted"
    ),
    pytest.param(K.CRASH, 2, 1, "split", False, False, id="crash-many"),
    pytest.param(K.CRASH, 2, 5, "split", False, False, id="crash-many-tries-do-not-matter"),
    pytest.param(K.CRASH, 1, 1, "retry", False, False, id="crash-one"),
    pytest.param(K.CRASH, 1, 3, "give_up", False, False, id="crash-one-exhausted"),
    pytest.param(K.HUNG, 4, 1, "split", False, False, id="hung-many"),
    pytest.param(K.HUNG, 1, 1, "retry", False, False, id="hung-one"),
    pytest.param(K.HUNG, 1, 3, "give_up", False, False, id="hung-one-exhausted"),
    pytest.param(K.ENGINE_ERROR, 16, 1, "split", False, False, id="engine_error-many"),
    pytest.param(K.ENGINE_ERROR, 1, 1, "give_up", False, False, id="engine_error-one"),
    pytest.param(K.DEVICE_OOM, 8, 1, "split", True, True, id="device_oom-many"),
    pytest.param(K.DEVICE_OOM, 1, 1, "retry", True, False, id="device_oom-one"),
    pytest.param(K.DEVICE_OOM, 1, 3, "give_up", True, False, id="device_oom-one-exhausted"),
    pytest.param(K.DEVICE_LOST, 8, 1, "fall_back", False, False, id="device_lost-many"),
    pytest.param(K.DEVICE_LOST, 1, 1, "fall_back", False, False, id="device_lost-one"),
    # reported again for the same task: the transport did not fall back; an engine error
    pytest.param(K.DEVICE_LOST, 8, 2, "split", False, False, id="device_lost-again-many"),
    pytest.param(K.DEVICE_LOST, 1, 2, "give_up", False, False, id="device_lost-again-one"),
]


@pytest.mark.parametrize(("kind", "items", "tries", "action", "lower", "forbid"), DECIDE)
def test_decide(
    kind: FailureKind, items: int, tries: int, action: str, lower: bool, forbid: bool
) -> None:
    d = faults.decide(kind, items=items, tries=tries, padded_tokens=1000, policy=POLICY)
    assert (d.action, d.lower_budget, d.forbid_tokens) == (action, lower, 1000 if forbid else None)


def test_every_kind_has_a_row() -> None:
    rows = {p.values[0] for p in DECIDE}
    assert rows == set(FailureKind)


@pytest.mark.parametrize("max_retries", [0, 1, 2, 5])
def test_one_item_gets_one_plus_max_retries_tries(max_retries: int) -> None:
    policy = FaultPolicy(max_retries=max_retries)
    actions = [
        faults.decide(K.CRASH, items=1, tries=t, padded_tokens=8, policy=policy).action
        for t in range(1, max_retries + 2)
    ]
    assert actions == ["retry"] * max_retries + ["give_up"]


def test_default_max_retries() -> None:
    assert FaultPolicy().max_retries == 2


def test_decide_rejects_a_task_that_did_not_fail() -> None:
    with pytest.raises(ValueError, match="tries >= 1"):
        faults.decide(K.CRASH, items=1, tries=0, padded_tokens=1, policy=POLICY)


# hung? oom counter rose? SIGKILL? -> kind
DEATH = [
    pytest.param(True, False, True, K.HUNG, id="killed-by-us-for-a-hang"),
    pytest.param(True, True, True, K.HUNG, id="hang-wins-over-a-coincident-oom"),
    pytest.param(False, True, True, K.OOM_KILL, id="sigkill-with-oom-evidence"),
    pytest.param(False, True, False, K.OOM_KILL, id="ray-oom-error-signal-unknown"),
    pytest.param(False, False, True, K.EXTERNAL_SIGKILL, id="sigkill-without-evidence"),
    pytest.param(False, False, False, K.CRASH, id="other-signal-or-exit"),
]


@pytest.mark.parametrize(("hung", "oom", "sigkill", "kind"), DEATH)
def test_death_kind(hung: bool, oom: bool, sigkill: bool, kind: FailureKind) -> None:
    assert faults.death_kind(hung=hung, oom_confirmed=oom, sigkill=sigkill) is kind


class _Subclassed(MemoryError):
    pass


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(MemoryError("cannot allocate"), K.DEVICE_OOM, id="memory-error"),
        pytest.param(_Subclassed(), K.DEVICE_OOM, id="memory-error-subclass"),
        pytest.param(
            ValueError("out of memory in the room"), K.ENGINE_ERROR, id="text-says-memory"
        ),
        pytest.param(RuntimeError("boom"), K.ENGINE_ERROR, id="runtime-error"),
    ],
)
def test_engine_error_kind_is_by_type_never_by_text(exc: BaseException, kind: FailureKind) -> None:
    assert faults.engine_error_kind(exc) is kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        pytest.param("arena_oom", K.DEVICE_OOM, id="bfc-arena"),
        pytest.param("cuda_oom", K.DEVICE_OOM, id="cuda-failure-2"),
        pytest.param("cudnn_alloc", K.DEVICE_OOM, id="cudnn-alloc-failed"),
        pytest.param("launch_failure", K.DEVICE_LOST, id="cuda-failure-719"),
        pytest.param("device_assert", K.DEVICE_LOST, id="device-side-assert"),
        pytest.param("unknown_999", K.DEVICE_LOST, id="cuda-failure-999"),
        pytest.param("shape_error", K.ENGINE_ERROR, id="invalid-argument"),
    ],
)
def test_ort_errors_by_their_cuda_status(name: str, kind: FailureKind) -> None:
    """ONNX Runtime's real exception classes with the texts it prints (testing.ORT_ERRORS)."""
    assert faults.engine_error_kind(ort_error(name)) is kind


# module, class name, message -> kind (None: not ORT's, or nothing CUDA in it)
ORT_TEXTS: list[Any] = [
    pytest.param(
        "builtins", "RuntimeError", "CUDA failure 2: out of memory", None, id="not-an-ort-exception"
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA failure 20: this room is out of bounds",
        None,
        id="other-cuda-code",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA failure 2: out of memory ; GPU=0",
        K.DEVICE_OOM,
        id="code-2",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0",
        K.DEVICE_OOM,
        id="cublas-alloc",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "RuntimeException",
        "BFCArena::AllocateRawInternal: Available memory of 0 is smaller than "
        "requested bytes of 1048576",
        K.DEVICE_OOM,
        id="arena-limit",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA failure 700: an illegal memory access was encountered",
        K.DEVICE_LOST,
        id="code-700",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA error cudaErrorLaunchFailure:unspecified launch failure",
        K.DEVICE_LOST,
        id="error-name",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA failure 214: uncorrectable ECC error encountered",
        K.DEVICE_LOST,
        id="ecc",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus",
        K.DEVICE_LOST,
        id="xid-79",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "Xidian input failed",
        None,
        id="xid-is-a-word",
    ),
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "DeviceReset",
        "reset",
        K.DEVICE_LOST,
        id="device-reset-type",
    ),
    # after a sticky error, allocations fail too: the lost device wins
    pytest.param(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "Fail",
        "CUDA failure 719: unspecified launch failure; Failed to allocate memory",
        K.DEVICE_LOST,
        id="lost-wins-over-oom",
    ),
]


@pytest.mark.parametrize(("module", "name", "message", "kind"), ORT_TEXTS)
def test_ort_error_kind(module: str, name: str, message: str, kind: FailureKind | None) -> None:
    assert faults.ort_error_kind(module, name, message) is kind


# credited before, counter now -> confirmed, credited after
SIGKILL_EVIDENCE = [
    pytest.param(3, 4, True, 4, id="counter-rose-by-one"),
    pytest.param(3, 3, False, 3, id="counter-did-not-rise"),
    pytest.param(3, 5, True, 4, id="two-kills-two-deaths-first"),
    pytest.param(4, 5, True, 5, id="two-kills-two-deaths-second"),
    pytest.param(3, None, False, 3, id="counter-unreadable"),
    pytest.param(None, 7, False, 7, id="no-baseline-yet"),
]


@pytest.mark.parametrize(("credited", "counter", "confirmed", "after"), SIGKILL_EVIDENCE)
def test_attribute_sigkill(
    credited: int | None, counter: int | None, confirmed: bool, after: int | None
) -> None:
    assert faults.attribute_sigkill(credited, counter) == (confirmed, after)


# the token budget: lowered on OOM, restored after calm, never to a size that was killed
BUDGET = [
    pytest.param("lower", (1024, 256), 512, id="halved"),
    pytest.param("lower", (300, 256), 256, id="not-below-the-floor"),
    pytest.param("restore", (256, 1024, None), 512, id="doubled"),
    pytest.param("restore", (768, 1024, None), 1024, id="up-to-the-plan"),
    pytest.param("restore", (512, 1024, 1024), 512, id="never-to-the-killed-size"),
    pytest.param("restore", (256, 1024, 1024), 512, id="below-the-killed-size-is-fine"),
    pytest.param("forbid", (None, 1024), 1024, id="first-kill"),
    pytest.param("forbid", (1024, 2048), 1024, id="keeps-the-smallest"),
    pytest.param("forbid", (1024, None), 1024, id="single-item-death-forbids-nothing"),
]


@pytest.mark.parametrize(("rule", "args", "want"), BUDGET)
def test_budget(rule: str, args: tuple[Any, ...], want: int) -> None:
    fns: dict[str, Callable[..., int | None]] = {
        "lower": faults.lowered_budget,
        "restore": faults.restored_budget,
        "forbid": faults.forbidden_after,
    }
    assert fns[rule](*args) == want


# silent seconds, padded tokens, warned -> verdict (deadline = 10 + 0.01 x tokens)
HANG = [
    pytest.param(5.0, 1000, False, "ok", id="early"),
    pytest.param(12.0, 1000, False, "warn", id="at-60-percent"),
    pytest.param(12.0, 1000, True, "ok", id="warned-once"),
    pytest.param(20.0, 1000, True, "kill", id="at-the-deadline"),
    pytest.param(20.0, 1000, False, "kill", id="deadline-without-a-warning"),
    pytest.param(19.9, 1000, True, "ok", id="just-before"),
    pytest.param(19.9, 2000, False, "warn", id="longer-batch-longer-deadline"),
]


@pytest.mark.parametrize(("silent", "tokens", "warned", "verdict"), HANG)
def test_hang_check(silent: float, tokens: int, warned: bool, verdict: str) -> None:
    policy = FaultPolicy(hang_base_s=10.0, hang_per_token_s=0.01, hang_warn_fraction=0.6)
    assert policy.hang_check(silent, tokens, warned) == verdict


@pytest.mark.parametrize(("warned", "then"), [(False, "warn"), (True, "kill")])
def test_next_hang_check_is_when_the_verdict_changes(warned: bool, then: str) -> None:
    policy = FaultPolicy(hang_base_s=10.0, hang_per_token_s=0.01, hang_warn_fraction=0.6)
    due = policy.next_hang_check_s(1000, warned)
    assert policy.hang_check(due - 1e-6, 1000, warned) == "ok"
    assert policy.hang_check(due, 1000, warned) == then


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"hang_base_s": 0}, "hang_base_s"),
        ({"hang_per_token_s": -1}, "hang_per_token_s"),
        ({"hang_warn_fraction": 1.0}, "fraction"),
    ],
)
def test_policy_validation(changes: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FaultPolicy(**changes)  # type: ignore[arg-type]


# --- tasks, cutting and reassembly --------------------------------------------------------


def _assembly(lengths: list[int], dim: int = 3) -> Assembly:
    seqs = tuple(np.ones(n, np.int32) for n in lengths)
    return Assembly.of(WorkBatch(7, seqs, tuple(f"k{i}" for i in range(len(lengths)))), dim)


@pytest.mark.parametrize(
    ("lengths", "budget", "want"),
    [
        ([10] * 8, None, [8]),
        ([10] * 8, 80, [8]),
        ([10] * 8, 40, [4, 4]),
        ([10] * 8, 30, [3, 3, 2]),
        ([10] * 3, 5, [1, 1, 1]),  # one item over the budget still goes, alone
        ([5, 50, 5, 50], 100, [2, 2]),  # length-sorted: the short ones together
    ],
    ids=["no-budget", "fits", "halves", "thirds", "item-over-budget", "sorted"],
)
def test_cut_to_budget(lengths: list[int], budget: int | None, want: list[int]) -> None:
    pieces = faults.cut_to_budget(faults.whole(_assembly(lengths)), budget)
    assert [len(p.positions) for p in pieces] == want
    assert sorted(p for piece in pieces for p in piece.positions) == list(range(len(lengths)))
    assert all(p.padded_tokens <= (budget or 10**9) or len(p.positions) == 1 for p in pieces)


def test_a_task_that_fits_keeps_its_tries() -> None:
    task = faults.whole(_assembly([4, 4]))
    task.tries = 2
    assert faults.cut_to_budget(task, 100) == [task]


def test_halves_keep_positions_and_ids() -> None:
    a, b = faults.halves(faults.whole(_assembly([5, 6, 7])))
    assert (a.positions, b.positions) == ((0,), (1, 2))
    assert (a.item_id(), b.item_id(1)) == ("k0", "k2")
    with pytest.raises(ValueError, match="one item"):
        faults.halves(a)


def test_item_id_without_ids_names_batch_and_position() -> None:
    asm = Assembly.of(WorkBatch(3, (np.ones(2, np.int32),)), 2)
    assert faults.whole(asm).item_id() == "batch 3 item 0"


def test_assembly_is_complete_when_every_position_has_a_row_or_an_error() -> None:
    asm = _assembly([3, 3, 3, 3])
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert not asm.fill((2, 0), rows[[2, 0]])
    assert not asm.give_up(1, "poison")
    assert asm.fill((3,), rows[[3]])
    result = asm.result()
    assert result.batch_id == 7 and result.failed == {1: "poison"}
    np.testing.assert_array_equal(result.vectors[[0, 2, 3]], rows[[0, 2, 3]])
    assert not result.vectors[1].any()


def test_give_up_message_names_the_item_its_size_tries_and_error() -> None:
    task = Task(_assembly([4, 9]), (1,), tries=3)
    msg = faults.give_up_message(task, K.CRASH, "worker pid 5 died: SIGSEGV(-11)")
    assert "'k1'" in msg and "9 tokens" in msg and "3 times" in msg and "SIGSEGV" in msg


@pytest.mark.parametrize(
    ("kind", "evidence", "says"),
    [
        (K.OOM_KILL, "oom_kill in memory.events rose: 3 -> 4", "OOM kill"),
        (K.EXTERNAL_SIGKILL, "oom_kill did not rise", "no evidence of the OOM killer"),
        (K.CRASH, "SIGSEGV(-11)", "died unexpectedly"),
        (K.HUNG, "hung: silent 31.0 s", "killed by us: hung"),
    ],
    ids=["oom", "external", "crash", "hung"],
)
def test_death_cause_says_the_kind_and_its_evidence(
    kind: FailureKind, evidence: str, says: str
) -> None:
    cause = faults.death_cause(kind, evidence)
    assert says in cause and evidence in cause


# --- events: one set of names, a callback cannot break an executor --------------------------


def test_emitter_rejects_unknown_names() -> None:
    emit = events.Emitter(None, logging.getLogger("test"))
    with pytest.raises(ValueError, match="unknown event"):
        emit("poison")  # Ray's old name: now poison_item on every backend


def test_emitter_survives_a_raising_callback(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def bad(event: dict[str, Any]) -> None:
        seen.append(event["event"])
        raise RuntimeError("callback bug")

    emit = events.Emitter(bad, logging.getLogger("test"), backend="ray")
    event = emit(events.RETRY, batch_id=1)
    assert seen == ["retry"] and event["backend"] == "ray" and event["batch_id"] == 1
    assert "callback failed" in caplog.text and "callback bug" in caplog.text


# --- the token budget after OOM failures: one state for both backends ----------------------------


def test_one_budget_state_lowers_escalates_restores_and_never_to_a_killed_size() -> None:
    """faults.BudgetState: the pool's scaling policy and Ray's executor keep this one state."""
    b = faults.BudgetState(1024)
    b = faults.budget_after_oom(b, floor=256, killed_tokens=1024, now=0.0)
    assert (b.tokens, b.forbidden, b.consecutive_oom, b.emergency) == (512, 1024, 1, False)
    b = faults.budget_after_success(b, started_at=-1.0)  # began before the OOM: no reset
    assert b.consecutive_oom == 1
    b = faults.budget_after_success(b, started_at=1.0)
    assert b.consecutive_oom == 0
    b = faults.budget_after_oom(b, floor=256, killed_tokens=None, now=2.0)
    assert (b.tokens, b.consecutive_oom, b.emergency) == (256, 1, False)  # the floor
    b = faults.budget_after_oom(b, floor=256, killed_tokens=None, now=3.0)
    assert (b.tokens, b.consecutive_oom, b.emergency) == (256, 2, True)  # two in a row
    b = faults.budget_after_calm(b, planned=1024)
    assert (b.tokens, b.consecutive_oom, b.emergency) == (256, 0, False)  # emergency ends
    b = faults.budget_after_calm(b, planned=1024)
    assert (b.tokens, b.consecutive_oom, b.emergency) == (512, 0, False)  # then doubles
    assert faults.budget_after_calm(b, planned=1024).tokens == 512  # 1024 was killed


def test_two_ooms_in_a_row_go_straight_to_the_floor() -> None:
    b = faults.budget_after_oom(faults.BudgetState(4096), floor=256, killed_tokens=4096, now=0.0)
    b = faults.budget_after_oom(b, floor=256, killed_tokens=2048, now=1.0)
    assert (b.tokens, b.emergency, b.forbidden) == (256, True, 2048)


# --- the rules beside a failed task's (issue 20): one for every backend ------------------------


@pytest.mark.parametrize(
    ("kind", "lower"),
    [
        pytest.param(K.OOM_KILL, True, id="oom-kill-lowers"),
        pytest.param(K.EXTERNAL_SIGKILL, False, id="sigkill-only-replaces"),
        pytest.param(K.CRASH, False, id="crash-only-replaces"),
        pytest.param(K.HUNG, False, id="hung-only-replaces"),
    ],
)
def test_a_death_with_no_task(kind: FailureKind, lower: bool) -> None:
    assert faults.idle_death_lowers_budget(kind) is lower


# unfinished tasks' padded tokens (oldest first), kind, hung
#   -> running index, suspects, forbid, lower the budget though nobody is charged
BLAME: list[Any] = [
    pytest.param((), K.OOM_KILL, False, None, False, None, True, id="idle-oom-kill-lowers"),
    pytest.param(
        (), K.EXTERNAL_SIGKILL, False, None, False, None, False, id="idle-sigkill-only-replaces"
    ),
    pytest.param((), K.CRASH, False, None, False, None, False, id="idle-crash-only-replaces"),
    pytest.param((512,), K.CRASH, False, 0, False, None, False, id="one-task-is-charged"),
    pytest.param(
        (512,), K.OOM_KILL, False, 0, False, None, False, id="one-oom-task-is-charged-decide-lowers"
    ),
    pytest.param((512, 768), K.CRASH, False, None, True, None, False, id="two-none-charged"),
    pytest.param(
        (512, 768),
        K.EXTERNAL_SIGKILL,
        False,
        None,
        True,
        None,
        False,
        id="two-sigkill-none-charged-budget-kept",
    ),
    pytest.param(
        (1024, 768, 256),
        K.OOM_KILL,
        False,
        None,
        True,
        768,
        True,
        id="two-oom-lowers-and-forbids-the-smaller-of-the-oldest-two",
    ),
    pytest.param((512, 768), K.HUNG, True, 0, False, None, False, id="a-hang-knows-its-task"),
]


@pytest.mark.parametrize(("sizes", "kind", "hung", "running", "suspects", "forbid", "lower"), BLAME)
def test_blame(
    sizes: tuple[int, ...],
    kind: FailureKind,
    hung: bool,
    running: int | None,
    suspects: bool,
    forbid: int | None,
    lower: bool,
) -> None:
    assert faults.blame(sizes, kind, hung=hung) == faults.Blame(running, suspects, forbid, lower)


START_POLICY = FaultPolicy(max_start_failures=3, start_backoff_s=0.25, start_backoff_max_s=10.0)
# failures in a row, ever ready, alive -> action, backoff
START: list[Any] = [
    pytest.param(1, False, 0, "break", 0.0, id="never-ready-breaks-at-once"),
    pytest.param(1, True, 1, "retry", 0.25, id="first-failure-backs-off"),
    pytest.param(3, True, 1, "retry", 1.0, id="doubling"),
    pytest.param(3, True, 0, "break", 0.0, id="three-in-a-row-none-alive"),
    pytest.param(2, True, 0, "retry", 0.5, id="two-none-alive-still-retries"),
    pytest.param(9, True, 2, "retry", 10.0, id="live-workers-keep-it-going-capped-backoff"),
]


@pytest.mark.parametrize(("failures", "ever_ready", "alive", "action", "backoff"), START)
def test_start_failure(
    failures: int, ever_ready: bool, alive: int, action: str, backoff: float
) -> None:
    d = faults.start_failure(
        START_POLICY, failures_in_row=failures, ever_ready=ever_ready, alive=alive
    )
    assert (d.action, d.backoff_s) == (action, backoff) and d.reason


# why the member broke, it runs on a GPU, it already left its device, the executor closes
FALLBACK: list[Any] = [
    pytest.param("device_lost", True, False, False, True, id="gpu-lost"),
    pytest.param("start_failures", True, False, False, True, id="gpu-cannot-start-workers"),
    pytest.param("other", True, False, False, False, id="gpu-internal-failure-fails-the-batch"),
    pytest.param("device_lost", False, False, False, False, id="cpu-member-never-falls-back"),
    pytest.param("start_failures", False, False, False, False, id="cpu-start-failures"),
    pytest.param(
        "other", True, True, False, True, id="a-lost-members-leftovers-go-back-whatever-the-error"
    ),
    pytest.param("device_lost", True, False, True, False, id="nothing-goes-back-when-closing"),
]


@pytest.mark.parametrize(("cause", "on_gpu", "lost", "closing", "falls"), FALLBACK)
def test_device_fallback(cause: Any, on_gpu: bool, lost: bool, closing: bool, falls: bool) -> None:
    assert faults.falls_back(cause, on_gpu=on_gpu, lost=lost, closing=closing) is falls


@pytest.mark.parametrize(
    ("unavailable", "on_gpu", "strict", "want"),
    [
        pytest.param(True, True, False, "drop", id="auto-drops-a-gpu-without-cuda"),
        pytest.param(True, True, True, "refuse", id="cuda-refuses"),
        pytest.param(False, True, False, "fail", id="any-other-gpu-start-failure-fails"),
        pytest.param(True, False, False, "fail", id="the-cpu-member-fails"),
    ],
)
def test_device_start(unavailable: bool, on_gpu: bool, strict: bool, want: str) -> None:
    assert faults.device_start(unavailable=unavailable, on_gpu=on_gpu, strict=strict) == want


MiB_ = 1024 * 1024


@pytest.mark.parametrize(
    ("rss_limit", "growth", "want"),
    [
        pytest.param(None, None, None, id="never"),
        pytest.param(None, 300 * MiB_, 100 * MiB_ + 300 * MiB_ + 50 * MiB_, id="growth-past-arena"),
        pytest.param(200 * MiB_, 300 * MiB_, 200 * MiB_, id="absolute-is-lower"),
        pytest.param(900 * MiB_, 300 * MiB_, 450 * MiB_, id="growth-is-lower"),
        pytest.param(900 * MiB_, None, 900 * MiB_, id="absolute-only"),
    ],
)
def test_recycle_limit(rss_limit: int | None, growth: int | None, want: int | None) -> None:
    assert (
        faults.recycle_limit(
            ready_rss=100 * MiB_, rss_limit=rss_limit, growth_limit=growth, arena_bytes=50 * MiB_
        )
        == want
    )


# RSS after a batch, absolute limit, leaving already -> the limit passed (recycle) or None
RECYCLE: list[Any] = [
    pytest.param(450 * MiB_, None, False, None, id="at-the-growth-limit-stays"),
    pytest.param(451 * MiB_, None, False, 450 * MiB_, id="past-the-growth-limit"),
    pytest.param(300 * MiB_, 250 * MiB_, False, 250 * MiB_, id="past-the-absolute-limit"),
    pytest.param(900 * MiB_, None, True, None, id="already-leaving"),
]


@pytest.mark.parametrize(("rss", "rss_limit", "leaving", "want"), RECYCLE)
def test_recycle(rss: int, rss_limit: int | None, leaving: bool, want: int | None) -> None:
    assert (
        faults.recycle(
            rss=rss,
            ready_rss=100 * MiB_,
            rss_limit=rss_limit,
            growth_limit=300 * MiB_,
            arena_bytes=50 * MiB_,
            leaving=leaving,
        )
        == want
    )
    assert (
        faults.recycle(rss=10**12, ready_rss=0, rss_limit=None, growth_limit=None, arena_bytes=0)
        is None
    )  # no limit: never


def test_one_hang_loop_warns_kills_and_says_when_to_look_again() -> None:
    policy = FaultPolicy(hang_base_s=10.0, hang_per_token_s=0.01, hang_warn_fraction=0.6)
    running = [
        faults.Running("a", 105.0, 1000, False),  # deadline 20: warn at 117
        faults.Running("b", 100.0, 1000, True),  # warned: kill at 120
        faults.Running("c", 115.0, 0, False),
    ]  # deadline 10: warn at 121
    assert faults.next_hang_check(policy, running) == 117.0
    assert faults.next_hang_check(policy, []) is None
    got = faults.hang_verdicts(policy, running, now=120.0)
    assert [(v.key, v.verdict) for v in got] == [("a", "warn"), ("b", "kill")]
    assert got[1].reason == "hung: silent 20.0 s, deadline 20.0 s"
    assert got[1].fields() == {"silent_s": 20.0, "deadline_s": 20.0}


def test_start_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_start_failures"):
        FaultPolicy(max_start_failures=0)
    with pytest.raises(ConfigError, match="start_backoff"):
        FaultPolicy(start_backoff_s=20.0, start_backoff_max_s=10.0)


@pytest.mark.parametrize(
    ("exit_code", "interrupted"),
    [
        pytest.param(-15, True, id="sigterm"),
        pytest.param(-2, True, id="sigint"),
        pytest.param(-9, False, id="sigkill-is-a-failure"),
        pytest.param(1, False, id="exit-1-is-a-failure"),
        pytest.param(None, False, id="unknown"),
    ],
)
def test_a_worker_stopped_while_starting_is_not_a_start_failure(
    exit_code: int | None, interrupted: bool
) -> None:
    """A group's SIGTERM (systemd, kill -TERM -PGID) can reach a worker before it ignores it."""
    assert faults.start_interrupted(exit_code) is interrupted


# said Leaving, asked to leave, holding a task, starting, exit code -> what its end means
EXITS: list[Any] = [
    pytest.param(True, False, False, False, 0, "left", id="said-leaving"),
    pytest.param(False, True, False, False, -9, "left", id="asked-between-tasks-gone-first"),
    pytest.param(False, True, True, False, -9, "death", id="asked-while-busy-died-busy"),
    pytest.param(
        False, True, False, True, -9, "left", id="asked-while-starting-killed-by-us-is-a-scale-down"
    ),
    pytest.param(
        False, False, False, True, -15, "stopped_while_starting", id="group-sigterm-while-starting"
    ),
    pytest.param(False, False, False, True, 1, "start_failure", id="load-failed"),
    pytest.param(False, False, True, False, -9, "death", id="busy-sigkill"),
    pytest.param(False, False, False, False, -9, "death", id="idle-sigkill"),
]


@pytest.mark.parametrize(("said", "asked", "holding", "starting", "code", "want"), EXITS)
def test_exit_kind(
    said: bool, asked: bool, holding: bool, starting: bool, code: int, want: str
) -> None:
    assert (
        faults.exit_kind(
            said_leaving=said,
            asked_to_leave=asked,
            holding_task=holding,
            starting=starting,
            exit_code=code,
        )
        == want
    )


def test_a_timed_budget_lowers_escalates_and_restores_one_step_per_calm_period() -> None:
    """Ray's and the in-process executor's budget: the same BudgetState steps as the pool's,
    with calm measured in time, and the events that say so."""
    b = faults.TimedBudget.of(1024, 256, calm_s=20.0)
    first = b.after_oom(K.OOM_KILL, 1024, now=100.0, workers=2)
    assert [n for n, _ in first] == ["scale"] and b.tokens == 512
    assert first[0][1]["batch_tokens_from"] == 1024 and "never again 1024" in first[0][1]["reason"]
    second = b.after_oom(K.DEVICE_OOM, None, now=101.0, workers=2)  # one item: no size
    assert [(n, f.get("on")) for n, f in second] == [("emergency", True), ("scale", None)]
    assert (b.tokens, b.state.emergency) == (256, True)
    assert b.after_time(120.0, 2) == []  # 19 s: not calm yet
    ended = b.after_time(121.0, 2)
    assert [(n, f.get("on")) for n, f in ended] == [("emergency", False)]  # at the floor
    assert b.tokens == 256 and b.after_time(140.0, 2) == []
    raised = b.after_time(141.0, 2)
    assert [(f["batch_tokens_from"], f["batch_tokens_to"]) for _, f in raised] == [(256, 512)]
    b.after_success(None)
    assert b.after_time(200.0, 2) == [] and b.tokens == 512  # 1024 ran out of memory


def test_one_wait_for_every_manager() -> None:
    """The pool's and Ray's managers block until the hang rule or their own next due time."""
    policy = FaultPolicy(hang_base_s=10.0, hang_per_token_s=0.0, hang_warn_fraction=0.5)
    running = [faults.Running("a", 100.0, 0, False)]  # warn at 105
    assert faults.wait_s(policy, running, 101.0, [None, 200.0], cap=30.0) == 4.0
    assert faults.wait_s(policy, running, 101.0, [102.5], cap=30.0) == 1.5
    assert faults.wait_s(policy, [], 101.0, [None], cap=1.0) == 1.0  # nothing due: the cap
    assert faults.wait_s(policy, [], 101.0, [50.0], cap=1.0) == 0.0  # overdue: never negative


# --- the hang deadline's allowance per token, by the model's size --------------------------------
# parameters -> seconds a padded token (2 x parameters operations at faults.HANG_MIN_FLOPS)
HANG_PER_TOKEN = [
    pytest.param(None, 0.01, id="unknown-size: the policy's own"),
    pytest.param(22_700_000, 0.01, id="MiniLM-L6: the floor"),
    pytest.param(596_000_000, 0.2384, id="Qwen3-0.6B"),
    pytest.param(7_570_000_000, 3.028, id="Qwen3-8B"),
]


@pytest.mark.parametrize(("parameters", "want"), HANG_PER_TOKEN)
def test_hang_allowance_follows_the_models_size(parameters: int | None, want: float) -> None:
    assert faults.hang_per_token_s(parameters) == pytest.approx(want, rel=1e-3)
    # a 0.6B decoder's 256-token batch gets minutes on a busy machine, where 10 ms a token
    # gave it 32.6 s and killed it (seen at load 20 on 2 cores)
    deadline = FaultPolicy(hang_per_token_s=faults.hang_per_token_s(parameters)).deadline_s(256)
    assert deadline == pytest.approx(30.0 + 256 * want, rel=1e-3)


def test_the_construction_path_gives_a_pool_its_models_allowance(
    monkeypatch: pytest.MonkeyPatch, real_model: ResolvedModel
) -> None:
    """start_executor reads the model's size and hands its allowance to the pool's policy (a
    fake engine stands for the model's: only the number matters here)."""
    from embedpool.executors.pool.pool import Pool
    from embedpool.graph.families import catalog
    from embedpool.placement import place, start_executor
    from embedpool.testing import FakeEngineSpec

    model = real_model
    assert catalog.parameter_count(model) == pytest.approx(22.7e6, rel=0.02)
    monkeypatch.setattr(catalog, "parameter_count", lambda m: 596_000_000)
    placement = place(model, device="cpu", precision="fp32")
    ex = start_executor(model, placement, workers=1, engine=FakeEngineSpec())
    try:
        assert isinstance(ex, Pool)
        assert ex.config.fault_policy.hang_per_token_s == pytest.approx(0.2384, rel=1e-3)
    finally:
        ex.close()
