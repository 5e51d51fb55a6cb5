"""Ray actors on the OpenVINO engine: the driver ships the graph the spec's runtime reads
(``EngineSpec.graph``) and each actor loads it with that runtime (``EngineSpec.load``), so
the vectors equal ONNX Runtime's in-process fp32 ones (cos >= 0.9999)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from embedpool import Embedder

TEXTS = ["def add(a, b):\n    return a + b", "héllo wörld", "SELECT * FROM t WHERE id = 3"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.openvino
def test_ray_actors_on_openvino_match_onnx_runtime(ray_cluster: ModuleType) -> None:
    with Embedder(precision="fp32", runtime="openvino", backend="ray", workers=1) as e:
        assert "OpenVINO" in e.device
        got = e.embed(TEXTS)
    with Embedder(precision="fp32", runtime="onnxruntime") as e:
        want = e.embed(TEXTS)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
