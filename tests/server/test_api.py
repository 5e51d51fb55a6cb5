"""The OpenAI-compatible API as the official ``openai`` client and plain HTTP see it."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest
from server_support import DIM, LiveServer, decode_base64, expected_vectors, fake_executor

from embedpool.executor import WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.models import ResolvedModel
from embedpool.testing import FakeEngineSpec, fake_vectors
from embedpool.tokenization import TextTokenizer

TEXTS = ["def f(x):\n    return x + 1", "hello world", "", "naïve café ☕", "x" * 50]


def test_openai_client_float_and_base64_equal_engine(
    server: LiveServer, tokenizer: TextTokenizer
) -> None:
    client = server.openai()
    want = expected_vectors(tokenizer, TEXTS)
    as_float = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float"
    )
    as_default = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=TEXTS
    )  # base64 on the wire
    as_b64 = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="base64"
    )
    got_float = np.array([d.embedding for d in as_float.data], dtype=np.float32)
    got_default = np.array([d.embedding for d in as_default.data], dtype=np.float32)
    got_b64 = np.stack([decode_base64(str(d.embedding)) for d in as_b64.data])
    assert [d.index for d in as_float.data] == list(range(len(TEXTS)))
    np.testing.assert_array_equal(got_float, want)
    np.testing.assert_array_equal(got_default, want)
    np.testing.assert_array_equal(got_b64, want)
    assert as_float.model == "all-MiniLM-L6-v2"
    tokens = sum(len(s) for s in tokenizer.encode(TEXTS).sequences)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens


def test_single_string_input_and_unprefixed_route(
    server: LiveServer, tokenizer: TextTokenizer
) -> None:
    r = httpx.post(f"{server.url}/embeddings", json={"input": "hello world"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    np.testing.assert_array_equal(
        np.array(body["data"][0]["embedding"], dtype=np.float32),
        expected_vectors(tokenizer, ["hello world"])[0],
    )
    assert r.headers["X-Embedpool-Truncated"] == "0"


def test_empty_string_is_embedded_as_cls_sep(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [""]}, timeout=30)
    assert r.status_code == 200, r.text
    want = fake_vectors([np.array([101, 102], dtype=np.int32)], DIM)[0]
    np.testing.assert_array_equal(
        np.array(r.json()["data"][0]["embedding"], dtype=np.float32), want
    )


@pytest.mark.parametrize(
    "name",
    [
        "all-MiniLM-L6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        "ALL-MINILM-L6-V2",
        "text-embedding-3-small",
    ],
    ids=["name", "hub-id", "case", "alias"],
)
def test_model_names_and_aliases(serve: Callable[..., LiveServer], name: str) -> None:
    live = serve(served_model_names=("text-embedding-3-small",))
    res = live.openai().embeddings.create(model=name, input=["a"])
    assert res.model == "all-MiniLM-L6-v2"


def test_models_list_and_retrieve(server: LiveServer) -> None:
    client = server.openai()
    ids = [m.id for m in client.models.list()]
    assert "all-MiniLM-L6-v2" in ids and "sentence-transformers/all-MiniLM-L6-v2" in ids
    assert client.models.retrieve("all-MiniLM-L6-v2").id == "all-MiniLM-L6-v2"
    assert httpx.get(f"{server.url}/models", timeout=10).json()["object"] == "list"
    r = httpx.get(f"{server.url}/v1/models/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_model_is_404_listing_served_models(server: LiveServer) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        server.openai().embeddings.create(model="text-embedding-ada-002", input=["a"])
    err = info.value.body
    assert isinstance(err, dict)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "all-MiniLM-L6-v2" in err["message"]


@pytest.mark.parametrize(
    ("dimensions", "status"), [(DIM, 200), (128, 400), (0, 400)], ids=["native", "smaller", "zero"]
)
def test_dimensions(server: LiveServer, dimensions: int, status: int) -> None:
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"input": ["a"], "dimensions": dimensions, "user": "u1"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "dimensions"
        assert (
            "was not trained for truncated dimensions" if dimensions else "between 1 and"
        ) in r.json()["error"]["message"]
        assert "384" in r.json()["error"]["message"]


def test_truncation_is_reported(server: LiveServer, tokenizer: TextTokenizer) -> None:
    texts = ["short", "word " * 400, "also short", "more " * 300]
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Embedpool-Truncated"] == "2"
    assert r.headers["X-Embedpool-Truncated-Indices"] == "1,3"
    assert r.json()["truncated_indices"] == [1, 3]
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected_vectors(tokenizer, texts))


def test_window_mode_averages_windows(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    live = serve(long_text="window", batch_tokens=512)
    texts = ["word " * 700, "short", " ".join(f"w{i}" for i in range(400))]
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Embedpool-Truncated"] == "0"
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected_vectors(tokenizer, texts, "window"), atol=1e-6)
    assert len(tokenizer.encode(texts, "window").sequences) > len(texts)


def test_large_request_is_split_into_batches_in_order(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    live = serve(batch_tokens=256, max_batch_items=16)
    texts = [f"item {i} " + "tok " * (i % 37) for i in range(300)]
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected_vectors(tokenizer, texts))
    metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
    count = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("embedpool_batch_tokens_count")
    )
    assert count >= 300 / 16


def test_health_ready_metrics(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a", "b"]}, timeout=30)
    httpx.post(f"{server.url}/v1/embeddings", json={"input": []}, timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in [
        "embedpool_requests_total",
        "embedpool_request_duration_seconds_bucket",
        "embedpool_queue_tokens",
        "embedpool_batch_tokens_bucket",
        "embedpool_workers",
        "embedpool_workers_rss_bytes",
        "embedpool_server_rss_bytes",
        "embedpool_oom_kills_total",
        "embedpool_batch_retries_total",
        "embedpool_cache_hits_total",
        "embedpool_inflight_batches",
        "embedpool_rejected_requests_total",
        "embedpool_embedded_items_total",
    ]:
        assert name in text, name
    assert 'embedpool_requests_total{route="/v1/embeddings",status="200"} 1.0' in text
    assert 'embedpool_requests_total{route="/v1/embeddings",status="400"} 1.0' in text


class _FailingProbe(InProcessExecutor):
    def submit(self, batch: WorkBatch):  # type: ignore[no-untyped-def]
        if batch.item_ids == ("probe",):
            raise RuntimeError("probe refused")
        return super().submit(batch)


def test_ready_fails_when_the_probe_fails(serve: Callable[..., LiveServer]) -> None:
    live = serve(lambda: _FailingProbe(FakeEngineSpec(dim=DIM).build))
    r = httpx.get(f"{live.url}/ready", timeout=30)
    assert r.status_code == 503 and "probe refused" in r.json()["reason"]


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Basic s3cret", 401),
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
    ],
    ids=["missing", "wrong-key", "wrong-scheme", "right", "lowercase"],
)
def test_bearer_auth(serve: Callable[..., LiveServer], header: str | None, status: int) -> None:
    live = serve(api_key="s3cret")
    headers = {"Authorization": header} if header else {}
    r = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["a"]}, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    # Probes need no key (orchestrators send none); /metrics and the API do.
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{live.url}/ready", timeout=30).status_code == 200
    assert httpx.get(f"{live.url}/metrics", headers=headers, timeout=10).status_code == (
        401 if status == 401 else 200
    )
    assert httpx.get(f"{live.url}/v1/models", headers=headers, timeout=10).status_code == status


def test_openai_client_with_api_key(serve: Callable[..., LiveServer]) -> None:
    import openai

    live = serve(api_key="s3cret")
    assert (
        len(live.openai("s3cret").embeddings.create(model="all-MiniLM-L6-v2", input="a").data) == 1
    )
    with pytest.raises(openai.AuthenticationError):
        live.openai("nope").embeddings.create(model="all-MiniLM-L6-v2", input="a")


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedpool.server import ServerSettings

    monkeypatch.setenv("EMBEDPOOL_API_KEY", "from-env")
    assert ServerSettings().resolved_api_key() == "from-env"
    assert ServerSettings(api_key="explicit").resolved_api_key() == "explicit"
    assert ServerSettings(api_key="").resolved_api_key() is None


def test_import_embedpool_does_not_load_web_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys, embedpool, embedpool.microbatcher; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_real_model_openai_client_matches_cli(
    serve: Callable[..., LiveServer], model: ResolvedModel
) -> None:
    """float and base64 from the real model equal the library/CLI's vectors for the same texts."""
    from embedpool.job import embed
    from embedpool.server import default_executor_factory

    live = serve(default_executor_factory(model, "int8"))
    client = live.openai()
    as_float = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float"
    )
    as_b64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    got_float = np.array([d.embedding for d in as_float.data], dtype=np.float32)
    got_b64 = np.array([d.embedding for d in as_b64.data], dtype=np.float32)
    np.testing.assert_array_equal(got_float, got_b64)
    cli = embed(TEXTS, precision="int8")
    cos = np.sum(got_float * cli, axis=1)
    assert cos.min() > 0.9999, cos


def test_fake_executor_is_deterministic(tokenizer: TextTokenizer) -> None:
    ex = fake_executor()()
    try:
        seqs = tuple(tokenizer.encode(["a", "b"]).sequences)
        res = ex.submit(WorkBatch(0, seqs)).result(timeout=30)
        np.testing.assert_array_equal(res.vectors, fake_vectors(seqs, DIM))
    finally:
        ex.close()
