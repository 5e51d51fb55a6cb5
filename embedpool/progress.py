"""What a person or a log sees while a job runs: live progress, plain lines, JSON events.

- On a TTY: a ``rich.progress`` bar (done/total, percent, ETA, chunks/s, tokens/s, RSS of the
  whole process tree, workers) redrawn a few times per second; events print above it.
- Otherwise (a log file, CI): one plain line every ``PLAIN_INTERVAL_S`` on stderr, with the
  same numbers and the ETA in text.
- ``--log-json``: every event (progress, scale, worker_death, retry, split, emergency,
  recycle, status, graph_build/graph_built/graph_fallback) as one JSON object per line on
  stderr.

A first run's graph build (``graph.prebuild``) is never silent: ``BuildDisplay`` shows
"building the int8 graph for all-MiniLM-L6-v2 (first run only)" with a bar of its stages on a
TTY (the job's bar waits meanwhile: rich draws one live display at a time), a line when it
starts and one when it ends elsewhere, and the fp32 fallback's one line either way.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from embedpool.proc import rss_bytes
from embedpool.types import Event

#: Plain (non-TTY) progress cadence: often enough for a CI log, rare enough to stay readable.
PLAIN_INTERVAL_S = 5.0
#: Events worth a line for a person; the rest (ready, start, stop, status) go to --log-json.
SHOWN_EVENTS = frozenset(
    {
        "scale",
        "emergency",
        "worker_death",
        "retry",
        "split",
        "poison_item",
        "recycle",
        "worker_hung_warning",
        "worker_hung_kill",
        "pool_broken",
        "worker_start_failed",
        "device_fallback",
    }
)
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
        rss = rss_bytes(pid)  # /proc/<pid>/statm: one small read, no psutil object per sample
        if rss is not None:  # else gone since the tree was listed
            per[pid] = rss
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


class _Rss(ProgressColumn):
    """The process tree's RSS as last sampled by the tracker (read at each redraw)."""

    def __init__(self, tracker: RssTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def render(self, task: Task) -> Text:
        return Text(f"RSS {fmt_bytes(self.tracker.current)}")


def _bar(tracker: RssTracker, stream: TextIO) -> RichProgress:
    """The terminal display: rich computes the rate and the ETA from the completed counts."""
    return RichProgress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[chunks_per_s]:.1f} chunks/s"),
        TextColumn("{task.fields[tokens_per_s]:.0f} tokens/s"),
        _Rss(tracker),
        TextColumn("{task.fields[workers]}"),
        console=Console(file=stream),
        refresh_per_second=4,
        transient=True,
    )


GRAPH_EVENTS = frozenset({"graph_build", "graph_built", "graph_fallback"})


class BuildDisplay:
    """A graph build's events as a person sees them (see the module doc)."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty() if bar is None else bar
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    @property
    def active(self) -> bool:
        """Whether a build's bar is on screen."""
        return self._bar is not None

    def __call__(self, event: Event) -> None:
        kind = event.get("event")
        if kind == "graph_fallback":
            self._line(f"embedpool: {event.get('message', event.get('reason', ''))}")
        elif kind == "graph_build":
            stage, step, steps = event.get("stage", ""), event.get("step", 0), event.get("steps", 1)
            if self._bar is None and step == 0 and stage != "waiting":
                title = (
                    f"building the {event.get('precision')} graph for {event.get('model')} "
                    "(first run only)"
                )
                if self._tty:
                    self._bar = RichProgress(
                        SpinnerColumn(),
                        TextColumn("{task.description}"),
                        BarColumn(),
                        MofNCompleteColumn(),
                        TextColumn("{task.fields[stage]}"),
                        TimeElapsedColumn(),
                        console=Console(file=self.stream),
                        refresh_per_second=8,
                        transient=True,
                    )
                    self._task = self._bar.add_task(title, total=steps, stage="")
                    self._bar.start()
                else:
                    self._line(title)
            if stage == "waiting":
                self._line("waiting for another embedpool process building the same graph")
            if self._bar is not None and self._task is not None:
                self._bar.update(self._task, completed=step, stage=stage)
        elif kind == "graph_built":
            self.stop()
            verb = "built" if event.get("built", True) else "another process built"
            self._line(
                f"{verb} the {event.get('precision')} graph for {event.get('model')} in "
                f"{float(event.get('seconds', 0)):.1f} s (peak RSS "
                f"{fmt_bytes(int(event.get('peak_rss', 0)))}): {event.get('path')}"
            )

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


class Progress:
    """Turns events into a live progress bar, plain lines, or JSON lines."""

    def __init__(
        self,
        total: int,
        tracker: RssTracker,
        *,
        log_json: bool = False,
        quiet: bool = False,
        stream: TextIO | None = None,
    ) -> None:
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
        self._bar: RichProgress | None = None
        self._build = BuildDisplay(self.stream)
        if not quiet and not log_json and self.stream.isatty():
            self._bar = _bar(tracker, self.stream)
            self._task = self._bar.add_task("embedding", total=total, **self._fields())
            self._bar.start()

    def set_total(self, total: int) -> None:
        """The input's size, once a pre-count has it (the job does not wait for it)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.update(self._task, total=total)

    def _fields(self) -> dict[str, Any]:
        el = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "chunks_per_s": self.done / el,
            "tokens_per_s": self.tokens / el,
            "workers": f"workers {self.workers}" if self.workers is not None else "",
        }

    def line(self) -> str:
        """The plain progress line (logs, CI)."""
        el = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        workers = f"  workers {self.workers}" if self.workers is not None else ""
        rate = self.done / el
        eta = f"ETA {_clock((self.total - self.done) / rate)}" if rate > 0 else "ETA ?"
        return (
            f"{self.done}/{self.total} chunks ({pct:.0f}%)  {eta}  {rate:.1f} chunks/s  "
            f"{self.tokens / el:.0f} tokens/s  RSS {fmt_bytes(self.tracker.current)}{workers}"
        )

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
            if self.quiet and kind != "graph_fallback":
                return
            if kind in GRAPH_EVENTS:
                self._graph_event(event)
                return
            if kind in SHOWN_EVENTS:
                self.message(_describe(event))
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, **self._fields())
            elif time.perf_counter() - self._last_plain >= PLAIN_INTERVAL_S:
                self._last_plain = time.perf_counter()
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def _graph_event(self, event: Event) -> None:
        """A first run's build: the job's bar steps aside while the build's is shown."""
        if self._bar is not None and event.get("event") == "graph_build":
            self._bar.stop()
        self._build(event)
        if self._bar is not None and not self._build.active:
            self._bar.start()

    def message(self, text: str) -> None:
        if self._bar is not None:
            # Plain text: '[scale] ...' must not be read as rich markup (it vanished).
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._build.stop()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _clock(seconds: float) -> str:
    """h:mm:ss, as rich's ETA column shows it."""
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _describe(event: Event) -> str:
    kind = event.get("event", "event")
    if kind == "device_fallback":  # one line that says it all
        return f"[{kind}] {event.get('message', '')}"
    rest = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "ts"))
    return f"[{kind}] {rest}"
