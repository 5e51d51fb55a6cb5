"""The CLI end to end, as a user runs it: real subprocesses, the real default model."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "embedpool"]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl_out(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


def corpus(n: int, offset: int = 0) -> list[dict[str, object]]:
    from embedpool.corpus import stdlib_chunks

    return [{"id": c.id, "text": c.text[:400]} for c in stdlib_chunks(n + offset)[offset:]]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("in") / "small.jsonl", corpus(40))


@pytest.mark.parametrize("ext", [".jsonl", ".npy", ".parquet"])
def test_formats_hold_the_same_vectors_in_input_order(
    small: Path, tmp_path: Path, ext: str
) -> None:
    out = tmp_path / f"out{ext}"
    res = run_cli("embed", str(small), "--out", str(out), "--workers", "0", "--no-cache", "-q")
    assert res.returncode == 0, res.stderr
    assert "done: chunks 40, embedded 40" in res.stderr
    ids = [json.loads(line)["id"] for line in small.read_text().splitlines()]
    if ext == ".jsonl":
        got_ids, vecs = read_jsonl_out(out)
    elif ext == ".npy":
        vecs = np.load(out)
        got_ids = json.loads(Path(str(out) + ".ids.json").read_text())
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        got_ids = table.column("id").to_pylist()
        vecs = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert got_ids == ids
    assert vecs.shape == (40, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_bad_lines_are_reported_and_the_rest_embedded(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"id": "a", "text": "alpha"}\nnot json\n{"id": "b"}\n'
        b'{"id": "c", "text": 5}\n{"id": "d", "text": "\xff"}\n{"id": "e", "text": "omega"}\n'
    )
    out = tmp_path / "o.jsonl"
    res = run_cli("embed", str(src), "--out", str(out), "--workers", "0", "--no-cache", "-q")
    assert res.returncode == 3, res.stderr
    for needle in (
        f"{src}:2",
        "not valid JSON",
        f"{src}:3 (id 'b'): missing field 'text'",
        "(id 'c'): field 'text' must be a string",
        f"{src}:5",
        "not valid UTF-8",
    ):
        assert needle in res.stderr
    assert read_jsonl_out(out)[0] == ["a", "e"]

    strict = run_cli(
        "embed",
        str(src),
        "--out",
        str(tmp_path / "s.jsonl"),
        "--strict",
        "--workers",
        "0",
        "--no-cache",
    )
    assert strict.returncode == 4
    assert "--strict: 4 bad input record(s)" in strict.stderr
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--out", "x.csv"], "unknown output format .csv", id="bad-extension"),
        pytest.param(
            ["--out", "x.jsonl", "--model", "/nonexistent/model"],
            "not found. Tried",
            id="unknown-model",
        ),
        pytest.param(
            ["--out", "x.jsonl", "--workers", "many"],
            "use 'auto' or a positive integer",
            id="bad-workers",
        ),
        pytest.param(["--out", "x.jsonl", "--max-memory", "lots"], "is not a size", id="bad-size"),
    ],
)
def test_usage_errors_exit_2_and_name_the_problem(
    small: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a if not a.startswith("x.") else str(tmp_path / a) for a in args]
    res = run_cli("embed", str(small), *args, "--no-cache")
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


def test_corrupt_cache_is_named_with_the_way_out(small: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite3"
    cache.write_bytes(b"this is not a database" * 100)
    out = tmp_path / "o.jsonl"
    res = run_cli("embed", str(small), "--out", str(out), "--workers", "0", "--cache", str(cache))
    assert res.returncode == 2
    assert str(cache) in res.stderr and "--rebuild" in res.stderr
    res = run_cli(
        "embed",
        str(small),
        "--out",
        str(out),
        "--workers",
        "0",
        "--cache",
        str(cache),
        "--rebuild",
        "-q",
    )
    assert res.returncode == 0, res.stderr


def test_rerun_hits_cache_and_one_percent_change_reembeds_exactly_those(tmp_path: Path) -> None:
    recs = corpus(200)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    cache = tmp_path / "c.sqlite3"
    out1, out2, out3 = tmp_path / "1.npy", tmp_path / "2.npy", tmp_path / "3.npy"
    base = ["--workers", "0", "--cache", str(cache), "--log-json", "--precision", "fp32"]
    first = run_cli("embed", str(src), "--out", str(out1), *base)
    assert first.returncode == 0, first.stderr
    second = run_cli("embed", str(src), "--out", str(out2), *base)
    assert second.returncode == 0
    assert "cache hits 200" in second.stderr
    np.testing.assert_array_equal(np.load(out1), np.load(out2))
    changed = {3, 77, 150}
    for i in changed:
        recs[i] = {"id": recs[i]["id"], "text": f"changed text number {i}"}
    write_jsonl(src, recs)
    third = run_cli("embed", str(src), "--out", str(out3), *base)
    assert third.returncode == 0
    assert "cache hits 197" in third.stderr
    a, c = np.load(out1), np.load(out3)
    same = [i for i in range(200) if i not in changed]
    np.testing.assert_array_equal(a[same], c[same])
    assert all(float(a[i] @ c[i]) < 0.99 for i in changed)


def test_kill_9_then_rerun_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus(300))
    cache = tmp_path / "c.sqlite3"
    out = tmp_path / "o.npy"
    common = ["--workers", "1", "--precision", "fp32", "--batch-tokens", "512"]
    proc = subprocess.Popen(
        [*CLI, "embed", str(src), "--out", str(out), "--cache", str(cache), *common, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.exists():
            try:
                with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=5) as db:
                    rows = db.execute("select count(*) from vectors").fetchone()[0]
            except sqlite3.Error:
                rows = 0
        if rows >= 40:
            break
        time.sleep(0.05)  # polling a file with a deadline, not synchronising on time
    assert proc.poll() is None, "the job finished before it could be killed"
    assert rows >= 40, "no batches reached the cache in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    resumed = run_cli("embed", str(src), "--out", str(out), "--cache", str(cache), *common)
    assert resumed.returncode == 0, resumed.stderr
    hits = int(resumed.stderr.split("cache hits ")[1].split()[0].rstrip(","))
    assert hits >= 40
    clean = tmp_path / "clean.npy"
    ref = run_cli("embed", str(src), "--out", str(clean), "--no-cache", *common, "-q")
    assert ref.returncode == 0
    got, want = np.load(out), np.load(clean)
    assert json.loads(Path(str(out) + ".ids.json").read_text()) == json.loads(
        Path(str(clean) + ".ids.json").read_text()
    )
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.99999, f"worst cosine {cos.min()} at row {int(cos.argmin())}"


def test_models_and_doctor_commands() -> None:
    res = run_cli("models")
    assert res.returncode == 0
    assert "all-MiniLM-L6-v2" in res.stdout and "bundled" in res.stdout and "384" in res.stdout
    doc = run_cli("doctor")
    assert doc.returncode == 0
    for word in (
        "cores",
        "memory",
        "profile",
        "workers",
        "batch",
        "onnxruntime",
        "driver",
        "device",
    ):
        assert word in doc.stdout


def _no_gpu_package() -> bool:
    from embedpool.device_choice import installed_ort_distributions

    return all(n != "onnxruntime-gpu" for n, _ in installed_ort_distributions())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["embed", "--device", "cuda"],
            "--device cuda: onnxruntime-gpu is not installed (the CPU package onnxruntime",
        ),
        (["embed", "--device", "cuda:3", "--no-cache"], "--device cuda:3: onnxruntime-gpu is not"),
        (["bench", "--device", "cuda", "--chunks", "5"], "--device cuda: onnxruntime-gpu"),
        (["serve", "--device", "cuda", "--port", "0"], "--device cuda: onnxruntime-gpu"),
        (["doctor", "--device", "cuda"], "device      error: --device cuda: onnxruntime-gpu"),
        (["embed", "--precision", "fp16", "--no-cache"], "precision fp16 runs on a GPU only"),
        (
            ["embed", "--cpu-workers", "2", "--no-cache"],
            "--cpu-workers adds CPU workers next to a GPU",
        ),
        (["embed", "--device", "tpu"], "device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_a_device_that_is_not_there_fails_at_once_with_exit_2(
    small: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    """No GPU here (nor in CI): --device cuda names what is missing and nothing starts."""
    assert _no_gpu_package(), "this test expects a machine without onnxruntime-gpu"
    cmd = list(args)
    if cmd[0] == "embed":
        cmd[1:1] = [str(small), "--out", str(tmp_path / "out.jsonl")]
    res = run_cli(*cmd, timeout=120)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_the_summary_says_which_device(small: Path, tmp_path: Path) -> None:
    res = run_cli(
        "embed", str(small), "--out", str(tmp_path / "o.npy"), "--workers", "0", "--no-cache", "-q"
    )
    assert res.returncode == 0, res.stderr
    assert "device cpu (auto: onnxruntime-gpu not installed), int8" in res.stderr
