"""Test doubles that behave like the real thing where it matters: processes, signals, memory.

``FakeEngineSpec`` builds a ``FakeEngine`` in ~no time: it returns deterministic unit vectors
derived from each sequence's token ids (so results can be compared with a clean run), sleeps
for a configurable time per token (so batches take real time and can be interrupted), and can
be told to misbehave for real:

- ``crash_on``: a token-id subsequence; a batch containing it SIGKILLs its own process,
  as the OOM killer would, but without the cgroup counting an OOM kill (poison-input tests);
- ``raise_on``: a subsequence that makes ``embed`` raise (a Python error, not a crash);
- ``hang_on``: a subsequence on which ``embed`` blocks forever (hung-worker tests);
- ``hold_while_exists``: a file; every batch waits while it exists, a gate that works across
  processes (a test holds batches in a worker or a Ray actor, then deletes the file);
- ``grow_bytes_per_batch``: RSS that is allocated, touched and kept (recycling tests);
- ``alloc_bytes_per_token``: a *transient* allocation proportional to the batch's padded
  tokens (rows x longest row), touched page by page, held while the batch "runs" (the
  delays) and freed after it, like a real engine's activations: two big batches at once
  can push a cgroup over its limit, where one, or two small ones, fit (OOM tests);
- ``fail_to_start`` / ``exit_on_start``: a load that raises, or a process that dies while
  loading; ``fail_to_start_if_exists``: the same, switched on later by creating a file;
- ``join_cgroup``: a ``cgroup.procs`` file the worker writes its own pid to while it loads,
  so that a test's memory limit binds that worker (a pool process or a Ray actor) alone and
  the kernel's OOM killer, not the test, kills it;
- a fake GPU (``device="cuda:N"``), whose failures are ONNX Runtime's own exceptions with the
  texts ORT prints (``ORT_ERRORS``): ``device_oom_above``, a padded-token size above which a
  batch raises the CUDA arena's out-of-memory error (as a GPU whose memory holds that much);
  ``lose_device_on``, a subsequence after which the device is lost for good (every later
  batch raises "unspecified launch failure", as a real sticky CUDA error does); and
  ``unavailable``, a CUDA provider that does not load. ``on_cpu()`` is the same engine on
  the CPU, where none of them happen: the recipe a pool falls back to.

``CrashingSpec`` wraps any recipe (the real ``EngineSpec``) with the same ``crash_on``
poison, so the real model's pool can be tested with a poison input; the product has no
such hook. Both are picklable and importable under ``spawn``, so pool tests run real worker
processes. Nothing in the product imports this module.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.process
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpool.types import TokenIds, Vectors

if TYPE_CHECKING:  # only for annotations: a fake worker imports as little as it can
    from embedpool.executor import WorkBatch


def contains_subsequence(seq: TokenIds, pattern: Sequence[int]) -> bool:
    """Whether ``pattern`` occurs contiguously in ``seq`` (numpy, no Python loop over tokens)."""
    k = len(pattern)
    if k == 0 or len(seq) < k:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(seq), k)
    return bool(np.any(np.all(windows == np.asarray(pattern, dtype=windows.dtype), axis=1)))


def fake_vectors(sequences: Sequence[TokenIds], dim: int) -> Vectors:
    """The vectors a FakeEngine returns: a unit vector seeded by each sequence's bytes."""
    out = np.empty((len(sequences), dim), dtype=np.float32)
    for row, seq in enumerate(sequences):
        seed = zlib.crc32(np.ascontiguousarray(seq, dtype=np.int32).tobytes())
        v = np.random.default_rng(seed).standard_normal(dim)
        out[row] = v / np.linalg.norm(v)
    return out


#: ONNX Runtime's messages for the GPU failures the fault policy knows, as ORT formats them:
#: "[ONNXRuntimeError] : code : NAME : " + the node's status, whose text comes from ORT's
#: BFCArena and CudaCall ("%s failure %d: %s ; GPU=%d ; hostname=%s ; file=%s ; line=%d ;
#: expr=%s;"). (exception class name in onnxruntime.capi.onnxruntime_pybind11_state, text)
ORT_ERRORS: dict[str, tuple[str, str]] = {
    "arena_oom": (
        "RuntimeException",
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            "running MultiHeadAttention node. Name:'layer.0.attention' Status Message: "
            "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* onnxruntime::"
            "BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, onnxruntime::"
            "WaitNotificationFn) Failed to allocate memory for requested buffer of size 805306368"
        ),
    ),
    "cuda_oom": (
        "Fail",
        (
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul "
            "node. Name:'layer.0.ff1' Status Message: CUDA failure 2: out of memory ; GPU=0 ; "
            "hostname=gpu-host ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
            "cuda_allocator.cc ; line=51 ; expr=cudaMalloc((void**)&p, size);"
        ),
    ),
    "cudnn_alloc": (
        "Fail",
        (
            "[ONNXRuntimeError] : 1 : FAIL : CUDNN failure 2000: CUDNN_STATUS_ALLOC_FAILED ; GPU=0 ; "
            "hostname=gpu-host ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
            "cuda_execution_provider.cc ; line=178 ; expr=cudnnCreate(&cudnn_handle_);"
        ),
    ),
    "launch_failure": (
        "Fail",
        (
            "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 719: unspecified launch failure ; GPU=0 ; "
            "hostname=gpu-host ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
            "gpu_data_transfer.cc ; line=73 ; expr=cudaMemcpyAsync(dst_data, src_data, bytes, "
            "cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream.GetHandle()));"
        ),
    ),
    "device_assert": (
        "RuntimeException",
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            "running Gather node. Name:'embeddings.word' Status Message: CUDA error "
            "cudaErrorAssert:device-side assert triggered"
        ),
    ),
    "unknown_999": (
        "Fail",
        (
            "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 999: unknown error ; GPU=0 ; "
            "hostname=gpu-host ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
            "cuda_call.cc ; line=116 ; expr=cudaSetDevice(info_.device_id);"
        ),
    ),
    "shape_error": (
        "InvalidArgument",
        (
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: "
            "input_ids for the following indices index: 1 Got: 9000 Expected: 512"
        ),
    ),
}


def ort_error(name: str) -> Exception:
    """ONNX Runtime's own exception for ``ORT_ERRORS[name]`` (its real class, so the fault
    policy sees what a real session raises)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    cls_name, text = ORT_ERRORS[name]
    exc: Exception = getattr(ort_state, cls_name)(text)
    return exc


@dataclass(frozen=True)
class FakeEngineSpec:
    """Recipe for a FakeEngine; cheap to pickle, like ``EngineSpec``."""

    dim: int = 32
    threads: int = 1
    #: Sleep per (unpadded) token and per batch: makes batches take real, interruptible time.
    delay_per_token_s: float = 0.0
    delay_per_batch_s: float = 0.0
    crash_on: tuple[int, ...] | None = None
    raise_on: tuple[int, ...] | None = None
    hang_on: tuple[int, ...] | None = None
    hold_while_exists: str | None = None
    grow_bytes_per_batch: int = 0
    alloc_bytes_per_token: int = 0
    fail_to_start: str | None = None
    #: Fail to start only while this file exists: a pool that starts, then cannot respawn.
    fail_to_start_if_exists: str | None = None
    exit_on_start: int | None = None
    start_delay_s: float = 0.0
    join_cgroup: str | None = None
    #: A fake device: "cpu", or "cuda:N" for a fake GPU with the failures below.
    device: str = "cpu"
    #: Fake GPU memory: a batch of more padded tokens raises ORT's arena out-of-memory error.
    device_oom_above: int | None = None
    #: A batch containing this subsequence loses the fake GPU: it and every later batch raise
    #: ORT's "unspecified launch failure" (``lost_error`` names another ORT_ERRORS entry).
    lose_device_on: tuple[int, ...] | None = None
    lost_error: str = "launch_failure"
    #: The fake GPU's provider does not load: build() raises DeviceUnavailable.
    unavailable: bool = False

    def on_cpu(self) -> FakeEngineSpec:
        """The same fake engine on the CPU: no device faults (what a pool falls back to)."""
        return dataclasses.replace(
            self, device="cpu", device_oom_above=None, lose_device_on=None, unavailable=False
        )

    def build(self) -> FakeEngine:
        if self.join_cgroup is not None:
            with open(self.join_cgroup, "w") as f:
                f.write(str(os.getpid()))
        if self.start_delay_s:
            time.sleep(self.start_delay_s)
        if self.exit_on_start is not None:
            os._exit(self.exit_on_start)
        if self.fail_to_start is not None:
            raise RuntimeError(self.fail_to_start)
        if self.fail_to_start_if_exists is not None and os.path.exists(
            self.fail_to_start_if_exists
        ):
            raise RuntimeError(f"{self.fail_to_start_if_exists} exists")
        if self.unavailable and self.device != "cpu":
            from embedpool.errors import DeviceUnavailable

            raise DeviceUnavailable(
                f"{self.device}: ONNX Runtime's CUDAExecutionProvider did not load (a fake GPU)",
                "package",
            )
        return FakeEngine(self)


class FakeEngine:
    def __init__(self, spec: FakeEngineSpec) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.threads = spec.threads
        self.device = spec.device
        self._hoard: list[bytes] = []
        self._lost = False

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        spec = self.spec
        crash_if_poisoned(sequences, spec.crash_on)
        if self._lost or (
            spec.lose_device_on is not None
            and any(contains_subsequence(s, spec.lose_device_on) for s in sequences)
        ):
            self._lost = True  # sticky, like a real CUDA context after such an error
            raise ort_error(spec.lost_error)
        if (
            spec.device_oom_above is not None
            and sequences
            and (len(sequences) * max(len(s) for s in sequences) > spec.device_oom_above)
        ):
            raise ort_error("arena_oom")
        for seq in sequences:
            if spec.raise_on is not None and contains_subsequence(seq, spec.raise_on):
                raise ValueError(f"FakeEngine: raise_on {spec.raise_on} found in a sequence")
            if spec.hang_on is not None and contains_subsequence(seq, spec.hang_on):
                threading.Event().wait()  # forever: only a kill ends it
        if spec.hold_while_exists is not None:
            wait_while_exists(spec.hold_while_exists)
        activations = b""
        if spec.alloc_bytes_per_token and sequences:
            padded = len(sequences) * max(len(s) for s in sequences)
            # b"x" * n writes every page, so the whole allocation is charged at once (an
            # untouched calloc would cost nothing until used); it is an mmap that del returns.
            activations = b"x" * (spec.alloc_bytes_per_token * padded)
        delay = spec.delay_per_batch_s + spec.delay_per_token_s * sum(len(s) for s in sequences)
        if delay > 0:
            time.sleep(delay)
        del activations
        if spec.grow_bytes_per_batch:
            # bytes(n) may come from calloc'd, untouched pages; b"x" * n writes every page.
            self._hoard.append(b"x" * spec.grow_bytes_per_batch)
        return fake_vectors(sequences, self.dim)


#: How long a held batch waits for its gate file to go: a test that died without deleting it
#: must not leave workers blocked for ever.
HOLD_LIMIT_S = 300.0


def wait_while_exists(path: str, poll_s: float = 0.01) -> None:
    """Block while ``path`` exists (at most HOLD_LIMIT_S)."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(poll_s)


def crash_if_poisoned(sequences: Sequence[TokenIds], poison: tuple[int, ...] | None) -> None:
    """SIGKILL this process if any sequence contains ``poison``."""
    if poison is not None and any(contains_subsequence(s, poison) for s in sequences):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class CrashingSpec:
    """A recipe that builds ``inner``'s engine, wrapped so that a batch containing ``crash_on``
    SIGKILLs its process first: the real model with a poison input. ``threads`` is passed on
    to ``inner`` (the pool sets it, as on any spec)."""

    inner: Any
    crash_on: tuple[int, ...]
    threads: int = 1

    def build(self) -> CrashingEngine:
        from embedpool.executor import with_threads

        return CrashingEngine(with_threads(self.inner, self.threads).build(), self.crash_on)


class CrashingEngine:
    def __init__(self, engine: Any, crash_on: tuple[int, ...]) -> None:
        self.engine = engine
        self.dim = int(engine.dim)
        self.crash_on = crash_on

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        from embedpool.executor import embed_sequences

        crash_if_poisoned(sequences, self.crash_on)
        return embed_sequences(self.engine, sequences, prompt_lengths)


def make_sequences(
    n: int, *, seed: int = 0, min_len: int = 4, max_len: int = 64, vocab: int = 30000
) -> list[TokenIds]:
    """``n`` random int32 sequences framed like BERT input ([CLS]=101 ... [SEP]=102)."""
    rng = np.random.default_rng(seed)
    out: list[TokenIds] = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        body = rng.integers(1000, vocab, size=max(0, length - 2))
        out.append(np.concatenate([[101], body, [102]]).astype(np.int32))
    return out


def make_batches(
    sequences: Sequence[TokenIds], items_per_batch: int, item_ids: Iterable[str] | None = None
) -> list[WorkBatch]:
    """Consecutive WorkBatches of ``items_per_batch`` items; ids default to ``item-<index>``."""
    from embedpool.executor import WorkBatch

    ids = list(item_ids) if item_ids is not None else [f"item-{i}" for i in range(len(sequences))]
    return [
        WorkBatch(b, tuple(sequences[i : i + items_per_batch]), tuple(ids[i : i + items_per_batch]))
        for b, i in enumerate(range(0, len(sequences), items_per_batch))
    ]


def spawn_worker(
    spec: object, env: dict[str, str] | None = None
) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """One real pool worker, spawned as the supervisor spawns it, with ``env`` set in its
    environment (a spawned child copies the parent's environment when it starts). Returns the
    process and the parent's end of its pipe (the worker's own end is already closed here)."""
    import pickle

    from embedpool.executors.pool.worker import worker_main

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = ctx.Process(
            target=worker_main,
            daemon=True,
            args=(child, pickle.dumps(spec), 0, 1, os.getpid(), None),
        )
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    return proc, parent
