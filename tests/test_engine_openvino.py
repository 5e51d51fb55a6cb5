"""The OpenVINO engine beyond the families' own tests (tests/test_families.py and
tests/test_decoders.py run their fidelity tests on both engines, tests/test_gemma3.py Gemma 3
at fp32): Gemma 3 at int8 on the same random-weight fixture and reference goldens, read by
OpenVINO from the standard-op graph embedpool builds for it (its fused graph holds ONNX
Runtime contrib ops: engine_openvino.FUSED_CONVERTS); and OpenVINO's int8 itself (graph.weight_int8): the weights
stay 8-bit inside the compiled model, the graph is deterministic, the cache keeps its vectors
apart from ONNX Runtime's int8, and the prebuild builds the graph OpenVINO reads. The encoder
families run on both engines in tests/test_families.py, the default model in
tests/test_accuracy.py (its quality bar at int8 too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_support import cosines, load_fixture, meets_bar

from embedpool.engine import EngineSpec
from embedpool.graph import GraphPrecision
from embedpool.tokenization import TextTokenizer
from embedpool.types import Precision

pytestmark = pytest.mark.openvino


@pytest.mark.parametrize("precision", ["int8"])
@pytest.mark.parametrize("name", ["gemma3"])
def test_decoder_on_openvino_matches_reference(
    name: str, precision: Precision, tmp_path: Path
) -> None:
    from embedpool.engine_openvino import FUSED_CONVERTS, OpenVinoEngine, graph_for
    from embedpool.graph import _family

    fx = load_fixture(name)
    fam, _ = _family(fx.model)
    assert fam.NAME not in FUSED_CONVERTS
    path = graph_for(fx.model, tmp_path, precision)
    assert "unfused" in path.name
    engine = OpenVinoEngine.for_spec(EngineSpec(fx.model, precision, 1, runtime="openvino"), path)
    seqs = TextTokenizer.for_model(fx.model).encode(fx.texts, prompt="").sequences
    got = engine.embed(seqs)
    assert got.shape == fx.vectors.shape
    meets_bar(cosines(got, fx.vectors), precision)


def test_int8_weights_stay_8_bit_in_the_compiled_model(tmp_path: Path) -> None:
    """OpenVINO's frontend folds DequantizeLinear on an 8-bit constant into its compressed
    weights: every matrix multiply of the compiled model reads u8 weights, none f32."""
    import onnx
    import openvino as ov

    from embedpool.engine_openvino import compile_config, graph_for

    fx = load_fixture("xlmr")
    path = graph_for(fx.model, tmp_path, "int8")
    assert path.name.endswith(".onnx") and "ovw8" in path.name
    dq = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "no DequantizeLinear in the int8 graph"
    compiled = ov.Core().compile_model(str(path), "CPU", compile_config(1, "int8"))
    fcs = [
        op
        for op in compiled.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
    ]
    assert fcs
    weights = {op.input(1).get_element_type().get_type_name() for op in fcs}
    assert weights == {"u8"}, weights


def test_int8_graph_is_deterministic_and_apart_from_onnxruntimes(tmp_path: Path) -> None:
    """Two builds, the same bytes; its vector-cache id is not ONNX Runtime's int8's."""
    from embedpool.engine_openvino import graph_for
    from embedpool.graph import graph_id

    fx = load_fixture("nomic")
    a = graph_for(fx.model, tmp_path / "a", "int8").read_bytes()
    b = graph_for(fx.model, tmp_path / "b", "int8").read_bytes()
    assert a == b
    assert graph_id(fx.model, "int8", "openvino") != graph_id(fx.model, "int8")
    assert graph_id(fx.model, "fp32", "openvino") == graph_id(fx.model, "fp32")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_prebuild_builds_the_graph_openvino_reads(
    precision: GraphPrecision, tmp_path: Path
) -> None:
    """For a rotary family the graph prebuild (a child process) builds the standard-op graph
    (int8: its weight-only form), not the fused one ONNX Runtime reads."""
    from embedpool.graph import built_path
    from embedpool.graph.ov_graph import built
    from embedpool.graph.prebuild import ensure_graph

    fx = load_fixture("modernbert")
    assert built(fx.model, precision, tmp_path) is None
    got = ensure_graph(fx.model, precision, cache_dir=tmp_path, runtime="openvino")
    assert got == precision
    path = built(fx.model, precision, tmp_path)
    assert path is not None and "unfused" in path.name
    assert built_path(fx.model, precision, tmp_path) is None  # ONNX Runtime's: not built


@pytest.mark.slow
def test_models_build_builds_and_verifies_openvinos_graphs(tmp_path: Path) -> None:
    """``embedpool models build --engine openvino`` (a Dockerfile's prebuild): the graphs
    OpenVINO reads, loaded by OpenVINO to verify them; ONNX Runtime's are not built. A
    precision an engine does not run exits 2 with one line naming it."""
    import os
    import subprocess
    import sys

    from embedpool.graph import built_path
    from embedpool.graph.ov_graph import built

    fx = load_fixture("modernbert")
    env = {**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path)}

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedpool", "models", "build", str(fx.model.directory),
             *args],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    res = build("--engine", "openvino", "--precision", "int8", "--precision", "fp32")
    assert res.returncode == 0, res.stderr
    for precision in ("int8", "fp32"):
        path = built(fx.model, precision, tmp_path / "onnx")
        assert path is not None and "unfused" in path.name
        assert f"{precision} on OpenVINO: {path}" in res.stdout
        assert built_path(fx.model, precision, tmp_path / "onnx") is None  # ONNX Runtime's
    assert res.stdout.count(f"verified: a {fx.model.dim}-dim vector") == 2
    for args, needle in (
        (["--engine", "openvino", "--precision", "fp16"], "not fp16 on cpu"),
        (["--precision", "bf16"], "bf16 runs on the openvino engine only"),
    ):
        bad = build(*args)
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
