"""Everything a client can get wrong is a 4xx in OpenAI's error shape, naming the field and the
input index; pool failures are 503, a full queue 429 + Retry-After; never a 500."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
from server_support import DIM, GatedEngine, LiveServer, expected_vectors

from embedpool.errors import PoolBroken
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.testing import FakeEngineSpec
from embedpool.tokenization import TextTokenizer

DEADLINE_S = 30.0

# (id, body: bytes or JSON-able, status, error code, param)
BAD_INPUTS: list[tuple[str, Any, int, str, str | None]] = [
    ("not-json", b"{input: nope", 400, "invalid_json", None),
    ("bad-utf8", b'{"input": "\xff\xfe"}', 400, "invalid_json", None),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ("array-body", ["a"], 400, "invalid_type", None),
    ("null-body", b"null", 400, "invalid_type", None),
    ("empty-body", b"", 400, "invalid_json", None),
    ("no-input", {"model": "all-MiniLM-L6-v2"}, 400, "missing_required_parameter", "input"),
    ("null-input", {"input": None}, 400, "invalid_type", "input"),
    ("number-input", {"input": 3.5}, 400, "invalid_type", "input"),
    ("object-input", {"input": {"a": 1}}, 400, "invalid_type", "input"),
    ("empty-list", {"input": []}, 400, "empty_input", "input"),
    ("mixed-types", {"input": ["ok", "fine", 7]}, 400, "invalid_type", "input[2]"),
    ("null-item", {"input": ["ok", None]}, 400, "invalid_type", "input[1]"),
    ("nested-strings", {"input": ["ok", ["a"]]}, 400, "invalid_type", "input[1]"),
    ("token-ids", {"input": [101, 2023, 102]}, 400, "unsupported_token_input", "input"),
    ("token-arrays", {"input": [[101, 102], [5]]}, 400, "unsupported_token_input", "input"),
    ("lone-surrogate", b'{"input": ["ok", "a\\ud800b"]}', 400, "invalid_text", "input[1]"),
    ("too-many", {"input": ["a"] * 9}, 400, "too_many_inputs", "input"),
    ("model-number", {"input": "a", "model": 5}, 400, "invalid_type", "model"),
    ("unknown-model", {"input": "a", "model": "gpt-4"}, 404, "model_not_found", "model"),
    (
        "bad-format",
        {"input": "a", "encoding_format": "int8"},
        400,
        "invalid_value",
        "encoding_format",
    ),
    ("dimensions-string", {"input": "a", "dimensions": "384"}, 400, "invalid_type", "dimensions"),
    ("dimensions-bool", {"input": "a", "dimensions": True}, 400, "invalid_type", "dimensions"),
    ("dimensions-float", {"input": "a", "dimensions": 384.0}, 400, "invalid_type", "dimensions"),
    ("user-number", {"input": "a", "user": 1}, 400, "invalid_type", "user"),
]


@pytest.fixture(scope="module")
def small_server(model: Any) -> Iterator[LiveServer]:
    from embedpool.server import ServerSettings, create_app

    settings = ServerSettings(api_key="", max_items_per_request=8, max_request_bytes=1 << 20)
    app = create_app(
        settings, lambda: InProcessExecutor(FakeEngineSpec(dim=DIM).build), model=model
    )
    live = LiveServer.start(app)
    yield live
    live.stop()


def _post(live: LiveServer, body: Any, **kw: Any) -> httpx.Response:
    url = f"{live.url}/v1/embeddings"
    if isinstance(body, bytes):
        return httpx.post(
            url,
            content=body,
            headers={"content-type": "application/json"},
            timeout=DEADLINE_S,
            **kw,
        )
    return httpx.post(url, json=body, timeout=DEADLINE_S, **kw)


def _assert_openai_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    assert err["param"] == param
    return dict(err)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [row[1:] for row in BAD_INPUTS],
    ids=[row[0] for row in BAD_INPUTS],
)
def test_bad_input_is_4xx_naming_the_field(
    small_server: LiveServer,
    tokenizer: TextTokenizer,
    body: Any,
    status: int,
    code: str,
    param: str | None,
) -> None:
    err = _assert_openai_error(_post(small_server, body), status, code, param)
    if param and "[" in param:
        assert param in err["message"]  # the message names the index too
    ok = _post(small_server, {"input": ["still serving"]})  # and the server keeps serving
    assert ok.status_code == 200
    assert (
        ok.json()["data"][0]["embedding"]
        == expected_vectors(tokenizer, ["still serving"])[0].tolist()
    )


def test_oversized_payload_by_content_length(small_server: LiveServer) -> None:
    body = b'{"input": ["' + b"a" * (2 << 20) + b'"]}'
    _assert_openai_error(_post(small_server, body), 413, "request_too_large")


def test_oversized_payload_without_content_length(small_server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to trust
        yield b'{"input": ["'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"]}'

    r = httpx.post(f"{small_server.url}/v1/embeddings", content=chunks(), timeout=DEADLINE_S)
    _assert_openai_error(r, 413, "request_too_large")
    assert _post(small_server, {"input": "after"}).status_code == 200


def test_bad_content_length_header(small_server: LiveServer) -> None:
    # h11 rejects a non-numeric Content-Length itself (400) before the app sees it.
    import socket

    host, port = small_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        status = s.recv(100).split(b" ")[1]
    assert status.startswith(b"4")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("GET", "/v1/embeddings", 405), ("DELETE", "/v1/models", 405)],
    ids=["unknown-route", "get-embeddings", "delete-models"],
)
def test_routing_errors_use_openai_shape(
    small_server: LiveServer, method: str, path: str, status: int
) -> None:
    r = httpx.request(method, f"{small_server.url}{path}", timeout=DEADLINE_S)
    _assert_openai_error(r, status)


def test_poison_input_is_422_naming_its_index(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    poison = tokenizer.token_ids("poison")
    live = serve(lambda: InProcessExecutor(FakeEngineSpec(dim=DIM, raise_on=tuple(poison)).build))
    r = _post(live, {"input": ["fine", "also fine", "this is poison", "ok"]})
    err = _assert_openai_error(r, 422, "input_failed", "input[2]")
    assert "raise_on" in err["message"]
    assert _post(live, {"input": ["fine", "ok"]}).status_code == 200


class _BrokenAfterStart(InProcessExecutor):
    """Accepts the probe, then fails every batch as a broken pool does."""

    broken_now = False

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        if self.broken_now:
            raise PoolBroken("no worker can be started (test)")
        return super().submit(batch)


class _FailingBatches(InProcessExecutor):
    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        fut.set_exception(RuntimeError("worker lost (test)"))
        return fut


def test_pool_failure_is_503_and_server_stays_up(serve: Callable[..., LiveServer]) -> None:
    live = serve(lambda: _FailingBatches(FakeEngineSpec(dim=DIM).build))
    err = _assert_openai_error(_post(live, {"input": ["a", "b"]}), 503, "pool_unavailable")
    assert "worker lost" in err["message"]
    assert httpx.get(f"{live.url}/health", timeout=DEADLINE_S).status_code == 200


def test_broken_pool_turns_health_red(serve: Callable[..., LiveServer]) -> None:
    holder: list[_BrokenAfterStart] = []

    def factory() -> _BrokenAfterStart:
        holder.append(_BrokenAfterStart(FakeEngineSpec(dim=DIM).build))
        return holder[0]

    live = serve(factory)
    assert _post(live, {"input": "a"}).status_code == 200
    holder[0].broken_now = True
    _assert_openai_error(_post(live, {"input": "b"}), 503, "pool_unavailable")
    health = httpx.get(f"{live.url}/health", timeout=DEADLINE_S)
    assert health.status_code == 503 and "broken" in health.json()["reason"]
    assert httpx.get(f"{live.url}/ready", timeout=DEADLINE_S).status_code == 503
    _assert_openai_error(_post(live, {"input": "c"}), 503, "pool_unavailable")


def test_queue_full_is_429_with_retry_after(
    serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    gate = threading.Event()
    engines: list[GatedEngine] = []

    def factory() -> InProcessExecutor:
        def build() -> GatedEngine:
            engines.append(GatedEngine(FakeEngineSpec(dim=DIM), gate))
            return engines[0]

        return InProcessExecutor(build)

    live = serve(factory, max_queue_tokens=20)
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(_post(live, {"input": ["one two three"]})))
    t.start()
    try:
        assert engines and engines[0].entered.wait(DEADLINE_S), (
            "first request never reached the engine"
        )
        r = _post(live, {"input": ["this request does not fit in the queue at all, " * 3]})
        _assert_openai_error(r, 429, "queue_full")
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        gate.set()
        t.join(DEADLINE_S)
    assert first and first[0].status_code == 200
    metrics = httpx.get(f"{live.url}/metrics", timeout=DEADLINE_S).text
    assert 'embedpool_rejected_requests_total{reason="queue_full"} 1.0' in metrics
    assert _post(live, {"input": "afterwards"}).status_code == 200


def test_request_timeout_is_503(serve: Callable[..., LiveServer]) -> None:
    gate = threading.Event()
    live = serve(
        lambda: InProcessExecutor(lambda: GatedEngine(FakeEngineSpec(dim=DIM), gate)),
        request_timeout_s=0.3,
    )
    try:
        start = time.monotonic()
        _assert_openai_error(_post(live, {"input": "slow"}), 503, "timeout")
        assert time.monotonic() - start < DEADLINE_S
    finally:
        gate.set()


def test_settings_validation() -> None:
    from embedpool.errors import ConfigError
    from embedpool.server import ServerSettings

    for bad in (
        {"port": 70000},
        {"precision": "bf16"},
        {"long_text": "cut"},
        {"max_items_per_request": 0},
        {"max_wait_ms": -1},
        {"max_inflight_batches": 0},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ServerSettings(**bad)
