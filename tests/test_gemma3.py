"""Gemma 3 text (EmbeddingGemma) against its reference implementation, without torch.

The fixture (tests/fixtures/families/gemma3/, scripts/make_gemma_fixture.py) is a small
random-weight ``Gemma3TextModel`` with bidirectional attention, local layers with a 16-token
window (keys within 8 positions) next to a global one, multi-query attention, ``head_dim``
apart from ``hidden / heads`` and ``query_pre_attn_scalar`` apart from ``head_dim``, saved by
sentence-transformers 6 with mean pooling, two Dense modules and Normalize, and
EmbeddingGemma's prompts. Goldens: the texts in one padded batch (plain and with the
``query`` prompt), and one text of 4,127 tokens at max length 8,192 (``long.*``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import pytest
from family_support import (
    CLI,
    F32,
    FIXTURES,
    Fixture,
    LongFixture,
    cache_env,
    checked_unfused_graph,
    cli_embed_query,
    copy_model,
    cosines,
    embed,
    embed_alone,
    embedder_matches_reference,
    encoder_graph,
    free_port,
    load_fixture,
    load_long_golden,
    long_cosine,
    meets_bar,
    openai_vectors,
    padding_cosines,
    prepare_graphs,
    prompted,
    run_graph,
    serve_matches_reference,
)

from embedpool.errors import ModelError
from embedpool.graph import _family, prepare_onnx
from embedpool.graph.compose import compose
from embedpool.graph.families import gemma3
from embedpool.graph.families.catalog import family_for, model_memory, parse_config
from embedpool.models import resolve_model
from embedpool.tokenization import TextTokenizer

NAME = "gemma3"
#: A Ray server's start: joining the cluster, shipping the model, the actor's graph build.
RAY_START_S = 240.0


@pytest.fixture(scope="module")
def fx() -> Fixture:
    return load_fixture(NAME)


@pytest.fixture(scope="module")
def graphs(fx: Fixture, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepare_graphs(fx.model, tmp_path_factory.mktemp("onnx"))


# --- fidelity --------------------------------------------------------------------------------


def test_tokens_match_the_reference_tokenizer(fx: Fixture) -> None:
    """Gemma's template: every text in <bos> (2) ... <eos> (1), the last one truncated to the
    max length with <eos> kept last."""
    seqs = TextTokenizer(fx.model.tokenizer_path, fx.model.max_length).encode(fx.texts).sequences
    assert [list(map(int, s)) for s in seqs] == fx.input_ids
    assert all(ids[0] == 2 and ids[-1] == 1 for ids in fx.input_ids)
    assert len(fx.input_ids[-1]) == fx.model.max_length == 128


def test_fp32_matches_reference_in_a_padded_batch(fx: Fixture, graphs: dict[str, Path]) -> None:
    """One text of one token ("x": <bos> x <eos>) padded next to a 128-token one, and
    everything between."""
    assert min(len(i) for i in fx.input_ids) == 3
    cos = cosines(embed(fx.model, graphs["fp32"], fx.texts), fx.vectors)
    assert cos.min() >= 0.9999, cos


def test_query_prompt_matches_reference(fx: Fixture, graphs: dict[str, Path]) -> None:
    """EmbeddingGemma's ``query`` prompt ('task: search result | query: '), as
    sentence-transformers prepends it."""
    assert dict(fx.model.text.prompts)["query"] == "task: search result | query: "
    cos = cosines(embed(fx.model, graphs["fp32"], prompted(fx)), fx.query_vectors)
    assert cos.min() >= 0.9999, cos


def test_int8_matches_reference(fx: Fixture, graphs: dict[str, Path]) -> None:
    """issue 11's int8 bar against the reference: mean >= 0.99, every vector >= 0.97."""
    meets_bar(cosines(embed(fx.model, graphs["int8"], fx.texts), fx.vectors), "int8")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vector_ignores_batch_neighbours(
    fx: Fixture, graphs: dict[str, Path], precision: str
) -> None:
    assert padding_cosines(fx.model, graphs[precision], fx.texts).min() >= 0.99999


def test_unfused_graph_matches_reference(fx: Fixture) -> None:
    """The standard-ops flavour (the benchmark baseline): same vectors, ONNX checker with full
    type inference, no contrib op."""
    graph = checked_unfused_graph(fx)
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in graph.graph.node}
    cos = cosines(run_graph(graph, fx), fx.vectors)
    assert cos.min() >= 0.9999, cos


def test_fp32_graph_uses_the_fused_kernels(graphs: dict[str, Path]) -> None:
    graph = onnx.load(str(graphs["fp32"]))
    ops = {n.op_type for n in graph.graph.node}
    want = {
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RotaryEmbedding",
        "MultiHeadAttention",
        "FastGelu",
    }
    assert want <= ops, want - ops
    assert not ops & {"Tanh", "ReduceMean", "Erf"}
    mha = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention"]
    # the global layer, mask-free (FlashAttention); each local layer an If between the same
    # FlashAttention (the sequence fits one window) and block-local attention
    assert len(mha) == 1 and len(mha[0].input) == 3, [list(n.input) for n in mha]
    ifs = [n for n in graph.graph.node if n.op_type == "If"]
    assert len(ifs) == 3
    for node in ifs:
        branches = {a.name: {n.op_type for n in a.g.node} for a in node.attribute}
        assert "MultiHeadAttention" in branches["then_branch"]
        assert "MultiHeadAttention" not in branches["else_branch"]


def test_both_window_branches_match_reference(fx: Fixture, graphs: dict[str, Path]) -> None:
    """Each text alone: those within one window (at most 9 tokens here) run the local layers'
    FlashAttention branch, the others the block-local one; all equal the reference."""
    half = gemma3.parse_config(fx.model.config).window_half
    lengths = [len(ids) for ids in fx.input_ids]
    assert min(lengths) <= half + 1 < max(lengths)
    cos = cosines(embed_alone(fx.model, graphs["fp32"], fx.texts), fx.vectors)
    assert cos.min() >= 0.9999, cos


@pytest.mark.parametrize("kind", ["mha", "plain"])
def test_attention_variants_match_reference(fx: Fixture, kind: str) -> None:
    """The benchmark alternatives in the fused graph: masked MultiHeadAttention with a
    [seq, seq] window bias, and Softmax attention in standard ops."""
    fam, cfg = _family(fx.model)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    graph = encoder_graph(fam, weights, cfg, fx, attention=kind)
    cos = cosines(run_graph(graph, fx), fx.vectors)
    assert cos.min() >= 0.9999, cos


@pytest.mark.openvino
def test_openvino_matches_reference(fx: Fixture, tmp_path: Path) -> None:
    """The second engine reads the unfused graph (engine_openvino.graph_for): the padded batch
    and the query prompt equal the reference there too."""
    from embedpool.engine import EngineSpec
    from embedpool.engine_openvino import OpenVinoEngine, graph_for

    engine = OpenVinoEngine.for_spec(
        EngineSpec(fx.model, "fp32", 1, runtime="openvino"), graph_for(fx.model, tmp_path)
    )
    tok = TextTokenizer(fx.model.tokenizer_path, fx.model.max_length)
    for texts, want in ((fx.texts, fx.vectors), (prompted(fx), fx.query_vectors)):
        cos = cosines(engine.embed(tok.encode(texts).sequences), want)
        assert cos.min() >= 0.9999, cos


# --- what the fixture pins down --------------------------------------------------------------


def _variant(fx: Fixture, **changes: Any) -> F32:
    fam, cfg = _family(fx.model)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    graph = compose(fam, weights, dataclasses.replace(cfg, **changes), fx.model.head)
    return run_graph(graph, fx)


def test_the_window_matters(fx: Fixture) -> None:
    """Texts longer than the window would get other vectors from a graph that ignored it
    (every layer global), and from one that took the window as config.json's 16 instead of
    transformers' bidirectional 16 // 2: both are tested, not assumed."""
    cfg = gemma3.parse_config(fx.model.config)
    assert cfg.window_half == 8
    long_texts = [i for i, ids in enumerate(fx.input_ids) if len(ids) > 2 * cfg.window_half + 1]
    assert len(long_texts) >= 4
    everywhere_global = _variant(fx, layer_types=("full_attention",) * cfg.num_layers)
    assert cosines(everywhere_global, fx.vectors)[long_texts].max() < 0.999
    double_window = _variant(fx, sliding_window=2 * cfg.sliding_window)
    assert cosines(double_window, fx.vectors)[long_texts].max() < 0.9999


def test_a_window_wider_than_the_positions_is_global(fx: Fixture) -> None:
    """A local window that spans every position the model has (sliding_window 300: keys
    within 150 of 128 positions) is built as global attention, no If and no blocks; the same
    vectors as masked attention with the window as a [seq, seq] bias (positions raised so
    that the window is kept)."""
    fam, cfg = _family(fx.model)
    weights = fam.load_weights(fx.model.weights_path, cfg)
    wide = dataclasses.replace(cfg, sliding_window=300)
    graph = compose(fam, weights, wide, fx.model.head)
    assert "If" not in {n.op_type for n in graph.graph.node}
    masked = encoder_graph(
        fam, weights, dataclasses.replace(wide, max_positions=512), fx, attention="mha"
    )
    assert "Abs" in {n.op_type for n in masked.graph.node}  # the window bias is there
    assert cosines(run_graph(graph, fx), run_graph(masked, fx)).min() >= 0.99999


def test_the_score_scale_and_rotary_bases_matter(fx: Fixture) -> None:
    """query_pre_attn_scalar (20) is not head_dim (24), and the two rotary bases differ: a
    graph that scaled by head_dim, or swapped the bases, would miss the goldens."""
    cfg = gemma3.parse_config(fx.model.config)
    assert (cfg.query_pre_attn_scalar, cfg.head_dim) == (20, 24)
    by_head_dim = _variant(fx, query_pre_attn_scalar=float(cfg.head_dim))
    assert cosines(by_head_dim, fx.vectors).min() < 0.9999
    swapped = _variant(fx, global_theta=cfg.local_theta, local_theta=cfg.global_theta)
    assert cosines(swapped, fx.vectors).min() < 0.9999


def test_hub_config_format(tmp_path: Path) -> None:
    """EmbeddingGemma's own config.json (transformers 4.57): ``rope_theta`` and
    ``rope_local_base_freq`` instead of ``rope_parameters``, and the layer types from
    ``sliding_window_pattern`` (3 here: local, local, global, local, as the fixture's
    ``layer_types``). Same weights, same vectors."""
    cfg = json.loads((FIXTURES / NAME / "model" / "config.json").read_text())
    rope = cfg["rope_parameters"]
    directory = copy_model(
        NAME,
        tmp_path,
        rope_parameters=None,
        layer_types=None,
        sliding_window_pattern=3,
        rope_scaling=None,
        rope_theta=rope["full_attention"]["rope_theta"],
        rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
    )
    hub = load_fixture(NAME, directory)
    assert gemma3.parse_config(hub.model.config) == gemma3.parse_config(cfg)
    got = embed(hub.model, prepare_onnx(hub.model, "fp32", tmp_path / "cache"), hub.texts)
    assert cosines(got, hub.vectors).min() >= 0.9999


def test_a_causal_lm_checkpoint_layout_loads(tmp_path: Path, fx: Fixture) -> None:
    """A ``Gemma3ForCausalLM`` save prefixes every key with ``model.``: the same model."""
    from safetensors.numpy import load_file, save_file

    directory = copy_model(NAME, tmp_path)
    weights = load_file(str(directory / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in weights.items()}, str(directory / "model.safetensors"))
    moved = load_fixture(NAME, directory)
    got = embed(moved.model, prepare_onnx(moved.model, "fp32", tmp_path / "cache"), fx.texts)
    assert cosines(got, fx.vectors).min() >= 0.9999


def test_lm_head_only_fields_change_nothing(fx: Fixture) -> None:
    """final_logit_softcapping and tie_word_embeddings act on a language-model head, which
    Gemma3TextModel has not: accepted, and the parsed config (what the graph is built from)
    is the same."""
    changed = {**fx.model.config, "final_logit_softcapping": 30.0, "tie_word_embeddings": False}
    assert gemma3.parse_config(changed) == gemma3.parse_config(fx.model.config)


def test_no_fp16_graph_and_a_gpu_runs_fp32(fx: Fixture, tmp_path: Path) -> None:
    """EmbeddingGemma's card: its activations do not support float16. No fp16 graph is built
    (the refusal says why); a GPU placement under ``auto`` runs fp32 and an explicit fp16 is
    refused before any work."""
    from embedpool.device_choice import DevicePlan, DeviceRequest, Gpu
    from embedpool.errors import ConfigError
    from embedpool.graph import model_precisions
    from embedpool.placement import place

    assert model_precisions(fx.model) == ("fp32", "int8")
    with pytest.raises(
        ConfigError, match=r"no fp16 graph of a gemma3 model: .*do not support float16"
    ):
        prepare_onnx(fx.model, "fp16", tmp_path)
    assert not list(tmp_path.iterdir())
    gpu = Gpu(0, "NVIDIA H200", 141 * 2**30, 140 * 2**30)
    cuda = DevicePlan("cuda", (gpu,), "test", DeviceRequest("cuda"))
    assert place(fx.model, plan=cuda, cpus=16).precision == "fp32"
    with pytest.raises(ConfigError, match="makes only fp32, int8 for this model"):
        place(fx.model, plan=cuda, cpus=16, precision="fp16")


def test_known_model_lists_its_prompts_and_memory() -> None:
    """``embedpool models``: embeddinggemma-300m with its family, its prompts (the code-search
    one among them), its Matryoshka widths and its weights at fp32 and int8, not fp16; every
    known model of a family without fp16 graphs says so."""
    from click.testing import CliRunner

    from embedpool.cli import main
    from embedpool.graph.families.catalog import FAMILIES
    from embedpool.models import KNOWN_MODELS
    from embedpool.models.known import find_known

    km = find_known("google/embeddinggemma-300m")
    assert km is not None and km.params is not None and 300e6 < km.params < 310e6  # "308M"
    assert dict(km.prompts)["InstructionRetrieval"] == "task: code retrieval | query: "
    assert km.weight_bytes("fp16") is None and km.weight_bytes("int8") == km.params
    unsafe = {t for fam in FAMILIES if getattr(fam, "FP16_UNSAFE", "") for t in fam.MODEL_TYPES}
    assert all(not k.fp16 for k in KNOWN_MODELS if k.family in unsafe)
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("embeddinggemma-300m "))
    assert " gemma3_text " in line and "task: code retrieval | query: " in line
    assert "matryoshka 768,512,256,128" in line and "weights fp32 " in line
    assert ", int8 " in line and "fp16" not in line


# --- long context ----------------------------------------------------------------------------


def load_long(tmp: Path) -> LongFixture:
    """The fixture with its positions and max length raised to 8,192 (as the script raised
    them for the reference), and the long text's golden."""
    long = load_long_golden(NAME)
    directory = copy_model(NAME, tmp, max_position_embeddings=long.max_seq_length)
    tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = long.max_seq_length
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    model = resolve_model(directory)
    assert model.max_length == 8192
    return LongFixture(model, long.text, long.input_ids, long.vector)


@pytest.fixture(scope="module")
def long_fx(tmp_path_factory: pytest.TempPathFactory) -> LongFixture:
    return load_long(tmp_path_factory.mktemp("long"))


def test_long_text_is_one_untruncated_sequence(long_fx: LongFixture) -> None:
    enc = TextTokenizer(long_fx.model.tokenizer_path, long_fx.model.max_length).encode(
        [long_fx.text]
    )
    assert len(long_fx.input_ids) >= 4096
    assert [list(map(int, s)) for s in enc.sequences] == [long_fx.input_ids]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_long_text_matches_reference(
    long_fx: LongFixture, tmp_path_factory: pytest.TempPathFactory, precision: str
) -> None:
    """4,127 tokens: rotary positions thousands out, windows far from the start, the global
    layer's FlashAttention over every key; padded in a batch next to a one-token text."""
    path = prepare_onnx(long_fx.model, precision, tmp_path_factory.mktemp("long-onnx"))  # type: ignore[arg-type]
    cos = long_cosine(long_fx.model, path, long_fx)
    assert cos >= (0.9999 if precision == "fp32" else 0.97), cos


def test_memory_is_planned_linear_in_length(long_fx: LongFixture) -> None:
    """The pool's estimate: block-local keys (3 x the half-window) per query, not [seq, seq]."""
    mem = model_memory(long_fx.model, "fp32")
    assert mem is not None and mem.max_seq == 8192 and mem.score_keys == 3 * 8


def test_memory_estimate_counts_the_dense_modules(fx: Fixture) -> None:
    """The graph holds the head's Dense modules too (EmbeddingGemma's two are 18 MiB of
    fp32): the weights the pool plans for include each module's float tensors."""
    from safetensors.numpy import load_file

    assert len(fx.model.head.dense) == 2
    bare = dataclasses.replace(fx.model, head=dataclasses.replace(fx.model.head, dense=()))
    dense_bytes = 4 * sum(
        t.size for d in fx.model.head.dense for t in load_file(d.weights).values()
    )
    with_dense, without = model_memory(fx.model, "fp32"), model_memory(bare, "fp32")
    assert with_dense is not None and without is not None
    assert with_dense.weights - without.weights == dense_bytes > 0


# --- through the pool, the CLI and serve -----------------------------------------------------


@pytest.mark.slow
def test_pool_matches_reference_with_prompts(
    fx: Fixture, long_fx: LongFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real pool worker (it builds and caches the graph): the padded batch, the query
    prompt by name, and the long text under the default token budget."""
    from embedpool.job import Embedder

    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path))
    with Embedder(fx.model, precision="fp32", workers=1) as e:
        embedder_matches_reference(e, fx)
    with Embedder(long_fx.model, precision="int8", workers=1) as e:
        got = e.embed(["short", long_fx.text])
        assert e.last_report.truncated == 0
    assert cosines(got[1:], long_fx.vector[None])[0] >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cli_embeds_with_the_query_prompt(fx: Fixture, tmp_path: Path, precision: str) -> None:
    meets_bar(cosines(cli_embed_query(fx, tmp_path, precision), fx.query_vectors), precision)


@pytest.mark.slow
def test_serve_answers_the_openai_client(fx: Fixture, tmp_path: Path) -> None:
    """``embedpool serve`` on 127.0.0.1 with a pool worker, asked by the official openai
    client: plain texts and ``prompt_name: query``, both equal to the reference."""
    serve_matches_reference(fx, tmp_path)


@pytest.mark.slow
def test_serve_int8_applies_the_prompt_by_input_type(fx: Fixture, tmp_path: Path) -> None:
    """The int8 graph through ``serve``, EmbeddingGemma's query prompt (``task: search result
    | query: ``) chosen by ``input_type: query``: within the int8 bar."""
    serve_matches_reference(fx, tmp_path, "int8", prompt_field="input_type")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_backend_int8_matches_reference(fx: Fixture, ray_cluster: ModuleType) -> None:
    """The Ray backend's actors build the int8 graph: within its bar, plain and with the
    query prompt by name."""
    from embedpool.job import Embedder

    with Embedder(fx.model, precision="int8", backend="ray") as e:
        embedder_matches_reference(e, fx, "int8")


@pytest.mark.slow
@pytest.mark.ray
def test_serve_on_ray_answers_the_openai_client(
    fx: Fixture, ray_cluster: ModuleType, tmp_path: Path
) -> None:
    """``embedpool serve --backend ray`` joining the session's Ray cluster: the model's files
    travel to the actors, which build the graph; plain and query-prompt vectors equal the
    reference."""
    import httpx

    address = os.environ.get("RAY_ADDRESS") or ray_cluster.get_runtime_context().gcs_address
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--backend",
            "ray",
            "--ray-address",
            address,
            "--model",
            str(fx.model.directory),
            "--precision",
            "fp32",
            "--workers",
            "1",
            "--port",
            str(port),
            "--no-cache",
            "--log-level",
            "warning",
        ],
        env=cache_env(tmp_path / "cache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RAY_START_S
        while True:  # bounded: the deadline, or the server's exit
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the Ray server did not get ready"
            time.sleep(0.2)
        for got, want in openai_vectors(f"{url}/v1", fx):
            assert cosines(got, want).min() >= 0.9999
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# --- refusals that teach -------------------------------------------------------------------

DROP = object()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_bidirectional_attention": False}, "use_bidirectional_attention is False"),
        ({"use_bidirectional_attention": DROP}, "use_bidirectional_attention is None"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}},
            "rope_type 'yarn'",
        ),
        (
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "factor": 2.0}}},
            r"rope_parameters.full_attention keys \['factor'\]",
        ),
        ({"layer_types": ["full_attention", "chunked_attention"] * 2}, "layer_types"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"sliding_window": None}, "sliding_window None"),
        ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
        ({"head_dim": 25}, "head_dim 25"),
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    ],
    ids=[
        "causal",
        "causal-by-default",
        "softcap",
        "bias",
        "silu",
        "rope-scaling",
        "yarn",
        "rope-extra-key",
        "layer-type",
        "layer-count",
        "null-window",
        "kv-heads",
        "odd-head-dim",
        "zero-scalar",
    ],
)
def test_unhonoured_config_is_refused(fx: Fixture, change: dict[str, Any], match: str) -> None:
    cfg = {k: v for k, v in {**fx.model.config, **change}.items() if v is not DROP}
    with pytest.raises(ModelError, match=match):
        family_for(cfg).parse_config(cfg, "config.json")


def test_refusal_names_the_way_out(fx: Fixture) -> None:
    cfg = {**fx.model.config, "attn_logit_softcapping": 50.0}
    with pytest.raises(ModelError) as err:
        parse_config(cfg, "x/config.json")
    msg = str(err.value)
    assert "x/config.json: attn_logit_softcapping 50.0" in msg
    assert "onnx/model.onnx" in msg and "gemma3 (gemma3_text)" in msg


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    directory = copy_model(NAME, tmp_path, head_dim=16)
    model = resolve_model(directory)
    fam, cfg = _family(model)
    with pytest.raises(
        ModelError,
        match=r"self_attn.q_proj.weight is \[48, 32\], config.json "
        r"implies \[32, 32\]",
    ):
        fam.load_weights(model.weights_path, cfg)
    shutil.rmtree(directory)
