"""The job pipeline (windows, dedupe, long-text windows, order, interruption) on a fake engine."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import embedpool.job as job
from embedpool.job import Embedder
from embedpool.testing import FakeEngineSpec, fake_vectors
from embedpool.tokenization import TextTokenizer

TEXTS = [
    "def f(x):\n    return x",
    "hello world",
    "",
    "   ",
    "hello world",
    "SELECT 1;",
    "αβγ 你好 🙂",
    "x " * 3000,
    "short",
    "def f(x):\n    return x",
]


@pytest.fixture
def fake() -> FakeEngineSpec:
    return FakeEngineSpec(dim=16)


def _expected(emb: Embedder, texts: list[str], mode: str = "truncate") -> np.ndarray:
    """What the job must return: per text, the normalised mean of its sequences' vectors."""
    tok: TextTokenizer = emb.tokenizer
    out = np.zeros((len(texts), emb.dim), dtype=np.float32)
    for i, t in enumerate(texts):
        seqs = tok.encode([t], mode).sequences  # type: ignore[arg-type]
        v = fake_vectors(seqs, emb.dim).sum(axis=0)
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("window_items", [3, 4096], ids=["many-windows", "one-window"])
@pytest.mark.parametrize("mode", ["truncate", "window"])
def test_vectors_in_input_order(
    fake: FakeEngineSpec, monkeypatch: pytest.MonkeyPatch, window_items: int, mode: str
) -> None:
    monkeypatch.setattr(job, "WINDOW_ITEMS", window_items)
    with Embedder(engine=fake, long_text=mode, batch_tokens=300) as emb:  # type: ignore[arg-type]
        got = emb.embed(TEXTS)
        report = emb.last_report
    np.testing.assert_allclose(got, _expected(emb, TEXTS, mode), atol=1e-6)
    assert report.embedded == len(TEXTS) and report.item_errors == []
    assert report.truncated == (1 if mode == "truncate" else 0)
    assert report.empty == 2


def test_duplicates_are_embedded_once(fake: FakeEngineSpec) -> None:
    texts = ["same"] * (job.FIRST_WINDOW_ITEMS - 1) + ["other"]  # one window: deduped in it
    with Embedder(engine=fake) as emb:
        got = emb.embed(texts)
        assert emb.last_report.inferred == 2
    assert np.allclose(got[:-1], got[0])


def test_window_mode_differs_from_truncate_only_for_long_texts(fake: FakeEngineSpec) -> None:
    texts = ["short text", "token " * 2000]
    with (
        Embedder(engine=fake, long_text="truncate") as a,
        Embedder(engine=fake, long_text="window") as b,
    ):
        ta, tb = a.embed(texts), b.embed(texts)
    assert np.allclose(ta[0], tb[0])
    assert not np.allclose(ta[1], tb[1])
    assert abs(float(np.linalg.norm(tb[1])) - 1.0) < 1e-5


def test_stop_finishes_in_flight_and_reports_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job, "WINDOW_ITEMS", 64)
    spec = FakeEngineSpec(dim=8)
    stop = threading.Event()
    texts = [f"text number {i}" for i in range(300)]
    seen: list[int] = []

    def on_event(e: dict[str, object]) -> None:
        if e.get("event") == "progress":
            seen.append(1)
            if len(seen) == 3:
                stop.set()

    with Embedder(engine=spec, batch_tokens=64, on_event=on_event) as emb:
        windows = list(emb.stream([str(i) for i in range(300)], texts, stop=stop))
        report = emb.last_report
    assert report.interrupted
    done = sum(int(w.ok.sum()) for w in windows)
    assert 0 < done < 300 and done == report.embedded
    expected = _expected(emb, texts)
    for w in windows:
        rows = w.ok.nonzero()[0]
        np.testing.assert_allclose(w.vectors[rows], expected[w.start + rows], atol=1e-6)


def test_non_string_text_is_rejected(fake: FakeEngineSpec) -> None:
    with Embedder(engine=fake) as emb, pytest.raises(ValueError, match="text 1 is int"):
        emb.embed(["ok", 3])  # type: ignore[list-item]


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="long_text"):
        Embedder(engine=FakeEngineSpec(), long_text="middle")  # type: ignore[arg-type]
