"""RayExecutor against a real local Ray cluster (see conftest.py), plus its pure parts.

The Ray tests use embedpool.testing.FakeEngineSpec (deterministic vectors, a real SIGKILL
on a poison token) except one that runs the real model. The faults both backends must survive
alike (SIGKILL, an OOM kill in a cgroup, a hung actor, poison, a raising callback) are in
tests/test_executor_faults.py, run against the local pool and Ray.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from polling import wait_until

from embedpool.errors import ConfigError, MissingExtraError, WorkerStartError
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.executors.ray.cluster import (
    INSTALL_HINT,
    actor_range,
    exit_detail,
    failure_of,
    require_ray,
    task_error_kind,
)
from embedpool.executors.ray.executor import RayExecutor
from embedpool.faults import FaultPolicy
from embedpool.testing import FakeEngineSpec, make_batches, make_sequences
from embedpool.types import Event

POISON = (424242, 424243)
DEADLINE_S = 90.0  # any one job; a timeout here is a hang, not slowness


def collect(run: Callable[[], Any], deadline_s: float = DEADLINE_S) -> dict[int, BatchResult]:
    """Drain an executor's run() into {batch_id: result}, failing on duplicates or a hang."""
    out: dict[int, BatchResult] = {}
    end = time.monotonic() + deadline_s
    for res in run():
        assert res.batch_id not in out, f"batch {res.batch_id} returned twice"
        out[res.batch_id] = res
        assert time.monotonic() < end, f"job still running after {deadline_s} s"
    return out


def local_reference(spec: Any, batches: Sequence[WorkBatch]) -> dict[int, BatchResult]:
    ex = InProcessExecutor(spec)
    try:
        return {r.batch_id: r for r in ex.run(batches)}
    finally:
        ex.close()


def assert_same(
    got: dict[int, BatchResult],
    want: dict[int, BatchResult],
    skip: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    assert sorted(got) == sorted(want)
    for bid, ref in want.items():
        cos = np.sum(got[bid].vectors * ref.vectors, axis=1)
        for row, c in enumerate(cos):
            if (bid, row) not in skip:
                assert c >= 0.99999, f"batch {bid} row {row}: cos {c}"


# --- without Ray --------------------------------------------------------------------------


def test_import_embedpool_never_imports_ray() -> None:
    code = (
        "import sys, embedpool, embedpool.executors, embedpool.executors.ray, "
        "embedpool.executors.ray.executor; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'embedpool\[ray\]'") as info:
        require_ray()
    assert isinstance(info.value, ImportError) and isinstance(info.value, ConfigError)
    with pytest.raises(
        MissingExtraError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")
    ):
        RayExecutor(FakeEngineSpec())


@pytest.mark.parametrize(
    ("actors", "cpus", "per_actor", "want"),
    [
        (None, 2.0, 1.0, (2, 2)),
        (None, 16.0, 2.0, (8, 8)),
        (None, 1.0, 2.0, (1, 1)),  # never zero: one actor waits for a big enough node
        (None, 3.0, 0.5, (6, 6)),
        (3, 2.0, 1.0, (3, 3)),
        ((1, 4), 2.0, 1.0, (1, 4)),
    ],
    ids=["auto-2cpu", "auto-16cpu-2each", "auto-too-small", "auto-half-cpu", "fixed", "range"],
)
def test_actor_range(
    actors: int | tuple[int, int] | None, cpus: float, per_actor: float, want: tuple[int, int]
) -> None:
    assert actor_range(actors, cpus, per_actor) == want


@pytest.mark.parametrize("actors", [0, (0, 2), (3, 2)], ids=["zero", "min-zero", "min-over-max"])
def test_bad_actor_counts_are_config_errors(actors: int | tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match="actors"):
        RayExecutor(FakeEngineSpec(), actors=actors)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "The actor died unexpectedly before finishing this task.\n\tpid: 19377\nThe actor is "
            "dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
            "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some "
            "common causes include: (1) the process was killed by the OOM killer",
            {
                "exit_type": "SYSTEM_ERROR",
                "exit_detail": "Worker unexpectedly exits with a connection error code 2. End of file.",
            },
        ),
        ("The actor is dead because it was killed by `ray.kill`.", {}),
    ],
    ids=["sigkill", "ray-kill"],
)
def test_exit_detail(text: str, want: dict[str, str]) -> None:
    assert exit_detail(RuntimeError(text)) == want


# what Ray raised -> what it means, by type only: the text of ActorDied mentions the OOM killer
# for any unexpected exit, and "oom" is a substring of "room"
FAILURES = [
    pytest.param(
        lambda e: e.OutOfMemoryError("node memory 96% > 95%"),
        "oom_death",
        None,
        id="ray-memory-monitor",
    ),
    pytest.param(lambda e: e.ActorDiedError(), "death", None, id="actor-died"),
    pytest.param(lambda e: e.WorkerCrashedError(), "death", None, id="worker-crashed"),
    pytest.param(
        lambda e: e.RayTaskError("embed", "tb", ValueError("no room: oom")).as_instanceof_cause(),
        "task_error",
        "engine_error",
        id="error-whose-text-says-oom",
    ),
    pytest.param(
        lambda e: e.RayTaskError(
            "embed", "tb", MemoryError("cannot allocate")
        ).as_instanceof_cause(),
        "task_error",
        "device_oom",
        id="memory-error-in-embed",
    ),
    pytest.param(lambda e: e.ObjectLostError("ab" * 14, None, ""), "lost", None, id="result-lost"),
]


@pytest.mark.ray
@pytest.mark.parametrize(("make", "failure", "kind"), FAILURES)
def test_failure_of_is_by_type(
    make: Callable[[Any], BaseException], failure: str, kind: str | None
) -> None:
    import ray

    exc = make(ray.exceptions)
    assert failure_of(exc, ray) == failure
    if kind is not None:
        assert str(task_error_kind(exc)) == kind


# --- on the local Ray cluster ----------------------------------------------------------


@pytest.mark.ray
def test_fake_engine_output_equals_local(ray_cluster: ModuleType) -> None:
    spec = FakeEngineSpec(dim=24)
    batches = make_batches(make_sequences(300, seed=1), 16)
    events: list[Event] = []
    with RayExecutor(spec, actors=2, on_event=events.append) as ex:
        assert ex.dim == 24
        # the executor starts work on its first ready actor; here both are wanted
        wait_until(
            lambda: [w.state for w in ex.stats().workers] == ["idle", "idle"],
            "both actors ready",
            timeout=DEADLINE_S,
        )
        got = collect(lambda: ex.run(batches))
    assert_same(got, local_reference(spec, batches))
    assert all(not r.failed for r in got.values())
    assert [e["event"] for e in events].count("worker_ready") == 2
    assert not [
        e for e in events if e["event"] in ("worker_death", "retry", "split", "poison_item")
    ]
    assert all(e["backend"] == "ray" for e in events)


@pytest.mark.ray
def test_killing_an_actor_mid_job_loses_nothing(ray_cluster: ModuleType) -> None:
    spec = FakeEngineSpec(dim=16, delay_per_batch_s=0.03)
    batches = make_batches(make_sequences(240, seed=2), 4)  # 60 batches, ~1 s on 2 actors
    events: list[Event] = []
    got: dict[int, BatchResult] = {}
    with RayExecutor(spec, actors=2, on_event=events.append) as ex:
        wait_until(
            lambda: [w.state for w in ex.stats().workers] == ["idle", "idle"],
            "both actors ready",
            timeout=DEADLINE_S,
        )  # a death, not a failed start
        victim = ex.handles[0]
        end = time.monotonic() + DEADLINE_S
        for res in ex.run(batches):
            got[res.batch_id] = res
            if len(got) == 3:
                ray_cluster.kill(victim)  # a real actor death, mid-job
            assert time.monotonic() < end
        assert victim not in ex.handles and len(ex.handles) == 2
    deaths = [e for e in events if e["event"] == "worker_death"]
    # One kill, one death; on a badly overloaded machine Ray may also report a slow actor as
    # unavailable (ActorUnavailableError), which embedpool treats as a death too.
    assert len(deaths) >= 1 and "ActorDied" in deaths[0]["error"], deaths
    assert_same(got, local_reference(spec, batches))
    assert all(not r.failed for r in got.values())


@pytest.mark.ray
def test_poison_input_is_one_per_item_error(ray_cluster: ModuleType) -> None:
    spec = FakeEngineSpec(dim=16, crash_on=POISON)
    seqs = make_sequences(64, seed=3)
    seqs[13] = np.concatenate([seqs[13][:3], POISON, seqs[13][3:]]).astype(np.int32)
    batches = make_batches(seqs, 4)  # the poison sits at row 1 of batch 3
    events: list[Event] = []
    with RayExecutor(
        spec, actors=2, policy=FaultPolicy(max_retries=1), on_event=events.append
    ) as ex:
        got = collect(lambda: ex.run(batches))
    failed = {(bid, pos): msg for bid, r in got.items() for pos, msg in r.failed.items()}
    assert list(failed) == [(3, 1)]
    assert "'item-13'" in failed[(3, 1)] and "died while embedding it 2 times" in failed[(3, 1)]
    assert [e["item_id"] for e in events if e["event"] == "poison_item"] == ["item-13"]
    # 4 -> 2 -> 1 rows, then one try and max_retries=1 retry of the single row
    # (>=: see the kill test about ActorUnavailableError under heavy load)
    deaths = [e for e in events if e["event"] == "worker_death"]
    assert len(deaths) >= 4, deaths
    assert sum(e["event"] == "split" and "ActorDied" in e["reason"] for e in events) >= 2
    assert np.all(got[3].vectors[1] == 0)
    want = local_reference(FakeEngineSpec(dim=16), batches)
    assert_same(got, want, skip=frozenset({(3, 1)}))


@pytest.mark.ray
def test_input_that_raises_is_isolated_without_killing_actors(ray_cluster: ModuleType) -> None:
    spec = FakeEngineSpec(dim=8, raise_on=POISON)
    seqs = make_sequences(16, seed=4)
    seqs[2] = np.concatenate([POISON, seqs[2]]).astype(np.int32)
    events: list[Event] = []
    with RayExecutor(
        spec, actors=1, policy=FaultPolicy(max_retries=0), on_event=events.append
    ) as ex:
        got = collect(lambda: ex.run(make_batches(seqs, 4)))
    assert {(b, p) for b, r in got.items() for p in r.failed} == {(0, 2)}
    assert "raised in the engine" in got[0].failed[2] and "ValueError" in got[0].failed[2]
    assert not [e for e in events if e["event"] == "worker_death"]


@pytest.mark.ray
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (FakeEngineSpec(fail_to_start="no such model here"), "no such model here"),
        (FakeEngineSpec(exit_on_start=3), "failed while loading its engine"),
    ],
    ids=["raises", "exits"],
)
def test_actor_that_cannot_start_is_reported(
    ray_cluster: ModuleType, spec: FakeEngineSpec, match: str
) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match=match):
        RayExecutor(spec, actors=1)
    assert time.monotonic() - started < 60  # reported from the error, not a timeout


@pytest.mark.ray
def test_actor_range_grows_while_work_waits(ray_cluster: ModuleType) -> None:
    spec = FakeEngineSpec(dim=8, delay_per_batch_s=0.05)
    batches = make_batches(make_sequences(200, seed=5), 2)  # 100 batches, ~5 s on one actor
    events: list[Event] = []
    with RayExecutor(spec, actors=(1, 2), on_event=events.append) as ex:
        got = collect(lambda: ex.run(batches))
        assert len(ex.handles) == 2
    assert len(got) == len(batches)
    assert sum(e["event"] == "worker_ready" for e in events) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_real_model_output_equals_local(ray_cluster: ModuleType) -> None:
    from embedpool.batching import plan_batches
    from embedpool.engine import EngineSpec
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    spec = EngineSpec(resolve_model(), "int8", 1)
    texts = [f"def f{i}(x):\n    return x * {i} + {'y' * (i % 40)}" for i in range(96)]
    seqs = TextTokenizer(spec.model.tokenizer_path, spec.model.max_length).encode(texts).sequences
    batches = [
        WorkBatch(n, tuple(seqs[i] for i in b.indices), tuple(str(i) for i in b.indices))
        for n, b in enumerate(plan_batches([len(s) for s in seqs], 512))
    ]
    events: list[Event] = []
    with RayExecutor(spec, actors=2, on_event=events.append) as ex:
        assert ex.dim == spec.model.dim
        got = collect(lambda: ex.run(batches))
    assert_same(got, local_reference(spec, batches))
    sources = [e["model_source"] for e in events if e["event"] == "worker_ready"]
    assert len(sources) == 2, sources  # one per actor, each from a place the shipment knows
    assert set(sources) <= {"driver path", "node cache", "object store"}


@pytest.mark.ray
@pytest.mark.slow
def test_prompt_lengths_reach_the_actors(ray_cluster: ModuleType, tmp_path: Any) -> None:
    """include_prompt=false on Ray: batches mixing several prompts (a conformance case with
    sentence-transformers' golden vectors) leave each sequence's own prompt out."""
    import conformance as C

    from embedpool.engine import EngineSpec
    from embedpool.models import resolve_model

    model = resolve_model(C.materialise("include-prompt-false-modes", tmp_path))
    batches = C.mixed_prompt_batches("include-prompt-false-modes", model)
    with RayExecutor(EngineSpec(model, "fp32", 1), actors=1) as ex:
        got = collect(lambda: ex.run([b for b, _ in batches]))
    for batch, want in batches:
        assert not got[batch.batch_id].failed
        assert C.cosines(got[batch.batch_id].vectors, want).min() >= 0.9999
