"""embedpool.graph.head: the sentence-transformers head in the graph agrees with the same head
in numpy (``head_numpy``, what shipped graphs get) on random token states for every pooling
mode, their concatenation, prompts left out, Dense layers, Normalize and truncate_dim; and
every Dense activation agrees with torch's own values (fixtures/conformance/activations.json,
made by scripts/make_conformance.py). sentence-transformers' own vectors for the same heads
are tests/test_conformance.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from embedpool.graph.builder import ATTENTION_MASK, GraphBuilder
from embedpool.graph.head import (
    PROMPT_LENGTH,
    _activation,
    _activation_numpy,
    apply_head,
    head_inputs,
    head_numpy,
    load_dense,
)
from embedpool.models.layout import TORCH_ACTIVATIONS
from embedpool.modelspec import DENSE_ACTIVATIONS, DenseSpec, HeadSpec, PoolingSpec

WIDTH = 6
ACTIVATIONS = json.loads(
    (Path(__file__).parent / "fixtures" / "conformance" / "activations.json").read_text()
)


def run_graph(
    head: HeadSpec, hidden: np.ndarray, mask: np.ndarray, prompt_lengths: np.ndarray
) -> np.ndarray:
    """The head alone as a graph whose input is the token states."""
    g = GraphBuilder()
    width = apply_head(g, "hidden", hidden.shape[-1], head, "out")
    inputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", WIDTH]),
        helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["b", "s"]),
    ]
    inputs += [
        helper.make_tensor_value_info(n, TensorProto.INT64, shape) for n, shape in head_inputs(head)
    ]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", width])]
    model = g.finish("head", inputs, out, producer_version="test")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"hidden": hidden, ATTENTION_MASK: mask}
    if head_inputs(head):
        feeds[PROMPT_LENGTH] = prompt_lengths
    result: np.ndarray = sess.run(None, feeds)[0]
    assert result.shape == (hidden.shape[0], width) == (hidden.shape[0], head.out_dim(WIDTH))
    return result


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows of 7, 3, 1 and 5 tokens; prompt lengths including one that covers
    a whole row (sentence-transformers' odd cases: CLS takes token 0, lasttoken gives 0)."""
    rng = np.random.default_rng(seed)
    lengths = [7, 3, 1, 5]
    hidden = rng.normal(0, 1, (4, 7, WIDTH)).astype(np.float32)
    mask = np.array([[1] * n + [0] * (7 - n) for n in lengths], dtype=np.int64)
    return hidden, mask, np.array([2, 3, 0, 4], dtype=np.int64)


def dense(
    tmp: Path,
    n_in: int,
    n_out: int,
    act: str,
    *,
    bias: bool = True,
    residual: bool = False,
    seed: int = 1,
) -> DenseSpec:
    rng = np.random.default_rng(seed)
    w = {"linear.weight": rng.normal(0, 0.5, (n_out, n_in)).astype(np.float32)}
    if bias:
        w["linear.bias"] = rng.normal(0, 0.5, n_out).astype(np.float32)
    if residual and n_in != n_out:
        w["residual.weight"] = rng.normal(0, 0.5, (n_out, n_in)).astype(np.float32)
    path = tmp / f"dense-{seed}-{act}.safetensors"
    save_file(w, str(path))
    return DenseSpec(n_in, n_out, bias, act, path, residual=residual)  # type: ignore[arg-type]


MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


@pytest.mark.parametrize("include_prompt", [True, False], ids=["prompt-in", "prompt-out"])
@pytest.mark.parametrize(
    "modes",
    [[m] for m in MODES] + [["lasttoken", "cls", "max"], MODES],
    ids=[*MODES, "three-concat", "all-six"],
)
def test_pooling_graph_matches_numpy(modes: list[str], include_prompt: bool) -> None:
    head = HeadSpec(
        PoolingSpec(tuple(modes), include_prompt=include_prompt),  # type: ignore[arg-type]
        normalize=False,
    )
    hidden, mask, plen = batch()
    want = head_numpy(hidden, mask, head, [], plen)
    got = run_graph(head, hidden, mask, plen)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not include_prompt and "lasttoken" in modes:  # row 1: all 3 tokens are the prompt
        col = modes.index("lasttoken") * WIDTH
        assert not got[1, col : col + WIDTH].any()


def test_pooling_reads_padding_nowhere() -> None:
    """Padding positions hold garbage in a real batch: no mode may read them."""
    hidden, mask, plen = batch()
    head = HeadSpec(PoolingSpec(tuple(MODES)), normalize=False)  # type: ignore[arg-type]
    noisy = hidden.copy()
    noisy[mask == 0] = 1e6
    np.testing.assert_allclose(
        run_graph(head, noisy, mask, plen),
        run_graph(head, hidden, mask, plen),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("normalize", "truncate"),
    [(True, None), (False, 3), (True, 3)],
    ids=["normalize", "truncate", "normalize-then-truncate"],
)
def test_dense_chain_normalize_truncate(
    tmp_path: Path, normalize: bool, truncate: int | None
) -> None:
    chain = (
        dense(tmp_path, 2 * WIDTH, 5, "gelu", seed=1),
        dense(tmp_path, 5, 5, "silu", residual=True, seed=2),
        dense(tmp_path, 5, 4, "softplus", bias=False, residual=True, seed=3),
    )
    head = HeadSpec(PoolingSpec(("cls", "mean")), chain, normalize=normalize, truncate_dim=truncate)
    hidden, mask, plen = batch(3)
    got = run_graph(head, hidden, mask, plen)
    want = head_numpy(hidden, mask, head, [load_dense(d) for d in chain], plen)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if normalize and truncate:  # truncated after Normalize, as sentence-transformers does
        assert np.all(np.linalg.norm(got, axis=1) < 1)


@pytest.mark.parametrize("act", DENSE_ACTIVATIONS)
def test_activation_matches_torch(act: str) -> None:
    by_name: dict[str, str] = {v: k for k, v in TORCH_ACTIVATIONS.items()}
    ref = next(v for k, v in ACTIVATIONS.items() if k.rsplit(".", 1)[-1] == by_name[act])
    x = np.array([ACTIVATIONS["inputs"]], dtype=np.float32)
    np.testing.assert_allclose(_activation_numpy(x, act)[0], ref, rtol=1e-5, atol=1e-6)
    g = GraphBuilder()
    out = _activation(g, "x", act, "a")
    g.op("Identity", [out], "y")
    model = g.finish(
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, x.size])],
        producer_version="test",
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got: Any = sess.run(None, {"x": x})[0][0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_every_torch_activation_in_the_table_is_implemented() -> None:
    assert set(TORCH_ACTIVATIONS.values()) == set(DENSE_ACTIVATIONS)
    saved = {k.rsplit(".", 1)[-1] for k in ACTIVATIONS if k != "inputs"}
    assert saved == set(TORCH_ACTIVATIONS)
