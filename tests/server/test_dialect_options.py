"""What the Ollama and TEI routes do to vectors beyond the OpenAI route, on a model without a
Normalize module (marked Matryoshka), on the real fp32 engine: Ollama's /api/embed and TEI's
normalize=true L2-normalise, /api/embeddings and normalize=false keep the model's vector,
dimensions cut and renormalise; and TEI's /tokenize counts the named prompt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conformance as C
import httpx
import numpy as np
import pytest
from server_support import LiveServer, fake_executor

from embedpool.models import ResolvedModel, resolve_model
from embedpool.tokenization import TextTokenizer

NAME = "cls-new-string"  # cls pooling, no Normalize: vectors as computed
TEXTS = C.TEXTS[:4]


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    model = resolve_model(C.matryoshka(NAME, tmp_path_factory.mktemp("dialect-options")))
    assert not model.normalize and model.matryoshka
    return model


@pytest.fixture(scope="module")
def live(raw_model: ResolvedModel) -> Iterator[LiveServer]:
    from embedpool.server import ServerSettings, create_app, default_executor_factory

    app = create_app(
        ServerSettings(api_key="", precision="fp32"),
        default_executor_factory(raw_model, "fp32"),
        model=raw_model,
    )
    server = LiveServer.start(app)
    yield server
    server.stop()


def post(live: LiveServer, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{live.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out


def test_normalisation_per_route(live: LiveServer) -> None:
    raw = np.array(
        [d["embedding"] for d in post(live, "/v1/embeddings", {"input": TEXTS})["data"]],
        dtype=np.float32,
    )
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1) > 1e-3), norms  # the model's own vectors are not unit
    golden = C.golden(NAME)["default"][: len(TEXTS)]
    np.testing.assert_allclose(raw, golden, atol=1e-4)  # and they are the reference's

    ollama = np.array(post(live, "/api/embed", {"input": TEXTS})["embeddings"])
    np.testing.assert_allclose(ollama, unit(raw), atol=1e-6)  # Ollama normalises
    legacy = np.array(post(live, "/api/embeddings", {"prompt": TEXTS[0]})["embedding"])
    np.testing.assert_allclose(legacy, raw[0], atol=1e-6)  # the older route does not
    tei = np.array(post(live, "/embed", {"inputs": TEXTS}))
    np.testing.assert_allclose(tei, unit(raw), atol=1e-6)  # TEI's normalize defaults to true
    tei_raw = np.array(post(live, "/embed", {"inputs": TEXTS, "normalize": False}))
    np.testing.assert_allclose(tei_raw, raw, atol=1e-6)


def test_dimensions_cut_and_renormalise(live: LiveServer) -> None:
    raw = np.array(
        [d["embedding"] for d in post(live, "/v1/embeddings", {"input": TEXTS})["data"]],
        dtype=np.float32,
    )
    want = unit(raw[:, :8])
    got = np.array(post(live, "/api/embed", {"input": TEXTS, "dimensions": 8})["embeddings"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    tei = np.array(post(live, "/embed", {"inputs": TEXTS, "dimensions": 8}))
    np.testing.assert_allclose(tei, want, atol=1e-6)
    tei_raw = np.array(post(live, "/embed", {"inputs": TEXTS, "dimensions": 8, "normalize": False}))
    np.testing.assert_allclose(tei_raw, raw[:, :8], atol=1e-6)


def test_tei_tokenize_counts_the_named_prompt(tmp_path: Path) -> None:
    from embedpool.server import ServerSettings, create_app

    prompted = resolve_model(C.materialise("include-prompt-false-modes", tmp_path))
    tok = TextTokenizer.for_model(prompted)
    prompt = tok.resolve_prompt(None, "query")
    assert prompt  # the fixture has a query prompt
    live = LiveServer.start(create_app(ServerSettings(api_key=""), fake_executor(), model=prompted))
    try:
        got = post(live, "/tokenize", {"inputs": ["sort a list"], "prompt_name": "query"})[0]
        plain = post(live, "/tokenize", {"inputs": ["sort a list"]})[0]
    finally:
        live.stop()
    assert len(got) == tok.count(["sort a list"], prompt=prompt)[0]
    assert len(got) > len(plain)
    full = (prompt + "sort a list").encode()
    assert [t["text"] for t in got if not t["special"]] == [
        full[t["start"] : t["stop"]].decode() for t in got if not t["special"]
    ]
    assert got[-2]["stop"] == len(full)  # offsets run into prompt + text
