"""ONNX Runtime on a GPU: the CUDA provider's options, and proof that it really loaded.

Used where a session is built (``engine.Engine``), so in a worker, never in a pool's parent::

    prepare(device)               before the session: ORT has a CUDA provider; its CUDA and
                                  cuDNN libraries from the nvidia-* wheels are loaded
    providers_for(device, mem_limit, precision)
                                  [("CUDAExecutionProvider", {...}), "CPUExecutionProvider"]
    check_session(session.get_providers(), device)
                                  after it: the session really is on the GPU
    unavailable(device, exc)      a session that could not be created, as DeviceUnavailable

ONNX Runtime does not fail when the CUDA provider cannot be created (CUDA 12 or cuDNN 9
libraries missing, a driver too old): it logs an error and quietly runs every node on the CPU
provider. A worker that believed it was on a GPU would then run 20-50x slower than planned,
with batch budgets sized for a GPU. ``check_session`` turns that into ``DeviceUnavailable``,
which ``--device auto`` answers by running on the CPU and ``--device cuda`` reports.

The options, and why:

- ``arena_extend_strategy=kSameAsRequested``: the default doubles the arena at each growth, so
  one batch slightly over a power of two reserves almost twice what it needs; with the token
  budget bounding every batch, growing by what is asked keeps the GPU's memory near the need.
- ``gpu_mem_limit``: the arena's cap (``pool.gpuplan.gpu_mem_limit``: a share of the free
  memory): a batch that does not fit fails as ORT's "Failed to allocate memory" in a live
  worker (a DEVICE_OOM: split, budget halved), instead of taking memory other programs hold.
- ``cudnn_conv_algo_search=HEURISTIC``: encoders have no convolutions; the default exhaustive
  search would only cost time and workspace memory if a model had one.
- ``use_tf32=0`` for fp32: TF32 matmuls keep 10 bits of mantissa; "fp32" means fp32, and fp16
  is the fast precision on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from embedpool.errors import DeviceUnavailable

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def device_index(device: str) -> int:
    """'cuda:2' -> 2 ('cuda' -> 0)."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


def cuda_options(device: str, mem_limit: int | None, precision: str) -> dict[str, str]:
    """The CUDA provider's options (see the module docstring)."""
    opts = {
        "device_id": str(device_index(device)),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "use_tf32": "0" if precision == "fp32" else "1",
    }
    if mem_limit is not None:
        opts["gpu_mem_limit"] = str(int(mem_limit))
    return opts


def providers_for(device: str, mem_limit: int | None = None, precision: str = "fp16") -> list[Any]:
    """ORT's ``providers`` argument for ``device`` ("cpu" or "cuda:N"). The CPU provider comes
    second on a GPU: ORT places there the few nodes CUDA has no kernel for (shape arithmetic)."""
    if device == "cpu":
        return [CPU_EP]
    return [(CUDA_EP, cuda_options(device, mem_limit, precision)), CPU_EP]


def prepare(device: str) -> None:
    """Before a GPU session: fail early if this ORT has no CUDA provider, and load the CUDA and
    cuDNN libraries that ``onnxruntime-gpu[cuda,cudnn]`` installs as nvidia-* wheels
    (``onnxruntime.preload_dlls``, ORT >= 1.21; without it ORT finds them only on the
    library path)."""
    import onnxruntime as ort

    check_available(ort.get_available_providers(), device)
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # a library it cannot find is reported by check_session, with ORT's own log line
        with contextlib.suppress(Exception):
            preload()


def unavailable(device: str, exc: BaseException) -> DeviceUnavailable:
    """A CUDA session that failed to build, as DeviceUnavailable naming the cause."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DeviceUnavailable(
        f"{device}: ONNX Runtime could not start a CUDA session: {first[:400]}", "device"
    )


def check_available(available: Sequence[str], device: str) -> None:
    """Before the session: the installed ONNX Runtime has a CUDA provider at all."""
    if device != "cpu" and CUDA_EP not in available:
        raise DeviceUnavailable(
            f"{device}: this ONNX Runtime has no {CUDA_EP} (providers: {', '.join(available)}): "
            f"the CPU package onnxruntime is the one imported; install onnxruntime-gpu "
            f"(pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'embedpool[gpu]')",
            "package",
        )


def check_session(session_providers: Sequence[str], device: str) -> None:
    """After the session: ORT really put it on the GPU (it falls back to the CPU quietly)."""
    if device != "cpu" and (not session_providers or session_providers[0] != CUDA_EP):
        raise DeviceUnavailable(
            f"{device}: ONNX Runtime could not create its {CUDA_EP} and fell back to "
            f"{', '.join(session_providers) or 'nothing'} (its log above says why; usually "
            f"the CUDA 12 or cuDNN 9 libraries are missing: pip install 'onnxruntime-gpu[cuda,cudnn]' "
            f"brings them)",
            "package",
        )
