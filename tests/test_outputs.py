"""embedpool.outputs: exact round trips per format, and nothing under --out until commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedpool.errors import ConfigError
from embedpool.outputs import (
    SUPPORTED_EXTENSIONS,
    format_vectors,
    ids_path,
    open_output,
    partial_path,
)
from embedpool.types import Vectors

DIM = 8
DEADLINE_S = 60.0
IDS = ["plain", "ünïcødé ✓", 'quote " and \\ backslash', "new\nline", "", "x" * 300] + [
    f"id{i}" for i in range(94)
]


def sample(n: int = len(IDS), dim: int = DIM) -> Vectors:
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vecs[0, :4] = [0.0, -0.0, 1e-45, 3.4028235e38]  # denormal, max, signed zero
    return vecs


def read_back(path: Path, dim: int = DIM) -> tuple[list[str], Vectors]:
    ext = path.suffix
    if ext == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        vecs = np.array([r["embedding"] for r in rows], dtype=np.float32).reshape(len(rows), dim)
        return [r["id"] for r in rows], vecs
    if ext == ".npy":
        with ids_path(path).open(encoding="utf-8") as f:
            ids = json.load(f)
        return ids, np.load(path)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    return table.column("id").to_pylist(), flat.reshape(table.num_rows, dim)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
@pytest.mark.parametrize("chunk", [1, 7, 1000], ids=["rows", "chunks", "one-write"])
def test_round_trip_is_exact(tmp_path: Path, ext: str, chunk: int) -> None:
    out = tmp_path / f"vectors{ext}"
    vecs = sample()
    writer = open_output(out, DIM)
    for s in range(0, len(IDS), chunk):
        writer.write(IDS[s : s + chunk], vecs[s : s + chunk])
        writer.write([], np.empty((0, DIM), np.float32))  # empty chunks are fine
        assert not out.exists(), "nothing appears under the final name before commit"
    writer.commit()
    ids, got = read_back(out)
    assert ids == IDS
    assert got.dtype == np.float32 and got.tobytes() == vecs.tobytes()
    extra = {"vectors.npy.ids.json"} if ext == ".npy" else set()
    assert listing(tmp_path) == sorted({out.name} | extra), "no temporary file is left"


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_zero_rows(tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"vectors{ext}"
    open_output(out, DIM).commit()
    ids, got = read_back(out)
    assert ids == [] and got.size == 0


def test_npy_is_memory_mappable(tmp_path: Path) -> None:
    out = tmp_path / "v.npy"
    vecs = sample()
    with open_output(out, DIM) as w:
        w.write(IDS, vecs)
    mapped = np.load(out, mmap_mode="r")
    assert mapped.shape == vecs.shape and np.array_equal(mapped, vecs)


def test_parquet_row_groups_are_bounded_by_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import embedpool.outputs as outputs

    monkeypatch.setattr(outputs, "PARQUET_ROW_GROUP_BYTES", 4096)
    out = tmp_path / "v.parquet"
    vecs = np.random.default_rng(3).standard_normal((2500, 4)).astype(np.float32)
    ids = [str(i) for i in range(2500)]
    with open_output(out, 4) as w:
        for s in range(0, 2500, 100):
            w.write(ids[s : s + 100], vecs[s : s + 100])
    meta = pq.ParquetFile(out).metadata
    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    # a group closes once 4 KiB are held: 16 B of floats + 4 B of offsets + the id per row,
    # written 100 rows (2.2 KiB) at a time -> 200 rows a group, the last holds the rest
    assert rows == [200] * 12 + [100]
    got_ids, got = read_back(out, dim=4)
    assert got_ids == ids and np.array_equal(got, vecs)


def test_parquet_row_groups_are_bounded_by_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import embedpool.outputs as outputs

    monkeypatch.setattr(outputs, "PARQUET_ROW_GROUP_ROWS", 300)
    out = tmp_path / "v.parquet"
    with open_output(out, 1) as w:
        for _ in range(10):
            w.write([""] * 100, np.zeros((100, 1), np.float32))
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [300] * 3 + [100]


def test_parquet_writer_memory_stays_bounded_whatever_the_output_size(tmp_path: Path) -> None:
    """Past its first row groups, the writer's memory does not grow with the output: numpy's
    buffers (tracemalloc) stay near the row-group bound plus a write, and Arrow's pool, which
    the parquet encoder allocates from, reaches no new high. A fresh interpreter, whose
    pyarrow import and first groups are done before the measure starts."""
    script = textwrap.dedent("""
        import sys, tracemalloc
        import numpy as np, pyarrow as pa
        import embedpool.outputs as outputs
        bound, window, dim = 1 << 20, 1024, 64  # a 256 KiB write; 32 MiB written in all
        outputs.PARQUET_ROW_GROUP_BYTES = bound
        vecs = np.random.default_rng(5).standard_normal((window, dim)).astype(np.float32)
        ids = [f"doc-{i:06d}" for i in range(window)]
        tracemalloc.start()
        with outputs.open_output(outputs.Path(sys.argv[1]), dim) as w:
            for _ in range(8):
                w.write(ids, vecs)
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            arrow_before = pa.default_memory_pool().max_memory()
            for _ in range(120):
                w.write(ids, vecs)
            numpy_growth = tracemalloc.get_traced_memory()[1] - held
            arrow_growth = pa.default_memory_pool().max_memory() - arrow_before
        print(numpy_growth, arrow_growth, 128 * vecs.nbytes, vecs.nbytes, bound)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "v.parquet")],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=True,
    )
    numpy_growth, arrow_growth, written, window_bytes, bound = map(int, out.stdout.split())
    assert written == 32 << 20
    assert numpy_growth < 2 * (bound + window_bytes), out.stdout  # ~1.5 MiB measured
    assert arrow_growth < window_bytes, out.stdout


def _normalised(rng: np.random.Generator) -> Vectors:
    v = rng.standard_normal((300, 384)).astype(np.float32)
    normalised: Vectors = v / np.linalg.norm(v, axis=1, keepdims=True)
    return normalised


@pytest.mark.parametrize(
    "make",
    [
        _normalised,
        lambda rng: rng.uniform(1e-7, 1e-6, (50, 64)).astype(np.float32),
        lambda rng: rng.uniform(0.999, 1.0, (50, 64)).astype(np.float32),
        lambda rng: (
            rng.standard_normal((50, 64)) * 10.0 ** rng.integers(-45, 38, (50, 64))
        ).astype(np.float32),
        lambda rng: np.zeros((3, 5), np.float32),
        lambda rng: np.array(
            [[0.0, -0.0, 0.1, 1e-7, 9.9999994e-8, 0.99999994, 1.0, 1e-45, 3.4028235e38, -2.5]],
            np.float32,
        ),
    ],
    ids=["normalised", "tiny", "near-one", "any-magnitude", "zeros", "edges"],
)
def test_jsonl_floats_read_back_exactly(make: Callable[[np.random.Generator], Vectors]) -> None:
    vecs = make(np.random.default_rng(7))
    rows = format_vectors(vecs)
    back = np.array([json.loads(r) for r in rows], dtype=np.float32).reshape(vecs.shape)
    assert back.tobytes() == vecs.tobytes()


def test_jsonl_floats_are_short() -> None:
    assert format_vectors(np.array([[0.1, 0.25, -0.5, 0.0, -0.0]], np.float32)) == [
        "[0.1, 0.25, -0.5, 0.0, -0.0]"
    ]
    vecs = _normalised(np.random.default_rng(1))
    mean_chars = sum(map(len, format_vectors(vecs))) / vecs.size
    assert mean_chars < 14, "9 significant digits at most, not 17"


# ---------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_abort_leaves_nothing(tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"vectors{ext}"
    writer = open_output(out, DIM)
    writer.write(IDS[:5], sample()[:5])
    assert listing(tmp_path), "the temporary file exists while writing"
    writer.abort()
    writer.abort()  # idempotent
    assert listing(tmp_path) == []


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_exception_inside_with_aborts_and_keeps_the_old_output(tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"vectors{ext}"
    with open_output(out, DIM) as w:
        w.write(IDS[:3], sample()[:3])
    before = listing(tmp_path)
    old = read_back(out)
    with pytest.raises(RuntimeError, match="boom"), open_output(out, DIM) as w:
        w.write(IDS, sample())
        raise RuntimeError("boom")
    assert listing(tmp_path) == before
    ids, vecs = read_back(out)
    assert ids == old[0] and np.array_equal(vecs, old[1])


def test_commit_replaces_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    out.write_text("old\n")
    writer = open_output(out, DIM)
    writer.write(IDS, sample())
    assert out.read_text() == "old\n", "the old output stays until commit"
    writer.commit()
    assert read_back(out)[0] == IDS


def test_npy_kill_between_renames_leaves_no_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an old OUT.npy must never pair with a new OUT.npy.ids.json."""
    out = tmp_path / "v.npy"
    with open_output(out, DIM) as w:
        w.write(IDS[:3], sample()[:3])
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_die(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    writer = open_output(out, DIM)
    writer.write(IDS[:5], sample()[:5])
    with pytest.raises(KeyboardInterrupt):
        writer.commit()
    assert calls[0] == str(ids_path(out))
    assert not out.exists(), "an array without its matching ids would look complete"
    assert listing(tmp_path) == [ids_path(out).name]


def test_write_after_commit_is_refused(tmp_path: Path) -> None:
    writer = open_output(tmp_path / "v.jsonl", DIM)
    writer.commit()
    with pytest.raises(RuntimeError, match="already committed"):
        writer.write(IDS[:1], sample()[:1])


@pytest.mark.parametrize(
    ("ids", "shape"),
    [
        (["a", "b"], (3, DIM)),
        (["a"], (1, DIM + 1)),
        (["a"], (DIM,)),
    ],
    ids=["row-count", "dim", "one-dimensional"],
)
def test_wrong_shape_is_refused(tmp_path: Path, ids: list[str], shape: tuple[int, ...]) -> None:
    writer = open_output(tmp_path / "v.npy", DIM)
    with pytest.raises(ValueError, match="expected vectors of shape"):
        writer.write(ids, np.zeros(shape, np.float32))
    writer.abort()


_KILLED_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from embedpool.outputs import open_output

    w = open_output(Path(sys.argv[1]), 8)
    for i in range(50):
        w.write([f"id{i}"] * 10, np.ones((10, 8), np.float32))
    print("written", flush=True)
    sys.stdin.read()  # hold here until killed
""")


@pytest.mark.slow
@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_sigkill_mid_write_leaves_no_final_file(tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"vectors{ext}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # returns at the latest when the child exits
        assert line == "written\n", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    left = listing(tmp_path)
    assert left and all(name.startswith(".") for name in left), left  # only hidden temps
    assert not out.exists() and not ids_path(out).exists()
    # The next job for the same --out sweeps the dead process's temporaries.
    open_output(out, DIM).abort()
    assert listing(tmp_path) == []


def test_temporaries_of_a_live_process_are_not_swept(tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    first = open_output(out, DIM)
    second = open_output(out, DIM)  # same pid: alive, its temp stays
    first.write(IDS[:1], sample()[:1])
    first.commit()
    second.abort()
    assert read_back(out)[0] == IDS[:1]


# ---------------------------------------------------------------------- partial outputs


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("v.jsonl", "v.partial.jsonl"),
        ("dir/run.2024.npy", "dir/run.2024.partial.npy"),
        ("x.parquet", "x.partial.parquet"),
    ],
    ids=["jsonl", "dotted-stem", "parquet"],
)
def test_partial_path(out: str, expected: str) -> None:
    assert partial_path(Path(out)) == Path(expected)


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_partial_output_then_final_commit_removes_it(tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"vectors{ext}"
    with open_output(out, DIM, partial=True) as w:
        w.write(IDS[:4], sample()[:4])
    assert not out.exists()
    assert read_back(partial_path(out))[0] == IDS[:4]
    with open_output(out, DIM) as w:
        w.write(IDS, sample())
    extra = {"vectors.npy.ids.json"} if ext == ".npy" else set()
    assert listing(tmp_path) == sorted({out.name} | extra)


# ---------------------------------------------------------------------- choosing a format


@pytest.mark.parametrize("name", ["v.csv", "v", "v.json"], ids=["csv", "none", "json"])
def test_unknown_extension_lists_the_supported_ones(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_output(tmp_path / name, DIM)
    assert all(ext in str(info.value) for ext in SUPPORTED_EXTENSIONS)
    assert listing(tmp_path) == []


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    with open_output(tmp_path / "V.JSONL", DIM) as w:
        w.write(IDS[:2], sample()[:2])
    assert (tmp_path / "V.JSONL").is_file()


def test_creates_the_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "v.jsonl"
    open_output(out, DIM).commit()
    assert out.is_file()


def test_importing_outputs_does_not_import_pyarrow() -> None:
    code = "import sys, embedpool.outputs; print('pyarrow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE_S, check=True
    )
    assert result.stdout.strip() == "False"


def test_final_file_has_normal_permissions(tmp_path: Path) -> None:
    """Not mkstemp's 0600: the output is created like any file the user writes."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "v.jsonl"
    open_output(out, DIM).commit()
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
