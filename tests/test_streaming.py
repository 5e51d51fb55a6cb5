"""Inputs of any size: the job reads its input window by window, holds a bounded number of
texts, and writes ids beside their vectors in every output format; --strict rejects a bad
file before any work; the JSONL reader, the validating pass and the pre-count."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import embedpool.job as job
from embedpool.inputs import (
    Chunk,
    ErrorLog,
    count_chunks,
    iter_inputs,
    validate_inputs,
)
from embedpool.job import Embedder
from embedpool.outputs import ids_path, open_output
from embedpool.testing import FakeEngineSpec, fake_vectors
from embedpool.types import Vectors

WINDOW = 16


class CountingSource:
    """An input with no ``len``: yields ``n`` records and counts how many were taken."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.taken = 0

    def __iter__(self) -> Iterator[Chunk]:
        for i in range(self.n):
            self.taken += 1
            # duplicates across and within windows: the dedupe must not misalign ids
            yield Chunk(f"id-{i}", f"text {i % 37} of the input")


def expected_vector(emb: Embedder, text: str) -> Vectors:
    seqs = emb.tokenizer.encode([text], "truncate").sequences
    out: Vectors = fake_vectors(seqs, emb.dim)[0]
    return out


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job, "WINDOW_ITEMS", WINDOW)


@pytest.mark.usefixtures("small_windows")
def test_the_job_holds_a_bounded_number_of_texts_whatever_the_input_size() -> None:
    """While a window is in the caller's hands, the job has read at most that window and the
    next one (prepared meanwhile): never the whole input."""
    source = CountingSource(20 * WINDOW + 5)
    with Embedder(engine=FakeEngineSpec(dim=8), batch_tokens=64) as emb:
        windows = 0
        for win in emb.stream(source):
            windows += 1
            read_beyond = source.taken - (win.start + len(win.ids))
            assert 0 <= read_beyond <= WINDOW, (win.start, source.taken)
            assert win.ok.all()
        assert windows == 21 and source.taken == source.n
        assert emb.last_report.chunks == source.n == emb.last_report.embedded


def test_the_first_window_is_small_and_windows_double_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first window's vectors are out after FIRST_WINDOW_ITEMS items (a couple of batches),
    not after a whole window; the windows then double to WINDOW_ITEMS."""
    monkeypatch.setattr(job, "WINDOW_ITEMS", 4 * job.FIRST_WINDOW_ITEMS)
    first = job.FIRST_WINDOW_ITEMS
    source = CountingSource(first * (1 + 2 + 4 + 4 + 4) + 3)
    with Embedder(engine=FakeEngineSpec(dim=8), batch_tokens=64) as emb:
        sizes = [len(win.ids) for win in emb.stream(source)]
    assert first <= 16
    assert sizes == [first, 2 * first, 4 * first, 4 * first, 4 * first, 3]


@pytest.mark.usefixtures("small_windows")
@pytest.mark.parametrize("ext", [".jsonl", ".npy", ".parquet"])
def test_ids_stream_beside_their_vectors_in_every_format(tmp_path: Path, ext: str) -> None:
    source = CountingSource(5 * WINDOW + 3)
    out = tmp_path / f"out{ext}"
    with Embedder(engine=FakeEngineSpec(dim=8), batch_tokens=64) as emb:
        writer = open_output(out, emb.dim)
        for win in emb.stream(iter(source)):
            writer.write(win.ids, win.vectors)
        writer.commit()
        expected = {c.id: expected_vector(emb, c.text) for c in CountingSource(source.n)}
    if ext == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        ids = [r["id"] for r in rows]
        vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
    elif ext == ".npy":
        ids = json.loads(ids_path(out).read_text())
        vectors = np.load(out)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        ids = table.column("id").to_pylist()
        vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert ids == [f"id-{i}" for i in range(source.n)]
    np.testing.assert_allclose(vectors, np.stack([expected[i] for i in ids]), atol=1e-6)


def test_stream_takes_texts_pairs_or_ids_and_texts() -> None:
    texts = ["alpha", "beta", "alpha"]
    with Embedder(engine=FakeEngineSpec(dim=8)) as emb:
        by_text = [w for w in emb.stream(t for t in texts)]
        by_pair = [w for w in emb.stream(iter([("a", "alpha"), ("b", "beta"), ("c", "alpha")]))]
        by_ids = [w for w in emb.stream(iter(["a", "b", "c"]), iter(texts))]
    assert by_text[0].ids == ["0", "1", "2"]
    assert by_pair[0].ids == by_ids[0].ids == ["a", "b", "c"]
    np.testing.assert_array_equal(by_text[0].vectors, by_pair[0].vectors)
    np.testing.assert_array_equal(by_pair[0].vectors, by_ids[0].vectors)


def test_a_text_that_is_not_a_str_is_named() -> None:
    with (
        Embedder(engine=FakeEngineSpec(dim=8)) as emb,
        pytest.raises(ValueError, match="text 1 is int"),
    ):
        list(emb.stream(iter([("a", "ok"), ("b", 3)])))  # type: ignore[arg-type]


def _jsonl(path: Path, n: int, bad_at: int | None = None) -> Path:
    lines = [json.dumps({"id": f"r{i}", "text": f"record {i}"}) for i in range(n)]
    if bad_at is not None:
        lines.insert(bad_at, '{"id": "broken", "text": ')
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_validating_pass_counts_and_logs_a_bounded_number_of_errors(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"id": 1}\n' if i % 2 else '{"text": "t"}\n' for i in range(30)))
    errors = ErrorLog(keep=3)
    assert validate_inputs([src], errors) == 15
    assert errors.count == 15 and len(errors.kept) == 3
    assert "missing field 'text'" in str(errors.kept[0])


def test_pre_count_without_holding(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", 1000)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n" * 130)
    assert count_chunks([src]) == 1000
    chunks = [x for x in iter_inputs([tmp_path / "code"]) if isinstance(x, Chunk)]
    assert count_chunks([src, tmp_path / "code"]) == 1000 + len(chunks) == 1003


def test_jsonl_reader_keeps_json_semantics_for_what_orjson_refuses(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"id": 12345678901234567890123, "text": "big id"}\n'
        b'{"id": "nan", "text": "x", "score": NaN}\n'
        b'{"id": "s", "text": "\\ud800 lone surrogate"}\n'
    )
    got = [x for x in iter_inputs([src])]
    assert [c.id for c in got if isinstance(c, Chunk)] == ["12345678901234567890123", "nan", "s"]


def test_strict_rejects_a_bad_file_before_any_work(tmp_path: Path) -> None:
    """The bad record is the last of more than a window of good ones, and the model does not
    exist: --strict exits 4 naming the record (the whole file was validated, and before the
    model was even looked up); without --strict the same command fails on the model (2)."""
    src = _jsonl(tmp_path / "in.jsonl", 9000, bad_at=9000)
    out = tmp_path / "out.npy"
    cmd = [
        sys.executable,
        "-m",
        "embedpool",
        "embed",
        str(src),
        "--out",
        str(out),
        "--model",
        str(tmp_path / "no-such-model"),
        "--no-cache",
        "-q",
    ]
    strict = subprocess.run(
        [*cmd, "--strict"], capture_output=True, text=True, timeout=120, check=False
    )
    assert strict.returncode == 4, strict.stderr
    assert f"{src}:9001" in strict.stderr and "not valid JSON" in strict.stderr
    assert "nothing was embedded" in strict.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.npy*"))
    lax = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert lax.returncode == 2, lax.stderr
    assert "no-such-model" in lax.stderr
