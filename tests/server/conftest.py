"""Fixtures for the server tests (helpers live in server_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from server_support import LiveServer, fake_executor

from embedpool.microbatcher import SubmitExecutor
from embedpool.models import ResolvedModel
from embedpool.tokenization import TextTokenizer


@pytest.fixture(scope="session")
def model(real_model: ResolvedModel) -> ResolvedModel:
    return real_model


@pytest.fixture(scope="session")
def tokenizer(model: ResolvedModel) -> TextTokenizer:
    return TextTokenizer(model.tokenizer_path, model.max_length)


@pytest.fixture
def serve(model: ResolvedModel) -> Iterator[Callable[..., LiveServer]]:
    """``serve(executor_factory=None, **settings)`` starts a server; all stop at teardown."""
    from embedpool.server import ServerSettings, create_app

    started: list[LiveServer] = []

    def start(
        executor_factory: Callable[[], SubmitExecutor] | None = None, **overrides: Any
    ) -> LiveServer:
        settings = replace(ServerSettings(api_key=""), **overrides)
        app = create_app(settings, executor_factory or fake_executor(), model=model)
        live = LiveServer.start(app)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def server(serve: Callable[..., LiveServer]) -> LiveServer:
    """A default server over the fake engine."""
    return serve()
