"""Conformance with sentence-transformers 6.2: every case of tests/fixtures/conformance (made
by scripts/make_conformance.py with sentence-transformers itself) gives its golden vectors or
embedpool's refusal, without torch. One row per case:

- vectors, in process (``Embedder(workers=None)``), fp32 and int8, vector cache off and on
  (on: embedded, then served from the cache, both checked);
- the prompt calls (explicit, named, empty, default) through the tokenizer and engine API;
- a few cases through the worker pool;
- every refusal through the CLI, in process and with the pool: exit 2 and one line naming
  the cause, no traceback;
- the bge layout: replacing onnx/model.onnx changes the vectors, with and without the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import conformance as C
import numpy as np
import pytest
from engines import ENGINES
from safetensors.numpy import save_file

from embedpool.cache import VectorCache
from embedpool.engine import Engine
from embedpool.errors import ModelError
from embedpool.graph import prepare_onnx
from embedpool.graph.compose import compose
from embedpool.graph.families import bert
from embedpool.graph.weights import load_safetensors
from embedpool.job import Embedder
from embedpool.models import load_directory, resolve_model
from embedpool.tokenization import TextTokenizer

VECTOR_CASES = C.names(errors=False)
ERROR_CASES = C.names(errors=True)
#: fp32: vectors interchangeable with sentence-transformers'.
FP32_MIN_COS, NORM_RTOL = 0.9999, 1e-3
#: int8: the issue's quality bar (mean, min cosine to sentence-transformers' fp32).
INT8_BAR = (0.99, 0.97)
#: Rows that cannot meet the bar for a reason of the random weights, with the bar used.
#: Their random Dense weights (std 0.4, no structure) go through int8 MatMuls (role
#: head_dense) with one calibrated activation scale for the whole pooled vector; measured,
#: keeping the head's Dense MatMuls in fp32 (an int8-recipe choice) lifts LaBSE's layout
#: from min 0.953 to 0.973 at std 0.3. The issue's bar itself holds for the real model
#: (tests/test_accuracy.py, MiniLM int8) and for every other row here.
INT8_RELAXED = {"dense-chain-residual": (0.98, 0.95), "dense-identity-no-normalize": (0.985, 0.94)}
DEADLINE_S = 240


def check(vecs: np.ndarray, name: str, precision: str, want: np.ndarray | None = None) -> None:
    """``vecs`` against the case's golden vectors, at the bar of ``precision``."""
    want = C.golden(name)["default"] if want is None else want
    assert vecs.shape == want.shape, (vecs.shape, want.shape)
    cos = C.cosines(vecs, want)
    if precision == "fp32":
        assert cos.min() >= FP32_MIN_COS, cos
        if not C.case(name)["normalized"]:  # the model's own norms, not unit vectors
            ratio = np.linalg.norm(vecs, axis=1) / np.linalg.norm(want, axis=1)
            assert np.abs(ratio - 1).max() <= NORM_RTOL, ratio
        else:
            assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    else:
        mean, low = INT8_RELAXED.get(name, INT8_BAR)
        assert cos.mean() >= mean and cos.min() >= low, cos


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conformance")
    return {name: C.materialise(name, root) for name in VECTOR_CASES + ERROR_CASES}


#: The vector cache on ONNX Runtime (its keys per engine: tests/test_engine_openvino.py), every
#: layout on both engines.
RUNS = [
    pytest.param(False, "onnxruntime", id="no-cache-ort"),
    pytest.param(True, "onnxruntime", id="cache-ort"),
    *(
        pytest.param(False, e.values[0], id=f"no-cache-{e.id}", marks=e.marks)
        for e in ENGINES
        if e.values[0] != "onnxruntime"
    ),
]


@pytest.mark.parametrize(("cached", "runtime"), RUNS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", VECTOR_CASES)
def test_vectors_match_sentence_transformers(
    dirs: dict[str, Path], tmp_path: Path, name: str, precision: str, cached: bool, runtime: str
) -> None:
    """Every layout on both engines (OpenVINO reads a shipped onnx/model.onnx, int32
    inputs and all, as ONNX Runtime does)."""
    cache = VectorCache.open(tmp_path / "vectors.sqlite3") if cached else None
    try:
        for run in range(2 if cached else 1):
            with Embedder(
                dirs[name], precision=precision, workers=None, cache=cache, runtime=runtime
            ) as e:
                vecs = e.embed(C.TEXTS)
                hits = e.last_report.cache_hits
            check(vecs, name, precision)
            assert hits == (len(C.TEXTS) if run else 0)
    finally:
        if cache is not None:
            cache.close()


CALLS = [(name, call) for name in VECTOR_CASES for call in C.case(name).get("calls", {})]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize(("name", "call"), CALLS, ids=[f"{n}-{c}" for n, c in CALLS])
def test_prompts_through_tokenizer_and_engine(
    dirs: dict[str, Path], name: str, call: str, precision: str
) -> None:
    """The API the library, CLI and server plumb prompts through: TextTokenizer.encode with
    ST's prompt arguments, Engine.embed with the prompt length (include_prompt=false)."""
    model = resolve_model(dirs[name])
    kwargs: dict[str, Any] = C.case(name)["calls"][call]
    enc = TextTokenizer.for_model(model).encode(C.TEXTS, **kwargs)
    engine = Engine.for_model(prepare_onnx(model, precision), model)  # type: ignore[arg-type]
    vecs = engine.embed(enc.sequences, [enc.prompt_length] * len(enc.sequences))
    check(vecs, name, precision, C.golden(name)[call])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("mean-old-flags", "int8"),
        ("labse-dense-tanh", "fp32"),
        ("cls-new-string", "fp32"),
        ("onnx-shipped", "int8"),
        ("include-prompt-false", "fp32"),
        ("tokenizer-config-missing", "fp32"),
        ("onnx-pooled-output", "fp32"),
        ("onnx-int32-inputs", "int8"),
    ],
)
def test_vectors_through_the_pool(dirs: dict[str, Path], name: str, precision: str) -> None:
    with Embedder(dirs[name], precision=precision, workers=1) as e:
        check(e.embed(C.TEXTS), name, precision)


PROMPT_LENGTH_CASES = ["include-prompt-false", "include-prompt-false-modes"]


@pytest.mark.parametrize("executor", ["in-process", "pool"])
@pytest.mark.parametrize("name", PROMPT_LENGTH_CASES)
def test_prompt_lengths_travel_with_every_batch(
    dirs: dict[str, Path], name: str, executor: str
) -> None:
    """include_prompt=false through an executor: batches that mix sequences of several
    prompts (as the server's batcher does) still leave each one's own prompt out. The Ray
    backend runs the same batches in tests/executors/ray/test_ray_executor.py."""
    from embedpool.engine import EngineSpec
    from embedpool.executors.inprocess import InProcessExecutor
    from embedpool.executors.pool.pool import Pool, pool_config_for

    model = resolve_model(dirs[name])
    spec = EngineSpec(model, "fp32", 1)
    batches = C.mixed_prompt_batches(name, model)
    ex: Any = (
        InProcessExecutor(spec)
        if executor == "in-process"
        else Pool(spec, pool_config_for(workers=1, precision="fp32"))
    )
    with ex:
        got = {r.batch_id: r for r in ex.run([b for b, _ in batches])}
    for batch, want in batches:
        assert not got[batch.batch_id].failed
        check(got[batch.batch_id].vectors, name, "fp32", want)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ERROR_CASES)
def test_refusal_in_the_library(dirs: dict[str, Path], name: str) -> None:
    with pytest.raises(ModelError, match=C.case(name)["error"]):
        resolve_model(dirs[name])


@pytest.mark.parametrize("workers", ["0", "1"], ids=["in-process", "pool"])
@pytest.mark.parametrize("name", ERROR_CASES)
def test_refusal_through_the_cli(
    dirs: dict[str, Path], tmp_path: Path, name: str, workers: str
) -> None:
    """Exit 2 and one line that names the cause, whether or not a pool would run."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(C.TEXTS) if t)
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            "embed",
            str(inp),
            "--out",
            str(tmp_path / "out.npy"),
            "--model",
            str(dirs[name]),
            "--workers",
            workers,
            "--no-cache",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("embedpool: "), out.stderr
    assert "Traceback" not in out.stderr
    assert re.search(C.case(name)["error"], lines[0]), lines[0]
    assert not (tmp_path / "out.npy").exists()


# --- the bge layout: the shipped ONNX file is what the vectors come from --------------------


def _other_encoder(d: Path, dest: Path) -> None:
    """An encoder of the same shape with other weights (the base's rows reversed), as a
    plain ONNX graph that outputs last_hidden_state, like the shipped one."""
    import onnx

    cfg = bert.parse_config(json.loads((d / "config.json").read_text()), "config.json")
    w = load_safetensors(d / "model.safetensors")
    w = {k: np.ascontiguousarray(v[::-1]) if v.ndim == 2 else v for k, v in w.items()}
    onnx.save(compose(bert, w, cfg, None, fused=False), dest)


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_replacing_the_shipped_onnx_changes_the_vectors(
    dirs: dict[str, Path], tmp_path: Path, precision: str, cached: bool
) -> None:
    """The issue's bge case: the int8 graph was keyed on model.safetensors but built from
    onnx/model.onnx, and fp32 with the cache served the old vectors."""
    d = tmp_path / "bge"
    shutil.copytree(dirs["onnx-shipped"], d)
    cache = VectorCache.open(tmp_path / "vectors.sqlite3") if cached else None

    def embed() -> np.ndarray:
        with Embedder(d, precision=precision, workers=None, cache=cache) as e:
            return e.embed(C.TEXTS)

    try:
        before = embed()
        check(before, "onnx-shipped", precision)
        _other_encoder(d, d / "onnx" / "model.onnx")
        after = embed()
    finally:
        if cache is not None:
            cache.close()
    # the same head on the other encoder, built from safetensors (no ONNX file)
    ref_dir = tmp_path / "ref"
    shutil.copytree(d, ref_dir)
    shutil.rmtree(ref_dir / "onnx")
    w = load_safetensors(d / "model.safetensors")
    save_file(
        {k: np.ascontiguousarray(v[::-1]) if v.ndim == 2 else v for k, v in w.items()},
        str(ref_dir / "model.safetensors"),
    )
    with Embedder(ref_dir, precision="fp32", workers=None) as e:
        want = e.embed(C.TEXTS)
    assert C.cosines(after, before).min() < 0.9, "still the old model's vectors"
    check(after, "onnx-shipped", precision, want)
    assert load_directory(d).files.by_role("onnx") is not None


@pytest.mark.parametrize("name", ["plain-hf", "mean-old-flags"], ids=["unnormalised", "normalised"])
def test_window_mode_averages_as_the_model_normalises(dirs: dict[str, Path], name: str) -> None:
    """An item's windows are averaged, then L2-normalised only when the model normalises."""
    from embedpool.vectors import combine_windows

    model = resolve_model(dirs[name])
    text = C.TEXTS[7] * 4  # several windows at max length 16 / 24
    enc = TextTokenizer.for_model(model).encode([text], mode="window")
    assert len(enc.sequences) >= 3
    rows = Engine.for_model(prepare_onnx(model, "fp32"), model).embed(enc.sequences)
    mean = rows.mean(axis=0)
    want = mean / np.linalg.norm(mean) if model.normalize else mean
    with Embedder(dirs[name], precision="fp32", workers=None, long_text="window") as e:
        got = e.embed([text])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    server_side = combine_windows(rows, [0] * len(rows), 1, model.normalize)[0]
    np.testing.assert_allclose(server_side, want, rtol=1e-5, atol=1e-6)


# --- issue 22: what the cache remembers, NomicBert as transformers 5 saves it, remote code --


@pytest.mark.parametrize("workers", [None, 1], ids=["in-process", "pool"])
def test_truncation_is_reported_when_every_chunk_is_a_cache_hit(
    dirs: dict[str, Path], tmp_path: Path, workers: int | None
) -> None:
    """The second identical run is served from the cache and reports the same truncation."""
    long_texts = [t for t in C.TEXTS if len(t) > 100]
    assert long_texts  # texts.json has one text over every case's max length
    cache = VectorCache.open(tmp_path / "vectors.sqlite3")
    try:
        reports = []
        for _ in range(2):
            with Embedder(
                dirs["mean-old-flags"], precision="fp32", workers=workers, cache=cache
            ) as e:
                e.embed(C.TEXTS)
                reports.append(e.last_report)
    finally:
        cache.close()
    first, second = reports
    assert second.cache_hits == len(C.TEXTS) and second.inferred == 0
    assert first.truncated == second.truncated == len(long_texts)


def _nomic_as_transformers5_saves_it(dest: Path) -> Path:
    """The nomic family fixture (nomic-ai's layout) as transformers 5 saves it after
    loading it: its native config (hidden_size, rope_parameters, ...) beside nomic-ai's
    tensor names (emb_ln, encoder.layers.N.attn.Wqkv, mlp.fc11), checked in the dev env."""
    src = Path(__file__).parent / "fixtures" / "families" / "nomic" / "model"
    d = dest / "nomic-t5"
    shutil.copytree(src, d)
    hub = json.loads((src / "config.json").read_text())
    native = {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "attention_probs_dropout_prob": 0.0,
        "bos_token_id": None,
        "classifier_dropout": None,
        "dtype": "float32",
        "eos_token_id": None,
        "head_dim": hub["n_embd"] // hub["n_head"],
        "hidden_act": "silu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": hub["n_embd"],
        "initializer_range": 0.02,
        "intermediate_size": hub["n_inner"],
        "layer_norm_eps": hub["layer_norm_epsilon"],
        "max_position_embeddings": hub["n_positions"],
        "num_attention_heads": hub["n_head"],
        "num_hidden_layers": hub["n_layer"],
        "pad_token_id": 0,
        "rope_parameters": {"rope_theta": hub["rotary_emb_base"], "rope_type": "default"},
        "transformers_version": "5.25.0",
        "type_vocab_size": hub["type_vocab_size"],
        "vocab_size": hub["vocab_size"],
    }
    (d / "config.json").write_text(json.dumps(native))
    return d


def _nomic_golden() -> tuple[list[str], np.ndarray]:
    fixture = Path(__file__).parent / "fixtures" / "families" / "nomic"
    texts: list[str] = json.loads((fixture / "golden.json").read_text())["texts"]
    with np.load(fixture / "golden.npz") as gold:
        return texts, gold["vectors"]


@pytest.mark.parametrize("workers", [None, 1], ids=["in-process", "pool"])
def test_nomic_saved_by_transformers5_matches_the_reference(
    tmp_path: Path, workers: int | None
) -> None:
    """The tensors' layout is read from their names, not from the config (was refused as
    "not a NomicBert checkpoint")."""
    d = _nomic_as_transformers5_saves_it(tmp_path)
    texts, want = _nomic_golden()
    with Embedder(d, precision="fp32", workers=workers) as e:
        got = e.embed(texts)
    assert C.cosines(got, want).min() >= FP32_MIN_COS


@pytest.mark.parametrize(
    ("auto_map", "allowed"),
    [
        (
            {
                "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
                "AutoModelForMaskedLM": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertForPreTraining",
            },
            True,
        ),
        (
            {
                "AutoConfig": "configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": "modeling_hf_nomic_bert.NomicBertModel",
            },
            True,
        ),
        (
            {
                "AutoConfig": "someone/nomic-fork--configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": "someone/nomic-fork--modeling_hf_nomic_bert.NomicBertModel",
            },
            False,
        ),
        (
            {
                "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
                "AutoModelForCausalLM": "nomic-ai/nomic-bert-2048--modeling_other.Other",
            },
            False,
        ),
    ],
    ids=["nomic-hub", "nomic-local-copy", "other-repo", "other-module"],
)
def test_remote_code_allow_list(tmp_path: Path, auto_map: dict[str, str], allowed: bool) -> None:
    """nomic-ai's NomicBert code (the hub's references, or the copy save_pretrained writes)
    is the model embedpool builds; the same module names elsewhere are refused by name."""
    d = _nomic_as_transformers5_saves_it(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": auto_map}))
    if not allowed:
        with pytest.raises(
            ModelError,
            match=r"auto_map names remote code \(.*\) that builds "
            r"model_type 'nomic_bert' its own way",
        ):
            resolve_model(d)
        return
    texts, want = _nomic_golden()
    with Embedder(d, precision="fp32", workers=None) as e:
        assert C.cosines(e.embed(texts), want).min() >= FP32_MIN_COS


def test_an_error_in_the_graph_built_from_a_shipped_file_names_that_file(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The int8 graph of a shipped onnx/model.onnx lives in the graph cache; an error
    loading it names the user's file, not only the cache file."""
    model = resolve_model(dirs["onnx-shipped"])
    assert model.onnx_path is not None
    broken = tmp_path / "onnx-shipped-int8-0123.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(ModelError) as info:
        Engine.for_model(broken, model, precision="int8")
    assert str(info.value).startswith(f"{model.onnx_path}: the int8 graph embedpool built")
    assert str(broken) in str(info.value)


def test_shipped_signature_is_read_without_the_weights(tmp_path: Path) -> None:
    """models.shipped_onnx reads inputs and outputs from the protobuf framing: initializers
    that old exporters list among the inputs are not inputs, and a file cut anywhere is
    refused as truncated (here, 12 cuts across the file)."""
    import onnx
    from onnx import helper

    from embedpool.models.shipped_onnx import read_signature

    src = C.FIXTURES / "shipped.onnx"
    sig = read_signature(src)
    assert [(t.name, t.elem_type, t.rank) for t in sig.inputs] == [
        ("input_ids", 7, 2),
        ("attention_mask", 7, 2),
        ("token_type_ids", 7, 2),
    ]
    assert [(t.name, t.rank) for t in sig.outputs] == [("last_hidden_state", 3)]
    model = onnx.load(str(src))
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
    )
    old = tmp_path / "old-export.onnx"
    onnx.save(model, str(old))
    assert read_signature(old).inputs == sig.inputs
    data = src.read_bytes()
    for i in range(1, 13):
        cut = tmp_path / f"cut{i}.onnx"
        cut.write_bytes(data[: len(data) * i // 13])
        with pytest.raises(ModelError, match=r"is truncated or not an ONNX model"):
            read_signature(cut)
