"""SIGTERM / SIGINT the real CLI mid-job: documented exit code, no final OUT, a partial file of
complete rows, no process left behind; a second signal exits at once, still without orphans.

``embedpool embed`` runs for real (int8 default model, ``--workers 2``, ``--no-cache``) on a
JSONL of 3,000 short standard-library chunks. ``--log-json`` puts events on stderr, which a
reader thread collects: the test signals once progress shows work done (mid-job, not before
the pool is up) and, for the double signal, only after the CLI said it got the first one
(two identical signals sent back to back may merge into one delivery).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from polling import wait_until
from pool_support import DEADLINE_S

from embedpool.corpus import stdlib_chunks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_processes")]

REPO = Path(__file__).resolve().parents[3]
CHUNKS = 3000
DIM = 384
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # embedpool.cli's documented codes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    path = tmp_path_factory.mktemp("cli-signals") / "chunks.jsonl"
    chunks = stdlib_chunks(CHUNKS)
    with path.open("w") as f:
        for c in chunks:
            f.write(json.dumps({"id": c.id, "text": c.text[:200]}) + "\n")
    return path, {c.id for c in chunks}


class Cli:
    """``embedpool embed`` in a subprocess with its stderr collected line by line."""

    def __init__(self, inp: Path, out: Path, *, own_group: bool = False) -> None:
        # own_group: the CLI leads a new process group (as under systemd), so that a signal
        # can be sent to the whole group: the CLI and every worker
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from embedpool.cli import main; main()",
                "embed",
                str(inp),
                "--out",
                str(out),
                "--workers",
                "2",
                "--no-cache",
                "--log-json",
                "--quiet",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=own_group,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e.get("event") == name:
                    out.append(e)
        return out

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, what: str, cond: object) -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the CLI exited ({self.proc.returncode}) before {what}:\n"
                    + "\n".join(self.lines[-30:])
                )
            return bool(cond() if callable(cond) else cond)

        wait_until(check, what)

    def descendants(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return children

    def wait(self) -> int:
        try:
            rc = self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(DEADLINE_S)
            pytest.fail("the CLI did not exit after the signal:\n" + "\n".join(self.lines[-30:]))
        self._close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE_S)
        self._close()

    def _close(self) -> None:
        """Join the reader (it ends at EOF), then close both pipes (no leaked files)."""
        self._reader.join(DEADLINE_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _gone(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.mark.parametrize(
    ("signals", "code"),
    [
        pytest.param((signal.SIGTERM,), EXIT_SIGTERM, id="sigterm-143"),
        pytest.param((signal.SIGINT,), EXIT_SIGINT, id="sigint-130"),
        pytest.param(
            (signal.SIGTERM, signal.SIGTERM), EXIT_SIGTERM, id="second-sigterm-exits-at-once"
        ),
    ],
)
def test_signal_mid_job(
    tmp_path: Path, corpus: tuple[Path, set[str]], signals: tuple[signal.Signals, ...], code: int
) -> None:
    inp, ids = corpus
    out = tmp_path / "vectors.jsonl"
    partial = tmp_path / "vectors.partial.jsonl"
    cli = Cli(inp, out)
    try:
        cli.wait_for("progress with chunks done", lambda: cli.events("progress"))
        workers = cli.descendants()
        worker_pids = {e["pid"] for e in cli.events("worker_ready")}
        assert worker_pids <= {p.pid for p in workers}
        assert len(worker_pids) >= 1
        cli.proc.send_signal(signals[0])
        if len(signals) > 1:
            name = signal.Signals(signals[0]).name
            cli.wait_for(
                "the CLI to acknowledge the first signal",
                lambda: cli.said(f"{name}: finishing in-flight batches"),
            )
            cli.proc.send_signal(signals[1])
        rc = cli.wait()
    finally:
        cli.kill()
    log = "\n".join(cli.lines[-30:])
    assert rc == code, log
    wait_until(
        lambda: _gone(workers),
        f"the CLI's children {[p.pid for p in workers]} to exit",
        timeout=15.0,
    )
    assert not out.exists(), "the final --out name was written by an interrupted job"
    if len(signals) > 1:
        return  # exited at once: nothing more is promised than no OUT and no orphans
    assert partial.exists(), log
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert rows, "nothing in the partial file"
    assert len(rows) < len(ids), "the job was not interrupted mid-way"
    got = [r["id"] for r in rows]
    assert len(set(got)) == len(got) and set(got) <= ids
    assert all(len(r["embedding"]) == DIM for r in rows)
    assert "interrupted" in log and str(partial) in log
    print(
        f"\n{signals}: exit {rc}, {len(rows)} of {len(ids)} rows in the partial file, "
        f"{len(workers)} children gone"
    )


def test_process_group_sigterm_drains_without_counting_crashes(
    tmp_path: Path, corpus: tuple[Path, set[str]]
) -> None:
    """systemd's KillMode=control-group and ``kill -TERM -PGID`` send SIGTERM to every process
    of the group, the workers included. The workers ignore it, as they ignore a Ctrl-C's
    SIGINT: the CLI decides how in-flight batches end. So: exit 143, a partial file of
    complete rows, and no worker death counted or respawned during the drain."""
    inp, ids = corpus
    out = tmp_path / "vectors.jsonl"
    partial = tmp_path / "vectors.partial.jsonl"
    cli = Cli(inp, out, own_group=True)
    try:
        cli.wait_for("progress with chunks done", lambda: cli.events("progress"))
        workers = cli.descendants()
        os.killpg(cli.proc.pid, signal.SIGTERM)
        rc = cli.wait()
    finally:
        cli.kill()
    log = "\n".join(cli.lines[-30:])
    assert rc == EXIT_SIGTERM, log
    wait_until(
        lambda: _gone(workers),
        f"the CLI's children {[p.pid for p in workers]} to exit",
        timeout=15.0,
    )
    assert not out.exists()
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 0 < len(rows) < len(ids), "the partial file is empty, or the job was not interrupted"
    assert cli.events("worker_death") == [], "a worker died of the group's SIGTERM"
    (stop,) = cli.events("pool_stop")
    assert stop["deaths"] == 0 and stop["start_failures"] == 0
