"""The Qwen decoder families (qwen3; qwen2 with Llama and Mistral) against their reference
implementations, without torch.

The fixtures (tests/fixtures/families/qwen3 and qwen2, scripts/make_decoder_fixtures.py) are
small random-weight ``Qwen3Model`` / ``Qwen2Model`` saved by sentence-transformers 6 with
last-token pooling and Normalize: grouped-query (qwen3: 4 q / 2 kv heads) and multi-query
(qwen2: 4 / 1) attention, ``head_dim`` 16 apart from hidden / heads (32 / 4), rotary theta
1e6, causal attention; qwen3 has per-head q/k norms, tied embeddings and Qwen3-Embedding's
tokenizer (its post-processor appends ``<|endoftext|>``, left padding), qwen2 q/k/v biases,
untied embeddings and a tokenizer that appends nothing. Goldens: the texts in one padded
batch, with the ``query`` prompt, at ``truncate_dim`` 16, one text of ~8,150 tokens, and
(qwen3) the same model with ``is_causal: false``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from engines import ENGINES
from family_support import (
    CLI,
    F32,
    FIXTURES,
    INT8_MIN,
    Fixture,
    cache_env,
    checked_unfused_graph,
    cli_embed_query,
    copy_model,
    cosines,
    embed,
    embedder_matches_reference,
    encode,
    encoder_graph,
    golden,
    jsonl,
    load_fixture,
    load_long_golden,
    meets_bar,
    padding_cosines,
    prepare_graphs,
    run_graph,
    serve_matches_reference,
)

from embedpool.engine import Engine
from embedpool.errors import ModelError
from embedpool.graph import _family, prepare_onnx
from embedpool.graph.compose import compose
from embedpool.graph.families import qwen2, qwen3
from embedpool.graph.families.catalog import family_for, model_memory, parse_config
from embedpool.models import resolve_model
from embedpool.tokenization import TextTokenizer

NAMES = ["qwen3", "qwen2"]


@pytest.fixture(scope="module", params=NAMES)
def fx(request: pytest.FixtureRequest) -> Fixture:
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def graphs(fx: Fixture, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepare_graphs(fx.model, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module", params=ENGINES)
def engines(
    request: pytest.FixtureRequest,
    fx: Fixture,
    graphs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Engine]:
    """The fixture's fp32 and int8 engines on each runtime (tests/engines.py): ONNX Runtime
    on the graphs above; OpenVINO on the graphs it reads (graph.ov_graph: the standard-op
    graph, GroupQueryAttention and RotaryEmbedding do not convert; int8: its weight-only
    int8 form)."""
    if request.param == "onnxruntime":
        return {p: Engine.for_model(graphs[p], fx.model, threads=1) for p in ("fp32", "int8")}
    from embedpool.engine import EngineSpec
    from embedpool.engine_openvino import OpenVinoEngine, graph_for

    cache = tmp_path_factory.mktemp("ov")
    return {
        p: OpenVinoEngine.for_spec(
            EngineSpec(fx.model, p, 1, runtime="openvino"), graph_for(fx.model, cache, p)
        )
        for p in ("fp32", "int8")
    }


def query_sequences(fx: Fixture) -> list[Any]:
    """The texts with the model's ``query`` prompt, through embedpool's prompt path."""
    tok = TextTokenizer.for_model(fx.model)
    return tok.encode(fx.texts, prompt_name=fx.prompt_name).sequences


def embed_sequences(fx: Fixture, path: Path, seqs: list[Any]) -> F32:
    from embedpool.engine import Engine

    return Engine.for_model(path, fx.model, threads=1).embed(seqs)


# --- fidelity --------------------------------------------------------------------------------


def test_tokens_match_the_reference_tokenizer(fx: Fixture) -> None:
    """Qwen3-Embedding's tokenizer ends every text with <|endoftext|> (the token last-token
    pooling reads); the qwen2 fixture's adds nothing, so its last token is the text's own."""
    seqs = TextTokenizer.for_model(fx.model).encode(fx.texts).sequences
    assert [list(map(int, s)) for s in seqs] == fx.input_ids
    eos = int(fx.model.config["eos_token_id"])
    ends_with_eos = [ids[-1] == eos for ids in fx.input_ids]
    assert (
        all(ends_with_eos) if fx.model.config["model_type"] == "qwen3" else not any(ends_with_eos)
    )


def test_fp32_matches_reference_in_a_padded_batch(fx: Fixture, engines: dict[str, Engine]) -> None:
    """One-token texts padded next to a 325-token one (the reference padded Qwen3 on the
    left, as its tokenizer_config says; embedpool pads right: the same vectors)."""
    assert min(map(len, fx.input_ids)) <= 2 and max(map(len, fx.input_ids)) > 300
    cos = cosines(engines["fp32"].embed(encode(fx.model, fx.texts)), fx.vectors)
    assert cos.min() >= 0.9999, cos


def test_query_prompt_matches_reference(fx: Fixture, engines: dict[str, Engine]) -> None:
    """The card's code-search instruction as the ``query`` prompt, resolved by name."""
    assert "code" in dict(fx.model.text.prompts)["query"]
    cos = cosines(engines["fp32"].embed(query_sequences(fx)), fx.query_vectors)
    assert cos.min() >= 0.9999, cos


def test_int8_matches_reference(fx: Fixture, engines: dict[str, Engine]) -> None:
    """issue 11's int8 bar against the reference: mean >= 0.99, every vector >= 0.97."""
    for got, want in (
        (engines["int8"].embed(encode(fx.model, fx.texts)), fx.vectors),
        (engines["int8"].embed(query_sequences(fx)), fx.query_vectors),
    ):
        meets_bar(cosines(got, want), "int8")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vector_ignores_batch_neighbours(
    fx: Fixture, graphs: dict[str, Path], precision: str
) -> None:
    assert padding_cosines(fx.model, graphs[precision], fx.texts).min() >= 0.99999


def test_unfused_graph_matches_reference(fx: Fixture) -> None:
    """The standard-ops flavour (the benchmark baseline): same vectors, ONNX checker with full
    type inference, no contrib op."""
    cos = cosines(run_graph(checked_unfused_graph(fx), fx), fx.vectors)
    assert cos.min() >= 0.9999, cos


def test_fp32_graph_uses_the_fused_kernels(fx: Fixture, graphs: dict[str, Path]) -> None:
    """GroupQueryAttention (rotary inside, causal, memory linear in length) in every layer;
    RMSNorms fused; no Softmax attention."""
    graph = onnx.load(str(graphs["fp32"]))
    ops = [n.op_type for n in graph.graph.node]
    layers = int(fx.model.config["num_hidden_layers"])
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert "QuickGelu" in ops and not {"Softmax", "MultiHeadAttention", "Sigmoid"} & set(ops)
    gqa = next(n for n in graph.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (
        fx.model.config["num_attention_heads"],
        fx.model.config["num_key_value_heads"],
    )
    qk_norms = ops.count("SimplifiedLayerNormalization")
    assert qk_norms == (1 + 2 * layers if fx.model.config["model_type"] == "qwen3" else 1)


@pytest.mark.parametrize("kind", ["flash", "plain"])
def test_attention_kinds_in_the_fused_graph(kind: str) -> None:
    """``attention="plain"`` in the fused graph (Softmax attention) gives the reference; a
    bidirectional kernel on a causal model does not (the mask is tested, not assumed)."""
    fx = load_fixture("qwen3")
    fam, cfg = _family(fx.model)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    if kind == "flash":
        cfg = dataclasses.replace(cfg, causal=False)
    graph = encoder_graph(fam, weights, cfg, fx, attention=kind)
    cos = cosines(run_graph(graph, fx), fx.vectors)
    if kind == "plain":
        assert cos.min() >= 0.9999, cos
    else:
        assert cos[1:].max() < 0.999, cos


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_bidirectional_config_matches_reference(tmp_path: Path, fused: bool, name: str) -> None:
    """``is_causal: false`` (transformers 5's switch, honoured by sentence-transformers 6):
    every token attends to every real token; fused, through mask-free MultiHeadAttention.
    qwen2: a gte-Qwen2-like directory (q/k/v biases, MQA) with its attention stated."""
    directory = copy_model(name, tmp_path, is_causal=False)
    fx = load_fixture(name, directory)
    want = golden(name, "bidirectional_vectors")
    fam, cfg = _family(fx.model)
    assert not cfg.causal
    graph = compose(
        fam, fam.load_weights(fx.model.weights_path, cfg), cfg, fx.model.head, fused=fused
    )
    ops = {n.op_type for n in graph.graph.node}
    assert ("MultiHeadAttention" in ops) == fused and "GroupQueryAttention" not in ops
    cos = cosines(run_graph(graph, fx), want)
    assert cos.min() >= 0.9999, cos


#: config.json's auto_map as gte-Qwen2-1.5B-instruct's hub files have it (saved copies name
#: the repository: "Alibaba-NLP/gte-Qwen2-1.5B-instruct--modeling_qwen.Qwen2Model").
GTE_AUTO_MAP = {
    "AutoModel": "modeling_qwen.Qwen2Model",
    "AutoModelForCausalLM": "modeling_qwen.Qwen2ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_qwen.Qwen2ForSequenceClassification",
}


@pytest.mark.parametrize("is_causal", [None, False])
def test_gte_qwen2_as_published_is_refused_naming_the_choice(
    tmp_path: Path, is_causal: bool | None
) -> None:
    """gte-Qwen2's own code (auto_map) decides its attention (bidirectional, by its card),
    which embedpool cannot check: refused, with or without is_causal beside it, naming
    auto_map and the explicit is_causal choice; never built causal in silence."""
    directory = copy_model(
        "qwen2", tmp_path, auto_map=GTE_AUTO_MAP, is_causal=is_causal, architectures=["Qwen2Model"]
    )
    with pytest.raises(
        ModelError,
        match=r"auto_map names remote code \(modeling_qwen\.Qwen2"
        r"Model\).*remove auto_map and state \"is_causal\": "
        r"false",
    ):
        resolve_model(directory)


def test_matryoshka_dimensions_match_truncate_dim(fx: Fixture, graphs: dict[str, Path]) -> None:
    """Qwen3-Embedding's Matryoshka widths: the first N values of the vector are what
    sentence-transformers' truncate_dim gives (embedpool renormalises them)."""
    from embedpool.vectors import truncate_dims

    dim = int(
        json.loads((FIXTURES / fx.model.directory.parent.name / "golden.json").read_text())["dim"]
    )
    got = truncate_dims(embed(fx.model, graphs["fp32"], fx.texts), dim, normalize=True)
    assert got.shape[1] == dim
    assert cosines(got, golden(fx.model.directory.parent.name, "dim_vectors")).min() >= 0.9999


def test_a_causal_lm_checkpoint_layout_loads(tmp_path: Path) -> None:
    """A ``Qwen3ForCausalLM`` save: every key under ``model.``, and an ``lm_head.weight``
    (untied) that an embedder never reads. The same vectors."""
    from safetensors.numpy import load_file, save_file

    fx = load_fixture("qwen3")
    directory = copy_model("qwen3", tmp_path, tie_word_embeddings=False)
    weights = load_file(str(directory / "model.safetensors"))
    out = {f"model.{k}": v for k, v in weights.items()}
    out["lm_head.weight"] = np.zeros_like(weights["embed_tokens.weight"])
    save_file(out, str(directory / "model.safetensors"))
    moved = load_fixture("qwen3", directory)
    got = embed(moved.model, prepare_onnx(moved.model, "fp32", tmp_path / "cache"), fx.texts)
    assert cosines(got, fx.vectors).min() >= 0.9999


def test_llama_and_mistral_are_the_qwen2_graph_with_their_flags() -> None:
    """Llama/Mistral configs parse to the Qwen2 block: q/k/v/o biases only with
    attention_bias, no q/k norms."""
    base = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 48,
        "rope_theta": 500000.0,
    }
    llama = parse_config({"model_type": "llama", **base})[1]
    assert (llama.qkv_bias, llama.o_bias, llama.qk_norm, llama.head_dim) == (False, False, False, 8)
    biased = qwen2.parse_config({"model_type": "llama", "attention_bias": True, **base})
    assert biased.qkv_bias and biased.o_bias and biased.rope_theta == 500000.0
    mistral = qwen2.parse_config({"model_type": "mistral", "sliding_window": None, **base})
    assert mistral.causal and not mistral.qkv_bias
    assert qwen3.parse_config({"model_type": "qwen3", **base}).qk_norm


# --- long context ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_long_text_matches_reference_in_a_padded_batch(
    fx: Fixture, graphs: dict[str, Path], precision: str
) -> None:
    """~8,150 tokens, untruncated (rotary positions thousands out, GroupQueryAttention over
    every earlier key), next to a one-token text padded to its length."""
    long = load_long_golden(fx.model.directory.parent.name)
    seqs = TextTokenizer.for_model(fx.model).encode([long.text, fx.texts[0]]).sequences
    assert len(long.input_ids) >= 4096 and list(map(int, seqs[0])) == long.input_ids
    got = embed_sequences(fx, graphs[precision], seqs)
    cos = cosines(got, np.stack([long.vector, fx.vectors[0]]))
    assert cos.min() >= (0.9999 if precision == "fp32" else INT8_MIN), cos


def test_memory_is_planned_linear_in_length(fx: Fixture) -> None:
    """The pool's estimate: no [seq, seq] scores (GroupQueryAttention), the measured
    activation width per token, every weight; int8 smaller than fp32."""
    from embedpool.graph.families.catalog import DECODER_FFN_FACTOR

    mem, mem8 = model_memory(fx.model, "fp32"), model_memory(fx.model, "int8")
    assert mem is not None and mem8 is not None
    assert mem.score_keys == 0 and mem.max_seq == 8192
    assert mem.ffn == DECODER_FFN_FACTOR * fx.model.config["intermediate_size"]
    assert mem.weights >= 4 * 30_000 and mem8.weights < mem.weights


def test_fp16_graph_on_the_cpu_provider(fx: Fixture, tmp_path: Path) -> None:
    """The GPU graph (encoder in float16, GroupQueryAttention included; head in float32),
    run on ONNX Runtime's CPU provider: cos >= 0.999 against the reference."""
    path = prepare_onnx(fx.model, "fp16", tmp_path)
    graph = onnx.load(str(path))
    gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    cos = cosines(run_graph(graph, fx), fx.vectors)
    assert cos.min() >= 0.999, cos


# --- through the pool, the CLI, serve and Ray -------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(("name", "precision"), [("qwen3", "fp32"), ("qwen2", "int8")])
def test_ray_backend_matches_reference(
    ray_cluster: Any, tmp_path: Path, name: str, precision: str
) -> None:
    """The Ray backend's actors build and run the same graph: equal to the reference (int8:
    within its bar), plain and with the query prompt."""
    from embedpool.job import Embedder

    fx = load_fixture(name)
    with Embedder(fx.model, precision=precision, backend="ray") as e:
        embedder_matches_reference(e, fx, precision)


@pytest.mark.slow
def test_pool_matches_reference_with_prompts(
    fx: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real pool worker (it builds and caches the graph): the padded batch, the query
    prompt by name, Matryoshka dimensions, and the long text."""
    from embedpool.job import Embedder

    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path))
    long = load_long_golden(fx.model.directory.parent.name)
    with Embedder(fx.model, precision="fp32", workers=1) as e:
        embedder_matches_reference(e, fx)
        got = e.embed(["x", long.text])
        assert e.last_report.truncated == 0
        assert cosines(got[1:], long.vector[None])[0] >= 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cli_embeds_with_the_query_prompt(fx: Fixture, tmp_path: Path, precision: str) -> None:
    meets_bar(cosines(cli_embed_query(fx, tmp_path, precision), fx.query_vectors), precision)


@pytest.mark.slow
def test_serve_answers_the_openai_client(tmp_path: Path) -> None:
    """``embedpool serve`` on 127.0.0.1 with a pool worker, asked by the official openai
    client: plain texts and ``prompt_name: query``, both equal to the reference."""
    serve_matches_reference(load_fixture("qwen3"), tmp_path)


@pytest.mark.slow
def test_serve_int8_applies_the_prompt_by_input_type(fx: Fixture, tmp_path: Path) -> None:
    """Each family's int8 graph through ``serve``, its query prompt (Qwen3's ``Instruct:
    ...\nQuery:``, jina-code's) chosen by ``input_type: query``: within the int8 bar."""
    serve_matches_reference(fx, tmp_path, "int8", prompt_field="input_type")


# --- refusals that teach -------------------------------------------------------------------

DROP = object()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.*'yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.*'linear'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type = 'llama3'"),
        (
            {"rope_parameters": {"rope_theta": 1e6, "factor": 2.0}},
            r"rope_parameters keys \['factor'\]",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window = True"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"mlp_bias": True}, "mlp_bias = True"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention = True"),
        ({"is_causal": "no"}, "is_causal = 'no'"),
        ({"num_key_value_heads": 3}, "not a multiple of 3 key/value heads"),
        ({"head_dim": 15}, "head_dim 15 is not even"),
        ({"num_hidden_layers": DROP}, "missing or bad .* field"),
    ],
    ids=[
        "yarn",
        "linear-legacy",
        "llama3",
        "rope-extra-key",
        "partial-rotary",
        "sliding",
        "sliding-layer",
        "mlp-bias",
        "gelu",
        "bidirectional-flag",
        "bad-is-causal",
        "kv-heads",
        "odd-head-dim",
        "missing-layers",
    ],
)
def test_unhonoured_config_is_refused(fx: Fixture, change: dict[str, Any], match: str) -> None:
    cfg = {k: v for k, v in {**fx.model.config, **change}.items() if v is not DROP}
    with pytest.raises(ModelError, match=match):
        family_for(cfg).parse_config(cfg, "config.json")


def test_mistral_sliding_window_is_refused() -> None:
    cfg = {
        "model_type": "mistral",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 48,
        "sliding_window": 4096,
    }
    with pytest.raises(ModelError, match="sliding_window = 4096"):
        qwen2.parse_config(cfg)


def test_refusal_names_the_way_out(tmp_path: Path) -> None:
    """Refused at resolution already (before any worker or build), naming the field, the
    families embedpool builds and the onnx/model.onnx route."""
    directory = copy_model("qwen3", tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelError) as err:
        resolve_model(directory)
    msg = str(err.value)
    assert f"{directory / 'config.json'}: rope_scaling" in msg and "'yarn'" in msg
    assert (
        "onnx/model.onnx" in msg
        and "qwen3 (qwen3)" in msg
        and "qwen2 (llama, mistral, qwen2)" in msg
    )


@pytest.mark.slow
def test_cli_refuses_an_unhonoured_field_in_one_line(tmp_path: Path) -> None:
    directory = copy_model("qwen3", tmp_path, use_sliding_window=True, sliding_window=16)
    res = subprocess.run(
        [
            *CLI,
            "embed",
            str(jsonl(tmp_path / "t.jsonl", ["a"])),
            "--out",
            str(tmp_path / "o.npy"),
            "--model",
            str(directory),
            "--workers",
            "1",
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=cache_env(tmp_path / "cache"),
    )
    assert res.returncode == 2, res.stderr
    assert "use_sliding_window = True" in res.stderr and "Traceback" not in res.stderr


# --- the known decoders ----------------------------------------------------------------------


def test_models_lists_the_known_decoders_with_prompts_and_memory() -> None:
    """``embedpool models``: each known decoder with its family, its code-search prompt and
    its weights at every precision (fp32 4, fp16 2, int8 1 byte a parameter)."""
    from click.testing import CliRunner

    from embedpool.cli import main
    from embedpool.models.known import find_known

    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    for name, family in (
        ("Qwen3-Embedding-0.6B", "qwen3"),
        ("Qwen3-Embedding-4B", "qwen3"),
        ("Qwen3-Embedding-8B", "qwen3"),
        ("jina-code-embeddings-0.5b", "qwen2"),
        ("jina-code-embeddings-1.5b", "qwen2"),
        ("gte-Qwen2-1.5B-instruct", "qwen2"),
    ):
        km = find_known(name)
        assert km is not None and km.family == family and km.params is not None
        line = lines[name]
        assert f" {family} " in line and "weights fp32 " in line and ", int8 " in line
        assert "code" in dict(km.prompts)["query"] and "code" in line
    qwen06 = find_known("Qwen3-Embedding-0.6B")
    assert qwen06 is not None and qwen06.params is not None
    assert 590e6 < qwen06.params < 600e6  # the card's 0.6B, from the config's shapes
    assert qwen06.weight_bytes("fp32") == 4 * qwen06.params == 4 * qwen06.weight_bytes("int8")  # type: ignore[operator]


# --- memory planned before work --------------------------------------------------------------


def test_a_model_that_cannot_fit_at_any_precision_is_refused_before_work(fx: Fixture) -> None:
    """Its int8 weights alone (one byte a parameter) exceed what is available: refused,
    naming the memory each precision needs; one byte more and it is left to the planner."""
    from embedpool.graph.prebuild import check_runnable
    from embedpool.graph.weights import tensor_infos

    params = sum(int(np.prod(i.shape)) for i in tensor_infos(fx.model.weights_path).values())
    with pytest.raises(
        ModelError,
        match=r"cannot run in the memory available here .*int8, one "
        r"byte a parameter\) are .*fp32",
    ):
        check_runnable(fx.model, params - 1)
    check_runnable(fx.model, params)
    check_runnable(fx.model, None)


@pytest.mark.slow
def test_cli_refuses_a_model_that_cannot_fit_in_one_line(tmp_path: Path) -> None:
    fx = load_fixture("qwen3")
    res = subprocess.run(
        [
            *CLI,
            "embed",
            str(jsonl(tmp_path / "t.jsonl", ["a"])),
            "--out",
            str(tmp_path / "o.npy"),
            "--model",
            str(fx.model.directory),
            "--max-memory",
            "1M",
            "--workers",
            "1",
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=cache_env(tmp_path / "cache"),
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot run in the memory available here" in lines[0], res.stderr
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # refused before any build


def test_large_graphs_map_their_weights_from_an_aligned_side_file(tmp_path: Path) -> None:
    """graph.external: the weights in ``<graph>.data`` at page-aligned offsets (what ONNX
    Runtime memory-maps, so workers share them), loaded by the engine without pre-packing;
    the same vectors as the one-file graph."""
    from embedpool.engine import Engine
    from embedpool.graph import external

    fx = load_fixture("qwen3")
    fam, cfg = _family(fx.model)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    one = tmp_path / "one.onnx"
    assert not external.save(compose(fam, weights, cfg, fx.model.head), one, one)
    assert not external.has_external_data(one)
    final = tmp_path / "mapped.onnx"
    graph = compose(fam, weights, cfg, fx.model.head)
    assert external.save(graph, tmp_path / "tmp.onnx", final, min_bytes=0, tensor_min=1024)
    (tmp_path / "tmp.onnx").rename(final)
    assert external.has_external_data(final)
    moved = [
        t
        for t in onnx.load(str(final), load_external_data=False).graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert len(moved) >= 2 * int(cfg.num_layers)
    assert all(
        int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in moved
    )
    assert final.stat().st_size < one.stat().st_size // 4
    from embedpool.graph.prebuild import built_graphs  # doctor's list counts the side file

    data_bytes = external.data_path(final).stat().st_size
    assert dict(built_graphs(tmp_path))["mapped.onnx"] == final.stat().st_size + data_bytes
    seqs = TextTokenizer.for_model(fx.model).encode(fx.texts).sequences
    a = Engine.for_model(one, fx.model, threads=1).embed(seqs)
    b = Engine.for_model(final, fx.model, threads=1).embed(seqs)
    assert np.array_equal(a, b)


def test_ray_ships_a_large_graphs_weights_side_file(tmp_path: Path) -> None:
    """A graph written with external data travels to Ray nodes with its side file, and the
    shipment names the graph itself (the engine loads it from the node's copy)."""
    from embedpool.engine import Engine
    from embedpool.executors.ray.shipping import ship_model, write_files
    from embedpool.graph import external

    fx = load_fixture("qwen3")
    fam, cfg = _family(fx.model)
    graph = compose(fam, fam.load_weights(fx.model.weights_path, cfg), cfg, fx.model.head)
    final = tmp_path / "driver" / "g.onnx"
    final.parent.mkdir()
    assert external.save(
        graph, tmp_path / "driver" / "tmp.onnx", final, min_bytes=0, tensor_min=1024
    )
    (tmp_path / "driver" / "tmp.onnx").rename(final)

    class Spec:
        def graph(self) -> Path:
            return final

    class ObjectStore:
        def put(self, files: dict[str, bytes]) -> dict[str, bytes]:
            return files

    shipment = ship_model(Spec(), ObjectStore())  # type: ignore[arg-type]
    assert [rel for rel, _ in shipment.manifest] == ["g.onnx", "g.onnx.data"]
    assert shipment.graph_name == "g.onnx"
    node = tmp_path / "node"
    write_files(node, shipment.payload[0], shipment.manifest)
    seqs = TextTokenizer.for_model(fx.model).encode(fx.texts).sequences
    got = Engine.for_model(node / shipment.graph_name, fx.model, threads=1).embed(seqs)
    assert cosines(got, fx.vectors).min() >= 0.9999
