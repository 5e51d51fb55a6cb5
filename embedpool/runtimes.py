"""Which inference runtime runs a CPU job, and in which precision: ONNX Runtime or OpenVINO,
chosen per CPU feature set from measurements, never by guess.

ONNX Runtime is the universal engine (every CPU, and the GPU path); OpenVINO
(``engine_openvino``, the ``openvino`` extra) is the second one, for what ONNX Runtime's CPU
provider lacks: a bf16 matrix multiply; its int8 is weight-only (``graph.weight_int8``: higher
quality than ONNX Runtime's int8, no faster without VNNI). ``--engine auto`` looks the CPU's tier up in
``MEASURED`` (one row per tier, each cell a measurement with its source); a tier or a cell
with no measurement keeps ONNX Runtime and says so. ``choose`` is a pure function of the
request, the CPU's flags and whether openvino is installed (tests/test_runtimes.py checks the
table); ``cpu_features`` reads the flags from /proc/cpuinfo. ``benchmarks/engines.py`` makes
the measurements for a new CPU in one command.

Tiers, from the flags Linux reports: ``amx`` (amx_bf16: Sapphire Rapids and later),
``avx512_bf16`` (Zen 4/5, Cooper Lake), ``vnni`` (avx512_vnni or avx_vnni, no bf16: Cascade
and Ice Lake, Alder Lake), ``avx2`` (Zen 1-3, Haswell to Skylake client), ``baseline``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from embedpool.errors import ConfigError
from embedpool.types import Precision, Runtime

if TYPE_CHECKING:
    from embedpool.executors.pool.memory import ModelMemory

Tier = Literal["amx", "avx512_bf16", "vnni", "avx2", "baseline"]
RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "openvino")
#: The flags a bf16 matrix multiply needs (either); named in the refusal.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Precisions each runtime runs on the CPU. int8 is a different graph on each: ONNX Runtime's
#: is embedpool's dynamic MatMulInteger recipe (graph.quantize; OpenVINO runs that one at a
#: third of its fp32 speed), OpenVINO's the fp32 graph with int8 weights behind
#: DequantizeLinear (graph.weight_int8; its static int8 missed the quality bar,
#: benchmarks/openvino_int8.py).
CPU_PRECISIONS: dict[Runtime, tuple[Precision, ...]] = {
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "int8", "bf16"),
}
INSTALL_HINT = "pip install 'embedpool[openvino]'"
#: An OpenVINO worker's memory against ONNX Runtime's estimate of the same model and
#: precision (``catalog.model_memory``; bf16 reads the fp32 graph): its libraries and CPU
#: plugin (``OPENVINO_LIBS``), the weights held about twice (the ONNX frontend's copy and the
#: plugin's: ``OPENVINO_WEIGHT_FACTOR``), counted per worker, and larger activations
#: (``OPENVINO_ACTIVATION_FACTOR``: it reads the standard-op graph of the rotary families,
#: whose windows become a mask). A graph with its weights inside the ONNX file is read, not
#: mapped (ENABLE_MMAP and CPU_RUNTIME_CACHE_CAPACITY=0 did not lower it); a large graph's
#: side file (graph.external) is mapped and shared: of each of two OpenVINO workers' RSS at
#: Qwen3-Embedding-0.6B's shape, 528 of 1,137 MiB were shared at int8 and 1,850 of 3,702 at
#: fp32 (PSS). Whether OpenVINO's graph gets a side file depends on its own size, unknown
#: before the build, so the estimate errs high by that file per extra worker. Measured
#: peaks, 1 thread, AMD EPYC Zen 3, OpenVINO 2026.4 (tests/test_runtimes.py keeps the table
#: and checks the estimate covers it):
#: the default model after 3 x 4 x 256 tokens, fp32 294-296 MiB (ONNX Runtime 184-213), int8
#: (weight-only, graph.weight_int8) 200 (156); one 8,192-token text at nomic-embed-text-v1.5's
#: shape fp32 1,761 (ONNX Runtime 1,081), int8 1,091 (976), at gte-modernbert-base's fp32
#: 2,140 (1,019). Erring high costs a late growth step: the pool measures its workers.
OPENVINO_LIBS = 56 * 1024 * 1024
OPENVINO_WEIGHT_FACTOR: dict[Precision, float] = {"fp32": 1.75, "bf16": 1.75, "int8": 1.6}
OPENVINO_ACTIVATION_FACTOR = 2.3
#: The decoders' (Qwen3, Qwen2): OpenVINO's activations are ONNX Runtime's or less. At
#: Qwen3-Embedding-0.6B's shape (benchmarks/decoders.py's model), one text, 1 thread, int8
#: peaked at 1,375 MiB at 2,048 tokens and 2,596 at 8,192 (about 200 KB a token against ONNX
#: Runtime's 344 KB estimate), fp32 at 3,937 and 5,149; ONNX Runtime's int8 at 8,192: 3,330.
#: The encoders' x 2.3 planned 7.6 GB for int8's 2.6 GB peak.
OPENVINO_DECODER_ACTIVATION_FACTOR = 1.0


def openvino_memory(
    memory: ModelMemory, precision: Precision, *, decoder: bool = False
) -> ModelMemory:
    """``memory`` (ONNX Runtime's estimate at ``precision``, bf16 as fp32) as an OpenVINO
    worker holds it: see OPENVINO_LIBS; a decoder's activations as
    OPENVINO_DECODER_ACTIVATION_FACTOR."""
    return dataclasses.replace(
        memory,
        weights=int(memory.weights * OPENVINO_WEIGHT_FACTOR[precision]) + OPENVINO_LIBS,
        activation_factor=(
            OPENVINO_DECODER_ACTIVATION_FACTOR if decoder else OPENVINO_ACTIVATION_FACTOR
        ),
        shared_weights=False,
    )


@dataclass(frozen=True)
class Cell:
    """What runs a precision request on a tier, and the measurement that says so."""

    runtime: Runtime
    precision: Precision
    why: str


_ORT_UNMEASURED = "no measurement of OpenVINO on this tier: ONNX Runtime, the universal engine"
#: tier -> precision request ("auto", "fp32", "int8") -> the cell. bf16 is OpenVINO's on
#: any tier that has it (ONNX Runtime's CPU provider has no bf16 matrix multiply).
MEASURED: dict[Tier, dict[str, Cell]] = {
    "avx2": {
        "auto": Cell(
            "onnxruntime",
            "int8",
            "AMD EPYC Zen 3, bare engines, quiet machine (benchmarks/engines.py): 2 threads "
            "ONNX Runtime int8 18.8 chunks/s, fp32 16.6, OpenVINO fp32 14.6, OpenVINO int8 "
            "13.9; 1 thread 12.2 / 8.4 / 8.9 / 9.0 (README Measured)",
        ),
        "fp32": Cell(
            "onnxruntime",
            "fp32",
            "AMD EPYC Zen 3, quiet runs: ONNX Runtime fp32 1.09-1.26x OpenVINO fp32 at 2 "
            "threads; 0.94x at 1 thread (one run)",
        ),
        "int8": Cell(
            "onnxruntime",
            "int8",
            "AMD EPYC Zen 3, quiet: OpenVINO's weight-only int8 0.74x ONNX Runtime int8 "
            "at 1 and 2 threads (cos 0.9995 to fp32 against 0.998; no faster than "
            "OpenVINO fp32 without VNNI)",
        ),
    },
    "avx512_bf16": {
        "auto": Cell(
            "openvino",
            "bf16",
            "AMD Zen 4 (AVX-512 VNNI+BF16), 2 threads, batches of 8 x 200 tokens: "
            "OpenVINO bf16 76 sequences/s at cos 0.99995 to fp32, ONNX Runtime int8 "
            "68, fp32 38",
        ),
        "fp32": Cell(
            "onnxruntime",
            "fp32",
            "OpenVINO fp32 not measured on this tier: ONNX Runtime, the universal engine",
        ),
        "int8": Cell(
            "onnxruntime",
            "int8",
            "AMD Zen 4: OpenVINO on embedpool's int8 graph 43/s against ONNX "
            "Runtime's 68; OpenVINO's static int8 misses the quality bar",
        ),
    },
    "amx": {
        p: Cell("onnxruntime", "int8" if p == "auto" else p, _ORT_UNMEASURED)  # type: ignore[arg-type]
        for p in ("auto", "fp32", "int8")
    },
    "vnni": {
        p: Cell("onnxruntime", "int8" if p == "auto" else p, _ORT_UNMEASURED)  # type: ignore[arg-type]
        for p in ("auto", "fp32", "int8")
    },
    "baseline": {
        p: Cell("onnxruntime", "int8" if p == "auto" else p, _ORT_UNMEASURED)  # type: ignore[arg-type]
        for p in ("auto", "fp32", "int8")
    },
}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as /proc/cpuinfo describes it (first processor): its name and its flags."""

    name: str
    flags: frozenset[str]

    @property
    def tier(self) -> Tier:
        f = self.flags
        if "amx_bf16" in f:
            return "amx"
        if "avx512_bf16" in f:
            return "avx512_bf16"
        if "avx512_vnni" in f or "avx_vnni" in f:
            return "vnni"
        if "avx2" in f:
            return "avx2"
        return "baseline"

    @property
    def bf16(self) -> bool:
        return any(flag in self.flags for flag in BF16_FLAGS)


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The first processor's ``model name`` and ``flags`` of /proc/cpuinfo's text."""
    name, flags = "unknown CPU", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = value
        if name != "unknown CPU" and flags:
            break
    return CpuFeatures(name, frozenset(flags.split()))


def cpu_features(path: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """This machine's CPU (no flags where /proc/cpuinfo cannot be read: the baseline tier)."""
    try:
        return parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return CpuFeatures("unknown CPU", frozenset())


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and precision a job runs, and why (one line for ``doctor``)."""

    runtime: Runtime
    precision: Precision
    reason: str


#: Why ``auto`` keeps ONNX Runtime for a model OpenVINO reads through its standard-op graph.
STANDARD_OP_GRAPH = (
    "OpenVINO was measured on the BERT family's fused graph; this family's runs on it as its "
    "standard-op graph (no FlashAttention, local windows as a mask): at "
    "gte-modernbert-base's shape 1.9x slower and 2.1x the memory of ONNX Runtime at 8,192 "
    "tokens, fp32, AMD EPYC Zen 3"
)


def choose(
    engine: str,
    precision: str,
    *,
    device_kind: str,
    cpu: CpuFeatures,
    openvino: bool,
    fused_graph: bool = True,
) -> RuntimeChoice:
    """The runtime for ``--engine`` and ``--precision`` (both as asked: "auto" or a name) on
    ``device_kind`` ("cpu" or "cuda"). ``fused_graph``: OpenVINO reads the model's graph as
    ONNX Runtime does (``graph.ov_graph.reads_fused``), the case MEASURED's OpenVINO cells
    were measured on; else ``auto`` keeps ONNX Runtime. Pure; ConfigError (exit 2) names
    what was wrong."""
    if engine not in RUNTIMES:
        raise ConfigError(f"engine {engine!r} is not one of {', '.join(RUNTIMES)}")
    if device_kind != "cpu":
        if engine == "openvino":
            raise ConfigError(
                "engine openvino runs on the CPU only; the GPU path is ONNX "
                "Runtime's (--engine onnxruntime or auto, or --device cpu)"
            )
        if precision == "bf16":
            raise ConfigError(
                "precision bf16 runs on the CPU (OpenVINO) only; on a GPU use fp16 or fp32"
            )
        # the GPU's precision is placement.precision_for's; this choice is the runtime's only
        return RuntimeChoice("onnxruntime", "fp32", "a GPU: ONNX Runtime's CUDA provider")
    tier = cpu.tier
    if precision == "bf16":
        if not cpu.bf16:
            raise ConfigError(
                f"precision bf16 needs a CPU with {' or '.join(BF16_FLAGS)} "
                f"(this {cpu.name} has neither); use fp32 or int8"
            )
        if engine == "onnxruntime":
            raise ConfigError(
                "precision bf16 runs on OpenVINO only (ONNX Runtime's CPU "
                "provider has no bf16 matrix multiply): --engine openvino or auto"
            )
        if not openvino:
            raise ConfigError(
                f"precision bf16 runs on OpenVINO, which is not installed: {INSTALL_HINT}"
            )
        return RuntimeChoice(
            "openvino",
            "bf16",
            f"bf16 asked for; {cpu.name} has {' '.join(f for f in BF16_FLAGS if f in cpu.flags)}",
        )
    if precision not in ("auto", "fp32", "int8"):
        raise ConfigError(
            f"precision {precision} does not run on the CPU; use int8, fp32"
            + (" or bf16" if cpu.bf16 else "")
        )
    if engine == "openvino":
        if not openvino:
            raise ConfigError(f"engine openvino is not installed: {INSTALL_HINT}")
        # auto: bf16 where the CPU has it (fp32-grade vectors), else int8 (weight-only: the
        # quality bar at a third of fp32's weights in memory), as ONNX Runtime's default
        chosen: Precision = ("bf16" if cpu.bf16 else "int8") if precision == "auto" else (precision)  # type: ignore[assignment]
        return RuntimeChoice(
            "openvino",
            chosen,
            f"--engine openvino, {chosen}"
            + (
                (" (the CPU has bf16)" if cpu.bf16 else " (no bf16 here)")
                if precision == "auto"
                else ""
            ),
        )
    cell = MEASURED[tier][precision]
    prec: Precision = "int8" if precision == "auto" else precision  # type: ignore[assignment]
    if cell.runtime == "openvino" and not fused_graph and engine == "auto":
        return RuntimeChoice(
            "onnxruntime", prec, f"auto, {tier} tier ({cpu.name}): {STANDARD_OP_GRAPH}"
        )
    if engine == "onnxruntime" or (cell.runtime == "openvino" and not openvino):
        if engine == "onnxruntime":
            return RuntimeChoice("onnxruntime", prec, "--engine onnxruntime")
        return RuntimeChoice(
            "onnxruntime",
            prec,
            f"{tier} CPU ({cpu.name}): OpenVINO {cell.precision} measured "
            f"faster here ({cell.why}), but openvino is not installed "
            f"({INSTALL_HINT})",
        )
    return RuntimeChoice(
        cell.runtime, cell.precision, f"auto, {tier} tier ({cpu.name}): {cell.why}"
    )
