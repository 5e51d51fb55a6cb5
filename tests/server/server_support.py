"""Helpers shared by the server tests and their subprocess script: a real uvicorn server in a
thread on a pre-bound 127.0.0.1 port, fake executors, and the vectors a request should get."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.executors.inprocess import InProcessExecutor
from embedpool.microbatcher import SubmitExecutor
from embedpool.testing import FakeEngine, FakeEngineSpec, fake_vectors
from embedpool.tokenization import TextTokenizer
from embedpool.types import LongTextMode, TokenIds, Vectors
from embedpool.vectors import combine_windows

DIM = 384  # MiniLM's: the server checks the fake's vectors against the model's dimension
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 30.0


def expected_vectors(
    tokenizer: TextTokenizer, texts: Sequence[str], mode: LongTextMode = "truncate"
) -> Vectors:
    """What the fake engine answers for these texts, computed without the server."""
    enc = tokenizer.encode(texts, mode)
    return combine_windows(fake_vectors(enc.sequences, DIM), enc.owner, len(texts))


class GatedEngine(FakeEngine):
    """A fake engine whose batches wait for ``gate`` (set it to let them through)."""

    def __init__(self, spec: FakeEngineSpec, gate: threading.Event) -> None:
        super().__init__(spec)
        self.gate = gate
        self.entered = threading.Event()

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        self.entered.set()
        if not self.gate.wait(60.0):
            raise TimeoutError("GatedEngine: gate never opened")
        return super().embed(sequences)


def fake_executor(spec: FakeEngineSpec | None = None) -> Callable[[], SubmitExecutor]:
    s = spec or FakeEngineSpec(dim=DIM)
    return lambda: InProcessExecutor(s.build)


@dataclass
class LiveServer:
    """uvicorn serving ``app`` on a socket bound before start, in a daemon thread."""

    app: Any
    url: str
    server: Any
    thread: threading.Thread

    @classmethod
    def start(cls, app: Any) -> LiveServer:
        import uvicorn

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listener
        # says TCP; with proto 0, Nagle + delayed ACK add 40 ms to every response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True
        )
        thread.start()
        from polling import wait_until  # here: serve_fake.py imports this module as a script

        def started() -> bool:
            if not thread.is_alive():
                raise RuntimeError("the test server exited during startup (see its log)")
            return bool(server.started)

        try:
            wait_until(started, "the test server's start", timeout=START_DEADLINE_S, interval=0.01)
        except BaseException:
            server.should_exit = True
            raise
        return cls(app, f"http://127.0.0.1:{port}", server, thread)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(STOP_DEADLINE_S)
        assert not self.thread.is_alive(), "the test server did not stop in time"

    def openai(self, api_key: str = "unused") -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60.0)


def decode_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")
