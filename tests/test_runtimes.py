"""The engine choice (embedpool.runtimes): the measured table per CPU tier, the refusals that
name what is missing, /proc/cpuinfo parsing, and what ``doctor`` says about it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedpool.errors import ConfigError
from embedpool.models import ResolvedModel, resolve_model
from embedpool.runtimes import (
    MEASURED,
    OPENVINO_ACTIVATION_FACTOR,
    OPENVINO_LIBS,
    OPENVINO_WEIGHT_FACTOR,
    CpuFeatures,
    choose,
    cpu_features,
    openvino_installed,
    parse_cpuinfo,
)
from embedpool.types import Precision, Runtime

FIXTURES = Path(__file__).parent / "fixtures" / "families"

ZEN3 = CpuFeatures("AMD EPYC 7B13", frozenset({"fma", "avx", "avx2"}))
ZEN4 = CpuFeatures("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
ICELAKE = CpuFeatures("Intel Xeon 8375C", frozenset({"avx2", "avx512f", "avx512_vnni"}))
SPR = CpuFeatures(
    "Intel Xeon 8481C",
    frozenset({"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}),
)
OLD = CpuFeatures("Intel Atom", frozenset({"sse4_2"}))


@pytest.mark.parametrize(
    ("cpu", "tier"),
    [(ZEN3, "avx2"), (ZEN4, "avx512_bf16"), (ICELAKE, "vnni"), (SPR, "amx"), (OLD, "baseline")],
)
def test_tiers_from_flags(cpu: CpuFeatures, tier: str) -> None:
    assert cpu.tier == tier


@pytest.mark.parametrize(
    ("cpu", "openvino", "want"),
    [
        # Zen 3: ONNX Runtime int8, whether or not openvino is installed (fp32 measured slower)
        (ZEN3, True, ("onnxruntime", "int8")),
        (ZEN3, False, ("onnxruntime", "int8")),
        # Zen 4 (VNNI + BF16): OpenVINO bf16 measured faster than ONNX Runtime's int8
        (ZEN4, True, ("openvino", "bf16")),
        (ZEN4, False, ("onnxruntime", "int8")),
        # no measurement on these tiers: the universal engine
        (ICELAKE, True, ("onnxruntime", "int8")),
        (SPR, True, ("onnxruntime", "int8")),
        (OLD, True, ("onnxruntime", "int8")),
    ],
)
def test_auto_picks_from_the_measured_table(
    cpu: CpuFeatures, openvino: bool, want: tuple[str, str]
) -> None:
    got = choose("auto", "auto", device_kind="cpu", cpu=cpu, openvino=openvino)
    assert (got.runtime, got.precision) == want
    assert cpu.name in got.reason
    if cpu is ZEN4 and not openvino:
        assert "openvino is not installed" in got.reason and "pip install" in got.reason


def test_auto_keeps_onnxruntime_where_openvino_reads_the_standard_op_graph() -> None:
    """MEASURED's OpenVINO cells were measured on the BERT family's fused graph: a family
    OpenVINO reads as its standard-op graph (rotary encoders, decoders) stays on ONNX Runtime
    under auto, saying why; asked for by name, OpenVINO still runs it."""
    got = choose("auto", "auto", device_kind="cpu", cpu=ZEN4, openvino=True, fused_graph=False)
    assert (got.runtime, got.precision) == ("onnxruntime", "int8")
    assert "standard-op graph" in got.reason and ZEN4.name in got.reason
    explicit = choose(
        "openvino", "auto", device_kind="cpu", cpu=ZEN4, openvino=True, fused_graph=False
    )
    assert (explicit.runtime, explicit.precision) == ("openvino", "bf16")
    bf16 = choose("auto", "bf16", device_kind="cpu", cpu=ZEN4, openvino=True, fused_graph=False)
    assert bf16.runtime == "openvino"  # bf16 runs nowhere else


@pytest.mark.parametrize(
    ("fixture", "fused"),
    [
        ("families/xlmr", True),
        ("rerankers/bert", True),
        ("families/nomic", False),
        ("families/modernbert", False),
        ("families/gemma3", False),
        ("families/qwen3", False),
        ("rerankers/qwen3", False),
    ],
)
def test_which_models_openvino_reads_as_their_fused_graph(fixture: str, fused: bool) -> None:
    from pathlib import Path

    from embedpool.graph.ov_graph import reads_fused
    from embedpool.models import resolve_model

    model = resolve_model(Path(__file__).parent / "fixtures" / fixture / "model")
    assert reads_fused(model) is fused


def test_every_cell_names_its_measurement() -> None:
    for tier, cells in MEASURED.items():
        assert set(cells) == {"auto", "fp32", "int8"}, tier
        for request, cell in cells.items():
            assert cell.why, (tier, request)
            if request != "auto":
                assert cell.precision == request, (tier, request)
            if cell.runtime == "openvino":  # only where a number says OpenVINO is faster
                assert "OpenVINO" in cell.why and any(ch.isdigit() for ch in cell.why)


@pytest.mark.parametrize(
    ("engine", "precision", "want"),
    [
        ("onnxruntime", "auto", ("onnxruntime", "int8")),
        ("onnxruntime", "fp32", ("onnxruntime", "fp32")),
        ("openvino", "fp32", ("openvino", "fp32")),
        ("openvino", "auto", ("openvino", "bf16")),
        ("auto", "bf16", ("openvino", "bf16")),
        ("auto", "fp32", ("onnxruntime", "fp32")),
        ("auto", "int8", ("onnxruntime", "int8")),
    ],
)
def test_explicit_requests_on_a_bf16_cpu(
    engine: str, precision: str, want: tuple[str, str]
) -> None:
    got = choose(engine, precision, device_kind="cpu", cpu=ZEN4, openvino=True)
    assert (got.runtime, got.precision) == want


@pytest.mark.parametrize(
    ("engine", "precision", "cpu", "openvino", "device", "says"),
    [
        ("auto", "bf16", ZEN3, True, "cpu", "needs a CPU with avx512_bf16 or amx_bf16"),
        ("onnxruntime", "bf16", ZEN4, True, "cpu", "bf16 runs on OpenVINO only"),
        ("auto", "bf16", ZEN4, False, "cpu", "pip install"),
        ("openvino", "auto", ZEN3, False, "cpu", "engine openvino is not installed"),
        ("openvino", "auto", ZEN3, True, "cuda", "runs on the CPU only"),
        ("auto", "bf16", ZEN4, True, "cuda", "bf16 runs on the CPU"),
        ("tensorrt", "auto", ZEN3, True, "cpu", "engine 'tensorrt' is not one of"),
    ],
)
def test_refusals_name_what_is_missing(
    engine: str, precision: str, cpu: CpuFeatures, openvino: bool, device: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        choose(engine, precision, device_kind=device, cpu=cpu, openvino=openvino)


@pytest.mark.parametrize(
    ("precision", "want"), [("auto", "int8"), ("int8", "int8"), ("fp32", "fp32")]
)
def test_openvino_on_zen3_runs_int8_for_auto(precision: str, want: str) -> None:
    """Without bf16, --engine openvino's default is its weight-only int8 (the quality bar,
    int8 weights in memory), as ONNX Runtime's default is its int8."""
    got = choose("openvino", precision, device_kind="cpu", cpu=ZEN3, openvino=True)
    assert (got.runtime, got.precision) == ("openvino", want)
    assert (
        choose("auto", precision, device_kind="cpu", cpu=ZEN3, openvino=True).runtime
        == "onnxruntime"
    )  # measured: not faster here


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
        "flags\t\t: fpu avx2 avx512_vnni avx512_bf16\n\nprocessor\t: 1\n"
        "model name\t: other\nflags\t\t: fpu\n"
    )
    cpu = parse_cpuinfo(text)
    assert cpu.name == "AMD EPYC 9B14"
    assert cpu.flags == {"fpu", "avx2", "avx512_vnni", "avx512_bf16"}
    assert cpu.tier == "avx512_bf16" and cpu.bf16


def test_this_machine_has_a_tier() -> None:
    cpu = cpu_features()
    assert cpu.tier in MEASURED
    got = choose("auto", "auto", device_kind="cpu", cpu=cpu, openvino=openvino_installed())
    assert got.runtime in ("onnxruntime", "openvino")


def test_doctor_says_which_engine_and_why() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            "doctor",
            "--engine",
            "onnxruntime",
            "--precision",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("engine "))
    assert "onnxruntime, fp32" in line and "why: --engine onnxruntime" in line
    env = {k: v for k, v in os.environ.items() if k != "EMBEDPOOL_ENGINE"}  # auto (conftest)
    auto = subprocess.run(
        [sys.executable, "-m", "embedpool", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert auto.returncode == 0, auto.stderr
    want = choose(
        "auto", "auto", device_kind="cpu", cpu=cpu_features(), openvino=openvino_installed()
    )
    line = next(ln for ln in auto.stdout.splitlines() if ln.strip().startswith("engine "))
    assert f"{want.runtime}, {want.precision}" in line and cpu_features().name in line


def test_bf16_on_the_cli_refused_by_name_or_run_on_openvino() -> None:
    """Without avx512_bf16/AMX (this Zen 3, CI's runners): refused, naming the flags; with
    them: OpenVINO bf16 (when installed)."""
    res = subprocess.run(
        [sys.executable, "-m", "embedpool", "doctor", "--precision", "bf16", "--engine", "auto"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if cpu_features().bf16 and openvino_installed():
        assert res.returncode == 0, res.stderr
        assert "openvino, bf16" in res.stdout
    else:
        assert res.returncode == 2
        assert "avx512_bf16 or amx_bf16" in res.stdout or "openvino" in res.stdout, res.stdout


def test_pool_estimate_is_per_engine_and_precision(real_model: ResolvedModel) -> None:
    """A worker's assumed RSS (until measured): OpenVINO's libraries and its second copy of
    the weights on top of ONNX Runtime's at each precision, never shared between workers,
    larger activations; its int8 (weights kept 8-bit) below its fp32; the server plans the
    same."""
    from embedpool.engine import EngineSpec
    from embedpool.executors.pool.memory import ModelMemory, worker_mem_estimate
    from embedpool.executors.pool.pool import engine_memory
    from embedpool.server.registry import planned_bytes

    def memory(precision: Precision, runtime: Runtime) -> ModelMemory:
        got = engine_memory(EngineSpec(real_model, precision, runtime=runtime))
        assert got is not None
        return got

    for precision in ("fp32", "int8"):
        ort, ov = memory(precision, "onnxruntime"), memory(precision, "openvino")
        factor = OPENVINO_WEIGHT_FACTOR[precision]
        assert ov.weights == int(ort.weights * factor) + OPENVINO_LIBS
        assert not ov.shared_weights
        assert ov.activations(2048) == int(ort.activations(2048) * OPENVINO_ACTIVATION_FACTOR)
        assert ov.activations(2048) > ort.activations(2048)
        assert planned_bytes(real_model, precision, 512, 2, "openvino") == 2 * (
            worker_mem_estimate(precision, 512, ov)
        )
        assert planned_bytes(real_model, precision, 512, 2) < planned_bytes(
            real_model, precision, 512, 2, "openvino"
        )
    assert memory("int8", "openvino").weights < memory("fp32", "openvino").weights
    assert memory("bf16", "openvino") == memory("fp32", "openvino")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "nomic"])
def test_openvino_activation_factor_is_the_familys(family: str) -> None:
    """The decoders' OpenVINO activations are planned at their measured factor, the
    encoders' at theirs (catalog.model_memory on the fixtures, both precisions)."""
    from embedpool.graph.families.catalog import model_memory
    from embedpool.runtimes import (
        OPENVINO_ACTIVATION_FACTOR,
        OPENVINO_DECODER_ACTIVATION_FACTOR,
    )

    model = resolve_model(FIXTURES / family / "model")
    want = (
        OPENVINO_DECODER_ACTIVATION_FACTOR
        if family.startswith("qwen")
        else OPENVINO_ACTIVATION_FACTOR
    )
    for precision in ("fp32", "int8"):
        ov = model_memory(model, precision, runtime="openvino")
        ort = model_memory(model, precision)
        assert ov is not None and ort is not None
        assert ov.activation_factor == want and ort.activation_factor == 1.0


#: OpenVINO workers' measured peaks (MiB), 1 thread, AMD EPYC Zen 3, OpenVINO 2026.4
#: (runtimes.OPENVINO_LIBS): the model's shape as catalog.model_memory reads it for ONNX
#: Runtime (weights in bytes, hidden, ffn, heads, max_seq, score_keys, shared), the
#: precision, the tokens of the batch and the peak. The default model: a pool worker after
#: 3 x 4 x 256 tokens; the others: one max-length text (benchmarks/families.py's shapes;
#: the decoder: benchmarks/decoders.py's Qwen3-Embedding-0.6B shape, read as max 8,192).
OPENVINO_PEAKS = [
    ((90852864, 384, 1536, 12, 256, None, False), "fp32", 512, 296, False),
    ((36341145, 384, 1536, 12, 256, None, False), "int8", 512, 200, False),
    ((546926592, 768, 6144, 12, 8192, 0, True), "fp32", 8192, 1761, False),
    ((218770636, 768, 6144, 12, 8192, 0, False), "int8", 8192, 1091, False),
    ((596057088, 768, 2304, 12, 8192, 192, True), "fp32", 8192, 2140, False),
    ((1828978688, 1024, 49152, 16, 8192, 0, True), "fp32", 8192, 5149, True),
    ((731591475, 1024, 49152, 16, 8192, 0, True), "int8", 8192, 2596, True),
]


@pytest.mark.parametrize(("shape", "precision", "tokens", "peak_mib", "decoder"), OPENVINO_PEAKS)
def test_openvino_estimate_covers_measured_peaks(
    shape: tuple[int, int, int, int, int, int | None, bool],
    precision: Precision,
    tokens: int,
    peak_mib: int,
    decoder: bool,
) -> None:
    """Each measured OpenVINO peak is within the pool's estimate (low, an OOM kill) and
    above half of it (a worker planned at twice its peak takes another worker's memory:
    the encoders' activation factor planned 2.9x the decoder's int8 peak). The estimate
    before (ONNX Runtime's plus 112 / 64 MiB) fell short of the three long-text peaks."""
    from embedpool.executors.pool.memory import ModelMemory, worker_mem_estimate
    from embedpool.runtimes import openvino_memory

    ort = ModelMemory(*shape)
    ov = openvino_memory(ort, precision, decoder=decoder)
    planned = worker_mem_estimate(precision, tokens, ov)
    assert peak_mib * 2**20 <= planned < 2 * peak_mib * 2**20
