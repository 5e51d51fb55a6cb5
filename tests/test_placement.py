"""Where a job runs: the precision rule, a GPU placement from a hand-made device plan, and
the cache keyed by the graph that really made each vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedpool.budget import GPU_MAX_BATCH_ITEMS, GPU_MAX_BATCH_TOKENS
from embedpool.cache import VectorCache, text_key
from embedpool.device_choice import DevicePlan, DeviceRequest, Gpu
from embedpool.errors import ConfigError, DeviceError
from embedpool.graph import graph_id
from embedpool.job import Embedder
from embedpool.models import resolve_model
from embedpool.placement import place, precision_for
from embedpool.testing import FakeEngineSpec

GiB = 1024**3
WITH_FP16 = ("fp32", "int8", "fp16")
WITHOUT_FP16 = ("fp32", "int8")


@pytest.mark.parametrize(
    ("requested", "kind", "available", "want"),
    [
        ("auto", "cpu", WITH_FP16, "int8"),
        ("auto", "cuda", WITH_FP16, "fp16"),
        ("auto", "cuda", WITHOUT_FP16, "fp32"),  # a graph builder without fp16
        ("fp32", "cpu", WITH_FP16, "fp32"),
        ("fp32", "cuda", WITH_FP16, "fp32"),
        ("int8", "cpu", WITH_FP16, "int8"),
        ("fp16", "cuda", WITH_FP16, "fp16"),
        ("int8", "cuda", WITH_FP16, "int8 runs on the CPU only"),
        ("fp16", "cpu", WITH_FP16, "fp16 runs on a GPU only"),
        ("fp16", "cuda", WITHOUT_FP16, "makes only fp32, int8"),
        ("bf16", "cpu", WITH_FP16, "bf16"),  # OpenVINO's: runtimes.choose checks the CPU flags
        ("bf16", "cuda", WITH_FP16, "bf16 runs on the CPU"),
        ("int4", "cpu", WITH_FP16, "not one of auto, int8, fp32, fp16, bf16"),
    ],
)
def test_precision_for(requested: str, kind: str, available: tuple[str, ...], want: str) -> None:
    if " " in want:
        with pytest.raises(ConfigError, match=want):
            precision_for(requested, kind, available)
    else:
        assert precision_for(requested, kind, available) == want


def _cuda(*gpus: Gpu, request: str = "cuda") -> DevicePlan:
    kind = "auto" if request == "auto" else "cuda"
    return DevicePlan("cuda", gpus, "test", DeviceRequest(kind))  # type: ignore[arg-type]


H200 = Gpu(0, "NVIDIA H200", 141 * GiB, 140 * GiB)
FULL = Gpu(0, "NVIDIA T4", 16 * GiB, 200 * 1024**2)


def test_a_gpu_placement_batches_for_the_gpu() -> None:
    m = resolve_model()
    p = place(m, plan=_cuda(H200), cpus=16)
    assert p.on_gpu and p.devices is not None
    assert p.precision == "fp16"
    assert (p.batch_tokens, p.max_batch_items) == (GPU_MAX_BATCH_TOKENS, GPU_MAX_BATCH_ITEMS)
    assert p.devices.cpu_workers == 0 and p.devices.parent_cores == 15
    assert p.describe().startswith("cuda:0 NVIDIA H200 (test)")
    p = place(m, plan=_cuda(H200), cpus=16, cpu_workers=4, batch_tokens=4096)
    assert p.batch_tokens == 4096 and p.devices is not None and p.devices.cpu_workers == 4
    assert "+ 4 CPU worker(s) in fp32" in p.describe()


def test_a_full_gpu_is_the_cpu_under_auto_and_an_error_under_cuda() -> None:
    m = resolve_model()
    p = place(m, plan=_cuda(FULL, request="auto"), cpus=8)
    assert not p.on_gpu and p.precision == "int8" and p.batch_tokens == 512
    assert "too little free GPU memory" in p.device.reason
    with pytest.raises(DeviceError) as info:
        place(m, plan=_cuda(FULL), cpus=8)
    assert info.value.missing == "device"


def test_the_ray_backend_is_the_cpu() -> None:
    m = resolve_model()
    assert not place(m, plan=_cuda(H200, request="auto"), backend="ray", cpus=4).on_gpu
    with pytest.raises(DeviceError, match="the ray backend runs its actors on the CPU"):
        place(m, plan=_cuda(H200), backend="ray", cpus=4)


def test_cpu_workers_need_a_gpu() -> None:
    with pytest.raises(ConfigError, match="--cpu-workers adds CPU workers next to a GPU"):
        place(resolve_model(), device="cpu", cpu_workers=2)


def test_vectors_are_cached_under_the_graph_that_made_them(tmp_path: Path) -> None:
    """A batch a device executor ran in another precision (CPU workers next to an fp16 GPU,
    a fallback) is cached under that precision's fingerprint, never the job's."""
    with VectorCache.open(tmp_path / "c.sqlite") as cache:
        emb = Embedder(engine=FakeEngineSpec(dim=384), cache=cache, lazy=True, device="cpu")
        window = emb._prepare(0, ["a", "b"], ["one text", "another text"])
        window.prep.vectors[:] = np.eye(2, 384, dtype=np.float32)
        window.prep.store(emb._cache_for("fp32"), [0])
        window.prep.store(emb._cache_for(None), [1])
        m = emb.model
        fp32 = m.fingerprint("fp32", "truncate", graph=graph_id(m, "fp32"))
        keys = [text_key("one text"), text_key("another text")]
        assert set(cache.get_many(fp32, keys)) == {keys[0]}
        assert set(cache.get_many(emb.fingerprint, keys)) == {keys[1]}
        assert emb.precision == "int8"


def test_doctor_shows_the_gpus_their_memory_the_driver_and_the_plan() -> None:
    from embedpool.device_choice import DeviceFacts
    from embedpool.doctor import render_devices

    facts = DeviceFacts(
        distributions=(("onnxruntime-gpu", "1.26.0"),),
        driver="570.86.15",
        driver_source="nvidia-smi",
        gpus=(H200,),
        all_gpus=2,
        cuda_visible_devices="0",
    )
    lines = "\n".join(
        render_devices(facts, place(resolve_model(), plan=_cuda(H200), cpus=16, cpu_workers=2))
    )
    assert "onnxruntime onnxruntime-gpu 1.26.0" in lines
    assert "driver      NVIDIA 570.86.15  (source: nvidia-smi)" in lines
    assert "gpu 0       NVIDIA H200: 141.0 GiB total, 140.0 GiB free" in lines
    assert "hidden      1 GPU(s) not in CUDA_VISIBLE_DEVICES='0'" in lines
    assert f"cuda:0: 1 worker, {GPU_MAX_BATCH_TOKENS} padded tokens per batch" in lines
    assert "2 CPU worker(s) alongside, 13 core(s) for the parent (tokenising) of 16" in lines
    error = render_devices(DeviceFacts(), None, "--device cuda: no NVIDIA driver found")
    assert error[-1] == "  device      error: --device cuda: no NVIDIA driver found"
    assert "no NVIDIA driver" in error[1]


def test_the_model_shape_counts_every_shard(tmp_path: Path) -> None:
    """The weights of a sharded checkpoint are those of every shard its index lists, as the
    pool's memory estimate counts them; unsharded, about the file's size."""
    import dataclasses
    import json

    from safetensors.numpy import save_file

    from embedpool.placement import model_shape

    m = resolve_model()
    shards: dict[str, dict[str, np.ndarray]] = {
        "model-00001-of-00002.safetensors": {"a.weight": np.zeros((10, 30), np.float32)},
        "model-00002-of-00002.safetensors": {
            "b.weight": np.zeros((5, 8), np.float16),
            "b.bias": np.zeros(8, np.float32),
        },
    }
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {k: file for file, tensors in shards.items() for k in tensors},
            }
        )
    )
    sharded = dataclasses.replace(m, weights_path=index)
    elements = 10 * 30 + 5 * 8 + 8
    assert model_shape(sharded, "fp32").weight_bytes == 4 * elements  # fp16 widened, as loaded
    assert model_shape(sharded, "fp16").weight_bytes == 2 * elements
    on_disk = m.weights_path.stat().st_size
    assert 0.99 * on_disk <= model_shape(m, "fp32").weight_bytes <= on_disk


def test_fp16_runs_end_to_end_on_the_cpu_provider() -> None:
    """With the graph builder's fp16, a GPU placement runs fp16, and that graph, built by
    prepare_onnx and loaded by the engine as a GPU worker loads it (ORT's CPU provider standing
    in for CUDA, which CI lacks), gives the fp32 graph's vectors within fp16's quality bar."""
    from embedpool.engine import Engine, EngineSpec
    from embedpool.graph import prepare_onnx
    from embedpool.tokenization import TextTokenizer

    m = resolve_model()
    assert place(m, plan=_cuda(H200), cpus=16).precision == "fp16"
    assert place(m, device="cpu").precision == "int8"
    with pytest.raises(ConfigError, match="precision fp16 does not run on cpu"):
        EngineSpec(m, "fp16")
    texts = [
        "def add(a, b):\n    return a + b",
        "über naïve café",
        "x" * 2000,
        *(f"item {i}: " + "word " * (i * 7 % 60) for i in range(13)),
    ]
    seqs = TextTokenizer.for_model(m).encode(texts).sequences
    fp16 = Engine.for_model(prepare_onnx(m, "fp16"), m, precision="fp16")
    assert fp16.session.get_providers() == ["CPUExecutionProvider"]
    got, want = fp16.embed(seqs), EngineSpec(m, "fp32").build().embed(seqs)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(texts), m.dim)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.999, cos
