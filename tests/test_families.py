"""The encoder families besides BERT (XLM-RoBERTa, NomicBert, ModernBERT) against their
reference implementations, without torch.

Each fixture under tests/fixtures/families/<name>/ is a small random-weight model in
sentence-transformers' layout with golden vectors computed by transformers +
sentence-transformers (scripts/make_family_fixtures.py, run in the dev venv). The goldens
embed all texts in one padded batch; the texts include ones longer than ModernBERT's local
window, short ones padded next to long ones, other scripts, a literal pad token, and one
longer than every max length. The long-context families (NomicBert, ModernBERT) also have
``long.json`` / ``long.npz``: one text of 30 x MiniLM's window embedded by the reference at
max length 8,192 (``--long``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from engines import ENGINES
from family_support import (
    F32,
    FIXTURES,
    Fixture,
    LongFixture,
    checked_unfused_graph,
    copy_model,
    cosines,
    embed,
    encode,
    encoder_graph,
    load_fixture,
    load_long_golden,
    long_cosine,
    meets_bar,
    padding_cosines,
    prepare_graphs,
    prompted,
    run_graph,
)

from embedpool.engine import Engine
from embedpool.errors import ModelError
from embedpool.graph import _family, prepare_onnx
from embedpool.graph.compose import compose
from embedpool.graph.families.catalog import FAMILIES, family_for
from embedpool.models import ResolvedModel, resolve_model
from embedpool.tokenization import TextTokenizer
from embedpool.types import LongTextMode

NAMES = ["xlmr", "nomic", "modernbert"]


@pytest.fixture(scope="module", params=NAMES)
def fixture(request: pytest.FixtureRequest) -> Fixture:
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def graphs(fixture: Fixture, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 and int8 graphs of the fixture, built once by prepare_onnx."""
    return prepare_graphs(fixture.model, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module", params=ENGINES)
def fp32_engine(
    request: pytest.FixtureRequest,
    fixture: Fixture,
    graphs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Engine:
    """The fixture's fp32 engine on each runtime (engines.ENGINES): ONNX Runtime on the
    fused graph; OpenVINO on the graph it reads (engine_openvino.graph_for)."""
    if request.param == "onnxruntime":
        return Engine.for_model(graphs["fp32"], fixture.model, threads=1)
    from embedpool.engine import EngineSpec

    spec = EngineSpec(fixture.model, "fp32", 1, runtime="openvino")
    from embedpool.engine_openvino import OpenVinoEngine, graph_for

    return OpenVinoEngine.for_spec(spec, graph_for(fixture.model, tmp_path_factory.mktemp("ov")))


@pytest.fixture(scope="module", params=ENGINES)
def int8_engine(
    request: pytest.FixtureRequest,
    fixture: Fixture,
    graphs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Engine:
    """The fixture's int8 engine on each runtime: ONNX Runtime's dynamic int8 graph;
    OpenVINO's weight-only int8 form of the graph it reads (graph.weight_int8)."""
    if request.param == "onnxruntime":
        return Engine.for_model(graphs["int8"], fixture.model, threads=1)
    from embedpool.engine import EngineSpec
    from embedpool.engine_openvino import OpenVinoEngine, graph_for

    spec = EngineSpec(fixture.model, "int8", 1, runtime="openvino")
    return OpenVinoEngine.for_spec(
        spec, graph_for(fixture.model, tmp_path_factory.mktemp("ov"), "int8")
    )


def embed_on(engine: Engine, model: ResolvedModel, texts: list[str]) -> F32:
    return engine.embed(encode(model, texts))


def test_tokens_match_the_reference_tokenizer(fixture: Fixture) -> None:
    model = fixture.model
    seqs = TextTokenizer(model.tokenizer_path, model.max_length).encode(fixture.texts).sequences
    assert [list(map(int, s)) for s in seqs] == fixture.input_ids


def test_fp32_matches_reference(fixture: Fixture, fp32_engine: Engine) -> None:
    cos = cosines(embed_on(fp32_engine, fixture.model, fixture.texts), fixture.vectors)
    assert cos.min() >= 0.9999, cos


def test_prompted_texts_match_reference(fixture: Fixture, fp32_engine: Engine) -> None:
    """sentence-transformers prepends the prompt to the text: so does this."""
    cos = cosines(embed_on(fp32_engine, fixture.model, prompted(fixture)), fixture.query_vectors)
    assert cos.min() >= 0.9999, cos


def test_fp32_vector_ignores_batch_neighbours_on_each_engine(
    fixture: Fixture, fp32_engine: Engine
) -> None:
    batch = embed_on(fp32_engine, fixture.model, fixture.texts)
    alone = np.concatenate([embed_on(fp32_engine, fixture.model, [t]) for t in fixture.texts])
    assert cosines(batch, alone).min() >= 0.99999


@pytest.mark.openvino
def test_openvino_reads_the_fused_graph_exactly_where_listed(
    fixture: Fixture, graphs: dict[str, Path]
) -> None:
    """engine_openvino.FUSED_CONVERTS against OpenVINO's ONNX frontend itself: a family not
    listed has a contrib op it cannot convert (so OpenVINO reads the unfused graph)."""
    import openvino as ov

    from embedpool.engine_openvino import FUSED_CONVERTS

    fam, _ = _family(fixture.model)
    try:
        ov.Core().read_model(str(graphs["fp32"]))
        converts = True
    except RuntimeError:
        converts = False
    assert converts == (fam.NAME in FUSED_CONVERTS), fam.NAME


def test_unfused_graph_matches_reference(fixture: Fixture) -> None:
    """The standard-ops flavour (the benchmark baseline) computes the same vectors and passes
    the ONNX checker with full type inference."""
    cos = cosines(run_graph(checked_unfused_graph(fixture), fixture), fixture.vectors)
    assert cos.min() >= 0.9999, cos


#: The com.microsoft kernels each family's shipped fp32 graph must use, and ops it must not.
FUSED_OPS: dict[str, tuple[set[str], set[str]]] = {
    "xlmr": (
        {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"},
        {"Softmax", "Erf"},
    ),
    "nomic": (
        {"RotaryEmbedding", "MultiHeadAttention", "SkipLayerNormalization", "QuickGelu"},
        {"Softmax", "Sigmoid"},
    ),
    "modernbert": (
        {"RotaryEmbedding", "MultiHeadAttention", "SkipLayerNormalization", "Gelu"},
        {"Erf"},
    ),
}


def test_fp32_graph_uses_the_fused_kernels(fixture: Fixture, graphs: dict[str, Path]) -> None:
    graph = onnx.load(str(graphs["fp32"]))
    ops = {n.op_type for n in graph.graph.node}
    want, unwanted = FUSED_OPS[fixture.model.directory.parent.name]
    assert want <= ops, want - ops
    assert not ops & unwanted
    mha = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention"]
    # no mask input: the kernel's FlashAttention path (padding rides on an extra dimension)
    assert all(len(n.input) == 3 for n in mha), [list(n.input) for n in mha]


@pytest.mark.parametrize("kind", ["mha", "plain"])
def test_attention_variants_match_reference(kind: str) -> None:
    """ModernBERT's benchmark alternatives: masked MultiHeadAttention with a [seq, seq] window
    bias, and Softmax attention in standard ops, both in the fused graph."""
    fixture = load_fixture("modernbert")
    fam, cfg = _family(fixture.model)
    weights = fam.load_weights(fixture.model.weights_path, cfg)
    graph = encoder_graph(fam, weights, cfg, fixture, attention=kind)
    cos = cosines(run_graph(graph, fixture), fixture.vectors)
    assert cos.min() >= 0.9999, cos


def test_int8_matches_reference(fixture: Fixture, int8_engine: Engine) -> None:
    """issue 11's int8 bar against the reference itself (the goldens), on the fixture's one
    padded batch of mixed lengths: mean >= 0.99, every vector >= 0.97; on each engine, and
    a text's vector does not depend on its batch neighbours."""
    batch = embed_on(int8_engine, fixture.model, fixture.texts)
    meets_bar(cosines(batch, fixture.vectors), "int8")
    alone = np.concatenate([embed_on(int8_engine, fixture.model, [t]) for t in fixture.texts])
    assert cosines(batch, alone).min() >= 0.99999


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vector_ignores_batch_neighbours(
    fixture: Fixture, graphs: dict[str, Path], precision: str
) -> None:
    """Padding is masked: a text alone and padded next to the longest one, one vector."""
    assert padding_cosines(fixture.model, graphs[precision], fixture.texts).min() >= 0.99999


@pytest.mark.slow
def test_pool_matches_reference(
    fixture: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row per family through real pool workers (they build and cache the graph)."""
    from embedpool.job import Embedder

    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path))
    with Embedder(fixture.model, precision="fp32", workers=1) as e:
        got = e.embed(fixture.texts)
    assert cosines(got, fixture.vectors).min() >= 0.9999


@pytest.mark.slow
@pytest.mark.openvino
def test_pool_on_openvino_matches_reference(
    fixture: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through pool workers on OpenVINO (a rotary family's worker builds the
    unfused graph it reads, under the graph store's lock)."""
    from embedpool.job import Embedder

    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path))
    with Embedder(fixture.model, precision="fp32", workers=1, runtime="openvino") as e:
        assert "OpenVINO" in e.device
        got = e.embed(fixture.texts)
    assert cosines(got, fixture.vectors).min() >= 0.9999


# --- XLM-RoBERTa ---------------------------------------------------------------------------


def test_roberta_model_type_builds_the_same_graph(tmp_path: Path) -> None:
    fx = load_fixture("xlmr", copy_model("xlmr", tmp_path, model_type="roberta"))
    got = embed(fx.model, prepare_onnx(fx.model, "fp32", tmp_path / "cache"), fx.texts)
    assert cosines(got, fx.vectors).min() >= 0.9999


def test_xlmr_positions_skip_a_literal_pad_token() -> None:
    """The fixture's texts include '<pad>', which transformers' positions skip: the golden for
    it is only matched if the graph skips it too (see test_fp32_matches_reference)."""
    fx = load_fixture("xlmr")
    pad = int(fx.model.config["pad_token_id"])
    assert any(pad in ids for ids in fx.input_ids)


# --- NomicBert --------------------------------------------------------------------------------


def test_nomic_native_layout(tmp_path: Path) -> None:
    """The fixture has nomic-ai's hub layout; transformers' native one (hidden_size, ...,
    layers.N.self_attn.q_proj) is the same model and gives the same vectors."""
    from safetensors.numpy import load_file, save_file

    src = FIXTURES / "nomic" / "model"
    hub = json.loads((src / "config.json").read_text())
    dst = tmp_path / "native"
    shutil.copytree(src, dst)
    native_cfg = {
        "model_type": "nomic_bert",
        "hidden_size": hub["n_embd"],
        "num_attention_heads": hub["n_head"],
        "num_hidden_layers": hub["n_layer"],
        "intermediate_size": hub["n_inner"],
        "max_position_embeddings": hub["n_positions"],
        "layer_norm_eps": hub["layer_norm_epsilon"],
        "hidden_act": "silu",
        "vocab_size": hub["vocab_size"],
        "type_vocab_size": hub["type_vocab_size"],
        "rope_parameters": {"rope_type": "default", "rope_theta": hub["rotary_emb_base"]},
    }
    (dst / "config.json").write_text(json.dumps(native_cfg))
    names = {
        "attn.out_proj": "self_attn.o_proj",
        "mlp.fc11": "mlp.up_proj",
        "mlp.fc12": "mlp.gate_proj",
        "mlp.fc2": "mlp.down_proj",
        "norm1": "post_attention_layernorm",
        "norm2": "post_mlp_layernorm",
    }
    out = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        key = key.replace("emb_ln.", "embeddings.LayerNorm.").replace("encoder.layers.", "layers.")
        if key.endswith("attn.Wqkv.weight"):
            for part, chunk in zip("qkv", np.split(value, 3), strict=True):
                out[key.replace("attn.Wqkv", f"self_attn.{part}_proj")] = chunk
            continue
        for old, new in names.items():
            key = key.replace(old, new)
        out[key] = value
    save_file(out, str(dst / "model.safetensors"))
    fx = load_fixture("nomic", dst)
    got = embed(fx.model, prepare_onnx(fx.model, "fp32", tmp_path / "cache"), fx.texts)
    assert cosines(got, fx.vectors).min() >= 0.9999


# --- ModernBERT ------------------------------------------------------------------------------


def test_modernbert_hub_config_format(tmp_path: Path) -> None:
    """The released ModernBERTs' configs predate transformers 5: ``global_attn_every_n_layers``
    and ``global_rope_theta`` / ``local_rope_theta`` instead of ``layer_types`` and
    ``rope_parameters``. Same weights, same vectors."""
    cfg = json.loads((FIXTURES / "modernbert" / "model" / "config.json").read_text())
    rope = cfg["rope_parameters"]
    directory = copy_model(
        "modernbert",
        tmp_path,
        layer_types=None,
        rope_parameters=None,
        global_rope_theta=rope["full_attention"]["rope_theta"],
        local_rope_theta=rope["sliding_attention"]["rope_theta"],
    )
    fx = load_fixture("modernbert", directory)
    got = embed(fx.model, prepare_onnx(fx.model, "fp32", tmp_path / "cache"), fx.texts)
    assert cosines(got, fx.vectors).min() >= 0.9999


def test_modernbert_window_matters() -> None:
    """The fixture's texts are longer than its local window, so a graph that ignored the
    window (every layer global) would give other vectors: the window is tested."""
    fx = load_fixture("modernbert")
    fam, cfg = _family(fx.model)
    assert max(len(i) for i in fx.input_ids) > cfg.local_window + 1
    everywhere_global = dataclasses.replace(cfg, layer_types=("full_attention",) * cfg.num_layers)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    graph = compose(fam, weights, everywhere_global, fx.model.head, fused=True)
    cos = cosines(run_graph(graph, fx), fx.vectors)
    long_texts = [i for i, ids in enumerate(fx.input_ids) if len(ids) > cfg.local_window // 2 + 1]
    assert cos[long_texts].max() < 0.999, cos


# --- long context ----------------------------------------------------------------------------

LONG = ["nomic", "modernbert"]
#: The config key that bounds each long-context fixture's positions (hub layouts).
POSITIONS_KEY = {"nomic": "n_positions", "modernbert": "max_position_embeddings"}


def load_long(name: str, tmp: Path) -> LongFixture:
    """The fixture with its max length and positions raised to 8,192, and one text of
    7,680-8,192 tokens (30 x MiniLM's 256-token window) with the reference's vector
    (``scripts/make_family_fixtures.py --long``)."""
    long = load_long_golden(name)
    directory = copy_model(name, tmp, **{POSITIONS_KEY[name]: long.max_seq_length})
    st = json.loads((directory / "sentence_bert_config.json").read_text())
    st["max_seq_length"] = long.max_seq_length
    (directory / "sentence_bert_config.json").write_text(json.dumps(st))
    model = resolve_model(directory)
    assert model.max_length == long.max_seq_length == 8192
    return LongFixture(model, long.text, long.input_ids, long.vector)


@pytest.fixture(scope="module", params=LONG)
def long_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LongFixture:
    return load_long(request.param, tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def long_graphs(
    long_fixture: LongFixture, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return prepare_graphs(long_fixture.model, tmp_path_factory.mktemp("onnx"))


def test_long_text_is_one_untruncated_sequence(long_fixture: LongFixture) -> None:
    """30 x MiniLM's window, tokenised as the reference does, nothing cut."""
    fx = long_fixture
    enc = TextTokenizer(fx.model.tokenizer_path, fx.model.max_length).encode([fx.text])
    assert len(fx.input_ids) >= 30 * 256
    assert [list(map(int, s)) for s in enc.sequences] == [fx.input_ids]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_long_text_matches_reference(
    long_fixture: LongFixture, long_graphs: dict[str, Path], precision: str
) -> None:
    """Rotary positions thousands of tokens out, FlashAttention over 7,800 keys and (in
    ModernBERT) block-local windows far from the start: the reference's vector, padded in a
    batch next to a short text."""
    fx = long_fixture
    cos = long_cosine(fx.model, long_graphs[precision], fx)
    assert cos >= (0.9999 if precision == "fp32" else 0.97), cos


@pytest.mark.slow
@pytest.mark.parametrize("long_text", ["truncate", "window"])
def test_long_text_through_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, long_text: LongTextMode
) -> None:
    """A pool worker embeds the 7,800-token text under the default 768-token budget (the
    planner runs it alone) with the reference's vector; at 8,192 tokens it is one window, so
    window mode gives the same vector; the pool's per-model estimate is planned for one
    8,192-token sequence."""
    from embedpool.graph.families.catalog import model_memory
    from embedpool.job import Embedder

    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path / "cache"))
    fx = load_long("modernbert", tmp_path)
    mem = model_memory(fx.model, "fp32")
    assert mem is not None and mem.max_seq == 8192
    with Embedder(fx.model, precision="fp32", workers=1, long_text=long_text) as e:
        got = e.embed(["short", fx.text, "another short one"])
        report = e.last_report
    assert cosines(got[1:2], fx.vector[None])[0] >= 0.9999
    assert report.truncated == 0, report


# --- refusals that teach -------------------------------------------------------------------

DROP = object()  # a config change that removes the key (its default then applies)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("xlmr", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("xlmr", {"is_decoder": True}, "is_decoder"),
        ("xlmr", {"hidden_act": "relu"}, "hidden_act 'relu'"),
        ("nomic", {"rotary_scaling_factor": 2.0}, "rotary_scaling_factor"),
        ("nomic", {"rotary_emb_interleaved": True}, "rotary_emb_interleaved"),
        ("nomic", {"rotary_emb_fraction": DROP}, r"rotary_emb_fraction = 0.0 \(its default\)"),
        ("nomic", {"qkv_proj_bias": True}, "qkv_proj_bias"),
        ("nomic", {"activation_function": "gelu"}, "activation_function"),
        ("nomic", {"prenorm": True}, "prenorm"),
        ("nomic", {"causal": True}, "causal"),
        ("modernbert", {"rope_parameters": None, "local_rope_theta": None}, "local_rope_theta"),
        ("modernbert", {"attention_bias": True}, "attention_bias"),
        ("modernbert", {"hidden_activation": "silu"}, "hidden_activation"),
        ("modernbert", {"layer_types": ["full_attention", "chunked_attention"] * 2}, "layer_types"),
        ("modernbert", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        (
            "modernbert",
            {"rope_parameters": {"full_attention": {"rope_type": "linear"}}},
            "rope_type 'linear'",
        ),
    ],
    ids=[
        "xlmr-relative",
        "xlmr-decoder",
        "xlmr-relu",
        "nomic-ntk-scaling",
        "nomic-interleaved",
        "nomic-no-rotary",
        "nomic-bias",
        "nomic-gelu",
        "nomic-prenorm",
        "nomic-causal",
        "modernbert-null-theta",
        "modernbert-bias",
        "modernbert-silu",
        "modernbert-layer-type",
        "modernbert-yarn",
        "modernbert-linear-rope",
    ],
)
def test_unhonoured_config_is_refused(
    tmp_path: Path, name: str, change: dict[str, Any], match: str
) -> None:
    model = resolve_model(FIXTURES / name / "model")
    cfg = {k: v for k, v in {**model.config, **change}.items() if v is not DROP}
    with pytest.raises(ModelError, match=match):
        family_for(cfg).parse_config(cfg, "config.json")


@pytest.mark.parametrize("model_type", ["t5", "gpt2", "phi3"])
def test_unknown_architecture_names_what_embedpool_builds(model_type: str) -> None:
    with pytest.raises(ModelError) as err:
        family_for({"model_type": model_type, "architectures": ["SomethingForCausalLM"]})
    msg = str(err.value)
    assert repr(model_type) in msg and "onnx/model.onnx" in msg
    for fam in FAMILIES:
        assert fam.NAME in msg or any(t in msg for t in fam.MODEL_TYPES)


def test_family_refusal_teaches_the_way_out() -> None:
    """A field a family cannot honour is named, and so are the families embedpool builds and
    the route through a shipped onnx/model.onnx (what to do, not only what is wrong)."""
    from embedpool.graph.families.catalog import parse_config

    cfg = {
        **resolve_model(FIXTURES / "xlmr" / "model").config,
        "position_embedding_type": "relative_key_query",
    }
    with pytest.raises(ModelError) as err:
        parse_config(cfg, "x/config.json")
    msg = str(err.value)
    assert "x/config.json: position_embedding_type 'relative_key_query'" in msg
    assert "onnx/model.onnx" in msg
    assert all(f"{fam.NAME} (" in msg for fam in FAMILIES), msg


def test_bert_decoder_is_refused() -> None:
    """A BERT config with is_decoder attends causally in transformers: never built as an
    encoder (its vectors would be silently wrong)."""
    from embedpool.graph.families import bert

    with pytest.raises(ModelError, match="is_decoder"):
        bert.parse_config(
            {
                "model_type": "bert",
                "hidden_size": 32,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "intermediate_size": 64,
                "is_decoder": True,
            }
        )


REFUSED: dict[str, tuple[dict[str, Any], list[str]]] = {
    # A decoder embedpool does not build (qwen2, qwen3, llama, mistral and gemma3 it does).
    "decoder": (
        {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]},
        ["model_type 'phi3'", "Phi3ForCausalLM"],
    ),
    "position-type": (
        {"position_embedding_type": "relative_key"},
        ["position_embedding_type 'relative_key'"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [["embed", "--workers", "0"], ["embed", "--workers", "1"], ["serve", "--port", "0"]],
    ids=["in-process", "pool", "serve"],
)
@pytest.mark.parametrize("case", list(REFUSED))
def test_cli_refuses_what_it_does_not_build(tmp_path: Path, case: str, how: list[str]) -> None:
    """Exit 2 before any worker starts, naming what was found, the families embedpool builds
    and the shipped-ONNX route; no traceback, no output file."""
    import subprocess
    import sys

    change, found = REFUSED[case]
    directory = copy_model("xlmr", tmp_path, **change)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = [how[0], str(src), "--out", str(out), *how[1:]] if how[0] == "embed" else how
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            *args,
            "--model",
            str(directory),
            "--no-cache" if how[0] == "embed" else "--log-level=warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    for words in [*found, "onnx/model.onnx", *(f"{fam.NAME} (" for fam in FAMILIES)]:
        assert words in res.stderr, (words, res.stderr)
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("case", list(REFUSED))
def test_library_pool_refuses_what_it_does_not_build(tmp_path: Path, case: str) -> None:
    from embedpool.job import Embedder

    directory = copy_model("xlmr", tmp_path, **REFUSED[case][0])
    with pytest.raises(ModelError, match=r"onnx/model\.onnx"):
        Embedder(str(directory), precision="fp32", workers=1)
