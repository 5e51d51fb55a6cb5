"""A model's graph made ready before any worker starts: the first run's build, planned
against the memory really available, run in one child process the caller waits for, with a
fallback to fp32 and an event for every step.

    ensure_graph(model, "int8", emit)
      ├─ the graph is cached (or shipped) ───────────────────────────────> "int8"
      ├─ decide(): the build fits ── build_in_child ── graph_build ... graph_built ─> "int8"
      └─ it does not fit, or the child was killed ── graph_fallback ──> "fp32" (cached,
                                                     shipped, or built the same way)

Why a child process rather than the caller's own: the caller waits for it before it starts
any worker, so the job's memory is caller + build, then caller + workers, never the three at
once (the build is accounted: it is the job's only other process while it runs); the
build's heap goes back to the system when the child exits (protobuf's arenas and glibc
keep what a long-lived process frees); an OOM kill of the build costs the build, not the job,
which degrades to fp32 instead of dying; and the caller never imports onnx. Starting the
child costs its imports, which a cold build pays anyway.

Why not inside a pool worker: a worker's start has a deadline, and a build under it
failed on a busy machine (issue 14). Concurrent first runs build once: the child takes the
graph's file lock (``store.get_or_build``), so a second process waits (its child reports
"waiting") and then uses the file.

The memory a build needs is estimated from the weights (``build_estimate``); the memory
available is the tightest of the cgroup's limit minus its usage, the host's available
memory and ``--max-memory`` minus this process's RSS (``available_memory``). ``decide`` is
the pure policy between them.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpool import events
from embedpool.config import cache_root, format_bytes
from embedpool.errors import BuildKilled, ConfigError, EmbedpoolError, ModelError
from embedpool.graph import BUILD_STAGES, GraphPrecision, built_path, cache_path, prepare_onnx
from embedpool.models import ResolvedModel

#: A build's peak RSS is BUILD_BASE_BYTES + factor x the model's float32 weight bytes (the
#: ONNX file's bytes for a shipped graph). Measured with benchmarks/graph_variants.py
#: --build-cost (a fresh process with an empty cache dir, imports and model resolution
#: included, VmHWM) on all-MiniLM-L6-v2 (90.9 MB of float32 weights), AMD EPYC (Zen 3,
#: family 25, AVX2, no AVX-512/VNNI), 2 cores: int8 235 MB (247 MB the highest seen in
#: the child here), fp32 376 MB, fp16 335 MB; the interpreter with numpy, onnx and the model
#: resolved holds 62 MB of it. So the factors are 2.04 (int8: the weights and their graph
#: copy), 3.45 (fp32: and the serialised file) and 3.0 (fp16), each raised by about 10%: an
#: estimate too high falls back to fp32 where int8 would have fitted; one too low risks the
#: build's OOM kill, which falls back too, but later. tests/test_firstrun.py checks that the
#: estimate bounds the real peak.
BUILD_BASE_BYTES = 64 * 1024**2
BUILD_FACTORS: Mapping[str, float] = {"int8": 2.3, "fp32": 3.8, "fp16": 3.3}
#: A shipped graph's int8 build (quantize.quantize_shipped) holds the fp32 file's
#: initialisers and their int8 copies at once, as the int8 build does; counted like it (not
#: measured separately).
SHIPPED_INT8_FACTOR = 2.3


@dataclass(frozen=True)
class Decision:
    """What a run will use: ``precision``, whether it must be built first, and, when it is
    not the precision asked for, why (one line for a person)."""

    precision: GraphPrecision
    build: bool
    reason: str | None = None


def decide(
    requested: GraphPrecision,
    *,
    ready: Collection[str],
    need: Mapping[str, int],
    available: int | None,
) -> Decision:
    """The policy: the graph asked for when it is built or its build fits ``available``
    bytes (None: unknown, assume it fits); else, for int8, fp32 when it is built or its
    build fits; else the build asked for all the same (the estimate is conservative, and a
    killed build is caught by ``ensure_graph``)."""
    if requested in ready:
        return Decision(requested, build=False)
    if available is None or need[requested] <= available:
        return Decision(requested, build=True)
    short = (
        f"building the {requested} graph needs about {format_bytes(need[requested])} "
        f"and {format_bytes(max(available, 0))} is available"
    )
    if requested == "int8":
        if "fp32" in ready:
            return Decision("fp32", build=False, reason=short)
        if need["fp32"] <= available:
            return Decision("fp32", build=True, reason=short)
    return Decision(requested, build=True)


def weight_bytes(model: ResolvedModel) -> int:
    """The model's weights as float32 bytes (bf16/fp16 checkpoints are widened on load), or
    the shipped ONNX file's size; from the safetensors headers only."""
    if model.onnx_path is not None:
        return model.onnx_path.stat().st_size
    from embedpool.graph.weights import FLOAT_DTYPES, tensor_infos

    return sum(
        4 * math.prod(info.shape)
        for info in tensor_infos(model.weights_path).values()
        if info.dtype in FLOAT_DTYPES
    )


def build_estimate(model: ResolvedModel, precision: GraphPrecision) -> int:
    """The build's expected peak RSS in bytes (see BUILD_FACTORS)."""
    if model.onnx_path is not None:
        factor = 0.0 if precision == "fp32" else SHIPPED_INT8_FACTOR
    else:
        factor = BUILD_FACTORS[precision]
    return BUILD_BASE_BYTES + int(factor * weight_bytes(model))


def available_memory(max_memory: int | None = None) -> int:
    """Bytes a new process may use now: the tightest of the memory cgroup's limit minus its
    usage (or the host's MemTotal - MemAvailable), psutil's available memory, and under
    ``max_memory`` (``--max-memory``) that minus this process's RSS."""
    import psutil

    from embedpool.executors.pool.limits import detect_limits
    from embedpool.executors.pool.readings import memory_used, own_rss

    limits = detect_limits(max_memory=max_memory)
    free = min(
        limits.real_memory_bytes - memory_used(limits), int(psutil.virtual_memory().available)
    )
    if limits.pool_memory_bytes is not None:
        free = min(free, limits.pool_memory_bytes - own_rss())
    return free


Emit = Callable[..., Any]


def _no_emit(name: str, **fields: Any) -> None:
    return None


@dataclass(frozen=True)
class Built:
    """A finished ``build_in_child``: the file, and what the build cost (``built`` False:
    another process built it while this one waited)."""

    path: Path
    seconds: float
    peak_rss: int
    built: bool


def build_in_child(
    model: ResolvedModel,
    precision: GraphPrecision,
    emit: Emit = _no_emit,
    *,
    cache_dir: Path | None = None,
    estimate: int | None = None,
    available: int | None = None,
    runtime: str = "onnxruntime",
) -> Built:
    """Build (or wait for another process building) this graph in a child process; emits
    ``graph_build`` as the build starts and enters each stage, ``graph_built`` at the end.
    Raises the child's ModelError/ConfigError as such, BuildKilled if it died by a signal."""
    steps = len(_stages(model, precision))
    common = {"model": model.name, "precision": precision}
    emit(
        events.GRAPH_BUILD,
        **common,
        stage="starting",
        step=0,
        steps=steps,
        estimate_bytes=estimate,
        available_bytes=available,
    )
    t0 = time.perf_counter()
    target = cache_dir if cache_dir is not None else cache_path(model, precision).parent
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    step = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedpool.graph.prebuild"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(pickle.dumps((model, precision, target, runtime)))
            proc.stdin.close()
            for raw in proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue  # a library's stray print, not ours
                if "stage" in msg:
                    step = min(step + 1, steps) if msg["stage"] != "waiting" else step
                    emit(
                        events.GRAPH_BUILD,
                        **common,
                        stage=msg["stage"],
                        step=step,
                        steps=steps,
                        estimate_bytes=estimate,
                        available_bytes=available,
                    )
                elif "done" in msg:
                    done = msg["done"]
                elif "error" in msg:
                    error = msg["error"]
        finally:
            proc.stdout.close()
            rc = proc.wait()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")[-4000:]
    seconds = time.perf_counter() - t0
    if error is not None:
        cls = ConfigError if error.get("type") == "ConfigError" else ModelError
        raise cls(error["message"])
    if rc < 0:
        raise BuildKilled(
            f"building the {precision} graph for {model.name} was killed "
            f"({events.exit_name(rc)}), most likely out of memory (it needs about "
            f"{format_bytes(estimate or build_estimate(model, precision))})"
        )
    if rc != 0 or done is None:
        raise ModelError(
            f"building the {precision} graph for {model.name} failed "
            f"({events.exit_name(rc)}): {stderr.strip() or 'no output'}"
        )
    result = Built(Path(done["path"]), seconds, int(done["peak_rss"]), bool(done["built"]))
    emit(
        events.GRAPH_BUILT,
        **common,
        seconds=round(seconds, 3),
        peak_rss=result.peak_rss,
        size_bytes=result.path.stat().st_size,
        path=str(result.path),
        built=result.built,
    )
    return result


def check_runnable(model: ResolvedModel, available: int | None) -> None:
    """A ModelError, before any work, when ``model`` cannot run in ``available`` bytes at any
    precision: its smallest graph's weights alone (int8: one byte a parameter, a lower bound
    of what a worker maps) exceed it. Only a certainty refuses; a model that might fit is
    left to the build's and the pool's estimates."""
    if available is None or model.onnx_path is not None or not model.config:
        return
    from embedpool.graph.weights import FLOAT_DTYPES, tensor_infos

    int8 = sum(
        math.prod(info.shape)
        for info in tensor_infos(model.weights_path).values()
        if info.dtype in FLOAT_DTYPES
    )
    if int8 <= available:
        return
    raise ModelError(
        f"{model.name} cannot run in the memory available here "
        f"({format_bytes(max(available, 0))}): its smallest graph's weights alone (int8, one "
        f"byte a parameter) are {format_bytes(int8)}, fp16 {format_bytes(2 * int8)}, fp32 "
        f"{format_bytes(4 * int8)}, before the runtime and a batch's activations; raise the "
        "memory limit (--max-memory, the container's) or pick a smaller model (`embedpool "
        "models` lists each known model's weights)"
    )


def ensure_graph(
    model: ResolvedModel,
    precision: GraphPrecision,
    emit: Emit = _no_emit,
    *,
    max_memory: int | None = None,
    cache_dir: Path | None = None,
    runtime: str = "onnxruntime",
) -> GraphPrecision:
    """The precision this run will use, its graph built (in a child process, see the module
    doc) if it was not yet: ``precision``, or fp32 where the int8 build cannot fit the
    memory available or was killed (``graph_fallback``, with a one-line ``message``). A
    model that cannot run here at any precision is refused first (``check_runnable``).
    ``runtime="openvino"``: the graph OpenVINO reads (``graph.ov_graph``: the standard-op
    graph where the fused one does not convert; int8 as weight-only int8), no fallback."""
    check_runnable(model, available_memory(max_memory))
    if runtime == "openvino":
        from embedpool.graph import ov_graph

        if ov_graph.built(model, precision, cache_dir) is None:
            build_in_child(
                model,
                precision,
                emit,
                cache_dir=cache_dir,
                runtime=runtime,
                estimate=build_estimate(model, "fp32"),
                available=available_memory(max_memory),
            )
        return precision
    ready = {p for p in {precision, "fp32"} if built_path(model, p, cache_dir) is not None}
    if precision in ready:
        return precision
    need: dict[str, int] = {p: build_estimate(model, p) for p in {precision, "fp32"}}
    available = available_memory(max_memory)
    choice = decide(precision, ready=ready, need=need, available=available)
    if choice.reason is not None:
        _fallback(model, precision, choice.precision, choice.reason, emit)
    if not choice.build:
        return choice.precision
    try:
        build_in_child(
            model,
            choice.precision,
            emit,
            cache_dir=cache_dir,
            estimate=need[choice.precision],
            available=available,
        )
    except BuildKilled as exc:
        if choice.precision != "int8":
            raise
        # the estimate was wrong for this machine: degrade rather than die
        _fallback(model, precision, "fp32", str(exc), emit)
        if "fp32" not in ready:
            try:
                build_in_child(
                    model,
                    "fp32",
                    emit,
                    cache_dir=cache_dir,
                    estimate=need["fp32"],
                    available=available_memory(max_memory),
                )
            except BuildKilled as again:
                raise BuildKilled(
                    f"{again}; no graph of {model.name} can be built in the memory available "
                    f"here ({format_bytes(max(available, 0))}): build it where there is more "
                    f"(`embedpool models build {model.name}`) and bring the cache directory "
                    "(EMBEDPOOL_CACHE_DIR), or raise the memory limit"
                ) from None
        return "fp32"
    return choice.precision


def _fallback(model: ResolvedModel, requested: str, used: str, reason: str, emit: Emit) -> None:
    message = (
        f"{reason}: running {model.name} in {used} for this run; "
        f"`embedpool models build {model.name} --precision {requested}` where memory "
        f"allows makes later runs {requested}"
    )
    emit(
        events.GRAPH_FALLBACK,
        model=model.name,
        requested=requested,
        precision=used,
        reason=reason,
        message=message,
    )


def prebuilt_graph(
    model: ResolvedModel, precision: str, emit: Emit = _no_emit, *, runtime: str = "onnxruntime"
) -> Path:
    """The graph ``runtime`` reads for ``model`` at ``precision``, built now (in a child, see
    the module doc) if it was not yet, without ``ensure_graph``'s fallback: what ``embedpool
    models build`` asked for, or a ConfigError naming why it cannot be."""
    if runtime == "openvino":
        from embedpool.engine import EngineSpec
        from embedpool.graph import ov_graph
        from embedpool.runtimes import INSTALL_HINT, openvino_installed

        EngineSpec(model, precision, runtime="openvino")  # type: ignore[arg-type]  # checks it
        if not openvino_installed():  # before a build that nothing could load
            raise ConfigError(f"--engine openvino: openvino is not installed ({INSTALL_HINT})")
        graph = ov_graph.graph_precision(precision)
        found = ov_graph.built(model, graph)
        return found or build_in_child(model, graph, emit, runtime="openvino").path
    if precision not in ("fp32", "int8", "fp16"):
        raise ConfigError(f"precision {precision} runs on the openvino engine only")
    graph_prec: GraphPrecision = precision  # type: ignore[assignment]
    return built_path(model, graph_prec) or build_in_child(model, graph_prec, emit).path


def verify_graph(
    model: ResolvedModel, path: Path, *, precision: str = "int8", runtime: str = "onnxruntime"
) -> int:
    """Load ``path`` in ``runtime`` (the CPU; ONNX Runtime loads any graph precision there)
    and embed one text: the vector's width. Raises ModelError when the file does not load or
    the vector is not the model's (its width, all finite, unit length where the model
    normalises); OpenVINO must be installed (``prebuilt_graph`` checks it)."""
    import numpy as np

    from embedpool.engine import Engine, EngineSpec
    from embedpool.tokenization import TextTokenizer

    seqs = TextTokenizer.for_model(model).encode(["embedpool checks this graph"]).sequences
    if runtime == "openvino":
        spec = EngineSpec(model, precision, threads=1, runtime="openvino")  # type: ignore[arg-type]
        engine = spec.load(path)
    else:
        engine = Engine.for_model(path, model, threads=1)
    try:
        vec = engine.embed(seqs)
    except ModelError as exc:  # a NaN or inf vector (Engine.embed refuses it)
        raise ModelError(
            f"{path} gives a bad vector for {model.name}: {exc}; delete it and rebuild"
        ) from exc
    norm = float(np.linalg.norm(vec))
    if (
        vec.shape != (1, model.dim)
        or not np.isfinite(vec).all()
        or (model.normalize and abs(norm - 1.0) > 1e-3)
    ):
        raise ModelError(
            f"{path} gives a bad vector for {model.name} (shape {vec.shape}, "
            f"norm {norm:.4f}, expected {model.dim} dims); delete it and rebuild"
        )
    return int(vec.shape[1])


def graph_dir() -> Path:
    """Where graphs are cached (``prepare_onnx``'s default ``cache_dir``)."""
    return cache_root() / "onnx"


def built_graphs(directory: Path | None = None) -> list[tuple[str, int]]:
    """(file name, bytes) of every graph built in ``directory`` (default: ``graph_dir()``);
    a large graph's bytes include its weights' side file (graph/external.py)."""
    from embedpool.graph.external import data_path

    where = directory if directory is not None else graph_dir()
    return sorted(
        (p.name, p.stat().st_size + (data_path(p).stat().st_size if data_path(p).is_file() else 0))
        for p in where.glob("*.onnx")
        if p.is_file()
    )


def _stages(model: ResolvedModel, precision: str) -> tuple[str, ...]:
    """The stages ``prepare_onnx`` reports for this build (for the progress bar's total)."""
    if model.onnx_path is not None:
        return ("quantising",)
    if precision == "fp32":
        return tuple(s for s in BUILD_STAGES if s != "quantising")
    return BUILD_STAGES


def _child_main() -> int:
    """``python -m embedpool.graph.prebuild``: read (model, precision, cache_dir) pickled on
    stdin, build, and report on stdout as JSON lines: {"stage"}, then {"done"} or {"error"}."""

    def say(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    model, precision, cache_dir, runtime = pickle.loads(sys.stdin.buffer.read())
    stages: list[str] = []

    def on_stage(name: str) -> None:
        stages.append(name)
        say({"stage": name})

    try:
        if runtime == "openvino":  # the graph OpenVINO reads (no openvino import needed)
            from embedpool.graph import ov_graph

            if ov_graph.built(model, precision, cache_dir) is None:
                on_stage("writing")  # OpenVINO's graph reports no stages of its own
            path = ov_graph.graph_for(model, cache_dir, precision)
        else:
            path = prepare_onnx(model, precision, cache_dir, on_stage=on_stage)
    except EmbedpoolError as exc:
        say({"error": {"type": type(exc).__name__, "message": str(exc)}})
        return 2
    say(
        {
            "done": {
                "path": str(path),
                "peak_rss": _peak_rss(),
                "built": any(s != "waiting" for s in stages),
            }
        }
    )
    return 0


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space.
    Not getrusage's ru_maxrss, which keeps the forking parent's RSS across exec (a child of a
    2 GB process reported 2 GB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


if __name__ == "__main__":
    sys.exit(_child_main())
