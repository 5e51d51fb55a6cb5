"""The first run (issue 10): the graph is built before any worker starts, in one process the
job waits for, within the job's memory, never silently and never fatally; concurrent first
runs build once; ``embedpool models build`` and ``embedpool doctor``.

The CLI runs as a user runs it (real subprocesses, the real default model, an empty
``EMBEDPOOL_CACHE_DIR`` of the test's own); the memory limits are real cgroups
(tests/cgroup_util.py: a skip locally without one, a failure under CI=true).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from family_support import free_port, wait_started

from embedpool import events
from embedpool.graph import cache_path, prepare_onnx
from embedpool.graph.prebuild import (
    Decision,
    build_estimate,
    build_in_child,
    decide,
    ensure_graph,
)
from embedpool.graph.store import file_lock
from embedpool.models import ResolvedModel

CLI = [sys.executable, "-m", "embedpool"]
MiB = 1024 * 1024
FIXTURE = Path(__file__).parent / "fixtures" / "reference_minilm.npz"
#: The issue's bars against sentence-transformers: int8 mean/min cosine, fp32 every cosine.
INT8_BAR, FP32_BAR = (0.99, 0.97), 0.9999


# --- the policy (pure) ------------------------------------------------------------------------

NEED = {"int8": 270 * MiB, "fp32": 400 * MiB}


def test_a_built_graph_is_used_without_a_build() -> None:
    assert decide("int8", ready={"int8"}, need=NEED, available=1) == Decision("int8", False)


def test_a_build_that_fits_is_made() -> None:
    assert decide("int8", ready=set(), need=NEED, available=300 * MiB) == Decision("int8", True)
    assert decide("int8", ready=set(), need=NEED, available=None) == Decision("int8", True)


def test_int8_that_cannot_fit_falls_back_to_a_built_fp32() -> None:
    d = decide("int8", ready={"fp32"}, need=NEED, available=200 * MiB)
    assert (d.precision, d.build) == ("fp32", False)
    assert d.reason is not None and "int8" in d.reason and "200.0 MiB" in d.reason


def test_int8_that_cannot_fit_falls_back_to_an_fp32_build_that_fits() -> None:
    need = {"int8": 270 * MiB, "fp32": 64 * MiB}  # a shipped ONNX file: fp32 needs no build
    d = decide("int8", ready=set(), need=need, available=200 * MiB)
    assert (d.precision, d.build) == ("fp32", True) and d.reason


def test_when_nothing_fits_the_build_asked_for_is_tried() -> None:
    """No silent change of an fp32 request, and no refusal on an estimate: a build that is
    killed after all is caught by ensure_graph."""
    assert decide("int8", ready=set(), need=NEED, available=100 * MiB) == Decision("int8", True)
    assert decide("fp32", ready=set(), need=NEED, available=100 * MiB) == Decision("fp32", True)


def test_the_build_is_never_silent_in_a_log() -> None:
    """Without a terminal: one line as the build starts, one when it ends (time, peak, path),
    the waiting and the fallback each in one line; stages are for the bar only."""
    import io

    from embedpool.progress import BuildDisplay

    out = io.StringIO()
    show = BuildDisplay(out)
    common = {"model": "all-MiniLM-L6-v2", "precision": "int8", "steps": 4}
    show(events.make_event(events.GRAPH_BUILD, **common, stage="starting", step=0))
    show(events.make_event(events.GRAPH_BUILD, **common, stage="loading weights", step=1))
    show(events.make_event(events.GRAPH_BUILD, **common, stage="waiting", step=1))
    show(
        events.make_event(
            events.GRAPH_BUILT,
            model="all-MiniLM-L6-v2",
            precision="int8",
            seconds=1.73,
            peak_rss=235 * MiB,
            size_bytes=1,
            path="/c/g.onnx",
            built=True,
        )
    )
    show(events.make_event(events.GRAPH_FALLBACK, message="no room: running fp32"))
    assert out.getvalue().splitlines() == [
        "building the int8 graph for all-MiniLM-L6-v2 (first run only)",
        "waiting for another embedpool process building the same graph",
        "built the int8 graph for all-MiniLM-L6-v2 in 1.7 s (peak RSS 235 MB): /c/g.onnx",
        "embedpool: no room: running fp32",
    ]


# --- the build in its own process -------------------------------------------------------------


@pytest.mark.slow
def test_the_build_runs_in_a_child_within_its_estimate(
    real_model: ResolvedModel, tmp_path: Path
) -> None:
    """A cold build: every stage reported in order, then the result; its peak RSS (the
    child's VmHWM) is below the estimate the fallback decides on, and not far below it;
    this process never imports onnx for it."""
    seen: list[dict[str, Any]] = []
    emit = events.Emitter(seen.append, logging.getLogger("test"))
    built = build_in_child(real_model, "int8", emit, cache_dir=tmp_path)
    estimate = build_estimate(real_model, "int8")
    assert built.built and built.path.parent == tmp_path
    assert built.peak_rss <= estimate <= 1.5 * built.peak_rss, (built.peak_rss, estimate)
    stages = [(e["step"], e["stage"]) for e in seen if e["event"] == events.GRAPH_BUILD]
    assert stages == [
        (0, "starting"),
        (1, "loading weights"),
        (2, "composing the graph"),
        (3, "quantising"),
        (4, "writing"),
    ]
    assert seen[-1]["event"] == events.GRAPH_BUILT and seen[-1]["path"] == str(built.path)
    assert built.path.read_bytes() == prepare_onnx(real_model, "int8", tmp_path).read_bytes()
    # a second call finds the file: no build, no event
    seen.clear()
    assert ensure_graph(real_model, "int8", emit, cache_dir=tmp_path) == "int8"
    assert seen == []


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "EMBEDPOOL_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _reference() -> tuple[list[str], np.ndarray]:
    with np.load(FIXTURE) as z:
        return [str(t) for t in z["texts"]], z["vectors"].astype(np.float32)


def _corpus(tmp_path: Path) -> tuple[Path, np.ndarray]:
    texts, vectors = _reference()
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return src, vectors


def _cosines(out: Path, want: np.ndarray) -> np.ndarray:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = np.array(
        [r["embedding"] for r in sorted(rows, key=lambda r: int(r["id"]))], dtype=np.float32
    )
    return np.asarray((got * want).sum(1))


@pytest.mark.slow
def test_first_run_builds_before_any_worker_and_says_so(
    tmp_path: Path, real_model: ResolvedModel
) -> None:
    """The default pool, an empty cache: the build's events come first (--log-json), the
    first worker starts after the graph is built, the vectors meet the int8 bar; a second
    run builds nothing."""
    src, want = _corpus(tmp_path)
    env = _env(tmp_path / "cache")
    argv = [
        *CLI,
        "embed",
        str(src),
        "--out",
        str(tmp_path / "out.jsonl"),
        "--no-cache",
        "--log-json",
    ]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    names = [e["event"] for e in _events(first.stderr)]
    assert names[0] == events.GRAPH_BUILD and events.GRAPH_FALLBACK not in names
    assert names.index(events.GRAPH_BUILT) < names.index(events.WORKER_START)
    cos = _cosines(tmp_path / "out.jsonl", want)
    assert cos.mean() >= INT8_BAR[0] and cos.min() >= INT8_BAR[1], cos
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [e for e in _events(again.stderr) if e["event"].startswith("graph_")]


@pytest.mark.slow
def test_models_build_verifies_and_doctor_lists_it(
    tmp_path: Path, real_model: ResolvedModel
) -> None:
    env = _env(tmp_path / "cache")
    proc = subprocess.run(
        [*CLI, "models", "build", "--precision", "int8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = cache_path(real_model, "int8", tmp_path / "cache" / "onnx")
    assert (
        path.is_file() and f"{path}" in proc.stdout and "verified: a 384-dim vector" in proc.stdout
    )
    assert "building the int8 graph for all-MiniLM-L6-v2 (first run only)" in proc.stderr
    doctor = subprocess.run([*CLI, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stderr
    assert f"1 built for {real_model.name} in {tmp_path / 'cache' / 'onnx'}" in doctor.stdout
    assert path.name in doctor.stdout
    # nothing to build the second time: the graph is verified again, not rebuilt
    again = subprocess.run(
        [*CLI, "models", "build"], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr
    bad = subprocess.run(
        [*CLI, "models", "build", str(tmp_path / "nope")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("embedpool: model ")
        and "Traceback" not in bad.stderr
    ), bad.stderr


# --- concurrency ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_first_runs_at_once_build_once(tmp_path: Path, real_model: ResolvedModel) -> None:
    """A job and another job start together on one empty cache dir: one process builds, the
    other waits for it or finds the file; both succeed with the same vectors."""
    src, _ = _corpus(tmp_path)
    env = _env(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [
                *CLI,
                "embed",
                str(src),
                "--out",
                str(tmp_path / f"out{i}.jsonl"),
                "--workers",
                "0",
                "--no-cache",
                "--log-json",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    built = [e["built"] for err in errs for e in _events(err) if e["event"] == events.GRAPH_BUILT]
    assert built.count(True) == 1, built
    assert (tmp_path / "out0.jsonl").read_text() == (tmp_path / "out1.jsonl").read_text()


@pytest.mark.slow
def test_a_first_run_waits_for_the_builder_then_uses_its_graph(
    tmp_path: Path, real_model: ResolvedModel
) -> None:
    """This test holds the graph's lock as a builder would; the CLI says it is waiting, and
    once the file appears and the lock is released it uses that file and builds nothing."""
    cache = tmp_path / "cache"
    target = cache_path(real_model, "int8", cache / "onnx")
    ready = prepare_onnx(real_model, "int8", tmp_path / "elsewhere")
    with file_lock(target.with_name(target.name + ".lock")):
        proc = subprocess.Popen(
            [*CLI, "models", "build", "--log-json"],
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until the child reports; ends if it exits
            if line.startswith("{") and json.loads(line).get("stage") == "waiting":
                break
        else:
            pytest.fail(f"never waited: exit {proc.wait()}")
        tmp = target.with_name(".copy.tmp")
        tmp.write_bytes(ready.read_bytes())
        os.replace(tmp, target)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    done = [e for e in _events(err) if e["event"] == events.GRAPH_BUILT]
    assert [e["built"] for e in done] == [False] and "verified" in out


# --- real memory limits ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cgroup
def test_first_run_embed_and_serve_fit_600mb(
    tmp_path: Path, real_model: ResolvedModel, cgroup_factory: Any
) -> None:
    """The issue's bar: the default first run (empty cache, default settings: the int8
    graph, the adaptive pool) inside a 600 MB memory cgroup, for ``embed`` and ``serve``:
    no OOM kill, exit 0, and vectors that meet the int8 bar."""
    from openai import OpenAI

    src, want = _corpus(tmp_path)
    cg = cgroup_factory(600 * MiB)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        cg.wrap([*CLI, "embed", str(src), "--out", str(out)]),
        env=_env(tmp_path / "embed-cache"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (proc.returncode, cg.oom_kills()) == (0, 0), proc.stderr[-3000:]
    assert "building the int8 graph for all-MiniLM-L6-v2 (first run only)" in proc.stderr
    cos = _cosines(out, want)
    assert cos.mean() >= INT8_BAR[0] and cos.min() >= INT8_BAR[1], cos

    cg2 = cgroup_factory(600 * MiB)
    port = free_port()
    server = subprocess.Popen(
        cg2.wrap([*CLI, "serve", "--port", str(port), "--no-cache"]),
        env=_env(tmp_path / "serve-cache"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: list[str] = []
    try:
        said = wait_started(server)
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120.0
        )
        texts = _reference()[0][:8]
        got = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        vecs = np.array([d.embedding for d in got.data], dtype=np.float32)
        cos = (vecs * want[:8]).sum(1)
        assert cos.mean() >= INT8_BAR[0] and cos.min() >= INT8_BAR[1], cos
    finally:
        server.terminate()
        err = "".join(said) + server.communicate(timeout=60)[1]
    assert cg2.oom_kills() == 0, err[-3000:]
    assert "building the int8 graph for all-MiniLM-L6-v2 (first run only)" in err


@pytest.mark.slow
@pytest.mark.cgroup
def test_int8_build_that_cannot_fit_falls_back_to_fp32(
    tmp_path: Path, real_model: ResolvedModel, cgroup_factory: Any
) -> None:
    """A 220 MiB cgroup: too small for the int8 build's estimate (~263 MiB), enough for an
    fp32 job in one process (measured: 172 MiB charged) whose graph an image pre-built
    (``models build --precision fp32``). The run says so in one line, exits 0, and its
    vectors are fp32's."""
    src, want = _corpus(tmp_path)
    env = _env(tmp_path / "cache")
    pre = subprocess.run(
        [*CLI, "models", "build", "--precision", "fp32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pre.returncode == 0, pre.stderr
    cg = cgroup_factory(220 * MiB)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        cg.wrap([*CLI, "embed", str(src), "--out", str(out), "--workers", "0", "--no-cache", "-q"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (proc.returncode, cg.oom_kills()) == (0, 0), proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if "for this run" in ln]
    assert (
        len(line) == 1
        and "building the int8 graph needs about" in line[0]
        and "running all-MiniLM-L6-v2 in fp32 for this run" in line[0]
    ), proc.stderr
    assert _cosines(out, want).min() >= FP32_BAR
    assert not cache_path(real_model, "int8", tmp_path / "cache" / "onnx").exists()


@pytest.mark.slow
@pytest.mark.cgroup
def test_no_build_fits_exits_2_with_one_message(
    tmp_path: Path, real_model: ResolvedModel, cgroup_factory: Any
) -> None:
    """A 160 MiB cgroup, nothing pre-built: the int8 build is tried (no estimate fits, and
    estimates are not refusals), the kernel kills it, the fp32 build is tried and killed
    too; the job itself is not killed: exit 2 and a message naming the way out."""
    src, _ = _corpus(tmp_path)
    cg = cgroup_factory(160 * MiB)
    proc = subprocess.run(
        cg.wrap(
            [
                *CLI,
                "embed",
                str(src),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--workers",
                "0",
                "--no-cache",
                "-q",
            ]
        ),
        env=_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and cg.oom_kills() == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "no graph of all-MiniLM-L6-v2 can be built in the memory available" in last
    assert "embedpool models build all-MiniLM-L6-v2" in last
