"""The engine in a worker process: what it imports and what the memory settings change.

Real processes throughout: glibc's malloc settings are process-wide and ``sys.modules`` is
per process, so both are checked in fresh spawned children, never in the test process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpool.engine import EngineSpec
from embedpool.executors.pool.protocol import Embed, Ready, Result
from embedpool.graph import prepare_onnx
from embedpool.models import ResolvedModel, resolve_model
from embedpool.testing import spawn_worker
from embedpool.types import Precision

#: Generous: the worker loads a model while other engineers' tests share 2 cores.
DEADLINE_S = 120.0
#: Packages a worker with a cached graph has no use for (graph building, CLI, downloads).
UNWANTED = ("onnx", "tokenizers", "safetensors", "huggingface_hub", "rich", "click")


@pytest.fixture(scope="module")
def model() -> Iterator[ResolvedModel]:
    m = resolve_model()
    for precision in ("int8", "fp32"):
        prepare_onnx(m, precision)  # cached before the children run
    yield m


def _run_worker(
    model: ResolvedModel,
    precision: Precision,
    env: dict[str, str],
    batches: list[tuple[np.ndarray, ...]],
) -> tuple[Ready, list[Result]]:
    """One real worker (spawned like the supervisor does) with ``env`` set, fed ``batches``."""
    proc, parent = spawn_worker(EngineSpec(model, precision, threads=1), env)
    try:
        assert parent.poll(DEADLINE_S), "worker not ready in time"
        ready = parent.recv()
        assert isinstance(ready, Ready), ready
        results = []
        for i, seqs in enumerate(batches):
            parent.send(Embed(i, seqs))
            assert parent.poll(DEADLINE_S), "batch not done in time"
            res = parent.recv()
            assert isinstance(res, Result), res
            results.append(res)
        return ready, results
    finally:
        parent.close()  # EOF ends the worker
        proc.join(DEADLINE_S)
        if proc.is_alive():  # pragma: no cover - a bug; do not leak it
            proc.kill()
            proc.join(5)


def _batch(n: int, length: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(
        np.concatenate([[101], rng.integers(1000, 29000, length - 2), [102]]).astype(np.int32)
        for _ in range(n)
    )


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_memory_settings_change_no_vector_and_lower_rss(
    model: ResolvedModel, precision: Precision
) -> None:
    # ragged lengths: padding and the mask go through the same kernels either way
    batches = [_batch(8, 256, 1), _batch(4, 100, 2) + _batch(4, 37, 3)]
    _, tuned = _run_worker(model, precision, {}, batches)
    _, plain = _run_worker(model, precision, {"EMBEDPOOL_MALLOC_TUNING": "0"}, batches)
    for a, b in zip(tuned, plain, strict=True):
        assert np.array_equal(a.vectors, b.vectors)
    # The reported RSS after the 8 x 256 batch (what recycling decisions read): glibc keeps
    # the freed activations without malloc_trim (measured 331 vs 164 MiB fp32, 200 vs
    # 147 MiB int8).
    assert tuned[0].rss < plain[0].rss, (tuned[0].rss >> 20, plain[0].rss >> 20)


def test_worker_with_a_cached_graph_imports_no_graph_building_packages(
    model: ResolvedModel,
) -> None:
    """onnx and friends cost a worker 10-18 MB of RSS for nothing once the graph is cached."""
    code = (
        "import pickle, sys\n"
        "import embedpool.executors.pool.worker\n"
        "spec = pickle.loads(sys.stdin.buffer.read())\n"
        "engine = spec.build()\n"
        "engine.embed([[101, 2000, 102]])\n"
        f"print(','.join(m for m in {UNWANTED!r} if m in sys.modules))\n"
    )
    for precision in ("int8", "fp32"):
        spec = EngineSpec(model, precision, threads=1)
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps(spec),
            capture_output=True,
            timeout=DEADLINE_S,
            check=True,
            cwd=Path(__file__).parent,
        )
        assert out.stdout.decode().strip() == "", (precision, out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize(
    ("env", "applied"),
    [({}, True), ({"EMBEDPOOL_MALLOC_TUNING": "0"}, False)],
    ids=["default", "disabled"],
)
def test_release_memory_trims_unless_disabled(env: dict[str, str], applied: bool) -> None:
    code = "from embedpool.executors.pool.worker import release_memory\nprint(release_memory())\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=DEADLINE_S,
        check=True,
        env={**os.environ, **env},
    )
    assert out.stdout.decode().strip() == str(applied and sys.platform.startswith("linux"))


def test_mem_pattern_setting_changes_no_vector(
    model: ResolvedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enable_mem_pattern=False (engine.session_options) only changes how memory is held."""
    import embedpool.engine as engine_module

    batch = list(_batch(4, 64, 5))
    lean = EngineSpec(model, "int8").build().embed(batch)
    plain = engine_module.session_options

    def with_pattern(threads: int) -> Any:
        opts = plain(threads)
        opts.enable_mem_pattern = True
        return opts

    monkeypatch.setattr(engine_module, "session_options", with_pattern)
    assert np.array_equal(EngineSpec(model, "int8").build().embed(batch), lean)
