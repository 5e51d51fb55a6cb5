"""embedpool.server.openai: the published request schema matches what the handler accepts;
rendering is the wire format the official client decodes."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from server_support import DIM, LiveServer

from embedpool.server.openai import render_embeddings, truncation_headers

MAX_ITEMS = 2048  # ServerSettings' default, which the default test server uses

# (id, body, published schema accepts it, the handler's status)
BODIES: list[tuple[str, dict[str, Any], bool, int]] = [
    ("string", {"input": "a"}, True, 200),
    ("strings", {"input": ["a", "b"], "model": "all-MiniLM-L6-v2"}, True, 200),
    (
        "all-fields",
        {
            "input": ["a"],
            "encoding_format": "base64",
            "dimensions": DIM,
            "user": "u",
            "model": None,
        },
        True,
        200,
    ),
    ("token-ids", {"input": [101, 2023, 102]}, False, 400),
    ("token-arrays", {"input": [[101, 102], [5]]}, False, 400),
    ("empty-array", {"input": []}, False, 400),
    ("too-many", {"input": ["a"] * (MAX_ITEMS + 1)}, False, 400),
    ("other-dimensions", {"input": "a", "dimensions": 128}, False, 400),
    ("unknown-model", {"input": "a", "model": "gpt-4"}, False, 404),
    ("bad-format", {"input": "a", "encoding_format": "int8"}, False, 400),
    ("prompt-name", {"input": "a", "prompt_name": "query"}, True, 200),
    ("unknown-prompt-name", {"input": "a", "prompt_name": "search_query"}, False, 400),
    ("input-type", {"input": "a", "input_type": "passage"}, True, 200),
    ("unknown-input-type", {"input": "a", "input_type": "search_document"}, False, 400),
    ("both-agree", {"input": "a", "input_type": "query", "prompt_name": "query"}, True, 200),
    ("both-disagree", {"input": "a", "input_type": "query", "prompt_name": "document"}, False, 400),
    ("null-prompt-fields", {"input": "a", "input_type": None, "prompt_name": None}, True, 200),
    ("prompt-name-not-string", {"input": "a", "prompt_name": 3}, False, 400),
]


@pytest.fixture(scope="module")
def request_schema(live: LiveServer) -> dict[str, Any]:
    spec = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]
    return dict(body["schema"])


@pytest.fixture(scope="module")
def live(model: Any) -> Any:
    from server_support import fake_executor

    from embedpool.server import ServerSettings, create_app

    server = LiveServer.start(create_app(ServerSettings(api_key=""), fake_executor(), model=model))
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("body", "valid", "status"), [r[1:] for r in BODIES], ids=[r[0] for r in BODIES]
)
def test_schema_and_handler_agree(
    live: LiveServer, request_schema: dict[str, Any], body: dict[str, Any], valid: bool, status: int
) -> None:
    errors = list(jsonschema.Draft202012Validator(request_schema).iter_errors(body))
    assert (not errors) == valid, errors
    r = httpx.post(f"{live.url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text


def test_base64_is_little_endian_float32() -> None:
    vectors = np.array([[1.0, -2.5, 3.25]], dtype=">f4")  # big-endian in, little-endian out
    import json

    body = json.loads(render_embeddings(vectors, "base64", "m", 7, []))
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert raw == np.array([1.0, -2.5, 3.25], dtype="<f4").tobytes()
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert "truncated_indices" not in body


def test_truncation_header_lists_at_most_512_indices() -> None:
    headers = truncation_headers(list(range(600)))
    assert headers["X-Embedpool-Truncated"] == "600"
    assert headers["X-Embedpool-Truncated-Indices"].split(",")[-1] == "511"
