"""The rerank routes on a real server on 127.0.0.1: the official ``cohere`` client (ClientV2
posts /v2/rerank, Client /v1/rerank), TEI's shape on /rerank and on ``POST /`` with httpx,
scores equal to CrossEncoder.predict (the fixtures' goldens), and bad input, auth, limits and
admission answered in each shape."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import DIM, LiveServer, fake_executor

from embedpool.executors.inprocess import InProcessExecutor
from embedpool.models import ResolvedModel, resolve_model
from embedpool.placement import executor_factory, place
from embedpool.server.rerank import RerankerSetup
from embedpool.testing import FakeEngine, FakeEngineSpec
from embedpool.types import TokenIds, Vectors

FIXTURES = Path(__file__).parent.parent / "fixtures" / "rerankers"
TOL = 1e-4
DEADLINE_S = 60.0


def golden(name: str) -> tuple[dict[str, Any], Any]:
    d = FIXTURES / name
    return json.loads((d / "golden.json").read_text()), np.load(d / "golden.npz")


@pytest.fixture(scope="module")
def rerankers() -> dict[str, ResolvedModel]:
    return {n: resolve_model(FIXTURES / n / "model") for n in ("bert", "xlmr")}


@pytest.fixture
def rerank_serve(model: ResolvedModel) -> Iterator[Callable[..., LiveServer]]:
    """``rerank_serve(reranker, factory=None, **settings)``: a server with the fake embedder
    and ``reranker`` (fp32, in this process, unless ``factory`` says otherwise)."""
    from embedpool.server import ServerSettings, create_app

    started: list[LiveServer] = []

    def start(
        reranker: ResolvedModel, factory: Callable[[], Any] | None = None, **overrides: Any
    ) -> LiveServer:
        settings = replace(ServerSettings(api_key=""), **overrides)
        make = factory or executor_factory(
            reranker, place(reranker, device="cpu", precision="fp32"), workers=None
        )
        app = create_app(
            settings,
            fake_executor(),
            model=model,
            reranker=RerankerSetup(reranker, make, aliases=("my-reranker",)),
        )
        live = LiveServer.start(app)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def post(live: LiveServer, path: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=DEADLINE_S)


# ----------------------------------------------------------------------------- cohere
def test_cohere_client_v2_gets_crossencoder_scores(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel]
) -> None:
    import cohere

    g, gold = golden("xlmr")
    live = rerank_serve(rerankers["xlmr"])
    docs = g["documents"]
    with httpx.Client(timeout=DEADLINE_S) as http:
        co = cohere.ClientV2(base_url=live.url, api_key="unused", httpx_client=http)
        res = co.rerank(model="my-reranker", query=g["queries"][1], documents=docs, top_n=5)
    expected = gold["scores"][len(docs) : 2 * len(docs)]  # the sigmoid of the logits
    order = list(np.argsort(-expected, kind="stable")[:5])
    assert [r.index for r in res.results] == order
    for r in res.results:
        assert abs(r.relevance_score - float(expected[r.index])) <= TOL
    # the long document is cut, and the response says so
    long_doc = docs.index(max(docs, key=len))
    assert res.meta is not None and res.meta.warnings
    assert "were cut to the model's window of 64 tokens" in res.meta.warnings[0]
    raw = post(
        live, "/v2/rerank", {"model": "my-reranker", "query": g["queries"][1], "documents": docs}
    )
    assert all("document" not in x for x in raw.json()["results"])  # v2: ids and scores only
    cut = raw.headers["X-Embedpool-Truncated-Indices"].split(",")
    assert str(long_doc) in cut and f"documents {', '.join(cut)} were cut" in res.meta.warnings[0]


def test_cohere_client_v1_and_document_objects(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel]
) -> None:
    import cohere

    g, gold = golden("bert")  # token types through the server's batcher
    live = rerank_serve(rerankers["bert"])
    docs = g["documents"][:6]
    with httpx.Client(timeout=DEADLINE_S) as http:
        co = cohere.Client(base_url=live.url, api_key="unused", httpx_client=http)
        res = co.rerank(model="my-reranker", query=g["queries"][0], documents=docs)
    expected = gold["scores"][:6]  # ms-marco layout: Identity, the logits themselves
    assert [r.index for r in res.results] == list(np.argsort(-expected, kind="stable"))
    assert max(abs(r.relevance_score - float(expected[r.index])) for r in res.results) <= TOL
    # Jina / vLLM: documents as {"text": ...}, return_documents default true
    body = {
        "model": "my-reranker",
        "query": g["queries"][0],
        "documents": [{"text": d} for d in docs],
        "top_n": 2,
    }
    for path in ("/v1/rerank", "/rerank"):
        r = post(live, path, body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [x["index"] for x in out["results"]] == [x.index for x in res.results[:2]]
        assert out["results"][0]["document"] == {"text": docs[out["results"][0]["index"]]}
        assert out["usage"]["total_tokens"] > 0
    metrics = httpx.get(f"{live.url}/metrics", timeout=DEADLINE_S).text
    assert "embedpool_reranked_pairs_total 18.0" in metrics  # 3 requests x 6 documents


# ----------------------------------------------------------------------------- TEI
def test_tei_shape_on_rerank_and_root(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel]
) -> None:
    g, gold = golden("bert")
    live = rerank_serve(rerankers["bert"])
    docs = g["documents"]
    for path in ("/rerank", "/"):
        r = post(
            live,
            path,
            {"query": g["queries"][2], "texts": docs, "raw_scores": True, "return_text": True},
        )
        assert r.status_code == 200, r.text
        out = r.json()
        logits = gold["logits"][2 * len(docs) : 3 * len(docs)]
        assert [x["index"] for x in out] == list(np.argsort(-logits, kind="stable"))
        assert max(abs(x["score"] - float(logits[x["index"]])) for x in out) <= TOL
        assert all(x["text"] == docs[x["index"]] for x in out)
        assert r.headers["X-Embedpool-Truncated"] == "1"
    # truncate: false refuses a pair longer than the window, in TEI's shape
    r = post(live, "/rerank", {"query": "q", "texts": docs, "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert "window is 64" in r.json()["error"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v2/rerank", {"documents": ["a"]}, 400, "query is required"),
        ("/v2/rerank", {"query": "q", "documents": "a"}, 400, "array of strings"),
        ("/v2/rerank", {"query": "q", "documents": ["a", 3]}, 400, "documents[1]"),
        ("/v2/rerank", {"query": "q", "documents": [{"title": "x"}]}, 400, "documents[0]"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "model": "other"}, 404, "other"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * 5}, 400, "at most 4"),
        ("/v1/rerank", [1, 2], 400, "JSON object"),
        ("/v1/rerank", {"query": "word " * 100, "documents": ["a"]}, 400, "shorten the query"),
        ("/rerank", {"query": "q", "texts": []}, 400, "cannot be empty"),
        ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ],
)
def test_bad_input_is_4xx_naming_it(
    rerank_serve: Callable[..., LiveServer],
    rerankers: dict[str, ResolvedModel],
    path: str,
    body: Any,
    status: int,
    needle: str,
) -> None:
    live = rerank_serve(rerankers["xlmr"], max_items_per_request=4)
    r = post(live, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    message = err["error"] if "texts" in json.dumps(body) else err["message"]
    assert needle in message
    assert post(live, "/v2/rerank", {"query": "q", "documents": ["a"]}).status_code == 200


def test_key_and_body_limit_hold(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel]
) -> None:
    live = rerank_serve(rerankers["xlmr"], api_key="sekret", max_request_bytes=2048)
    body = {"query": "q", "documents": ["a"]}
    assert post(live, "/v2/rerank", body).status_code == 401
    assert post(live, "/v2/rerank", body, key="sekret").status_code == 200
    r = post(live, "/v1/rerank", {"query": "q", "documents": ["x" * 4000]}, key="sekret")
    assert r.status_code == 413 and "limit" in r.json()["message"]


class _Gated(FakeEngine):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__(FakeEngineSpec(dim=1))
        self.gate = gate
        self.entered = threading.Event()

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        self.entered.set()
        if not self.gate.wait(DEADLINE_S):
            raise TimeoutError("the gate never opened")
        return super().embed(sequences)


def test_a_full_queue_is_429_with_retry_after(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel]
) -> None:
    gate = threading.Event()
    engines: list[_Gated] = []

    def build() -> _Gated:
        engines.append(_Gated(gate))
        return engines[-1]

    live = rerank_serve(
        rerankers["xlmr"], factory=lambda: InProcessExecutor(build), max_queue_tokens=40
    )
    first: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: first.append(
            post(live, "/v2/rerank", {"query": "q", "documents": ["one two three"]})
        )
    )
    t.start()
    try:
        assert engines and engines[0].entered.wait(DEADLINE_S), "the first request never ran"
        r = post(live, "/v2/rerank", {"query": "q", "documents": ["does not fit " * 10] * 3})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "queue" in r.json()["message"]
        r = post(live, "/rerank", {"query": "q", "texts": ["does not fit " * 10] * 3})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
    finally:
        gate.set()
        t.join(DEADLINE_S)
    assert first and first[0].status_code == 200


def test_no_reranker_no_rerank_routes(
    serve: Callable[..., LiveServer],
    rerank_serve: Callable[..., LiveServer],
    rerankers: dict[str, ResolvedModel],
) -> None:
    """An app without a reranker answers rerank bodies with TEI's 422 on ``POST /`` even
    while another app in the process serves one (the TEI hand-over is per app)."""
    with_reranker = rerank_serve(rerankers["xlmr"])
    live = serve()
    assert post(live, "/v2/rerank", {"query": "q", "documents": ["a"]}).status_code == 404
    r = post(live, "/", {"query": "q", "texts": ["a"]})
    assert r.status_code == 422 and "serves no reranker" in r.json()["error"]
    assert r.json()["error_type"] == "Validation"
    assert post(with_reranker, "/", {"query": "q", "texts": ["a"]}).status_code == 200
    assert DIM == 384


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["a\ud800b", "\udfff"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "model",
    "query",
    "documents",
    "texts",
    "top_n",
    "return_documents",
    "raw_scores",
    "return_text",
    "truncate",
    "truncation_direction",
    "max_tokens_per_doc",
    "relevant_spans",
]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank", "/"])
def test_nothing_a_client_sends_gives_a_5xx(
    rerank_serve: Callable[..., LiveServer], rerankers: dict[str, ResolvedModel], path: str
) -> None:
    live = rerank_serve(rerankers["xlmr"])
    valid: dict[str, Any] = {"query": "q", "texts" if path == "/" else "documents": ["a", "b"]}

    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(body=st.one_of(_json, st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=5)))
    def check(body: Any) -> None:
        sent = {**valid, **body} if isinstance(body, dict) else body
        r = client.post(
            f"{live.url}{path}",
            content=json.dumps(sent),  # \u-escaped
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code < 500, (sent, r.status_code, r.text)
        if r.status_code >= 400:
            err = r.json()
            assert isinstance(err.get("message") or err.get("error"), str), err

    with httpx.Client(timeout=DEADLINE_S) as client:
        check()
