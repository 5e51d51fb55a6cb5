"""The per-model worker memory estimate (``memory.worker_mem_estimate`` with a
``ModelMemory``), table-tested against pool workers' measured peaks, and what it changes in
the plan: a long-context model is budgeted for one max-length sequence.

Measured rows: benchmarks/families.py (one real pool worker, 1 thread, fp32, random weights
of the real models' shapes, AMD EPYC) and benchmarks/worker_rss.py (MiniLM). The estimate
must not be below a measured peak (the plan would start a worker that does not fit) and not
far above it (the plan would start too few).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpool.executors.pool.machine import Limits
from embedpool.executors.pool.memory import (
    ACTIVATION_PER_TOKEN,
    WORKER_BASE_RSS,
    MiB,
    ModelMemory,
    activation_estimate,
    worker_mem_estimate,
)
from embedpool.executors.pool.plan import plan
from embedpool.graph.families.catalog import model_memory
from embedpool.models import resolve_model

FIXTURES = Path(__file__).parents[2] / "fixtures" / "families"

#: fp32 graph bytes of the real models (4 bytes per parameter).
NOMIC = ModelMemory(
    weights=523 * 10**6, hidden=768, ffn=2 * 3072, heads=12, max_seq=8192, score_keys=0
)
MODERNBERT = ModelMemory(
    weights=596 * 10**6, hidden=768, ffn=2 * 1152, heads=12, max_seq=8192, score_keys=3 * 64
)
MINILM = ModelMemory(
    weights=90_854_912, hidden=384, ffn=1536, heads=12, max_seq=256, score_keys=None
)


@pytest.mark.parametrize(
    ("model", "tokens", "measured_mib"),
    [
        (NOMIC, 768, 640),
        (NOMIC, 2048, 727),
        (NOMIC, 8192, 1138),
        (MODERNBERT, 768, 689),
        (MODERNBERT, 2048, 761),
        (MODERNBERT, 8192, 1117),
        (MINILM, 1024, 192),  # 4 x 256 tokens (engine.py's arena measurement)
    ],
    ids=[
        "nomic-768",
        "nomic-2048",
        "nomic-8192",
        "modernbert-768",
        "modernbert-2048",
        "modernbert-8192",
        "minilm-4x256",
    ],
)
def test_estimate_covers_measured_peaks(
    model: ModelMemory, tokens: int, measured_mib: float
) -> None:
    one_batch = ModelMemory(**{**model.__dict__, "max_seq": min(model.max_seq, tokens)})
    est = worker_mem_estimate("fp32", tokens, one_batch) / MiB
    assert measured_mib <= est <= 1.2 * measured_mib, est


def test_long_context_estimate_is_one_max_length_sequence() -> None:
    """The planner runs a sequence longer than the budget alone, so a small budget does not
    make an 8,192-token model's worker any smaller."""
    assert worker_mem_estimate("fp32", 768, NOMIC) == worker_mem_estimate("fp32", 8192, NOMIC)
    assert worker_mem_estimate("fp32", 16384, NOMIC) > worker_mem_estimate("fp32", 8192, NOMIC)


@pytest.mark.parametrize(
    ("score_keys", "growth"),
    [(None, 4.0), (0, 2.0), (192, 2.0)],
    ids=["full-scores-quadratic", "flash-linear", "local-linear"],
)
def test_scores_grow_with_seq_only_for_full_score_kernels(
    score_keys: int | None, growth: float
) -> None:
    """Activations of one max-length sequence: doubling it doubles them for FlashAttention and
    block-local kernels; with every head's [seq, seq] scores the score term quadruples."""
    base = dict(weights=0, hidden=0, ffn=0, heads=12, score_keys=score_keys)
    if score_keys is not None:
        base["hidden"] = 768  # something per token besides the scores
    small = ModelMemory(**base, max_seq=2048).activations(0)  # type: ignore[arg-type]
    large = ModelMemory(**base, max_seq=4096).activations(0)  # type: ignore[arg-type]
    assert large / small == pytest.approx(growth, rel=0.01)


def test_without_a_model_the_default_constants_apply() -> None:
    for precision in ("fp32", "int8"):
        assert worker_mem_estimate(precision, 768) == (
            WORKER_BASE_RSS[precision] + ACTIVATION_PER_TOKEN * 768
        )
    assert activation_estimate(768) == ACTIVATION_PER_TOKEN * 768
    assert activation_estimate(768, NOMIC) == NOMIC.activations(768)


def test_plan_budgets_the_long_context_model() -> None:
    """On 4 GiB and 8 cores, MiniLM's constants allow every core a worker; nomic at 8,192
    tokens (about 1.2 GiB each) gets fewer, with the reason given."""
    limits = Limits(
        cpus=8,
        cpus_source="test",
        memory_bytes=4 * 1024 * MiB,
        memory_source="test",
        profile="cloud",
        profile_source="test",
    )
    default = plan(limits, precision="fp32", mem_used=0)
    nomic = plan(limits, precision="fp32", mem_used=0, model=NOMIC)
    assert default.policy.max_workers == 8
    assert 1 <= nomic.policy.max_workers < 4
    assert nomic.policy.worker_mem_estimate == worker_mem_estimate("fp32", 768, NOMIC)
    assert any("per fp32 worker" in r for r in nomic.reasons)


@pytest.mark.parametrize(
    ("name", "keys", "ffn_factor"), [("xlmr", None, 1), ("nomic", 0, 2), ("modernbert", 24, 2)]
)
def test_model_memory_reads_the_family_shape(name: str, keys: int | None, ffn_factor: int) -> None:
    model = resolve_model(FIXTURES / name / "model")
    fp32, int8 = model_memory(model, "fp32"), model_memory(model, "int8")
    assert fp32 is not None and int8 is not None
    assert fp32.score_keys == keys  # the ModernBERT fixture's window is 16: 3 x 8 keys
    assert fp32.max_seq == model.max_length and fp32.hidden == 32
    assert fp32.ffn == ffn_factor * int(
        model.config.get("intermediate_size", model.config.get("n_inner", 0))
    )
    assert (
        0.9 * model.weights_path.stat().st_size <= fp32.weights <= model.weights_path.stat().st_size
    )
    assert int8.weights < fp32.weights


def test_plan_counts_weights_the_workers_share_once() -> None:
    """A graph whose weights every worker maps from one file (``graph.external``) costs each
    further worker its runtime and activations only: on 3 GiB and 64 cores, a model with 1 GiB
    of shared weights is planned more workers than the same model holding them privately,
    and one more worker is expected to add its estimate less the weights."""
    limits = Limits(
        cpus=64,
        cpus_source="test",
        memory_bytes=3 * 1024 * MiB,
        memory_source="test",
        profile="cloud",
        profile_source="test",
    )
    shared = ModelMemory(
        weights=1024 * MiB,
        hidden=1024,
        ffn=6 * 3072,
        heads=16,
        max_seq=512,
        score_keys=0,
        shared_weights=True,
    )
    private = ModelMemory(**{**shared.__dict__, "shared_weights": False})
    a, b = plan(limits, mem_used=0, model=shared), plan(limits, mem_used=0, model=private)
    per = worker_mem_estimate("int8", a.policy.batch_tokens, shared)
    assert per == worker_mem_estimate("int8", b.policy.batch_tokens, private)
    room = 0.85 * limits.real_memory_bytes  # the cloud profile's mem_stop
    assert b.policy.max_workers == int(room // per) < a.policy.max_workers
    assert a.policy.max_workers == int((room - shared.weights) // (per - shared.weights)) < 32
    assert a.policy.worker_mem_estimate == per - shared.weights
    assert b.policy.worker_mem_estimate == per
    assert any("weights the workers share" in r for r in a.reasons)
    assert not any("weights the workers share" in r for r in b.reasons)
