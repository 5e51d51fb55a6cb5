"""``serve --engine openvino``: the server on OpenVINO pool workers answers the openai client
with the vectors ONNX Runtime gives (fp32, cos >= 0.9999), through the one construction path
(``placement.place(engine=...)`` -> ``executor_factory``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from server_support import LiveServer

from embedpool import Embedder
from embedpool.models import ResolvedModel
from embedpool.placement import executor_factory, place

TEXTS = ["def add(a, b):\n    return a + b", "héllo wörld", "SELECT * FROM t WHERE id = 3"]


@pytest.mark.slow
@pytest.mark.openvino
def test_serve_on_openvino_matches_onnx_runtime(
    model: ResolvedModel, serve: Callable[..., LiveServer]
) -> None:
    placement = place(model, device="cpu", precision="fp32", engine="openvino")
    assert placement.runtime == "openvino"
    live = serve(executor_factory(model, placement, workers=1), precision="fp32")
    got = live.openai().embeddings.create(model=model.name, input=TEXTS)
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    with Embedder(model, precision="fp32", runtime="onnxruntime") as e:
        want = e.embed(TEXTS)
    cos = (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
