"""The OpenVINO engine on the decoder families (Qwen2, Qwen3, Gemma 3): the same random-weight
fixtures and reference goldens as their own tests (transformers + sentence-transformers), read
by OpenVINO from the standard-op graph embedpool builds for them (their fused graphs hold ONNX
Runtime contrib ops: engine_openvino.FUSED_CONVERTS). The encoder families run on both
engines in tests/test_families.py, the default model in tests/test_accuracy.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from family_support import cosines, load_fixture

from embedpool.engine import EngineSpec
from embedpool.tokenization import TextTokenizer

pytestmark = pytest.mark.openvino


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3"])
def test_decoder_fp32_on_openvino_matches_reference(name: str, tmp_path: Path) -> None:
    from embedpool.engine_openvino import FUSED_CONVERTS, OpenVinoEngine, graph_for
    from embedpool.graph import _family

    fx = load_fixture(name)
    fam, _ = _family(fx.model)
    assert fam.NAME not in FUSED_CONVERTS
    path = graph_for(fx.model, tmp_path)
    assert "unfused" in path.name
    engine = OpenVinoEngine.for_spec(EngineSpec(fx.model, "fp32", 1, runtime="openvino"), path)
    seqs = TextTokenizer.for_model(fx.model).encode(fx.texts, prompt="").sequences
    got = engine.embed(seqs)
    assert got.shape == fx.vectors.shape
    cos = cosines(got, fx.vectors)
    assert cos.min() >= 0.9999, (name, np.round(cos, 6))
