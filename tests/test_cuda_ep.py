"""ONNX Runtime's CUDA provider as the engine asks for it, and the checks that it really
runs there (ORT falls back to the CPU quietly when the provider does not load)."""

from __future__ import annotations

import pytest

from embedpool import cuda_ep
from embedpool.engine import EngineSpec
from embedpool.errors import ConfigError, DeviceUnavailable
from embedpool.models import resolve_model

GiB = 1024**3


def test_providers_for_the_cpu_and_a_gpu() -> None:
    assert cuda_ep.providers_for("cpu") == ["CPUExecutionProvider"]
    (cuda, opts), cpu = cuda_ep.providers_for("cuda:2", 3 * GiB, "fp16")
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert opts == {
        "device_id": "2",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1",
        "gpu_mem_limit": str(3 * GiB),
    }
    (_, fp32), _ = cuda_ep.providers_for("cuda:0", None, "fp32")
    assert fp32["use_tf32"] == "0" and "gpu_mem_limit" not in fp32  # fp32 means fp32


@pytest.mark.parametrize(
    ("providers", "ok"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], True),
        (["CPUExecutionProvider"], False),  # ORT fell back quietly
        (["TensorrtExecutionProvider", "CUDAExecutionProvider"], False),
        ([], False),
    ],
)
def test_check_session(providers: list[str], ok: bool) -> None:
    if ok:
        cuda_ep.check_session(providers, "cuda:0")
        return
    with pytest.raises(DeviceUnavailable, match="could not create its CUDAExecutionProvider"):
        cuda_ep.check_session(providers, "cuda:0")
    cuda_ep.check_session(providers, "cpu")  # nothing to check on the CPU


def test_this_onnxruntime_has_no_cuda_provider_and_the_engine_says_so() -> None:
    """The real ORT here is the CPU package: a GPU engine fails its build with the cause and
    the fix, before any session is made (in a worker, a failed start that auto turns into
    the CPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover - a GPU box
        return
    with pytest.raises(DeviceUnavailable) as info:
        EngineSpec(resolve_model(), "fp32", device="cuda:0").build()
    assert info.value.missing == "package"
    assert "has no CUDAExecutionProvider" in str(info.value)
    assert "pip install 'embedpool[gpu]'" in str(info.value)


@pytest.mark.parametrize(
    ("precision", "device", "ok"),
    [
        ("int8", "cpu", True),
        ("fp32", "cpu", True),
        ("fp32", "cuda:0", True),
        ("fp16", "cuda:1", True),
        ("fp16", "cpu", False),
        ("int8", "cuda:0", False),
    ],
)
def test_engine_spec_precision_and_device(precision: str, device: str, ok: bool) -> None:
    m = resolve_model()
    if ok:
        spec = EngineSpec(m, precision, device=device)  # type: ignore[arg-type]
        cpu = spec.on_cpu()
        assert cpu.device == "cpu" and cpu.gpu_mem_limit is None
        assert cpu.precision == ("fp32" if precision == "fp16" else precision)
    else:
        with pytest.raises(ConfigError, match="int8 is the CPU's, fp16 the GPU's"):
            EngineSpec(m, precision, device=device)  # type: ignore[arg-type]


def test_device_index() -> None:
    assert [cuda_ep.device_index(d) for d in ("cuda", "cuda:0", "cuda:3")] == [0, 0, 3]
