"""embedpool.metrics: every metric is exported whatever the executor reports, readings are
taken at scrape time, and a scrape never fails because the pool is closing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedpool.metrics import POOL_READINGS, ServerMetrics, worker_readings
from embedpool.microbatcher import BatcherStats


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return _samples(metrics)[(name, tuple(sorted(labels.items())))]


@dataclass
class _Worker:
    state: str
    rss: int


@dataclass
class _PoolStats:
    workers: list[_Worker] = field(default_factory=list)
    oom_kills: int = 0
    retries: int = 0
    splits: int = 0
    target_workers: int = 0


def test_every_name_is_exported_with_nothing_running() -> None:
    metrics = ServerMetrics(lambda: None, lambda: None)
    names = {name for name, _ in _samples(metrics)}
    for name, kind, _, _ in POOL_READINGS:
        assert (f"{name}_total" if kind == "counter" else name) in names, name
    for name in (
        "embedpool_queue_tokens",
        "embedpool_inflight_batches",
        "embedpool_pool_broken",
        "embedpool_workers_rss_bytes",
        "embedpool_server_rss_bytes",
    ):
        assert name in names, name
    assert _value(metrics, "embedpool_workers", state="busy") == 0


def test_readings_are_taken_at_scrape_time() -> None:
    pool = _PoolStats(
        [_Worker("busy", 100), _Worker("idle", 50), _Worker("idle", 25)],
        oom_kills=1,
        retries=2,
        splits=3,
        target_workers=3,
    )
    batcher: list[BatcherStats | None] = [None]
    metrics = ServerMetrics(lambda: batcher[0], lambda: pool)
    assert _value(metrics, "embedpool_workers", state="idle") == 2
    assert _value(metrics, "embedpool_workers_rss_bytes") == 175
    assert _value(metrics, "embedpool_oom_kills_total") == 1
    assert _value(metrics, "embedpool_batch_retries_total") == 5  # retries + splits
    pool.oom_kills = 4
    batcher[0] = BatcherStats(900, 3, 2, 1500.0, 10, 1, "no workers")
    assert _value(metrics, "embedpool_oom_kills_total") == 4
    assert _value(metrics, "embedpool_queue_tokens") == 900
    assert _value(metrics, "embedpool_pool_broken") == 1


def test_a_failing_pool_reading_does_not_fail_the_scrape() -> None:
    def closing() -> Any:
        raise RuntimeError("pool closing")

    metrics = ServerMetrics(lambda: None, closing)
    assert _value(metrics, "embedpool_oom_kills_total") == 0


def test_requests_are_counted_by_route_and_status() -> None:
    metrics = ServerMetrics(lambda: None, lambda: None)
    metrics.observe_request("/v1/embeddings", 200, 0.01)
    metrics.observe_request("/v1/embeddings", 200, 0.02)
    metrics.observe_request("/v1/embeddings", 429, 0.001)
    assert _value(metrics, "embedpool_requests_total", route="/v1/embeddings", status="200") == 2
    assert _value(metrics, "embedpool_requests_total", route="/v1/embeddings", status="429") == 1
    assert _value(metrics, "embedpool_request_duration_seconds_count", route="/v1/embeddings") == 3


@pytest.mark.parametrize(
    ("stats", "by_state", "rss"),
    [
        ({"workers": 1, "rss_bytes": 10}, {"idle": 1}, 10.0),
        (
            {"workers": [_Worker("busy", 5), _Worker("starting", 0)]},
            {"busy": 1, "starting": 1},
            5.0,
        ),
        ({}, {}, 0.0),
    ],
    ids=["in-process-count", "pool-records", "nothing"],
)
def test_worker_readings(stats: dict[str, Any], by_state: dict[str, int], rss: float) -> None:
    assert worker_readings(stats) == (by_state, rss)
