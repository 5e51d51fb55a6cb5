"""embedpool.graph: the safetensors -> ONNX builder, int8 derivation and the on-disk cache.

Correctness is pinned against an independent numpy BERT forward pass: tiny random models
for every builder option (key layouts, poolings, GELU kinds, fused or plain, pooled or not),
the real MiniLM for what prepare_onnx ships. Agreement with sentence-transformers' own
vectors is tests/test_accuracy.py's job (it goes through the public API, hence through here).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file

from embedpool.engine import Engine
from embedpool.errors import ModelError
from embedpool.graph import cache_path, graph_id, int8_fp32_nodes, prepare_onnx
from embedpool.graph.families.bert import BertConfig, build_bert, load_weights
from embedpool.graph.quantize import TokenBatchReader, smooth_matmul_inputs
from embedpool.graph.store import file_lock, get_or_build
from embedpool.models import ResolvedModel, resolve_model
from embedpool.modelspec import PoolingSpec
from embedpool.tokenization import TextTokenizer

F32 = npt.NDArray[np.float32]
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "x",
    "class Cache(dict):\n    def __missing__(self, key):\n        value = self[key] = compute(key)\n"
    "        return value\n" * 3,
]


# --- an independent numpy BERT -------------------------------------------------------------

def _erf(x: Any) -> Any:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and math.erf per
    element is too slow for MiniLM's activations."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _ln(x: Any, w: Any, b: Any, eps: float) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert(w: dict[str, F32], cfg: BertConfig, ids: npt.NDArray[np.int64],
               mask: npt.NDArray[np.int64]) -> F32:
    """last_hidden_state, float64 maths, straight from the BERT paper's definitions."""
    f = {k: v.astype(np.float64) for k, v in w.items()}
    b, s = ids.shape
    x = (f["embeddings.word_embeddings.weight"][ids]
         + f["embeddings.position_embeddings.weight"][:s][None]
         + f["embeddings.token_type_embeddings.weight"][0])
    x = _ln(x, f["embeddings.LayerNorm.weight"], f["embeddings.LayerNorm.bias"],
            cfg.layer_norm_eps)
    bias = (1.0 - mask[:, None, None, :]) * -1e9
    nh, hd = cfg.num_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."

        def lin(t: Any, key: str, p: str = p) -> Any:
            return t @ f[p + key + ".weight"].T + f[p + key + ".bias"]

        q, k, v = (lin(x, f"attention.self.{n}").reshape(b, s, nh, hd).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, nh * hd)
        x = _ln(x + lin(ctx, "attention.output.dense"), f[p + "attention.output.LayerNorm.weight"],
                f[p + "attention.output.LayerNorm.bias"], cfg.layer_norm_eps)
        h = lin(x, "intermediate.dense")
        if cfg.hidden_act == "gelu":
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        else:
            h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        x = _ln(x + lin(h, "output.dense"), f[p + "output.LayerNorm.weight"],
                f[p + "output.LayerNorm.bias"], cfg.layer_norm_eps)
    return x.astype(np.float32)  # type: ignore[no-any-return]


def numpy_sentence(hidden: F32, mask: npt.NDArray[np.int64], pooling: str) -> F32:
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)  # type: ignore[no-any-return]


def pad(seqs: list[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


# --- a tiny random BERT, for builder options MiniLM does not exercise ----------------------

TINY = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 64, "layer_norm_eps": 1e-7,
        "hidden_act": "gelu", "max_position_embeddings": 24, "vocab_size": 50,
        "type_vocab_size": 2}


def tiny_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]

    def r(*shape: int) -> F32:
        return rng.normal(0, 0.3, shape).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": r(cfg["vocab_size"], h),
         "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], h),
         "embeddings.token_type_embeddings.weight": r(2, h),
         "embeddings.LayerNorm.weight": 1 + r(h), "embeddings.LayerNorm.bias": r(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (inter, h), "output.dense": (h, inter)}.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = r(o, n), r(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + name + ".weight"], w[p + name + ".bias"] = 1 + r(h), r(h)
    return w


def write_checkpoint(path: Path, w: dict[str, F32], layout: str) -> None:
    """Save ``w`` as safetensors under one of the key layouts seen in the wild."""
    out: dict[str, F32] = {}
    for key, value in w.items():
        if layout == "tf-names":
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta")
        out[("bert." if layout == "bert-prefix" else "") + key] = value
    if layout == "bert-prefix":
        out["cls.predictions.bias"] = np.zeros(3, np.float32)  # heads are ignored
    save_file(out, str(path))


@pytest.mark.parametrize(
    ("layout", "pooling", "act", "fused", "pool"),
    [
        ("bare", "mean", "gelu", True, True),
        ("bare", "mean", "gelu", False, True),
        ("bert-prefix", "cls", "gelu", True, True),
        ("bert-prefix", "cls", "gelu", False, True),
        ("tf-names", "mean", "gelu_new", True, True),
        ("tf-names", "mean", "gelu_new", False, True),
        ("bare", "mean", "gelu", True, False),
        ("bare", "mean", "gelu", False, False),
    ],
    ids=["fused-mean", "plain-mean", "prefix-fused-cls", "prefix-plain-cls",
         "tf-fused-tanh", "tf-plain-tanh", "fused-hidden", "plain-hidden"])
def test_tiny_bert_matches_numpy(tmp_path: Path, layout: str, pooling: Any, act: str,
                                 fused: bool, pool: bool) -> None:
    config = {**TINY, "hidden_act": act}
    cfg = BertConfig.from_dict(config)
    ckpt = tmp_path / "model.safetensors"
    write_checkpoint(ckpt, tiny_weights(config), layout)
    weights = load_weights(ckpt, cfg)
    model = build_bert(weights, cfg, pooling=pooling, fused=fused, pool=pool)
    onnx.checker.check_model(model, full_check=not fused)  # ORT-only ops defeat inference
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids, mask = pad([rng.integers(1, 50, n) for n in (7, 3, 12, 1)])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if not fused:
        feeds["token_type_ids"] = np.zeros_like(ids)
    got = sess.run(None, feeds)[0]
    hidden = numpy_bert(tiny_weights(config), cfg, ids, mask)
    if pool:
        np.testing.assert_allclose(got, numpy_sentence(hidden, mask, pooling), atol=1e-4)
    else:  # only positions that are real tokens are defined
        np.testing.assert_allclose(got[mask == 1], hidden[mask == 1], atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bert_int8_ready_matches_numpy(tmp_path: Path, pooling: Any) -> None:
    """The graph the int8 recipe quantises: separate Q/K/V MatMuls into MultiHeadAttention and
    an int8 word table. Only the table's rounding separates it from the fp32 maths."""
    cfg = BertConfig.from_dict(TINY)
    ckpt = tmp_path / "model.safetensors"
    write_checkpoint(ckpt, tiny_weights(TINY), "bare")
    model = build_bert(load_weights(ckpt, cfg), cfg, pooling=pooling, int8_ready=True)
    ops = {n.op_type for n in model.graph.node}
    assert "MultiHeadAttention" in ops and not ops & {"Attention", "EmbedLayerNormalization"}
    table = next(t for t in model.graph.initializer if t.name == "emb.word.q")
    assert table.data_type == onnx.TensorProto.INT8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids, mask = pad([rng.integers(1, 50, n) for n in (7, 3, 12, 1)])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    want = numpy_sentence(numpy_bert(tiny_weights(TINY), cfg, ids, mask), mask, pooling)
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert ((got * want).sum(1) >= 0.9999).all()


def test_smoothing_moves_scale_into_weights_without_changing_the_maths(tmp_path: Path) -> None:
    """SmoothQuant rewrites ff1's input and weights; in fp32 the vectors must not move, and
    the smoothed activation's channels must be flatter (what int8 needs)."""
    cfg = BertConfig.from_dict(TINY)
    ckpt = tmp_path / "model.safetensors"
    weights = tiny_weights(TINY)
    weights["encoder.layer.0.attention.output.LayerNorm.weight"][3] = 40.0  # an outlier channel
    write_checkpoint(ckpt, weights, "bare")
    model = build_bert(load_weights(ckpt, cfg), cfg, pooling="mean", int8_ready=True)
    rng = np.random.default_rng(2)
    seqs = [tuple(int(t) for t in rng.integers(1, 50, n)) for n in (9, 4, 12, 6)]
    reader = TokenBatchReader([np.array(q, dtype=np.int32) for q in seqs],
                              ["input_ids", "attention_mask"], batch_size=2)
    nodes = [f"l{i}.ff1_MatMul" for i in range(cfg.num_layers)]
    smoothed = smooth_matmul_inputs(model, nodes, reader, alpha=0.5)
    muls = [n for n in smoothed.graph.node if n.name.endswith(".smooth_Mul")]
    assert len(muls) == cfg.num_layers
    ids, mask = pad([np.array(q) for q in seqs])
    feeds = {"input_ids": ids, "attention_mask": mask}

    def run(m: Any, outputs: list[str] | None = None) -> list[Any]:
        if outputs:
            m.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT,
                                                                     None) for o in outputs)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return list(sess.run(None, feeds))

    np.testing.assert_allclose(run(smoothed)[0], run(model)[0], atol=1e-5)
    raw, flat = muls[0].input[0], muls[0].output[0]
    _, before, after = run(smoothed, [raw, flat])
    spread = [np.abs(x).max(axis=(0, 1)).max() / np.abs(x).max(axis=(0, 1)).mean()
              for x in (before, after)]
    assert spread[1] < spread[0] / 2, spread
    with pytest.raises(ModelError, match="no MatMul named"):
        smooth_matmul_inputs(model, ["l9.ff1_MatMul"], reader, alpha=0.5)


def test_int8_ready_is_fused_only() -> None:
    cfg = BertConfig.from_dict(TINY)
    with pytest.raises(ValueError, match="fused graph only"):
        build_bert({}, cfg, pooling="mean", fused=False, int8_ready=True)


# --- config validation ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "roberta"}, "not a BERT-family"),
        ({"model_type": "gpt2"}, "not a BERT-family"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"num_attention_heads": 5}, "not divisible"),
        ({"hidden_size": None}, "missing or bad"),
    ],
    ids=["roberta", "gpt2", "relu", "relative-positions", "heads", "no-hidden-size"])
def test_unsupported_config_is_a_model_error(change: dict[str, Any], match: str) -> None:
    config = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ModelError, match=match):
        BertConfig.from_dict(config)


def test_checkpoint_missing_layers_names_the_keys(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    write_checkpoint(ckpt, tiny_weights(TINY), "bare")
    cfg = BertConfig.from_dict({**TINY, "num_hidden_layers": 3})
    with pytest.raises(ModelError, match=r"missing encoder\.layer\.2\."):
        load_weights(ckpt, cfg)


# --- the real model through prepare_onnx -----------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> ResolvedModel:
    return resolve_model()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def built(minilm: ResolvedModel, cache: Path) -> dict[str, Path]:
    """fp32 and int8 MiniLM graphs, built once for the module."""
    return {p: prepare_onnx(minilm, p, cache) for p in ("fp32", "int8")}  # type: ignore[misc]


def embed(model: ResolvedModel, path: Path, texts: list[str]) -> F32:
    """One padded batch on purpose: short texts padded to the longest prove the mask works."""
    seqs = TextTokenizer(model.tokenizer_path, model.max_length).encode(texts).sequences
    return Engine.for_model(path, model, threads=1).embed(seqs)


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_graph_is_fused(built: dict[str, Path]) -> None:
    ops = op_types(built["fp32"])
    expected = {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
    assert expected <= ops, f"missing {expected - ops}"
    assert not ops & {"Softmax", "LayerNormalization", "Erf"}, "something left unfused"


def test_int8_graph_is_static_and_keeps_the_chosen_nodes_fp32(minilm: ResolvedModel,
                                                              built: dict[str, Path]) -> None:
    graph = onnx.load(str(built["int8"])).graph
    ops = {n.op_type for n in graph.node}
    assert {"QLinearMatMul", "QuantizeLinear", "MultiHeadAttention"} <= ops
    word = next(t for t in graph.initializer if t.name == "emb.word.q")
    assert word.data_type == onnx.TensorProto.INT8  # the 47 MB table, stored as int8
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger"}, "dynamic quantisation left"
    keep = set(int8_fp32_nodes(minilm))
    assert keep == {f"l{i}.ff2_MatMul" for i in range(6)}
    assert keep <= {n.name for n in graph.node if n.op_type == "MatMul"}
    # Q, K, V, O, FF1 of every layer are quantised.
    assert sum(n.op_type == "QLinearMatMul" for n in graph.node) == 6 * 6 - len(keep)


def test_minilm_fp32_matches_numpy(minilm: ResolvedModel, built: dict[str, Path]) -> None:
    cfg = BertConfig.from_dict(minilm.config)
    seqs = TextTokenizer(minilm.tokenizer_path, minilm.max_length).encode(TEXTS).sequences
    ids, mask = pad(seqs)
    want = numpy_sentence(numpy_bert(load_weights(minilm.weights_path, cfg), cfg, ids, mask),
                          mask, minilm.pooling)
    got = embed(minilm, built["fp32"], TEXTS)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_minilm_int8_close_to_fp32(minilm: ResolvedModel, built: dict[str, Path]) -> None:
    cos = (embed(minilm, built["int8"], TEXTS) * embed(minilm, built["fp32"], TEXTS)).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos


def test_int8_vector_ignores_batch_neighbours(minilm: ResolvedModel,
                                              built: dict[str, Path]) -> None:
    """Static activation scales: a text alone and padded among long texts, one vector (the
    dynamic recipe gave cos ~0.993 here, so resumed jobs and pool retries changed vectors)."""
    long_texts = [TEXTS[3] * 8, "word " * 400]  # both truncated to max_length
    alone = np.concatenate([embed(minilm, built["int8"], [t]) for t in TEXTS[:3]])
    mixed = embed(minilm, built["int8"], [long_texts[0], *TEXTS[:3], long_texts[1]])[1:4]
    cos = (alone * mixed).sum(1)
    assert cos.min() >= 0.99999, cos


@pytest.mark.slow
def test_int8_build_is_deterministic(minilm: ResolvedModel, built: dict[str, Path],
                                     tmp_path: Path) -> None:
    """Calibration reads a fixed token set in a fixed order: a second build, elsewhere, writes
    the same bytes, so every machine with the same inputs embeds alike."""
    again = prepare_onnx(minilm, "int8", tmp_path)
    assert again != built["int8"] and again.name == built["int8"].name
    assert again.read_bytes() == built["int8"].read_bytes()


# --- the cache ------------------------------------------------------------------------------

def test_second_call_reuses_the_file(minilm: ResolvedModel, cache: Path, built: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: built[p].stat().st_mtime_ns for p in built}

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rebuilt a cached graph")

    monkeypatch.setattr("embedpool.graph.families.bert.build_encoder", no_build)
    monkeypatch.setattr("embedpool.graph.quantize_int8", no_build)
    monkeypatch.setattr("embedpool.graph.quantize_int8_static", no_build)
    for p in ("fp32", "int8"):
        assert prepare_onnx(minilm, p, cache) == built[p]  # type: ignore[arg-type]
        assert built[p].stat().st_mtime_ns == before[p]
    assert sorted(f.name for f in cache.glob("*.onnx")) == sorted(p.name for p in built.values())


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"config": "layer_norm_eps=1e-6"}, False),
        ({"config": "reordered"}, True),
        ({"head": "cls"}, False),
        ({"text": "max_length=128"}, False),
        ({"weights_sha256": "0" * 64}, False),
        ({"name": "renamed"}, False),  # the name is in the file name, not the key
    ],
    ids=["config-eps", "config-key-order", "pooling", "max-length", "weights", "name"])
def test_cache_key(minilm: ResolvedModel, tmp_path: Path, change: dict[str, Any],
                   same: bool) -> None:
    edit = dict(change)
    if edit.get("config") == "layer_norm_eps=1e-6":
        edit["config"] = {**minilm.config, "layer_norm_eps": 1e-6}
    elif edit.get("config") == "reordered":
        edit["config"] = dict(reversed(list(minilm.config.items())))
    if edit.get("head") == "cls":
        edit["head"] = dataclasses.replace(minilm.head, pooling=PoolingSpec(("cls",)))
    if edit.get("text") == "max_length=128":
        edit["text"] = dataclasses.replace(minilm.text, max_length=128)
    other = dataclasses.replace(minilm, **edit)
    for precision in ("fp32", "int8"):
        a = cache_path(minilm, precision, tmp_path)  # type: ignore[arg-type]
        b = cache_path(other, precision, tmp_path)  # type: ignore[arg-type]
        assert (a == b) is same
        if change.get("name"):
            assert a.name.split("-")[-1] == b.name.split("-")[-1]
    assert cache_path(minilm, "fp32", tmp_path) != cache_path(minilm, "int8", tmp_path)


@pytest.mark.parametrize(
    ("constant", "value"),
    [("INT8_RECIPE_VERSION", 999), ("INT8_CALIBRATION_CHUNKS", 7),
     ("INT8_CALIBRATION_BATCH", 3)],
    ids=["recipe-version", "calibration-chunks", "calibration-batch"])
def test_int8_cache_key_follows_the_recipe(minilm: ResolvedModel, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, constant: str,
                                           value: int) -> None:
    before = {p: cache_path(minilm, p, tmp_path) for p in ("fp32", "int8")}  # type: ignore[misc]
    ids = {p: graph_id(minilm, p) for p in ("fp32", "int8")}  # type: ignore[misc]
    monkeypatch.setattr(f"embedpool.graph.{constant}", value)
    assert cache_path(minilm, "int8", tmp_path) != before["int8"]
    assert cache_path(minilm, "fp32", tmp_path) == before["fp32"]
    # ... and so does the vector cache's fingerprint: no vectors of two recipes in one cache
    assert graph_id(minilm, "int8") != ids["int8"] and graph_id(minilm, "fp32") == ids["fp32"]
    fingerprint = minilm.fingerprint("int8", graph=ids["int8"])
    assert minilm.fingerprint("int8", graph=graph_id(minilm, "int8")) != fingerprint


def test_non_bert_model_is_a_model_error(minilm: ResolvedModel, tmp_path: Path) -> None:
    other = dataclasses.replace(minilm, config={**minilm.config, "model_type": "t5"})
    with pytest.raises(ModelError, match="model_type 't5' is not an encoder embedpool builds"):
        prepare_onnx(other, "fp32", tmp_path)
    assert not list(tmp_path.iterdir())


def test_shipped_onnx_is_used_as_is_and_quantised(minilm: ResolvedModel, built: dict[str, Path],
                                                  tmp_path: Path) -> None:
    shipped = dataclasses.replace(minilm, onnx_path=built["fp32"])
    assert prepare_onnx(shipped, "fp32", tmp_path) == built["fp32"]
    int8 = prepare_onnx(shipped, "int8", tmp_path)
    assert int8.parent == tmp_path and "MatMulInteger" in op_types(int8)
    cos = (embed(minilm, int8, TEXTS) * embed(minilm, built["fp32"], TEXTS)).sum(1)
    assert cos.min() >= 0.97


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "g.onnx"

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"half a graph")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        get_or_build(target, boom)
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx.lock"]


def test_lock_wait_is_bounded(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ModelError, match="waited"), file_lock(lock, timeout_s=0.3):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
    with file_lock(lock, timeout_s=5):  # released when its holder died
        pass


_CHILD = """
import sys
from pathlib import Path
import embedpool.graph as g
import embedpool.graph.families.bert as bert
from embedpool.models import resolve_model

real = bert.build_encoder
def counting(*args, **kwargs):
    with open(sys.argv[2], "a") as log:
        log.write("build\\n")
    return real(*args, **kwargs)
bert.build_encoder = counting
print(g.prepare_onnx(resolve_model(), "fp32", Path(sys.argv[1])))
"""


@pytest.mark.slow
def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert outs[0] == outs[1]
    assert log.read_text().count("build") == 1
    assert [p.name for p in cache.glob("*.onnx")] == [Path(outs[0]).name]
    assert not list(cache.glob(".*.tmp"))
    onnx.checker.check_model(outs[0])
