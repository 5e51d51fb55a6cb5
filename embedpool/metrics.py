"""Prometheus metrics for the server, on a registry owned by one app (never the global one).

Two kinds of metric live here:

* *event* metrics the server updates as things happen (requests by status, latency, batch
  tokens, rejections, truncations, cache hits and misses);
* *readings* taken at scrape time from the batcher and the pool (queue depth, in-flight
  batches, workers, RSS, OOM kills, retries), through a custom collector, so the numbers are
  never stale and nothing polls in the background.

The pool's ``stats()`` (``PoolStats``) is read with ``stats_dict``; the fields used are listed
in ``POOL_READINGS``, and any field missing reads as 0 so that every metric name is always
exported (dashboards and alerts do not break on an executor that lacks one).

``prometheus_client`` is imported here only; ``import embedpool`` does not load it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedpool.microbatcher import BatcherStats, stats_dict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets (s): from one short text on a warm pool (~5 ms) to a 2,048-item request
#: on a busy 2-core machine (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Batch-token buckets: padded tokens per batch, up to a few times the default 2,048 budget.
BATCH_TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

#: (metric name, kind, help, ``PoolStats`` fields summed). An executor without a field reads 0.
POOL_READINGS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "embedpool_oom_kills",
        "counter",
        "Workers OOM-killed, confirmed by their cgroup's oom_kill counter or Ray's OutOfMemoryError",
        ("oom_kills",),
    ),
    (
        "embedpool_external_sigkills",
        "counter",
        "Workers SIGKILLed from outside with no evidence of the OOM killer",
        ("external_sigkills",),
    ),
    # A split after an OOM kill is a retry too, in two halves.
    (
        "embedpool_batch_retries",
        "counter",
        "Batch retries after a worker died (whole or split)",
        ("retries", "splits"),
    ),
    (
        "embedpool_worker_deaths",
        "counter",
        "Workers that died without being asked to leave",
        ("deaths",),
    ),
    (
        "embedpool_hung_kills",
        "counter",
        "Workers killed for exceeding their batch deadline",
        ("hung_kills",),
    ),
    (
        "embedpool_poison_inputs",
        "counter",
        "Inputs given up on after killing workers",
        ("poison_items",),
    ),
    (
        "embedpool_worker_recycles",
        "counter",
        "Workers replaced because their memory grew",
        ("recycles",),
    ),
    (
        "embedpool_worker_start_failures",
        "counter",
        "Replacement workers (or Ray actors) that failed while loading their engine",
        ("start_failures",),
    ),
    (
        "embedpool_target_workers",
        "gauge",
        "Workers the scaling policy wants now",
        ("target_workers",),
    ),
    (
        "embedpool_max_workers",
        "gauge",
        "Most workers (or Ray actors) the executor may run",
        ("max_workers",),
    ),
    (
        "embedpool_executor_queued_batches",
        "gauge",
        "Batches in the executor's own queue, not yet on a worker",
        ("queued",),
    ),
    (
        "embedpool_pool_batch_tokens",
        "gauge",
        "The pool's current padded-token budget per task",
        ("batch_tokens",),
    ),
    (
        "embedpool_pool_emergency",
        "gauge",
        "1 while the pool runs in single-worker emergency mode",
        ("emergency",),
    ),
)


def _number(stats: dict[str, Any], keys: tuple[str, ...]) -> float:
    total = 0.0
    for key in keys:
        value = stats.get(key)
        if isinstance(value, bool | int | float):
            total += float(value)
    return total


def worker_readings(stats: dict[str, Any]) -> tuple[dict[str, int], float]:
    """(workers by state, total worker RSS in bytes) from a pool's stats.

    ``workers`` is either a count (the in-process executor) or a sequence of per-worker records
    with ``state`` and ``rss`` (``PoolStats.workers``).
    """
    workers = stats.get("workers")
    if isinstance(workers, int) and not isinstance(workers, bool):
        return {"idle": workers}, float(stats.get("rss_bytes", 0) or 0)
    by_state: dict[str, int] = {}
    rss = 0.0
    if isinstance(workers, list | tuple):
        for w in workers:
            state = str(getattr(w, "state", "unknown"))
            by_state[state] = by_state.get(state, 0) + 1
            rss += float(getattr(w, "rss", 0) or 0)
    return by_state, rss


@dataclass(frozen=True)
class ModelReadings:
    """One served model's readings at scrape time (``registry.Member.readings``)."""

    name: str
    state: str  # loaded, loading, unloaded, unloading
    batcher: BatcherStats | None
    pool: dict[str, Any]  # ``stats_dict`` of its running pool's stats ({}: none running)
    closed: dict[str, float]  # the counters of its pools already closed, by metric name


def pool_counters(stats: dict[str, Any]) -> dict[str, float]:
    """The counter readings (``POOL_READINGS`` of kind counter) of one pool's stats."""
    return {
        name: _number(stats, keys) for name, kind, _, keys in POOL_READINGS if kind == "counter"
    }


#: Gauges whose server-wide (unlabelled) value is the largest model's, not the sum.
_MAX_GAUGES = frozenset(
    {"embedpool_pool_broken", "embedpool_pool_batch_tokens", "embedpool_pool_emergency"}
)
_WORKER_STATES = ("starting", "idle", "busy", "leaving")


#: The per-model twin of a reading: ``embedpool_queue_tokens`` -> ``embedpool_model_queue_tokens``.
def _per_model(name: str) -> str:
    return name.replace("embedpool_", "embedpool_model_", 1)


def _batcher_values(b: BatcherStats | None) -> dict[str, float]:
    return {
        "embedpool_queue_tokens": b.queued_tokens if b else 0,
        "embedpool_queue_sequences": b.pending_sequences if b else 0,
        "embedpool_inflight_batches": b.inflight_batches if b else 0,
        "embedpool_throughput_tokens_per_second": b.tokens_per_s if b else 0.0,
        "embedpool_pool_broken": 1 if b and b.broken else 0,
    }


_BATCHER_DOCS = {
    "embedpool_queue_tokens": "Tokens admitted and not yet embedded (pending + in flight)",
    "embedpool_queue_sequences": "Sequences waiting in the batcher for a batch",
    "embedpool_inflight_batches": "Batches submitted to the pool",
    "embedpool_throughput_tokens_per_second": "Tokens embedded per second over the last few "
    "seconds",
    "embedpool_pool_broken": "1 when the worker pool is broken",
}


class _ReadingsCollector(Collector):
    """Reads the batchers and the pools at scrape time: the server's values (unlabelled: the
    sum over its models, the largest for a state or a budget) and, once the app names its
    models (:meth:`ServerMetrics.set_models`), each model's under ``embedpool_model_*`` with
    a ``model`` label (every served model; one not loaded reads 0, its closed pools'
    counters kept)."""

    def __init__(
        self, batcher_stats: Callable[[], BatcherStats | None], pool_stats: Callable[[], Any]
    ) -> None:
        self._batcher_stats = batcher_stats
        self._pool_stats = pool_stats
        self.models: Callable[[], list[ModelReadings]] | None = None

    def _sources(self) -> list[ModelReadings]:
        if self.models is not None:
            return self.models()
        try:
            stats = stats_dict(self._pool_stats())
        except Exception:  # a scrape must not fail because the pool is closing
            stats = {}
        return [ModelReadings("", "loaded", self._batcher_stats(), stats, {})]

    def collect(self) -> Iterable[Metric]:
        sources = self._sources()
        labelled = self.models is not None
        per_batcher = [(m.name, _batcher_values(m.batcher)) for m in sources]
        for name, doc in _BATCHER_DOCS.items():
            each = [v[name] for _, v in per_batcher]
            total = max(each, default=0) if name in _MAX_GAUGES else sum(each)
            yield GaugeMetricFamily(name, doc, value=total)
            if labelled:
                twin = GaugeMetricFamily(_per_model(name), f"{doc}, by model", labels=["model"])
                for model, values in per_batcher:
                    twin.add_metric([model], values[name])
                yield twin
        info = GaugeMetricFamily(
            "embedpool_executor_info",
            "Where batches run: in-process, pool (local workers) or ray (Ray actors)",
            labels=["backend"],
        )
        for backend in dict.fromkeys(m.pool.get("backend") for m in sources):
            if isinstance(backend, str):
                info.add_metric([backend], 1)
        yield info
        readings = [(m.name, *worker_readings(m.pool)) for m in sources]
        workers = GaugeMetricFamily("embedpool_workers", "Pool workers by state", labels=["state"])
        by_model = GaugeMetricFamily(
            "embedpool_model_workers", "Pool workers by model and state", labels=["model", "state"]
        )
        totals = dict.fromkeys(_WORKER_STATES, 0)
        for model, by_state, _ in readings:
            for state, n in by_state.items():
                totals[state] = totals.get(state, 0) + n
            if labelled:
                for state in dict.fromkeys([*_WORKER_STATES, *by_state]):
                    by_model.add_metric([model, state], by_state.get(state, 0))
        for state, n in totals.items():
            workers.add_metric([state], n)
        yield workers
        if labelled:
            yield by_model
        rss_doc = "Resident memory of all pool workers together (Ray actors report none)"
        yield GaugeMetricFamily(
            "embedpool_workers_rss_bytes", rss_doc, value=sum(rss for _, _, rss in readings)
        )
        if labelled:
            rss = GaugeMetricFamily(
                "embedpool_model_workers_rss_bytes", f"{rss_doc}, by model", labels=["model"]
            )
            for model, _, r in readings:
                rss.add_metric([model], r)
            yield rss
        for name, kind, doc, keys in POOL_READINGS:
            series: list[tuple[str, float]]
            if kind == "counter":
                series = [
                    (m.name, m.closed.get(name, 0.0) + _number(m.pool, keys)) for m in sources
                ]
                yield CounterMetricFamily(name, doc, value=sum(x for _, x in series))
                family: CounterMetricFamily | GaugeMetricFamily = CounterMetricFamily(
                    _per_model(name), f"{doc}, by model", labels=["model"]
                )
            else:
                series = [(m.name, _number(m.pool, keys)) for m in sources]
                vs = [x for _, x in series]
                yield GaugeMetricFamily(
                    name, doc, value=max(vs, default=0.0) if name in _MAX_GAUGES else sum(vs)
                )
                family = GaugeMetricFamily(_per_model(name), f"{doc}, by model", labels=["model"])
            if labelled:
                for model, x in series:
                    family.add_metric([model], x)
                yield family
        if labelled:
            loaded = GaugeMetricFamily(
                "embedpool_model_loaded",
                "1 when the model is loaded (state: loaded, loading, unloaded, unloading)",
                labels=["model", "state"],
            )
            for m in sources:
                loaded.add_metric([m.name, m.state], 1.0 if m.state == "loaded" else 0.0)
            yield loaded
        yield GaugeMetricFamily(
            "embedpool_server_rss_bytes",
            "Resident memory of the server process",
            value=psutil.Process().memory_info().rss,
        )


class ServerMetrics:
    """All metrics of one app, on its own ``CollectorRegistry``."""

    def __init__(
        self, batcher_stats: Callable[[], BatcherStats | None], pool_stats: Callable[[], Any]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "embedpool_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "embedpool_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "embedpool_batch_tokens",
            "Padded tokens per batch sent to the pool",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.embedded_items = Counter("embedpool_embedded_items", "Inputs embedded", registry=r)
        self.embedded_tokens = Counter("embedpool_embedded_tokens", "Tokens embedded", registry=r)
        self.truncated_items = Counter(
            "embedpool_truncated_items", "Inputs cut to the model's maximum length", registry=r
        )
        self.rejected = Counter(
            "embedpool_rejected_requests",
            "Requests refused before embedding",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "embedpool_cache_hits", "Inputs answered from the vector cache", registry=r
        )
        self.cache_misses = Counter(
            "embedpool_cache_misses", "Inputs not in the vector cache", registry=r
        )
        self.reranked_pairs = Counter(
            "embedpool_reranked_pairs", "[query, document] pairs scored by the reranker", registry=r
        )
        self.reranked_tokens = Counter(
            "embedpool_reranked_tokens", "Tokens of the pairs scored by the reranker", registry=r
        )
        self.ready_probes = Counter(
            "embedpool_ready_probes",
            "Probe embeddings run for /ready (concurrent calls share one)",
            registry=r,
        )
        self._readings = _ReadingsCollector(batcher_stats, pool_stats)
        r.register(self._readings)

    def set_models(self, models: Callable[[], list[ModelReadings]]) -> None:
        """Read every served model (``models()`` at each scrape) instead of the one
        ``batcher_stats``/``pool_stats``: the server's sums and each model's series."""
        self._readings.models = models

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
