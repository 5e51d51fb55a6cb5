"""One key, one set of limits for every route of every dialect (OpenAI, Ollama, TEI): 401
without the key, 413 over the body limit, 429 + Retry-After when the queue is full, 503 when
the pool fails, a failing input named; each answered in its dialect's error shape, and no body
a client sends gives a 5xx. Over the fake engine (the vectors do not matter here)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import DIM, GatedEngine, LiveServer

from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.testing import FakeEngineSpec
from embedpool.tokenization import TextTokenizer

DEADLINE_S = 30.0
KEY = "s3cret"
MODEL = "all-MiniLM-L6-v2"

# (dialect, method, path, a valid body or None)
ROUTES: list[tuple[str, str, str, Any]] = [
    ("openai", "POST", "/v1/embeddings", {"input": "a"}),
    ("openai", "GET", "/v1/models", None),
    ("ollama", "POST", "/api/embed", {"model": MODEL, "input": ["a", "b"]}),
    ("ollama", "POST", "/api/embeddings", {"model": MODEL, "prompt": "a"}),
    ("ollama", "POST", "/api/show", {"model": MODEL}),
    ("ollama", "GET", "/api/tags", None),
    ("ollama", "GET", "/api/ps", None),
    ("ollama", "GET", "/api/version", None),
    ("tei", "POST", "/", {"inputs": "a"}),
    ("tei", "POST", "/embed", {"inputs": ["a", "b"]}),
    ("tei", "POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
    ("tei", "POST", "/tokenize", {"inputs": "a"}),
    ("tei", "POST", "/decode", {"ids": [101, 102]}),
    ("tei", "GET", "/info", None),
]
POSTS = [r for r in ROUTES if r[1] == "POST"]
#: Routes that embed: they go through admission (429) and the pool (503, failing inputs).
EMBEDDING = [r for r in POSTS if r[2] not in ("/api/show", "/tokenize", "/decode")]


def _ids(routes: list[tuple[str, str, str, Any]]) -> list[str]:
    return [f"{m} {p}" for _, m, p, _ in routes]


def assert_shape(dialect: str, r: httpx.Response, status: int) -> dict[str, Any]:
    """``r`` is an error of ``status`` in ``dialect``'s shape, with a message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict), body
    if dialect == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        message = body["error"]["message"]
    elif dialect == "ollama":
        assert set(body) == {"error"}, body
        message = body["error"]
    else:
        assert set(body) == {"error", "error_type"}, body
        assert isinstance(body["error_type"], str) and body["error_type"]
        message = body["error"]
    assert isinstance(message, str) and message
    return dict(body)


def call(
    live: LiveServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    content: bytes | None = None,
    client: httpx.Client | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if content is None and body is not None:
        content = json.dumps(body).encode()
    if content is not None:
        headers["content-type"] = "application/json"
    if client is not None:  # keep-alive
        return client.request(method, f"{live.url}{path}", content=content, headers=headers)
    return httpx.request(
        method, f"{live.url}{path}", content=content, headers=headers, timeout=DEADLINE_S
    )


@pytest.fixture(scope="module")
def keyed(model: Any) -> Iterator[LiveServer]:
    from embedpool.server import ServerSettings, create_app

    settings = ServerSettings(api_key=KEY, max_items_per_request=8, max_request_bytes=64 * 1024)
    live = LiveServer.start(
        create_app(settings, lambda: InProcessExecutor(FakeEngineSpec(dim=DIM).build), model=model)
    )
    yield live
    live.stop()


@pytest.mark.parametrize(("dialect", "method", "path", "body"), ROUTES, ids=_ids(ROUTES))
def test_every_route_needs_the_key(
    keyed: LiveServer, dialect: str, method: str, path: str, body: Any
) -> None:
    assert_shape(dialect, call(keyed, method, path, body, key=None), 401)
    r = assert_shape(dialect, call(keyed, method, path, body, key="wrong"), 401)
    assert "API key" in json.dumps(r)
    ok = call(keyed, method, path, body)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("dialect", "method", "path", "body"), POSTS, ids=_ids(POSTS))
def test_body_limit_on_every_route(
    keyed: LiveServer, dialect: str, method: str, path: str, body: Any
) -> None:
    big = json.dumps({"input": "a" * 70_000, "inputs": "a", "prompt": "a"}).encode()
    err = assert_shape(dialect, call(keyed, method, path, content=big), 413)
    assert "65536" in json.dumps(err)  # names the limit

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        yield b'{"inputs": "'
        for _ in range(20):
            yield b"a" * 8192
        yield b'"}'

    r = httpx.request(
        method,
        f"{keyed.url}{path}",
        content=chunks(),
        timeout=DEADLINE_S,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert_shape(dialect, r, 413)
    assert call(keyed, method, path, body).status_code == 200


@pytest.mark.parametrize(
    ("dialect", "path", "body"),
    [
        ("ollama", "/api/embed", {"input": ["a"] * 9}),
        ("tei", "/embed", {"inputs": ["a"] * 9}),
        ("tei", "/tokenize", {"inputs": ["a"] * 9}),
        ("tei", "/decode", {"ids": [[101]] * 9}),
    ],
    ids=["ollama", "tei-embed", "tei-tokenize", "tei-decode"],
)
def test_item_limit_on_every_route(keyed: LiveServer, dialect: str, path: str, body: Any) -> None:
    err = assert_shape(
        dialect, call(keyed, "POST", path, body), 400 if dialect == "ollama" else 422
    )
    assert "8" in json.dumps(err)


@pytest.mark.parametrize(
    ("dialect", "method", "path", "status"),
    [
        ("ollama", "GET", "/api/embed", 405),
        ("ollama", "GET", "/api/nothing", 404),
        ("tei", "GET", "/embed", 405),
        ("tei", "PUT", "/", 405),
        ("tei", "POST", "/embed_all", 422),
        ("tei", "POST", "/predict", 422),
    ],
    ids=["ollama-405", "ollama-404", "tei-405", "tei-root-405", "tei-embed-all", "tei-predict"],
)
def test_routing_errors_in_the_dialect_shape(
    keyed: LiveServer, dialect: str, method: str, path: str, status: int
) -> None:
    err = assert_shape(dialect, call(keyed, method, path, {"inputs": "a"}), status)
    assert path in json.dumps(err)


# ----------------------------------------------------------------------------- admission
def test_queue_full_is_429_in_every_dialect(serve: Callable[..., LiveServer]) -> None:
    gate = threading.Event()
    engines: list[GatedEngine] = []

    def build() -> GatedEngine:
        engines.append(GatedEngine(FakeEngineSpec(dim=DIM), gate))
        return engines[-1]

    live = serve(lambda: InProcessExecutor(build), max_queue_tokens=20)
    first: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: first.append(
            call(live, "POST", "/v1/embeddings", {"input": ["one two three"]}, key=None)
        )
    )
    t.start()
    try:
        assert engines and engines[0].entered.wait(DEADLINE_S), "the first request never ran"
        long = json.dumps("this request does not fit in the queue at all " * 3)
        for dialect, method, path, body in EMBEDDING:  # while the queue is full
            big = json.loads(json.dumps(body).replace('"a"', long).replace('"b"', long))
            r = call(live, method, path, big, key=None)
            assert_shape(dialect, r, 429)
            assert int(r.headers["Retry-After"]) >= 1, path
    finally:
        gate.set()
        t.join(DEADLINE_S)
    assert first and first[0].status_code == 200
    for _, method, path, body in EMBEDDING:
        assert call(live, method, path, body, key=None).status_code == 200, path


class _FailingBatches(InProcessExecutor):
    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        fut.set_exception(RuntimeError("worker lost (test)"))
        return fut


def test_pool_failure_is_503_in_every_dialect(serve: Callable[..., LiveServer]) -> None:
    live = serve(lambda: _FailingBatches(FakeEngineSpec(dim=DIM).build))
    for dialect, method, path, body in EMBEDDING:
        err = assert_shape(dialect, call(live, method, path, body, key=None), 503)
        assert "worker lost" in json.dumps(err)
        if dialect == "tei":
            assert err["error_type"] == "Unhealthy"
    assert httpx.get(f"{live.url}/health", timeout=DEADLINE_S).status_code == 200


def test_failing_input_is_named_in_every_dialect(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    poison = tuple(tokenizer.token_ids("poison"))
    live = serve(lambda: InProcessExecutor(FakeEngineSpec(dim=DIM, raise_on=poison).build))
    r = call(live, "POST", "/api/embed", {"input": ["fine", "poison"]}, key=None)
    assert "input[1]" in assert_shape("ollama", r, 422)["error"]
    r = call(live, "POST", "/embed", {"inputs": ["fine", "poison"]}, key=None)
    err = assert_shape("tei", r, 424)  # TEI's status for an inference failure
    assert err["error_type"] == "Backend" and "input[1]" in err["error"]
    assert call(live, "POST", "/embed", {"inputs": ["fine"]}, key=None).status_code == 200


# ----------------------------------------------------------------------------- no 5xx
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    # lone surrogates: JSON carries them ("\ud800"), UTF-8 and the tokenizer cannot
    | st.sampled_from(["a\ud800b", "\udfff", "query\udc80"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "model",
    "input",
    "inputs",
    "prompt",
    "truncate",
    "dimensions",
    "keep_alive",
    "options",
    "normalize",
    "prompt_name",
    "truncation_direction",
    "ids",
    "add_special_tokens",
    "skip_special_tokens",
    "name",
    "parameters",
    "query",
    "texts",
]
_bodies = st.one_of(
    _json, st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=5), st.binary(max_size=40)
)


@pytest.mark.parametrize(("dialect", "method", "path", "valid"), POSTS, ids=_ids(POSTS))
def test_nothing_a_client_sends_gives_a_5xx(
    keyed: LiveServer, dialect: str, method: str, path: str, valid: Any
) -> None:
    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(body=_bodies)
    def check(body: Any) -> None:
        if isinstance(body, bytes):
            r = call(keyed, method, path, content=body, client=client)
        else:
            r = call(
                keyed,
                method,
                path,
                {**valid, **body} if isinstance(body, dict) else body,
                client=client,
            )
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert_shape(dialect, r, r.status_code)

    with httpx.Client(timeout=DEADLINE_S) as client:
        check()


# ----------------------------------------------------------------------------- TEI tokens
def test_tei_tokenize_counts_what_the_model_is_fed(
    keyed: LiveServer, tokenizer: TextTokenizer
) -> None:
    texts = ["def f(x): return x", "héllo wörld " * 200]
    r = call(keyed, "POST", "/tokenize", {"inputs": texts})
    assert r.status_code == 200, r.text
    tokens = r.json()
    fed = tokenizer.encode(texts)
    assert [len(t) for t in tokens] == fed.n_tokens  # untruncated: the second is > 256
    assert fed.n_tokens[1] > tokenizer.max_length
    for toks, text in zip(tokens, texts, strict=True):
        assert toks[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
        data = text.encode()
        for t in toks[1:-1]:  # TEI's offsets: UTF-8 bytes
            assert t["text"] == data[t["start"] : t["stop"]].decode()
            assert not t["special"]
    bare = call(keyed, "POST", "/tokenize", {"inputs": "héllo", "add_special_tokens": False})
    assert [t["text"] for t in bare.json()[0]] == ["héllo"]
    assert bare.json()[0][0]["stop"] == len("héllo".encode())
    bad = call(keyed, "POST", "/tokenize", {"inputs": "a", "prompt_name": "nope"})
    assert "nope" in assert_shape("tei", bad, 422)["error"]


def test_tei_decode_round_trips(keyed: LiveServer, tokenizer: TextTokenizer) -> None:
    ids = [t["id"] for t in call(keyed, "POST", "/tokenize", {"inputs": "sort a list"}).json()[0]]
    assert call(keyed, "POST", "/decode", {"ids": ids}).json() == ["sort a list"]
    both = call(keyed, "POST", "/decode", {"ids": [ids, ids], "skip_special_tokens": False})
    assert both.json() == ["[CLS] sort a list [SEP]"] * 2
    err = assert_shape("tei", call(keyed, "POST", "/decode", {"ids": [10**9]}), 422)
    assert err["error_type"] == "Tokenizer" and "1000000000" in err["error"]
    assert (
        assert_shape("tei", call(keyed, "POST", "/decode", {"ids": []}), 400)["error_type"]
        == "Empty"
    )


def test_root_get_is_an_open_health_check(keyed: LiveServer) -> None:
    r = httpx.get(f"{keyed.url}/", timeout=DEADLINE_S)  # no key, as probes send none
    assert r.status_code == 200 and "running" in r.text


@pytest.mark.parametrize(
    ("dialect", "path", "body", "field"),
    [
        ("ollama", "/api/embed", b'{"input": ["ok", "a\\ud800b"]}', "input[1]"),
        ("ollama", "/api/embeddings", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("ollama", "/api/embed", b'{"model": "m\\ud800", "input": "x"}', "model"),
        ("tei", "/embed", b'{"inputs": "a\\ud800b"}', "inputs"),
        ("tei", "/tokenize", b'{"inputs": ["x", "a\\ud800b"]}', "inputs[1]"),
        (
            "tei",
            "/similarity",
            b'{"inputs": {"source_sentence": "\\udfff", "sentences": ["x"]}}',
            "source_sentence",
        ),
        ("openai", "/v1/embeddings", b'{"input": "x", "model": "m\\ud800"}', "model"),
    ],
    ids=[
        "ollama-input",
        "ollama-prompt",
        "ollama-model",
        "tei-embed",
        "tei-tokenize",
        "tei-similarity",
        "openai-model",
    ],
)
def test_lone_surrogates_are_4xx_naming_the_field(
    keyed: LiveServer, dialect: str, path: str, body: bytes, field: str
) -> None:
    r = call(keyed, "POST", path, content=body)
    assert 400 <= r.status_code < 500, r.text
    assert field.split("[")[0].split(".")[-1] in json.dumps(assert_shape(dialect, r, r.status_code))


def test_metrics_count_every_dialect_route_by_name(serve: Callable[..., LiveServer]) -> None:
    live = serve()
    for _, method, path, body in ROUTES:
        assert call(live, method, path, body, key=None).status_code == 200, path
    metrics = httpx.get(f"{live.url}/metrics", timeout=DEADLINE_S).text
    for _, _, path, _ in ROUTES:
        assert f'route="{path}",status="200"' in metrics, path


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (300, 300.0),
        (0, 0.0),
        (-1, math.inf),
        (2.5, 2.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("0", 0.0),
        ("-1m", math.inf),
    ],
)
def test_keep_alive_is_read_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    from embedpool.server.ollama import keep_alive_s

    assert keep_alive_s(value) == seconds


@pytest.mark.parametrize("value", ["5x", "-1", "10", "", "m", "5m3", True, [1], {"a": 1}])
def test_a_bad_keep_alive_is_400(keyed: LiveServer, value: Any) -> None:
    r = call(keyed, "POST", "/api/embed", {"input": "a", "keep_alive": value})
    err = assert_shape("ollama", r, 400)["error"]
    assert "duration" in err or "Unsupported type" in err
