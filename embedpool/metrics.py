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
    ("embedpool_oom_kills", "counter",
     "Workers OOM-killed, confirmed by their cgroup's oom_kill counter or Ray's OutOfMemoryError",
     ("oom_kills",)),
    ("embedpool_external_sigkills", "counter",
     "Workers SIGKILLed from outside with no evidence of the OOM killer", ("external_sigkills",)),
    # A split after an OOM kill is a retry too, in two halves.
    ("embedpool_batch_retries", "counter", "Batch retries after a worker died (whole or split)",
     ("retries", "splits")),
    ("embedpool_worker_deaths", "counter", "Workers that died without being asked to leave",
     ("deaths",)),
    ("embedpool_hung_kills", "counter", "Workers killed for exceeding their batch deadline",
     ("hung_kills",)),
    ("embedpool_poison_inputs", "counter", "Inputs given up on after killing workers",
     ("poison_items",)),
    ("embedpool_worker_recycles", "counter", "Workers replaced because their memory grew",
     ("recycles",)),
    ("embedpool_worker_start_failures", "counter",
     "Replacement workers (or Ray actors) that failed while loading their engine",
     ("start_failures",)),
    ("embedpool_target_workers", "gauge", "Workers the scaling policy wants now",
     ("target_workers",)),
    ("embedpool_max_workers", "gauge", "Most workers (or Ray actors) the executor may run",
     ("max_workers",)),
    ("embedpool_executor_queued_batches", "gauge",
     "Batches in the executor's own queue, not yet on a worker", ("queued",)),
    ("embedpool_pool_batch_tokens", "gauge", "The pool's current padded-token budget per task",
     ("batch_tokens",)),
    ("embedpool_pool_emergency", "gauge", "1 while the pool runs in single-worker emergency mode",
     ("emergency",)),
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


class _ReadingsCollector(Collector):
    """Reads the batcher and the pool at scrape time."""

    def __init__(self, batcher_stats: Callable[[], BatcherStats | None],
                 pool_stats: Callable[[], Any]) -> None:
        self._batcher_stats = batcher_stats
        self._pool_stats = pool_stats

    def collect(self) -> Iterable[Metric]:
        b = self._batcher_stats()
        yield GaugeMetricFamily("embedpool_queue_tokens",
                                "Tokens admitted and not yet embedded (pending + in flight)",
                                value=b.queued_tokens if b else 0)
        yield GaugeMetricFamily("embedpool_queue_sequences",
                                "Sequences waiting in the batcher for a batch",
                                value=b.pending_sequences if b else 0)
        yield GaugeMetricFamily("embedpool_inflight_batches", "Batches submitted to the pool",
                                value=b.inflight_batches if b else 0)
        yield GaugeMetricFamily("embedpool_throughput_tokens_per_second",
                                "Tokens embedded per second over the last few seconds",
                                value=b.tokens_per_s if b else 0.0)
        yield GaugeMetricFamily("embedpool_pool_broken", "1 when the worker pool is broken",
                                value=1 if b and b.broken else 0)
        try:
            stats = stats_dict(self._pool_stats())
        except Exception:  # a scrape must not fail because the pool is closing
            stats = {}
        backend = stats.get("backend")
        info = GaugeMetricFamily("embedpool_executor_info",
                                 "Where batches run: in-process, pool (local workers) or ray "
                                 "(Ray actors)", labels=["backend"])
        if isinstance(backend, str):
            info.add_metric([backend], 1)
        yield info
        by_state, rss = worker_readings(stats)
        workers = GaugeMetricFamily("embedpool_workers", "Pool workers by state", labels=["state"])
        for state in ("starting", "idle", "busy", "leaving"):
            workers.add_metric([state], by_state.pop(state, 0))
        for state, n in by_state.items():
            workers.add_metric([state], n)
        yield workers
        yield GaugeMetricFamily("embedpool_workers_rss_bytes",
                                "Resident memory of all pool workers together (Ray actors report none)",
                                value=rss)
        for name, kind, doc, keys in POOL_READINGS:
            value = _number(stats, keys)
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("embedpool_server_rss_bytes", "Resident memory of the server process",
                                value=psutil.Process().memory_info().rss)


class ServerMetrics:
    """All metrics of one app, on its own ``CollectorRegistry``."""

    def __init__(self, batcher_stats: Callable[[], BatcherStats | None],
                 pool_stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("embedpool_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("embedpool_request_duration_seconds",
                                 "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Histogram("embedpool_batch_tokens", "Padded tokens per batch sent to the pool",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.embedded_items = Counter("embedpool_embedded_items", "Inputs embedded", registry=r)
        self.embedded_tokens = Counter("embedpool_embedded_tokens", "Tokens embedded", registry=r)
        self.truncated_items = Counter("embedpool_truncated_items",
                                       "Inputs cut to the model's maximum length", registry=r)
        self.rejected = Counter("embedpool_rejected_requests", "Requests refused before embedding",
                                ["reason"], registry=r)
        self.cache_hits = Counter("embedpool_cache_hits", "Inputs answered from the vector cache",
                                  registry=r)
        self.cache_misses = Counter("embedpool_cache_misses", "Inputs not in the vector cache",
                                    registry=r)
        self.reranked_pairs = Counter("embedpool_reranked_pairs",
                                      "[query, document] pairs scored by the reranker",
                                      registry=r)
        self.reranked_tokens = Counter("embedpool_reranked_tokens",
                                       "Tokens of the pairs scored by the reranker", registry=r)
        self.ready_probes = Counter("embedpool_ready_probes",
                                    "Probe embeddings run for /ready (concurrent calls share one)",
                                    registry=r)
        r.register(_ReadingsCollector(batcher_stats, pool_stats))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
