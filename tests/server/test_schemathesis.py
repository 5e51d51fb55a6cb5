"""Property-based requests generated from the server's own /openapi.json: never a 5xx, and
a body the published schema calls valid is never refused as invalid (the schema tells the
truth about what the handler accepts).

Positive and negative examples (schema-valid and schema-violating bodies and parameters),
a bounded number per operation, against a real uvicorn server over the fake engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_support import DIM, LiveServer

from embedpool.executors.inprocess import InProcessExecutor
from embedpool.testing import FakeEngineSpec

MAX_EXAMPLES = 30  # per operation and mode: ~2 minutes on a busy 2-core machine at most


@pytest.fixture(scope="module")
def live(model: Any) -> Iterator[LiveServer]:
    from embedpool.server import ServerSettings, create_app

    # Small limits so that generated bodies hit them (413, too many items) as well.
    settings = ServerSettings(api_key="", max_items_per_request=16, max_request_bytes=64 * 1024)
    app = create_app(
        settings, lambda: InProcessExecutor(FakeEngineSpec(dim=DIM).build), model=model
    )
    server = LiveServer.start(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(live: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


# Explicit operations instead of schemathesis.pytest.from_fixture, whose lazy loader breaks
# under pytest 9 ('Function' object has no attribute '_nodeid'); test_every_operation_is_listed
# keeps this list honest.
OPERATIONS = [
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]


def test_every_operation_is_listed(api_schema: Any) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


#: Negative examples need something that can be made invalid: only the body qualifies (a path
#: string parameter cannot violate its schema).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    ("POST", "/v1/embeddings", GenerationMode.NEGATIVE)
]


@schemathesis.check
def valid_is_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request is not refused as invalid (400, 422). 404 (an unknown model id in
    the path) and 413 (the body size limit, which no schema states) remain possible."""
    if response.status_code in (400, 422):
        raise AssertionError(
            f"schema-valid request refused with {response.status_code}: {response.text[:300]}"
        )
    return None


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES]
)
def test_no_server_errors(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks.append(valid_is_accepted)

    @given(operation.as_strategy(mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate(checks=checks, timeout=30)

    check()
