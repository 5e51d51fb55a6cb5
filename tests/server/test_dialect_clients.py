"""The Ollama and TEI dialects under their real clients, unchanged, against a real server on
127.0.0.1 serving the real model: the official ``ollama`` client (embed, embeddings, list,
show, ps), LangChain's ``OllamaEmbeddings``, ``huggingface_hub.InferenceClient``
(feature_extraction, sentence_similarity). Each client's vectors equal the OpenAI route's for
the same texts; errors reach each client as its dialect's error.

Not here: LangChain's ``HuggingFaceEndpointEmbeddings`` (langchain-huggingface). Unchanged, it
reaches a self-hosted TEI only as ``HuggingFaceEndpointEmbeddings(model="http://HOST:PORT")``.
The current release, 1.2.x (1.2.0-1.2.3), refuses that in its validator (``validate_environment``:
"`model` must be a HuggingFace repo ID, not a URL"); a repo id is sent to
``https://router.huggingface.co/hf-inference/models/<id>/pipeline/feature-extraction``
(huggingface_hub's ``INFERENCE_PROXY_TEMPLATE``, a constant no setting moves), and a
``client=`` passed in is replaced by that validator. 1.0.x-1.1.x accept the URL and work
against this server (checked by hand: 1.1.0 with huggingface_hub 0.36.2, ``embed_documents``
and ``embed_query``), but require ``huggingface_hub<1`` (1.2 requires ``<2``), and this
environment has huggingface_hub 2.x (the ``InferenceClient`` tests below run on it): no
release of langchain-huggingface installs beside it, so the client cannot be tested here.
See the README's "TEI's API"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from server_support import LiveServer

from embedpool.models import ResolvedModel

pytestmark = pytest.mark.slow  # the real model's engine

KEY = "dialect-key"
MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "def add(a, b):\n    return a + b",
    "How do I sort a list in Python?",
    "héllo wörld, ünïcode",
    "",
    "a long chunk " * 200,
]  # > 256 tokens: truncated on every route alike


@pytest.fixture(scope="module")
def live(model: ResolvedModel) -> Iterator[LiveServer]:
    from embedpool.server import ServerSettings, create_app, default_executor_factory

    app = create_app(
        ServerSettings(api_key=KEY), default_executor_factory(model, "int8"), model=model
    )
    server = LiveServer.start(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(live: LiveServer) -> np.ndarray:
    """The OpenAI route's vectors for TEXTS."""
    data = live.openai(KEY).embeddings.create(model=MODEL, input=TEXTS).data
    return np.array([d.embedding for d in data], dtype=np.float32)


def assert_same(got: Any, want: np.ndarray) -> None:
    arr = np.asarray(got, dtype=np.float32)
    assert arr.shape == want.shape
    np.testing.assert_allclose(arr, want, atol=2e-6, rtol=0)


def ollama_client(live: LiveServer, key: str = KEY) -> Any:
    """An ``ollama.Client`` (a context manager: it closes its connections)."""
    from ollama import Client

    return Client(host=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def ollama(live: LiveServer) -> Iterator[Any]:
    with ollama_client(live) as client:
        yield client


# ----------------------------------------------------------------------------- Ollama
def test_ollama_embed_equals_openai(ollama: Any, reference: np.ndarray) -> None:
    client = ollama
    answer = client.embed(model=MODEL, input=[t for t in TEXTS if t])
    assert answer.model == MODEL
    assert_same(answer.embeddings, reference[[i for i, t in enumerate(TEXTS) if t]])
    assert answer.prompt_eval_count is not None and answer.prompt_eval_count > 256
    assert answer.total_duration is not None and answer.total_duration > 0
    single = client.embed(model=f"{MODEL}:latest", input=TEXTS[1])
    assert_same(single.embeddings, reference[1:2])
    by_ollama_name = client.embed(model="all-minilm", input=TEXTS[1])  # Ollama's library name
    assert_same(by_ollama_name.embeddings, reference[1:2])
    # Ollama's rule: an empty input embeds nothing
    assert client.embed(model=MODEL, input="").embeddings == []


def test_ollama_embeddings_equals_openai(ollama: Any, reference: np.ndarray) -> None:
    got = ollama.embeddings(model=MODEL, prompt=TEXTS[0]).embedding
    assert_same([got], reference[:1])


def test_ollama_dimensions_and_truncate(ollama: Any) -> None:
    from ollama import ResponseError

    client = ollama
    with pytest.raises(ResponseError) as bad:
        client.embed(model=MODEL, input=["short", TEXTS[4]], truncate=False)
    assert bad.value.status_code == 400
    assert "context length" in bad.value.error and "input[1]" in bad.value.error
    with pytest.raises(ResponseError) as dims:  # MiniLM is not trained for fewer dimensions
        client.embed(model=MODEL, input="a", dimensions=128)
    assert dims.value.status_code == 400 and "dimensions" in dims.value.error
    assert len(client.embed(model=MODEL, input="a", dimensions=384).embeddings[0]) == 384


def test_ollama_list_show_ps(ollama: Any, model: ResolvedModel) -> None:
    client = ollama
    listed = client.list().models
    assert [m.model for m in listed] == [f"{MODEL}:latest"]
    assert listed[0].size is not None and listed[0].size > 1_000_000
    assert listed[0].digest == model.weights_sha256
    assert listed[0].details is not None and listed[0].details.family == "bert"
    shown = client.show(MODEL)
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["bert.embedding_length"] == 384
    assert shown.modelinfo["bert.context_length"] == model.max_length
    running = client.ps().models
    assert [m.model for m in running] == [f"{MODEL}:latest"]
    assert running[0].context_length == model.max_length


def test_ollama_errors_reach_the_client(live: LiveServer, ollama: Any) -> None:
    from ollama import ResponseError

    with pytest.raises(ResponseError) as missing:
        ollama.embed(model="nomic-embed-text", input="a")
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'nomic-embed-text' not found"
    with pytest.raises(ResponseError) as unknown:
        ollama.show("nomic-embed-text")
    assert unknown.value.status_code == 404
    with ollama_client(live, "wrong") as wrong, pytest.raises(ResponseError) as denied:
        wrong.embed(model=MODEL, input="a")
    assert denied.value.status_code == 401 and "API key" in denied.value.error


def test_langchain_ollama_embeddings(live: LiveServer, reference: np.ndarray) -> None:
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(
        model=MODEL,
        base_url=live.url,
        validate_model_on_init=True,
        client_kwargs={"headers": {"Authorization": f"Bearer {KEY}"}},
    )
    try:
        assert_same(emb.embed_documents(TEXTS[:3]), reference[:3])
        assert_same([emb.embed_query(TEXTS[1])], reference[1:2])
    finally:
        assert emb._client is not None
        emb._client.close()  # type: ignore[no-untyped-call]  # its httpx connections (LangChain never closes them)


# ----------------------------------------------------------------------------- TEI
def hf_client(live: LiveServer, key: str = KEY) -> Any:
    """An ``InferenceClient`` (a context manager: it closes its connections)."""
    from huggingface_hub import InferenceClient

    return InferenceClient(base_url=live.url, api_key=key, timeout=60)


@pytest.fixture(scope="module")
def hf(live: LiveServer) -> Iterator[Any]:
    # CI sets HF_HUB_OFFLINE=1 (no hub downloads), which makes huggingface_hub refuse every
    # request, even to this server on 127.0.0.1: lift it for these clients only.
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        with hf_client(live) as client:
            yield client


def test_inference_client_feature_extraction(hf: Any, reference: np.ndarray) -> None:
    client = hf
    for i, text in enumerate(TEXTS):
        got = client.feature_extraction(text)
        assert_same(got, reference[i : i + 1])
    query = client.feature_extraction(TEXTS[1], prompt_name="query", normalize=True, truncate=True)
    assert_same(query, reference[1:2])  # MiniLM's query prompt is empty


def test_inference_client_sentence_similarity(hf: Any, reference: np.ndarray) -> None:
    scores = hf.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:3])
    np.testing.assert_allclose(scores, reference[1:3] @ reference[0], atol=1e-5)


def test_inference_client_errors(live: LiveServer, hf: Any) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as too_long:
        hf.feature_extraction(TEXTS[4], truncate=False)
    assert too_long.value.response.status_code == 422
    assert too_long.value.response.json()["error_type"] == "Validation"
    assert "must have less than 256 tokens" in str(too_long.value)
    with hf_client(live, "wrong") as wrong, pytest.raises(HfHubHTTPError) as denied:
        wrong.feature_extraction("a")
    assert denied.value.response.status_code == 401


def test_tei_embed_normalize_and_info(
    live: LiveServer, reference: np.ndarray, model: ResolvedModel
) -> None:
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        f"{live.url}/embed", json={"inputs": TEXTS, "normalize": False}, headers=auth, timeout=60
    )
    assert_same(r.json(), reference)  # MiniLM ends in Normalize: its own vectors are unit
    assert r.headers["X-Embedpool-Truncated-Indices"] == "4"
    info = httpx.get(f"{live.url}/info", headers=auth, timeout=60).json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == model.max_length
    assert info["model_dtype"] == "int8"
