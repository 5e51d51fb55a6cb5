"""The batch budget, decided once (``budget.batch_budget``), and run as decided.

A table of the rule (device, profile, model, what the user asked), then the proof that
``embedpool doctor`` prints the plan ``embed`` and ``serve`` run, for every profile: the
same budget, floor, workers, threads and reasons, read from the doctor's report and from the
pool's ``pool_start`` event of a real ``embed`` (``--log-json``) and the ``/metrics`` of a
real ``serve``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from polling import wait_ready

from embedpool.budget import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_ITEMS,
    GPU_MAX_BATCH_ITEMS,
    GPU_MAX_BATCH_TOKENS,
    GPU_UNKNOWN_MEMORY_TOKENS,
    MIN_BATCH_TOKENS,
    BatchBudget,
    batch_budget,
)
from embedpool.device_choice import DevicePlan, DeviceRequest
from embedpool.errors import ConfigError
from embedpool.executors.pool.machine import Limits
from embedpool.executors.pool.plan import plan
from embedpool.models import ResolvedModel
from embedpool.placement import place

CPU_ROWS = [
    # profile, requested, requested items -> tokens, floor, items, words in the reason
    pytest.param(
        "local",
        None,
        None,
        DEFAULT_BATCH_TOKENS,
        MIN_BATCH_TOKENS,
        DEFAULT_MAX_BATCH_ITEMS,
        "local profile",
        id="local",
    ),
    pytest.param(
        "cloud",
        None,
        None,
        DEFAULT_BATCH_TOKENS,
        MIN_BATCH_TOKENS,
        DEFAULT_MAX_BATCH_ITEMS,
        "cloud profile",
        id="cloud",
    ),
    pytest.param(
        "wsl2",
        None,
        None,
        DEFAULT_BATCH_TOKENS // 2,
        MIN_BATCH_TOKENS,
        DEFAULT_MAX_BATCH_ITEMS,
        "wsl2 profile halves",
        id="wsl2-halves",
    ),
    pytest.param(
        None,
        None,
        None,
        DEFAULT_BATCH_TOKENS,
        MIN_BATCH_TOKENS,
        DEFAULT_MAX_BATCH_ITEMS,
        "lighter",
        id="no-profile-ray",
    ),
    pytest.param(
        "wsl2",
        2048,
        None,
        2048,
        MIN_BATCH_TOKENS,
        DEFAULT_MAX_BATCH_ITEMS,
        "as requested",
        id="requested-wins-over-profile",
    ),
    pytest.param("local", 128, 8, 128, 128, 8, "as requested", id="requested-below-floor"),
]


@pytest.mark.parametrize(
    ("profile", "requested", "items", "tokens", "floor", "max_items", "why"), CPU_ROWS
)
def test_cpu_budget(
    profile: Any,
    requested: int | None,
    items: int | None,
    tokens: int,
    floor: int,
    max_items: int,
    why: str,
) -> None:
    b = batch_budget(
        device="cpu", profile=profile, max_length=256, requested=requested, requested_items=items
    )
    assert (b.tokens, b.floor, b.max_items) == (tokens, floor, max_items)
    assert why in b.reason and b.fits and 1 <= b.floor <= b.tokens


GPU_ROWS = [
    # max length, memory fit, requested -> tokens, floor
    pytest.param(256, None, None, GPU_UNKNOWN_MEMORY_TOKENS, 256, id="unknown-memory"),
    pytest.param(512, 10_000, None, 9728, 512, id="whole-512-sequences"),
    pytest.param(256, 10 * GPU_MAX_BATCH_TOKENS, None, GPU_MAX_BATCH_TOKENS, 256, id="the-cap"),
    pytest.param(8192, 4000, None, 0, 8192, id="not-one-sequence-fits"),
    pytest.param(256, 10_000, 4096, 4096, 256, id="requested-fits"),
    pytest.param(256, 10_000, 50_000, 9984, 256, id="requested-capped-by-memory"),
    pytest.param(256, None, 50_000, 50_000, 256, id="requested-unknown-memory"),
]


@pytest.mark.parametrize(("max_length", "fit", "requested", "tokens", "floor"), GPU_ROWS)
def test_gpu_budget(
    max_length: int, fit: int | None, requested: int | None, tokens: int, floor: int
) -> None:
    b = batch_budget(
        device="cuda", profile="wsl2", max_length=max_length, requested=requested, gpu_fit=fit
    )
    assert (b.tokens, b.floor, b.max_items) == (tokens, floor, GPU_MAX_BATCH_ITEMS)
    assert b.fits == (tokens > 0)


@pytest.mark.parametrize("bad", [0, -5])
def test_a_budget_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ConfigError, match="batch_tokens must be >= 1"):
        batch_budget(requested=bad)


def _limits(profile: Any) -> Limits:
    gib = 1024**3
    return Limits(
        cpus=4,
        cpus_source="test",
        memory_bytes=16 * gib,
        memory_source="test",
        profile=profile,
        profile_source="test",
    )


@pytest.mark.parametrize("profile", ["cloud", "local", "wsl2"])
def test_the_placement_the_pool_plan_and_the_rule_agree(
    real_model: ResolvedModel, profile: Any
) -> None:
    """The bug this module fixed: placement passed 768 to plan() as "requested", so the wsl2
    profile never halved. Now plan() runs the placement's budget, reason and floor."""
    cpu = DevicePlan("cpu", (), "test", DeviceRequest("cpu"))
    p = place(real_model, plan=cpu, profile=profile)
    want = batch_budget(profile=profile, max_length=real_model.max_length)
    assert p.budget == want and p.profile == profile
    pol = plan(_limits(profile), budget=p.budget)
    assert (pol.policy.batch_tokens, pol.policy.min_batch_tokens) == (want.tokens, want.floor)
    assert f"batch budget {want.tokens} padded tokens: {want.reason}" in pol.reasons
    # without a placement, plan() decides the same way from the profile
    assert plan(_limits(profile)).policy.batch_tokens == want.tokens
    ray = place(real_model, plan=cpu, profile=profile, backend="ray")
    assert ray.profile is None and ray.budget == batch_budget()


def test_the_profile_sizes_the_in_process_budget_too(real_model: ResolvedModel) -> None:
    """``--workers 0 --profile wsl2``: no pool, but the job's batches are the profile's."""
    from embedpool.cli import _pool_args
    from embedpool.job import Embedder
    from embedpool.testing import FakeEngineSpec

    w, opts = _pool_args("0", None, "wsl2", None)
    assert w is None and opts == {"profile": "wsl2"}
    e = Embedder(
        real_model, workers=w, pool_options=opts, engine=FakeEngineSpec(dim=384), lazy=True
    )
    assert e.batch_tokens == DEFAULT_BATCH_TOKENS // 2


def test_budget_is_frozen() -> None:
    b = BatchBudget(768, 256, 64, "x")
    with pytest.raises(AttributeError):
        b.tokens = 1  # type: ignore[misc]


# --- doctor, embed and serve: the same plan --------------------------------------------------

CLI = [sys.executable, "-m", "embedpool"]
DOCTOR_BATCHES = re.compile(
    r"^  batches\s+(\d+) padded tokens per batch .*never below (\d+)\)$", re.M
)
DOCTOR_WORKERS = re.compile(r"^  workers\s+start (\d+), at most (\d+) x (\d+) thread", re.M)


def _doctor(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    res = subprocess.run(
        [*CLI, "doctor", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    batches = DOCTOR_BATCHES.search(res.stdout)
    workers = DOCTOR_WORKERS.search(res.stdout)
    assert batches and workers, res.stdout
    why = res.stdout.split("\nwhy:\n", 1)[1].splitlines()
    return {
        "batch_tokens": int(batches[1]),
        "floor": int(batches[2]),
        "workers": int(workers[1]),
        "max_workers": int(workers[2]),
        "threads": int(workers[3]),
        "plan": [
            line[4:] for line in why if line.startswith("  - ") and not line.startswith("  - note:")
        ],
    }


def _embed(args: list[str], env: dict[str, str], tmp: Path) -> dict[str, Any]:
    src = tmp / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": str(i), "text": f"chunk {i} " + "word " * i}) + "\n" for i in range(6)
        )
    )
    res = subprocess.run(
        [
            *CLI,
            "embed",
            str(src),
            "--out",
            str(tmp / "out.jsonl"),
            "--no-cache",
            "--log-json",
            "-q",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    starts = [
        json.loads(line)
        for line in res.stderr.splitlines()
        if line.startswith("{") and '"pool_start"' in line
    ]
    assert len(starts) == 1, res.stderr
    ev = starts[0]
    return {
        "batch_tokens": ev["batch_tokens"],
        "floor": ev["budget_floor"],
        "workers": ev["workers"],
        "max_workers": ev["max_workers"],
        "threads": ev["threads"],
        "plan": ev["plan"],
    }


def _env(tmp: Path, profile: str | None) -> dict[str, str]:
    env = dict(
        os.environ, EMBEDPOOL_CACHE_DIR=os.environ.get("EMBEDPOOL_CACHE_DIR", str(tmp / "cache"))
    )
    env.pop("EMBEDPOOL_PROFILE", None)
    if profile is not None:
        env["EMBEDPOOL_PROFILE"] = profile
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env_profile", "tokens"),
    [
        pytest.param(["--profile", "cloud"], None, 512, id="cloud"),
        pytest.param(["--profile", "local"], None, 512, id="local"),
        pytest.param(["--profile", "wsl2"], None, 256, id="wsl2"),
        pytest.param([], "wsl2", 256, id="wsl2-from-the-environment"),
        pytest.param(["--profile", "wsl2", "--batch-tokens", "512"], None, 512, id="requested"),
    ],
)
def test_doctor_prints_the_plan_embed_runs(
    real_model: ResolvedModel, tmp_path: Path, args: list[str], env_profile: str | None, tokens: int
) -> None:
    env = _env(tmp_path, env_profile)
    fixed = ["--workers", "1"]  # the memory reading cannot move a fixed count
    doctor = _doctor([*args, *fixed], env)
    embed = _embed([*args, *fixed], env, tmp_path)
    assert doctor == embed
    assert embed["batch_tokens"] == tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(text: str, name: str) -> float:
    return next(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    )


@pytest.mark.slow
def test_serve_runs_the_doctors_budget(real_model: ResolvedModel, tmp_path: Path) -> None:
    import httpx

    env = _env(tmp_path, None)
    args = ["--profile", "wsl2", "--workers", "1"]
    doctor = _doctor(args, env)
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--no-cache", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert _metric(metrics, "embedpool_pool_batch_tokens") == doctor["batch_tokens"] == 256
        assert _metric(metrics, "embedpool_max_workers") == doctor["max_workers"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
