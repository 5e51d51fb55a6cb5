"""embedpool.progress: the RSS tracker, and what a terminal, a log and --log-json see."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

import embedpool.progress as progress_module
from embedpool.progress import Progress, RssTracker

MiB = 1024 * 1024
CHILD_BYTES = 200 * MiB
_CHILD = (
    "import sys\n"
    f"block = b'x' * {CHILD_BYTES}  # written, so resident\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_tracker_counts_a_child_and_keeps_the_peak_after_it_exits() -> None:
    tracker = RssTracker(interval_s=0.05)
    alone = tracker.sample(relist=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with_child = tracker.sample(relist=True)
        assert with_child >= alone + CHILD_BYTES, (alone, with_child)
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    after = tracker.sample(relist=True)  # the exited child is no longer listed
    assert after < with_child - CHILD_BYTES // 2
    assert tracker.close() >= with_child


def _events(progress: Progress) -> None:
    progress({"event": "scale", "workers": 2})
    for done in (10, 20, 30):
        progress({"event": "progress", "done": done, "tokens": 1000})


def test_a_terminal_gets_a_bar_with_eta_rates_rss_and_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master, slave = pty.openpty()
    # 200 columns, so that every column fits on the bar's one line (rich sizes the console
    # from the standard streams or COLUMNS, not from the file it writes to).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    monkeypatch.setenv("COLUMNS", "200")
    tracker = RssTracker()
    try:
        with os.fdopen(slave, "w", encoding="utf-8") as tty:
            progress = Progress(100, tracker, stream=tty)
            _events(progress)
            progress.close()  # the final redraw, then the bar clears itself
        out = _drain(master)
    finally:
        os.close(master)
        tracker.close()
    assert "━" in out  # the bar
    for part in ("30/100", "30%", "chunks/s", "tokens/s", "workers 2", "[scale]"):
        assert part in out, (part, out)
    # the test process tree's RSS: MB alone, GB late in a full suite run
    assert re.search(r"RSS [\d.]+ [MG]B", out), out
    assert re.search(r"\d+:\d\d:\d\d", out), out  # the ETA


def test_logs_get_plain_lines_with_the_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    stream = io.StringIO()
    tracker = RssTracker()
    try:
        progress = Progress(100, tracker, stream=stream)
        _events(progress)
        progress.close()
    finally:
        tracker.close()
    last = stream.getvalue().splitlines()[-1]
    assert re.fullmatch(
        r"30/100 chunks \(30%\)  ETA \d+:\d\d:\d\d  [\d.]+ chunks/s  \d+ "
        r"tokens/s  RSS \d+ MB  workers 2",
        last,
    ), last
    assert "\x1b[" not in stream.getvalue()  # no terminal control codes in a log


def test_log_json_writes_every_event_as_one_json_line() -> None:
    stream = io.StringIO()
    tracker = RssTracker()
    try:
        progress = Progress(100, tracker, log_json=True, stream=stream)
        _events(progress)
        progress.close()
    finally:
        tracker.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in lines] == ["scale", "progress", "progress", "progress"]
    assert all(isinstance(e["ts"], float) for e in lines)


def _drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")
