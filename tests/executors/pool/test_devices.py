"""GPU faults and the device executor, with real worker processes and a fake GPU.

The fake GPU (``embedpool.testing.FakeEngineSpec(device="cuda:0", ...)``) raises ONNX
Runtime's own exception classes with the texts ORT prints: the CUDA arena's out-of-memory
error above a batch size, and a sticky "unspecified launch failure" after a poison input.
Nothing here mocks the pool: every worker is a spawned process speaking the real protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pool_support import DEADLINE_S, EventLog, fast_config

from embedpool import events
from embedpool.errors import DeviceError, DeviceLost
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors import devices
from embedpool.executors.devices import DeviceExecutor, PoolRecipe
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.executors.pool.pool import Pool
from embedpool.testing import FakeEngineSpec, fake_vectors, make_batches, make_sequences

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

DIM = 16
POISON = (7777, 7778)


def gpu_config(**overrides: Any) -> Any:
    """One worker on fake cuda:0, short timers (a GPU pool as devices.start builds it)."""
    base: dict[str, Any] = dict(workers=1, threads=1, device="cuda:0", profile="cloud")
    base.update(overrides)
    return fast_config(**base)


def check_all(results: dict[int, BatchResult], batches: list[WorkBatch]) -> None:
    assert sorted(results) == sorted(b.batch_id for b in batches)
    for b in batches:
        r = results[b.batch_id]
        assert r.failed == {}
        np.testing.assert_allclose(r.vectors, fake_vectors(b.sequences, DIM), atol=1e-6)


def plant(seqs: list[Any], index: int) -> None:
    seqs[index] = np.concatenate([seqs[index][:3], POISON, seqs[index][3:]]).astype(np.int32)


def test_cuda_out_of_memory_splits_lowers_the_budget_and_recovers(event_log: EventLog) -> None:
    """A batch over the fake GPU's memory raises ORT's arena error in a live worker: the task
    is split and the budget lowered, as after an OOM kill, but no worker dies; the budget
    comes back up once things are calm, never to a size that ran out of memory."""
    spec = FakeEngineSpec(dim=DIM, device="cuda:0", device_oom_above=1500, delay_per_batch_s=0.005)
    batches = make_batches(make_sequences(1200, seed=31, min_len=40, max_len=64), 64)
    with Pool(
        spec, gpu_config(batch_tokens=4096, emergency_exit_s=0.3), on_event=event_log
    ) as pool:
        results = {r.batch_id: r for r in pool.run(batches)}
        stats = pool.stats()
    check_all(results, batches)
    splits = event_log.named(events.SPLIT)
    assert splits and {e["kind"] for e in splits} == {"device_oom"}
    assert "Failed to allocate memory for requested buffer" in splits[0]["reason"]
    assert stats.deaths == 0 and stats.poison_items == 0  # a live worker's error, not a kill
    scale = event_log.named(events.SCALE)
    lowered = [e for e in scale if e["batch_tokens_to"] < e["batch_tokens_from"]]
    raised = [e for e in scale if e["batch_tokens_to"] > e["batch_tokens_from"]]
    assert lowered and lowered[0]["batch_tokens_from"] == 4096
    assert raised, "the budget was never restored after the out-of-memory errors"
    assert max(e["batch_tokens_to"] for e in raised) <= 1500 < 4096  # never the OOM size again


def test_a_lost_gpu_moves_its_batches_to_the_cpu(event_log: EventLog) -> None:
    """A sticky CUDA error breaks the GPU's pool with DeviceLost; the device executor says so
    in one line and an event, starts the CPU pool and every batch is embedded there, the
    poison input included (on the CPU it is an ordinary input)."""
    seqs = make_sequences(400, seed=32)
    plant(seqs, 150)
    batches = make_batches(seqs, 10)
    gpu = PoolRecipe(
        "cuda:0 FakeGPU",
        FakeEngineSpec(dim=DIM, device="cuda:0", lose_device_on=POISON, delay_per_batch_s=0.01),
        gpu_config(),
    )
    cpu = PoolRecipe("cpu", _fake(gpu).on_cpu(), fast_config(workers=2), precision="fp32")
    ex = devices.start([gpu], fallback=cpu, on_event=event_log)
    try:
        assert ex.devices == ["cuda:0 FakeGPU"]
        results = {r.batch_id: r for r in ex.run(batches)}
        assert ex.devices == ["cpu"]
        described = ex.describe()
    finally:
        ex.close()
    check_all(results, batches)
    (fallback,) = event_log.named(events.DEVICE_FALLBACK)
    assert fallback["device"] == "cuda:0 FakeGPU" and fallback["to"] == "cpu"
    assert "CUDA failure 719: unspecified launch failure" in fallback["reason"]
    assert "\n" not in fallback["message"]
    assert "fell back: cuda:0 FakeGPU lost" in described
    # batches done on the GPU are the job's own; the CPU's say which precision made them
    on_cpu = [r for r in results.values() if r.precision == "fp32"]
    assert on_cpu and len(on_cpu) < len(batches)
    assert results[15].precision == "fp32"  # the poisoned batch ran on the CPU
    assert [e for e in event_log.named(events.POOL_BROKEN) if "was lost" in e["error"]]


def test_cpu_workers_alongside_a_gpu_share_the_batches(event_log: EventLog) -> None:
    batches = make_batches(make_sequences(600, seed=33), 10)
    gpu = PoolRecipe(
        "cuda:0 FakeGPU",
        FakeEngineSpec(dim=DIM, device="cuda:0", delay_per_batch_s=0.02),
        gpu_config(),
    )
    cpu = PoolRecipe(
        "cpu",
        FakeEngineSpec(dim=DIM, delay_per_batch_s=0.02),
        fast_config(workers=2),
        precision="fp32",
    )
    with devices.start([gpu], cpu=cpu, on_event=event_log) as ex:
        assert ex.devices == ["cuda:0 FakeGPU", "cpu"]
        assert ex.stats().max_workers == 3
        results = {r.batch_id: r for r in ex.run(batches)}
    check_all(results, batches)
    by = {p: sum(1 for r in results.values() if r.precision == p) for p in (None, "fp32")}
    assert by[None] > 0 and by["fp32"] > 0  # both took work
    assert event_log.named(events.DEVICE_FALLBACK) == []


def _fake(recipe: PoolRecipe) -> FakeEngineSpec:
    assert isinstance(recipe.spec, FakeEngineSpec)
    return recipe.spec


def test_auto_runs_on_the_cpu_when_the_cuda_provider_does_not_load(event_log: EventLog) -> None:
    gpu = PoolRecipe(
        "cuda:0 FakeGPU", FakeEngineSpec(dim=DIM, device="cuda:0", unavailable=True), gpu_config()
    )
    cpu = PoolRecipe("cpu", _fake(gpu).on_cpu(), fast_config(workers=1), precision="fp32")
    with devices.start([gpu], fallback=cpu, on_event=event_log) as ex:
        assert ex.devices == ["cpu"]
        assert any("auto: cuda:0 FakeGPU not used" in n and "did not load" in n for n in ex.notes)
        batches = make_batches(make_sequences(40, seed=34), 8)
        check_all({r.batch_id: r for r in ex.run(batches)}, batches)


def test_cuda_fails_at_once_when_the_provider_does_not_load() -> None:
    gpu = PoolRecipe(
        "cuda:0 FakeGPU", FakeEngineSpec(dim=DIM, device="cuda:0", unavailable=True), gpu_config()
    )
    cpu = PoolRecipe("cpu", _fake(gpu).on_cpu(), fast_config(workers=1))
    with pytest.raises(DeviceError) as info:
        devices.start([gpu], fallback=cpu, strict=True)
    assert info.value.missing == "package"
    assert str(info.value).startswith(
        "--device cuda:0: cuda:0: ONNX Runtime's CUDAExecutionProvider did not load"
    )


def test_a_lost_gpu_without_a_fallback_breaks_with_the_reason(event_log: EventLog) -> None:
    seqs = make_sequences(60, seed=35)
    plant(seqs, 5)
    gpu = PoolRecipe(
        "cuda:0 FakeGPU",
        FakeEngineSpec(dim=DIM, device="cuda:0", lose_device_on=POISON),
        gpu_config(),
    )
    ex = DeviceExecutor([gpu.start(event_log)], on_event=event_log)
    try:
        with pytest.raises(Exception, match="every device was lost"):
            list(ex.run(make_batches(seqs, 10)))
        assert ex.broken is not None and "unspecified launch failure" in ex.broken
    finally:
        ex.close()


def test_in_process_on_a_lost_gpu_is_a_clear_error() -> None:
    seqs = make_sequences(20, seed=36)
    plant(seqs, 3)
    with InProcessExecutor(FakeEngineSpec(dim=DIM, device="cuda:0", lose_device_on=POISON)) as ex:
        fut = ex.submit(WorkBatch(0, tuple(seqs)))
        with pytest.raises(DeviceLost, match=r"cuda:0 was lost .* device='cpu'"):
            fut.result(timeout=DEADLINE_S)
        assert ex.broken is not None and "cuda:0 was lost" in ex.broken
