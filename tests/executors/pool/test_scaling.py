"""The scaling policy, table-tested with no processes: plan(), predict(), decide(),
on_oom_kill(), on_batch_success(), and simulated runs through a memory hog and OOM storms."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embedpool.budget import MIN_BATCH_TOKENS
from embedpool.doctor import render_doctor
from embedpool.errors import ConfigError
from embedpool.executors.pool.machine import Limits, Reading
from embedpool.executors.pool.memory import SUPERVISOR_BASELINE
from embedpool.executors.pool.plan import ProfilePolicy, plan
from embedpool.executors.pool.scaling import (
    Decision,
    PolicyState,
    decide,
    on_batch_success,
    on_oom_kill,
    predict,
)
from embedpool.types import Profile

MiB = 1024 * 1024
GiB = 1024 * MiB


def limits(cpus: int = 2, memory: int = 24 * GiB, profile: Profile = "local") -> Limits:
    return Limits(
        cpus=cpus,
        cpus_source="test",
        memory_bytes=memory,
        memory_source="test",
        profile=profile,
        profile_source="test",
        host_cpus=cpus,
        host_memory_bytes=memory,
        root=Path("/"),
    )


def capped(cpus: int, memory: int, cap: int) -> Limits:
    """Limits with a --max-memory ``cap`` below the host's ``memory``."""
    return Limits(
        cpus=cpus,
        cpus_source="test",
        memory_bytes=cap,
        memory_source="--max-memory, counted against the pool's own RSS",
        profile="local",
        profile_source="test",
        host_cpus=cpus,
        host_memory_bytes=memory,
        system_memory_bytes=memory,
        system_memory_source="host",
        pool_memory_bytes=cap,
        root=Path("/"),
    )


# -- plan() ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    limits: Limits
    start: int
    max_workers: int
    threads: int
    kwargs: dict[str, object] = field(default_factory=dict)
    batch: int = 512
    reason: str | None = None


PLAN_ROWS = [
    pytest.param(PlanRow(limits(2, profile="cloud"), 2, 2, 1), id="cloud-2-cores-starts-full"),
    pytest.param(PlanRow(limits(2), 1, 2, 1), id="local-2-cores-starts-at-1"),
    pytest.param(PlanRow(limits(16), 1, 16, 1), id="local-16-cores"),
    pytest.param(
        PlanRow(limits(8, profile="wsl2"), 1, 2, 1, batch=256, reason="wsl2 profile's cap"),
        id="wsl2-caps-at-2",
    ),
    pytest.param(PlanRow(limits(1, profile="cloud"), 1, 1, 1), id="one-core"),
    pytest.param(PlanRow(limits(8), 1, 4, 2, {"threads": 2}), id="threads-2-on-8"),
    pytest.param(
        PlanRow(limits(2), 1, 1, 2, {"threads": 4}, reason="threads 4 capped at 2"),
        id="threads-above-cores-capped",
    ),
    pytest.param(
        PlanRow(limits(2), 1, 1, 2, {"workers": 1}, reason="fixed by --workers"),
        id="workers-1-gets-all-threads",
    ),
    pytest.param(
        PlanRow(limits(2), 2, 2, 1, {"workers": 4}, reason="workers 4 capped at 2"),
        id="workers-above-cores-capped",
    ),
    pytest.param(PlanRow(limits(8), 3, 3, 2, {"workers": 3}), id="workers-3-on-8-get-2-threads"),
    # (80% x 1024 - 150 supervisor) / (105 + 512 x 64 KiB = 137 MiB per int8 worker) = 4
    pytest.param(
        PlanRow(limits(16, GiB), 1, 4, 1, reason="137 MiB per int8 worker at 512 tokens"),
        id="memory-1GiB-bounds-workers",
    ),
    pytest.param(
        PlanRow(limits(16, 256 * MiB, "cloud"), 1, 1, 1, reason="not even one fits"),
        id="memory-256MiB-still-one-worker",
    ),
    # (1638 - 150) / (160 + 32 = 192 MiB per fp32 worker) = 7
    pytest.param(
        PlanRow(limits(16, 2 * GiB), 1, 7, 1, {"precision": "fp32"}, reason="192 MiB per fp32"),
        id="fp32-estimate",
    ),
    # smaller batches, smaller workers: (819 - 150) / (105 + 16) = 5
    pytest.param(
        PlanRow(limits(16, GiB), 1, 5, 1, {"batch_tokens": 256}, batch=256),
        id="memory-bound-follows-batch-budget",
    ),
    # (80% x 8 GiB - 5 GiB in use) / 137 = 10
    pytest.param(
        PlanRow(limits(16, 8 * GiB), 1, 10, 1, {"mem_used": 5 * GiB}, reason="in use"),
        id="memory-in-use-counts",
    ),
    # (85% x 8 GiB - 6 GiB in use) / 137 = 5
    pytest.param(
        PlanRow(limits(16, 8 * GiB, "cloud"), 5, 5, 1, {"mem_used": 6 * GiB}),
        id="cloud-starts-at-memory-bound",
    ),
    pytest.param(
        PlanRow(limits(2), 1, 2, 1, {"batch_tokens": 1024}, batch=1024, reason="as requested"),
        id="batch-tokens-explicit",
    ),
    pytest.param(
        PlanRow(limits(2), 1, 2, 1, {"batch_tokens": 100}, batch=100), id="batch-below-min"
    ),
    # --max-memory 1G on a 16 GiB host with 12 GiB in use: the cap counts the pool's own RSS,
    # (80% x 1024 - 150) / 137 = 4, not "host usage above the cap: 1 worker"
    pytest.param(
        PlanRow(
            capped(16, 16 * GiB, GiB),
            1,
            4,
            1,
            {"mem_used": 12 * GiB},
            reason="counted against the pool's own RSS",
        ),
        id="max-memory-counts-the-pool-not-the-host",
    ),
    # ... but the real limit still binds when it is the tighter one: (0.8 x 16 - 15.5) GiB < 0
    pytest.param(
        PlanRow(
            capped(16, 16 * GiB, 4 * GiB),
            1,
            1,
            1,
            {"mem_used": 15 * GiB + GiB // 2},
            reason="[host] - 15.5 GiB in use",
        ),
        id="max-memory-real-limit-still-binds",
    ),
    # ((80% x 2048 = 1638) - 600 used by the pool) / 137 = 7
    pytest.param(
        PlanRow(
            capped(16, 16 * GiB, 2 * GiB),
            1,
            7,
            1,
            {"mem_used": GiB, "pool_used": 600 * MiB},
            reason="600 MiB in use",
        ),
        id="max-memory-pool-usage-counts",
    ),
]


@pytest.mark.parametrize("row", PLAN_ROWS)
def test_plan(row: PlanRow) -> None:
    p = plan(row.limits, **row.kwargs)  # type: ignore[arg-type]
    pol = p.policy
    assert (pol.start_workers, pol.max_workers, pol.threads_per_worker) == (
        row.start,
        row.max_workers,
        row.threads,
    )
    assert pol.max_workers * pol.threads_per_worker <= row.limits.cpus
    assert pol.batch_tokens == row.batch
    assert pol.min_batch_tokens == min(MIN_BATCH_TOKENS, row.batch)
    assert pol.cpus == row.limits.cpus
    assert p.reasons[0].startswith(f"profile {row.limits.profile}")
    if row.reason is not None:
        assert any(row.reason in r for r in p.reasons), p.reasons


@pytest.mark.parametrize("cpus", [1, 2, 3, 7, 16, 64])
@pytest.mark.parametrize("profile", ["cloud", "local", "wsl2"])
@pytest.mark.parametrize("workers", [None, 1, 5, 100])
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_plan_never_oversubscribes(
    cpus: int, profile: Profile, workers: int | None, threads: int | None
) -> None:
    pol = plan(limits(cpus, profile=profile), workers=workers, threads=threads).policy
    assert pol.max_workers * pol.threads_per_worker <= cpus
    assert 1 <= pol.start_workers <= pol.max_workers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"workers": 0}, "workers must be >= 1", id="workers-0"),
        pytest.param({"threads": 0}, "threads must be >= 1", id="threads-0"),
        pytest.param({"batch_tokens": 0}, "batch_tokens must be >= 1", id="batch-0"),
    ],
)
def test_plan_rejects(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan(limits(), **kwargs)  # type: ignore[arg-type]


def test_profile_thresholds_keep_their_order() -> None:
    stops = {
        prof: plan(limits(profile=prof)).policy.mem_stop for prof in ("cloud", "local", "wsl2")
    }
    assert stops["wsl2"] < stops["local"] < stops["cloud"]


def test_plan_without_a_reading_counts_the_supervisor_baseline() -> None:
    """Without the memory in use, plan() reserves SUPERVISOR_BASELINE: on a memory-bound
    1 GiB machine that is one worker fewer than with nothing in use."""
    lim = limits(16, GiB)
    assumed = plan(lim).policy.max_workers
    assert plan(lim, mem_used=SUPERVISOR_BASELINE).policy.max_workers == assumed
    assert plan(lim, mem_used=0).policy.max_workers == assumed + 1


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        pytest.param({"start_workers": 5}, "start_workers", id="start-above-max"),
        pytest.param({"mem_resume": 0.9}, "mem_resume < mem_stop", id="resume-above-stop"),
        pytest.param({"cpu_stop": 1.5}, "cpu_stop", id="cpu-stop-above-1"),
        pytest.param({"min_batch_tokens": 4096}, "min_batch_tokens", id="min-batch-above-batch"),
        pytest.param({"threads_per_worker": 0}, "threads_per_worker", id="threads-0"),
    ],
)
def test_policy_validation(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(POLICY, **changes)  # type: ignore[arg-type]


def test_doctor_shows_a_max_memory_cap_beside_the_real_limit() -> None:
    lim = capped(16, 16 * GiB, GiB)
    text = render_doctor(lim, plan(lim, mem_used=12 * GiB), mem_used=12 * GiB)
    assert "16.0 GiB limit  (source: host" in text
    assert "12.0 GiB (75% of the limit, all programs" in text
    assert "pool cap    1.0 GiB for embedpool's own RSS" in text


def test_doctor_renders_every_number() -> None:
    lim = dataclasses.replace(limits(2, 512 * MiB), notes=("EMBEDPOOL_CPUS=8 ignored",))
    p = plan(lim)
    text = render_doctor(lim, p, mem_used=128 * MiB)
    for needle in (
        "2 usable",
        "source: test",
        "512.0 MiB limit",
        "profile     local",
        f"at most {p.policy.max_workers} x 1",
        "512 padded tokens",
        "80%",
        "70%",
        "69%",
        "59%",
        "128.0 MiB (25%",
        "EMBEDPOOL_CPUS=8 ignored",
        *p.reasons,
    ):
        assert needle in text, needle


# -- predict() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "steps", "expected"),
    [
        pytest.param([], 2, 0.0, id="empty"),
        pytest.param([0.4], 2, 0.4, id="one-value"),
        pytest.param([0.5, 0.5, 0.5], 2, 0.5, id="flat"),
        pytest.param([0.1, 0.2, 0.3], 2, 0.5, id="rising"),
        pytest.param([0.9, 0.8, 0.7], 2, 0.5, id="falling"),
        pytest.param([0.5, 0.6, 0.5, 0.6], 2, 0.64, id="noise-is-damped"),
        pytest.param([1.0, 3.0], 1, 5.0, id="one-step"),
    ],
)
def test_predict(values: list[float], steps: int, expected: float) -> None:
    assert predict(values, steps) == pytest.approx(expected)


# -- decide() ----------------------------------------------------------------------------------

#: 4 usable cores, 1 GiB; memory stop 80% / resume 70%, others' CPU stop 69% / resume 59%.
POLICY = ProfilePolicy(
    start_workers=1,
    max_workers=4,
    mem_stop=0.80,
    mem_resume=0.70,
    cpu_stop=0.69,
    cpu_resume=0.59,
    threads_per_worker=1,
    batch_tokens=2048,
    min_batch_tokens=256,
    emergency_exit_s=10.0,
    worker_mem_estimate=120 * MiB,
    cpus=4,
    settle_readings=3,
    plateau_gain=1.05,
    reprobe_s=60.0,
)


def r(
    mem: float = 0.30,
    cpu: float = 10.0,
    pool: float = 0.0,
    queue: int = 10,
    workers: int = 1,
    thr: float = 30.0,
    rss: int | None = 100 * MiB,
    ts: float = 0.0,
) -> Reading:
    """One reading against a 1 GiB limit; ``cpu`` is the whole busy share, ``pool`` ours."""
    return Reading(
        ts=ts,
        cpu_percent=cpu,
        mem_used=int(mem * GiB),
        mem_limit=GiB,
        worker_rss=() if rss is None else (rss,) * workers,
        queue_depth=queue,
        workers=workers,
        throughput=thr,
        pool_cpu_percent=pool,
    )


def steady(n: int = 3, **kw: float | None) -> list[Reading]:
    return [r(ts=float(i), **kw) for i in range(n)]  # type: ignore[arg-type]


def series(key: str, values: Sequence[float], **kw: float | None) -> list[Reading]:
    return [r(ts=float(i), **{key: v}, **kw) for i, v in enumerate(values)]  # type: ignore[arg-type]


def st(workers: int = 1, batch: int = 2048, **kw: object) -> PolicyState:
    return PolicyState.of(workers=workers, batch_tokens=batch, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    history: list[Reading]
    state: PolicyState
    action: str
    target: int
    reason: str
    now: float = 100.0
    batch: int | None = None  # expected budget; None = unchanged
    emergency: bool | None = None  # expected; None = as before
    check: dict[str, object] = field(default_factory=dict)  # expected new-state fields
    policy: ProfilePolicy = POLICY


DECIDE_ROWS = [
    # -- growth
    pytest.param(Row(steady(), st(), "grow", 2, "grow 1 -> 2"), id="grow-when-all-gates-open"),
    pytest.param(Row(steady(queue=0), st(), "hold", 1, "queue empty"), id="hold-empty-queue"),
    pytest.param(Row(steady(workers=4), st(4), "hold", 4, "at max workers 4"), id="hold-at-max"),
    pytest.param(
        Row([r(workers=0), r(), r()], st(), "hold", 1, "settling"),
        id="hold-until-settled-3-readings",
    ),
    pytest.param(
        Row(steady(workers=1), st(2), "hold", 2, "settling at 2 workers (live 1)"),
        id="hold-while-new-worker-loads",
    ),
    pytest.param(
        Row(
            steady(), st(), "grow", 2, "grow", policy=dataclasses.replace(POLICY, settle_readings=1)
        ),
        id="settle-1-grows-at-once",
    ),
    # -- memory gates on growth
    pytest.param(
        Row(
            steady(mem=0.72), st(), "hold", 1, "one more worker (~100 MiB) would take memory to 82%"
        ),
        id="hold-one-more-worker-would-cross",
    ),
    pytest.param(
        Row(steady(mem=0.55, rss=300 * MiB), st(), "hold", 1, "one more worker (~300 MiB)"),
        id="hold-observed-rss-bigger-than-estimate",
    ),
    pytest.param(
        Row(steady(mem=0.69, rss=None), st(), "hold", 1, "one more worker (~120 MiB)"),
        id="hold-estimate-until-rss-observed",
    ),
    pytest.param(Row(steady(mem=0.60, rss=None), st(), "grow", 2, "grow"), id="grow-with-estimate"),
    pytest.param(
        Row(series("mem", [0.50, 0.55, 0.60, 0.62, 0.64]), st(), "hold", 1, "one more worker"),
        id="hold-predicted-usage-plus-worker-crosses",
    ),
    pytest.param(
        Row(steady(mem=0.75), st(mem_hot=True), "hold", 1, "not yet under 70%"),
        id="hysteresis-hold-between-resume-and-stop",
    ),
    pytest.param(
        Row(steady(mem=0.60), st(mem_hot=True), "grow", 2, "grow", check={"mem_hot": False}),
        id="hysteresis-released-below-resume",
    ),
    pytest.param(
        Row(
            steady(mem=0.75),
            st(mem_hot=False),
            "hold",
            1,
            "one more worker",
            check={"mem_hot": False},
        ),
        id="no-hysteresis-flag-without-crossing",
    ),
    # -- shrink before the limit
    pytest.param(
        Row(steady(mem=0.85, workers=3), st(3), "shrink", 2, "shrink 3 -> 2"), id="shrink-over-stop"
    ),
    pytest.param(
        Row(
            series("mem", [0.60, 0.66, 0.72], workers=2),
            st(2),
            "shrink",
            1,
            "heading over 80%",
            check={"mem_hot": True},
        ),
        id="shrink-on-predicted-memory",
    ),
    pytest.param(
        Row(series("mem", [0.95, 0.90, 0.85], workers=3), st(3), "shrink", 2, "shrink 3 -> 2"),
        id="shrink-even-when-falling-if-over-stop",
    ),
    pytest.param(
        Row(steady(mem=0.85, workers=3), st(2), "hold", 2, "still leaving"),
        id="one-shrink-at-a-time",
    ),
    pytest.param(
        Row(steady(mem=0.85), st(1), "hold", 1, "batch budget 2048 -> 1024", batch=1024),
        id="at-one-worker-halve-batch",
    ),
    pytest.param(
        Row(steady(mem=0.85), st(1, 256), "hold", 1, "smallest budget", batch=256),
        id="at-the-floor-hold",
    ),
    # -- CPU: only other programs' load gates growth
    pytest.param(
        Row(steady(cpu=100.0, pool=95.0, workers=1), st(), "grow", 2, "grow"),
        id="own-busy-workers-do-not-block",
    ),
    pytest.param(
        Row(
            steady(cpu=100.0, pool=20.0),
            st(),
            "hold",
            1,
            "other programs use 80% CPU",
            check={"cpu_hot": True},
        ),
        id="others-cpu-over-stop",
    ),
    pytest.param(
        Row(steady(cpu=65.0), st(cpu_hot=True), "hold", 1, "other programs"),
        id="cpu-hysteresis-holds",
    ),
    pytest.param(
        Row(steady(cpu=45.0), st(cpu_hot=True), "grow", 2, "grow", check={"cpu_hot": False}),
        id="cpu-hysteresis-released",
    ),
    pytest.param(
        Row(
            steady(cpu=40.0),
            st(),
            "hold",
            1,
            "no free core",
            policy=dataclasses.replace(POLICY, cpus=2),
        ),
        id="no-free-core-on-2-cpus",
    ),
    pytest.param(
        Row(
            steady(cpu=20.0, pool=0.0),
            st(),
            "grow",
            2,
            "grow",
            policy=dataclasses.replace(POLICY, cpus=2),
        ),
        id="free-core-on-2-cpus",
    ),
    pytest.param(
        Row(series("cpu", [10.0, 30.0, 50.0]), st(), "hold", 1, "predicted 90%"),
        id="others-cpu-predicted-over-stop",
    ),
    pytest.param(
        Row(steady(cpu=100.0, pool=10.0, mem=0.5, workers=3), st(3), "hold", 3, "other programs"),
        id="cpu-never-shrinks",
    ),
    # -- throughput
    pytest.param(
        Row(
            steady(workers=2, thr=31.0),
            st(2, best_throughput={1: 30.0}),
            "shrink",
            1,
            "throughput plateau, 2 workers did 31.0 seq/s, 1 did 30.0",
            check={"growth_blocked": True, "plateau_since": 100.0},
        ),
        id="plateau-gives-the-worker-back",
    ),
    pytest.param(
        Row(
            steady(workers=2, thr=31.0),
            st(2, best_throughput={1: 30.0}),
            "hold",
            2,
            "at max workers 2",
            policy=dataclasses.replace(POLICY, max_workers=2, start_workers=2, adaptive=False),
        ),
        id="fixed-worker-count-is-not-backed-off",
    ),
    pytest.param(
        Row(
            steady(workers=2, thr=55.0), st(2, best_throughput={1: 30.0}), "grow", 3, "grow 2 -> 3"
        ),
        id="throughput-rising-keeps-adding",
    ),
    pytest.param(
        Row(
            steady(workers=2, thr=20.0),
            st(2, best_throughput={1: 30.0}),
            "shrink",
            1,
            "throughput plateau",
            check={"growth_blocked": True},
        ),
        id="slower-with-more-backs-off",
    ),
    pytest.param(
        Row(
            steady(workers=1),
            st(1, best_throughput={1: 30.0, 2: 20.0}),
            "hold",
            1,
            "throughput plateau: 2 workers",
        ),
        id="after-back-off-stays",
    ),
    pytest.param(
        Row(
            steady(workers=1),
            st(1, best_throughput={1: 30.0, 2: 20.0}, plateau_since=30.0),
            "grow",
            2,
            "grow",
            now=100.0,
            check={"best_throughput": {1: 30.0}},
        ),
        id="plateau-reprobed-after-60s",
    ),
    pytest.param(
        Row(steady(workers=1), st(1, best_throughput={1: 30.0, 2: 60.0}), "grow", 2, "grow"),
        id="known-good-count-regrows",
    ),
    pytest.param(
        Row(
            steady(workers=2, thr=31.0, queue=0),
            st(2, best_throughput={1: 30.0}),
            "hold",
            2,
            "queue empty",
            check={"best_throughput": {1: 30.0}},
        ),
        id="no-learning-from-a-starved-queue",
    ),
    pytest.param(
        Row(
            steady(workers=2, thr=40.0),
            st(2, best_throughput={1: 20.0, 2: 20.0}),
            "grow",
            3,
            "grow",
            check={"best_throughput": {1: 20.0, 2: 30.0}},
        ),
        id="throughput-is-smoothed",
    ),
    # -- emergency
    pytest.param(
        Row(
            steady(mem=0.75),
            st(1, 256, emergency=True),
            "hold",
            1,
            "emergency mode: holding",
            emergency=True,
            check={"calm_since": None},
        ),
        id="emergency-holds-one-worker",
    ),
    pytest.param(
        Row(
            steady(mem=0.50),
            st(1, 256, emergency=True),
            "hold",
            1,
            "emergency mode",
            emergency=True,
            check={"calm_since": 100.0},
        ),
        id="emergency-calm-starts",
    ),
    pytest.param(
        Row(
            steady(mem=0.50),
            st(1, 256, emergency=True, calm_since=95.0),
            "hold",
            1,
            "calm for 5 s",
            emergency=True,
        ),
        id="emergency-not-calm-long-enough",
    ),
    pytest.param(
        Row(
            steady(mem=0.50),
            st(1, 256, emergency=True, calm_since=90.0, consecutive_oom=2),
            "hold",
            1,
            "emergency mode off",
            batch=256,
            emergency=False,
            check={"consecutive_oom": 0, "calm_since": 100.0},
        ),
        id="emergency-left-after-calm",
    ),
    pytest.param(
        Row(
            steady(mem=0.75),
            st(1, 256, emergency=True, calm_since=50.0),
            "hold",
            1,
            "emergency mode",
            emergency=True,
            check={"calm_since": None},
        ),
        id="emergency-calm-broken",
    ),
    pytest.param(
        Row(
            steady(mem=0.50, workers=2),
            st(2, 2048, emergency=True),
            "hold",
            1,
            "emergency",
            batch=256,
        ),
        id="emergency-forces-one-worker-small-batches",
    ),
    pytest.param(
        Row(
            steady(workers=1, thr=5.0),
            st(1, 256, emergency=True, best_throughput={1: 30.0}),
            "hold",
            1,
            "emergency",
            check={"best_throughput": {1: 30.0}},
        ),
        id="emergency-throughput-not-learned",
    ),
    # -- batch budget restore
    pytest.param(
        Row(
            steady(workers=4),
            st(4, 512, calm_since=90.0),
            "hold",
            4,
            "batch budget 512 -> 1024",
            batch=1024,
            check={"calm_since": 100.0},
        ),
        id="budget-doubles-after-calm",
    ),
    pytest.param(
        Row(steady(workers=4), st(4, 512, calm_since=95.0), "hold", 4, "at max", batch=512),
        id="budget-waits-for-calm",
    ),
    pytest.param(
        Row(steady(workers=4), st(4, 1536, calm_since=0.0), "hold", 4, "1536 -> 2048", batch=2048),
        id="budget-restores-to-plan-not-beyond",
    ),
    pytest.param(
        Row(
            steady(workers=4),
            st(4, 512, calm_since=90.0, oom_tokens=1024),
            "hold",
            4,
            "at max",
            batch=512,
        ),
        id="budget-not-restored-to-a-killed-size",
    ),
    pytest.param(
        Row(
            steady(workers=4),
            st(4, 256, calm_since=90.0, oom_tokens=1024),
            "hold",
            4,
            "batch budget 256 -> 512",
            batch=512,
        ),
        id="budget-restored-below-a-killed-size",
    ),
    # -- a fixed worker count (--workers N): back to N once memory allows, whatever the CPU
    pytest.param(
        Row(
            steady(cpu=100.0, pool=10.0),
            st(1),
            "grow",
            2,
            "grow 1 -> 2",
            policy=dataclasses.replace(
                POLICY, max_workers=2, start_workers=2, adaptive=False, cpus=2
            ),
        ),
        id="fixed-count-regrows-despite-others-cpu",
    ),
    pytest.param(
        Row(
            steady(),
            st(1, best_throughput={1: 30.0, 2: 20.0}),
            "grow",
            2,
            "grow 1 -> 2",
            policy=dataclasses.replace(POLICY, max_workers=2, start_workers=2, adaptive=False),
        ),
        id="fixed-count-regrows-despite-a-plateau",
    ),
    pytest.param(
        Row(
            steady(mem=0.75),
            st(1, mem_hot=True),
            "hold",
            1,
            "memory went over",
            policy=dataclasses.replace(POLICY, max_workers=2, start_workers=2, adaptive=False),
        ),
        id="fixed-count-still-waits-for-memory",
    ),
    pytest.param(Row([], st(), "hold", 1, "no readings"), id="no-readings"),
]


@pytest.mark.parametrize("row", DECIDE_ROWS)
def test_decide(row: Row) -> None:
    d = decide(row.history, row.state, row.policy, row.now)
    assert (d.action, d.target_workers) == (row.action, row.target), d.reason
    assert row.reason in d.reason, d.reason
    assert d.state.workers == d.target_workers and d.state.batch_tokens == d.batch_tokens
    assert d.batch_tokens == (row.state.batch_tokens if row.batch is None else row.batch)
    assert d.emergency == (row.state.emergency if row.emergency is None else row.emergency)
    assert d.emergency == d.state.emergency
    for name, value in row.check.items():
        assert getattr(d.state, name) == value, (name, d.state)


def test_decide_reason_gives_the_readings() -> None:
    d = decide(steady(mem=0.85, workers=3, cpu=30.0, pool=20.0, thr=42.0), st(3), POLICY, 1.0)
    assert "memory 85% (predicted 85%) of 1024 MiB" in d.reason
    assert "others' CPU 10%" in d.reason and "queue 10" in d.reason and "42.0 seq/s" in d.reason


# -- OOM kills -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "target", "batch", "emergency", "oom", "reason"),
    [
        pytest.param(
            st(3, 2048),
            3,
            1024,
            False,
            1,
            "OOM kill: batch budget 2048 -> 1024",
            id="first-kill-halves-budget",
        ),
        pytest.param(st(3, 256), 3, 256, False, 1, "256 -> 256", id="first-kill-at-min-budget"),
        pytest.param(
            st(3, 1024, consecutive_oom=1),
            1,
            256,
            True,
            2,
            "emergency mode on: 2 consecutive",
            id="second-kill-enters-emergency",
        ),
        pytest.param(
            st(1, 256, emergency=True, consecutive_oom=2),
            1,
            256,
            True,
            3,
            "3 consecutive",
            id="kill-in-emergency-stays",
        ),
    ],
)
def test_on_oom_kill(
    state: PolicyState, target: int, batch: int, emergency: bool, oom: int, reason: str
) -> None:
    d = on_oom_kill(state, POLICY, now=50.0)
    assert (d.target_workers, d.batch_tokens, d.emergency) == (target, batch, emergency)
    assert d.state.consecutive_oom == oom and d.state.last_oom_at == 50.0
    assert d.state.mem_hot  # growth waits for memory to fall under mem_resume
    assert reason in d.reason
    assert d.action == ("shrink" if target < state.workers else "hold")


@pytest.mark.parametrize(
    ("started_at", "resets"),
    [
        pytest.param(None, True, id="any-success-resets"),
        pytest.param(51.0, True, id="batch-started-after-the-kill-resets"),
        pytest.param(49.0, False, id="batch-already-running-does-not-reset"),
    ],
)
def test_batch_success_between_kills(started_at: float | None, resets: bool) -> None:
    first = on_oom_kill(st(2), POLICY, now=50.0)
    after = on_batch_success(first.state, started_at)
    assert after.consecutive_oom == (0 if resets else 1)
    second = on_oom_kill(after, POLICY, now=60.0)
    assert second.emergency is (not resets)
    assert on_batch_success(st()) == st()


@pytest.mark.parametrize(
    ("before", "killed", "after"),
    [
        pytest.param(None, 1024, 1024, id="first-kill-records-its-size"),
        pytest.param(1024, 512, 512, id="smaller-kill-lowers-the-cap"),
        pytest.param(512, 1024, 512, id="larger-kill-keeps-the-cap"),
        pytest.param(512, None, 512, id="single-item-death-not-recorded"),
    ],
)
def test_oom_kill_records_the_killed_size(
    before: int | None, killed: int | None, after: int | None
) -> None:
    d = on_oom_kill(st(2, 1024, oom_tokens=before), POLICY, now=50.0, killed_tokens=killed)
    assert d.state.oom_tokens == after


# -- simulated runs ------------------------------------------------------------------------------


@dataclass
class Sim:
    """A pool in a 1 GiB box: each worker 100 MiB, 30 seq/s up to ``cores`` workers (flat
    beyond), 200 MiB baseline, plus whatever ``hog`` holds. Decisions apply at once."""

    policy: ProfilePolicy
    cores: int = 4
    hog: int = 0
    state: PolicyState = field(init=False)
    history: list[Reading] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    t: float = 0.0

    def __post_init__(self) -> None:
        self.state = PolicyState.of(self.policy.start_workers, self.policy.batch_tokens)

    def step(self, n: int = 1, queue: int = 50) -> None:
        for _ in range(n):
            self.t += 1.0
            w = self.state.workers
            used = 200 * MiB + w * 100 * MiB + self.hog
            self.history.append(
                Reading(
                    ts=self.t,
                    cpu_percent=100.0 * min(w, self.cores) / self.cores,
                    mem_used=used,
                    mem_limit=GiB,
                    worker_rss=(100 * MiB,) * w,
                    queue_depth=queue,
                    workers=w,
                    throughput=30.0 * min(w, self.cores),
                    pool_cpu_percent=100.0 * min(w, self.cores) / self.cores,
                )
            )
            d = decide(self.history[-20:], self.state, self.policy, self.t)
            self.decisions.append(d)
            self.state = d.state

    def oom(self) -> None:
        d = on_oom_kill(self.state, self.policy, self.t)
        self.decisions.append(d)
        self.state = d.state


def test_sim_grows_to_the_plateau_not_beyond() -> None:
    sim = Sim(dataclasses.replace(POLICY, max_workers=6, cpus=8), cores=3)
    sim.step(60)
    # 3 workers saturate 3 "cores": the 4th is tried, brings nothing, and is given back.
    assert sim.state.workers == 3
    assert [d.action for d in sim.decisions].count("grow") == 3
    assert [d.action for d in sim.decisions].count("shrink") == 1
    assert any("throughput plateau" in d.reason for d in sim.decisions)


def test_sim_memory_hog_shrinks_then_grows_back() -> None:
    sim = Sim(POLICY)
    sim.step(30)
    assert sim.state.workers == 4  # 200 + 400 MiB = 59%: room for all four
    sim.hog = 300 * MiB  # now 88%: over the 80% stop
    sim.step(30)
    # 200 + 300 hog + 4 x 100 = 88%, over the 80% stop: one worker goes; 3 workers = 78%
    # holds (below stop, and a 4th would take it back to 88%).
    assert sim.state.workers == 3
    shrinks = [d for d in sim.decisions if d.action == "shrink"]
    assert shrinks and all("memory" in d.reason for d in shrinks)
    sim.hog = 0
    sim.step(30)
    assert sim.state.workers == 4


def test_sim_oom_storm_enters_and_leaves_emergency() -> None:
    sim = Sim(POLICY)
    sim.step(30)
    assert sim.state.workers == 4
    sim.oom()
    sim.oom()
    assert sim.state.emergency and sim.state.workers == 1 and sim.state.batch_tokens == 256
    sim.step(5)
    assert sim.state.emergency  # calm, but not yet for emergency_exit_s
    sim.step(10)
    assert not sim.state.emergency
    assert any("emergency mode off" in d.reason for d in sim.decisions)
    sim.step(60)
    assert sim.state.workers == 4 and sim.state.batch_tokens == 2048
