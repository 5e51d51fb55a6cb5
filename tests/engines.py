"""The engines every fidelity test runs on: the engine is a test parameter, not a second
suite. ``ENGINES`` parametrises a test or fixture over ONNX Runtime and OpenVINO; OpenVINO's
case carries the ``openvino`` marker, so a missing openvino package skips it locally and fails
it under CI=true (ci_rules)."""

from __future__ import annotations

import pytest

ENGINES = [
    pytest.param("onnxruntime", id="ort"),
    pytest.param("openvino", id="openvino", marks=pytest.mark.openvino),
]
