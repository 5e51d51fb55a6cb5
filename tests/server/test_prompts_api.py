"""Prompts and dimensions through the HTTP API as the official ``openai`` client sends them
(``extra_body={"prompt_name": ...}`` / ``input_type``, ``dimensions=``), against
sentence-transformers' golden vectors of a conformance fixture whose Pooling leaves the prompt
out (include_prompt=false), on the real engine."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import conformance as C
import numpy as np
import openai
import pytest
from server_support import LiveServer

from embedpool.cache import BoundCache, VectorCache
from embedpool.models import resolve_model

NAME = "include-prompt-false-modes"  # 4 poolings of 16 (64 wide); prompts, no default


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, VectorCache]]:
    """The fixture model, marked Matryoshka, served on the real fp32 engine with a cache."""
    from embedpool.graph import graph_id
    from embedpool.server import ServerSettings, create_app, default_executor_factory

    root = tmp_path_factory.mktemp("prompts-api")
    model = resolve_model(C.matryoshka(NAME, root))
    cache = VectorCache.open(root / "v.sqlite3")
    hook = BoundCache(cache, model.fingerprint("fp32", graph=graph_id(model, "fp32")))
    app = create_app(
        ServerSettings(api_key="", precision="fp32", max_wait_ms=50),
        default_executor_factory(model, "fp32"),
        model=model,
        cache=hook,
    )
    server = LiveServer.start(app)
    client = server.openai()  # one client, closed at the end: no socket left to the GC
    yield client, cache
    client.close()
    server.stop()
    cache.close()


def create(live: tuple[Any, VectorCache], **kwargs: Any) -> np.ndarray:
    res = live[0].embeddings.create(model=NAME, input=C.TEXTS, **kwargs)
    return np.array([d.embedding for d in res.data], dtype=np.float32)


def golden(call: str) -> np.ndarray:
    return C.golden(NAME)[call]


def test_prompt_name_and_input_type_give_sentence_transformers_vectors(
    live: tuple[Any, VectorCache],
) -> None:
    calls = [
        ({}, "default"),
        ({"extra_body": {"prompt_name": "long"}}, "prompt_name=long"),
        ({"extra_body": {"input_type": "query"}}, "prompt_name=query"),
        ({"extra_body": {"prompt_name": "query", "input_type": "query"}}, "prompt_name=query"),
    ]
    # sent together, so that the micro-batcher mixes requests with different prompts
    with ThreadPoolExecutor(len(calls)) as pool:
        got = list(pool.map(lambda c: create(live, **c[0]), calls))
    for (_, call), vecs in zip(calls, got, strict=True):
        assert C.cosines(vecs, golden(call)).min() >= 0.9999, call


def test_a_vector_cached_without_the_prompt_is_not_served_with_it(
    live: tuple[Any, VectorCache],
) -> None:
    texts = ["only here", "and here"]
    client = live[0]
    plain = client.embeddings.create(model=NAME, input=texts)
    prompted = client.embeddings.create(
        model=NAME, input=texts, extra_body={"prompt_name": "query"}
    )
    again = client.embeddings.create(model=NAME, input=texts, extra_body={"input_type": "query"})
    a, b, c = (
        np.array([d.embedding for d in r.data], dtype=np.float32) for r in (plain, prompted, again)
    )
    assert C.cosines(a, b).max() < 0.999
    np.testing.assert_array_equal(b, c)  # the second prompted request came from the cache
    assert prompted.usage.prompt_tokens > plain.usage.prompt_tokens  # the prompt's tokens count


def test_dimensions_keep_the_first_values_normalised(live: tuple[Any, VectorCache]) -> None:
    full = create(live, extra_body={"prompt_name": "query"})
    cut = create(live, dimensions=8, extra_body={"prompt_name": "query"})
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert cut.shape == (len(C.TEXTS), 8)
    np.testing.assert_allclose(cut, want, rtol=1e-5, atol=1e-6)
    as_float = create(
        live, dimensions=8, encoding_format="float", extra_body={"prompt_name": "query"}
    )
    np.testing.assert_array_equal(as_float, cut)


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        (
            {"extra_body": {"prompt_name": "search_query"}},
            "prompt_name",
            r"'search_query' is not one of the model's prompts: \['doc', 'document', 'long', 'query'\]",
        ),
        (
            {"extra_body": {"input_type": "classification"}},
            "input_type",
            "'classification' is not one of document, passage, query",
        ),
        ({"extra_body": {"input_type": "query", "prompt_name": "long"}}, "input_type", "disagree"),
        ({"dimensions": 65}, "dimensions", "between 1 and model .*'s width 64, got 65"),
    ],
    ids=["prompt-name", "input-type", "conflict", "too-wide"],
)
def test_refusals_are_400_naming_the_field(
    live: tuple[Any, VectorCache], kwargs: dict[str, Any], param: str, message: str
) -> None:
    import re

    with pytest.raises(openai.BadRequestError) as info:
        create(live, **kwargs)
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == param, err
    assert re.search(message, err["message"]), err["message"]
    assert len(create(live)) == len(C.TEXTS)  # the service stays up


def test_default_model_refuses_other_dimensions_with_its_width(serve: Any, tmp_path: Path) -> None:
    with serve().openai() as client, pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["a"], dimensions=64)
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == "dimensions"
    assert (
        "was not trained for truncated dimensions (Matryoshka); its vectors have 384"
        in err["message"]
    )
