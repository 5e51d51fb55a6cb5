"""The server's settings: one frozen dataclass, validated at construction (no web imports)."""

from __future__ import annotations

from dataclasses import dataclass

from embedpool.budget import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_ITEMS
from embedpool.config import env_str
from embedpool.errors import ConfigError
from embedpool.microbatcher import DEFAULT_MAX_QUEUE_TOKENS
from embedpool.types import LongTextMode, Precision

#: OpenAI's own limit on inputs per request; clients (LangChain, LlamaIndex) chunk to it.
DEFAULT_MAX_ITEMS = 2048
#: Body size limit: 2,048 inputs of ~4 KB each, plus JSON overhead.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: How long one /ready probe's answer is reused. Concurrent /ready calls always share the probe
#: in flight; this also bounds a sequential flood to one probe embedding per second (next to
#: the pool's hundreds of batches per second, nothing), while a load balancer polling every
#: few seconds still sees every change.
DEFAULT_READY_REUSE_S = 1.0
#: ``serve --keep-alive``: Ollama's default, 5 minutes.
DEFAULT_KEEP_ALIVE_S = 300.0


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``embedpool serve`` takes; validated at construction."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "all-MiniLM-L6-v2"
    precision: Precision = "int8"
    long_text: LongTextMode = "truncate"
    #: Bearer token; None falls back to EMBEDPOOL_API_KEY; empty string disables auth.
    api_key: str | None = None
    max_items_per_request: int = DEFAULT_MAX_ITEMS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    max_wait_ms: float = 2.0
    #: Batches kept in the executor; None = 2 per worker (from the executor's stats()).
    max_inflight_batches: int | None = None
    #: Extra names clients may send as ``model`` (e.g. "text-embedding-3-small").
    served_model_names: tuple[str, ...] = ()
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 10.0
    ready_reuse_s: float = DEFAULT_READY_REUSE_S
    #: SIGTERM: how long uvicorn waits for requests in flight before closing connections.
    graceful_timeout_s: float = 30.0
    log_level: str = "info"
    #: Several models (``serve --model A --model B``): which load when the server starts
    #: ("first": the default model; "all": in order while they fit; "none": each on its first
    #: request), and how long one stays loaded unused (<= 0: until room is needed).
    preload: str = "first"
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    #: Bytes all models may use together; None: the planner's available memory at start
    #: (under ``max_memory_bytes``, ``--max-memory``). Only held to with several models.
    model_memory_bytes: int | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port", self.port),
            (self.precision in ("fp32", "int8", "fp16"), "precision", self.precision),
            (self.long_text in ("truncate", "window"), "long_text", self.long_text),
            (self.max_items_per_request >= 1, "max_items_per_request", self.max_items_per_request),
            (self.max_request_bytes >= 1024, "max_request_bytes", self.max_request_bytes),
            (self.max_queue_tokens >= 1, "max_queue_tokens", self.max_queue_tokens),
            (self.batch_tokens >= 1, "batch_tokens", self.batch_tokens),
            (self.max_batch_items >= 1, "max_batch_items", self.max_batch_items),
            (0 <= self.max_wait_ms <= 1000, "max_wait_ms", self.max_wait_ms),
            (
                self.max_inflight_batches is None or self.max_inflight_batches >= 1,
                "max_inflight_batches",
                self.max_inflight_batches,
            ),
            (self.request_timeout_s > 0, "request_timeout_s", self.request_timeout_s),
            (self.ready_timeout_s > 0, "ready_timeout_s", self.ready_timeout_s),
            (self.ready_reuse_s >= 0, "ready_reuse_s", self.ready_reuse_s),
            (self.graceful_timeout_s >= 0, "graceful_timeout_s", self.graceful_timeout_s),
            (self.preload in ("all", "first", "none"), "preload", self.preload),
            (
                self.model_memory_bytes is None or self.model_memory_bytes >= 1,
                "model_memory_bytes",
                self.model_memory_bytes,
            ),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"server setting {name}={value!r} is out of range")

    def resolved_api_key(self) -> str | None:
        """The key to require, or None for no auth (settings first, then EMBEDPOOL_API_KEY)."""
        key = self.api_key if self.api_key is not None else env_str("EMBEDPOOL_API_KEY")
        return key or None
