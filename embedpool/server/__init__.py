"""``embedpool serve``: an OpenAI-compatible embedding server (FastAPI under uvicorn).

Request path of ``POST /v1/embeddings``::

    auth (bearer, constant time) -> read body (Content-Length and real size <= max_request_bytes)
      -> JSON -> validate (every error names its field and input index, OpenAI error shape)
      -> tokenise (a thread for big requests) -> cache: only misses go on
      -> MicroBatcher.submit  (429 + Retry-After when the token queue is full)
      -> await vectors        (503 when the pool cannot embed, 422 naming a poison input)
      -> float or base64 JSON, truncated inputs listed in X-Embedpool-Truncated-Indices

Status codes: 400 invalid request, 401 bad or missing key, 404 unknown model or route,
413 body too large, 422 an input the model cannot embed, 429 queue full, 503 pool unavailable
or not ready. A 500 only ever means a bug in embedpool, never something a client sent.

One module per concern:

* ``settings``: :class:`ServerSettings` (no web imports);
* ``openai``: the wire format (parsing, validation, rendering, schemas, error shape);
* ``service``: the embedding path (tokenise, cache, admission, await, failures -> HTTP);
* ``readiness``: the shared, rate-limited ``/ready`` probe;
* ``app``: routes, auth (which endpoints need the key, and why), lifespan, uvicorn;
* ``on_ray``: the executor of ``serve --backend ray`` (Ray actors behind the same batcher).

FastAPI, Starlette and uvicorn are imported by this package only (``import embedpool`` does
not load them).
"""

from __future__ import annotations

from embedpool.server.app import create_app, default_executor_factory, run_server
from embedpool.server.service import VectorCacheHook
from embedpool.server.settings import ServerSettings

__all__ = [
    "ServerSettings",
    "VectorCacheHook",
    "create_app",
    "default_executor_factory",
    "run_server",
]
