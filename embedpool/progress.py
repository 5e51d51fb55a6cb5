"""What a person or a log sees while a job runs: live progress, plain lines, JSON events.

- On a TTY: a rich live line (chunks, chunks/s, tokens/s, RSS of the whole process tree,
  workers) redrawn a few times per second.
- Otherwise: one plain line every ``PLAIN_INTERVAL_S`` on stderr.
- ``--log-json``: every event (progress, scale, worker_death, retry, split, emergency,
  recycle, status) as one JSON object per line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, TextIO

import psutil

from embedpool.types import Event

#: Plain (non-TTY) progress cadence: often enough for a CI log, rare enough to stay readable.
PLAIN_INTERVAL_S = 5.0
#: Events worth a line for a person; the rest (ready, start, stop, status) go to --log-json.
SHOWN_EVENTS = frozenset({"scale", "emergency", "worker_death", "retry", "split", "poison_item",
                          "recycle", "worker_hung_warning", "worker_hung_kill", "pool_broken",
                          "worker_start_failed"})
#: RSS sampling period: fast enough to catch a batch's peak (batches take ~50-500 ms).
RSS_INTERVAL_S = 0.1
#: How often the tracker re-lists the process tree. Listing descendants makes psutil read
#: every /proc entry; doing that every 0.1 s took ~2.5% of a 2-core machine's CPU from the
#: embedding threads (py-spy, fp32 bench). A new worker is counted within this period.
TREE_REFRESH_S = 1.0


def _tree_pids() -> list[int]:
    me = psutil.Process()
    try:
        return [me.pid, *(p.pid for p in me.children(recursive=True))]
    except psutil.Error:
        return [me.pid]


def _rss_of(pids: list[int]) -> tuple[int, dict[int, int]]:
    per: dict[int, int] = {}
    for pid in pids:
        try:  # /proc/<pid>/statm: one small read, no psutil object per sample
            with open(f"/proc/{pid}/statm", "rb") as f:
                per[pid] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            try:
                per[pid] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue  # gone since the tree was listed
    return sum(per.values()), per


class RssTracker:
    """Samples the process tree's RSS in a daemon thread and keeps the peak."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S) -> None:
        self.peak = 0
        self.current = 0
        self._interval = interval_s
        self._pids: list[int] = []
        self._listed_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="embedpool-rss", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self, *, relist: bool = False) -> int:
        now = time.monotonic()
        if relist or now - self._listed_at >= TREE_REFRESH_S:
            self._pids, self._listed_at = _tree_pids(), now
        total, _ = _rss_of(self._pids)
        self.current = total
        self.peak = max(self.peak, total)
        return total

    def close(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample(relist=True)
        return self.peak


def fmt_bytes(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GB"
    return f"{n / 1024**2:.0f} MB"


class Progress:
    """Turns events into a live display, plain lines, or JSON lines."""

    def __init__(self, total: int, tracker: RssTracker, *, log_json: bool = False,
                 quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.tokens = 0
        self.workers: int | None = None
        self.tracker = tracker
        self.stream = stream or sys.stderr
        self.log_json = log_json
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._last_plain = self.t0
        self._lock = threading.Lock()
        self._live: Any = None
        if not quiet and not log_json and self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live("", console=Console(file=self.stream), refresh_per_second=4,
                              transient=True)
            self._live.start()

    def line(self) -> str:
        el = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        workers = f"  workers {self.workers}" if self.workers is not None else ""
        return (f"{self.done}/{self.total} chunks ({pct:.0f}%)  {self.done / el:.1f} chunks/s  "
                f"{self.tokens / el:.0f} tokens/s  RSS {fmt_bytes(self.tracker.current)}{workers}")

    def __call__(self, event: Event) -> None:
        with self._lock:
            kind = event.get("event")
            if kind == "progress":
                self.done = int(event.get("done", self.done))
                self.tokens += int(event.get("tokens", 0))
            if "workers" in event and isinstance(event["workers"], int):
                self.workers = event["workers"]
            if self.log_json:
                ev = {"ts": time.time(), **event}
                self.stream.write(json.dumps(ev, default=str) + "\n")
                self.stream.flush()
                return
            if self.quiet:
                return
            if kind in SHOWN_EVENTS:
                self.message(_describe(event))
            if self._live is not None:
                self._live.update(self.line())
            elif time.perf_counter() - self._last_plain >= PLAIN_INTERVAL_S:
                self._last_plain = time.perf_counter()
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def message(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _describe(event: Event) -> str:
    kind = event.get("event", "event")
    rest = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "ts"))
    return f"[{kind}] {rest}"
