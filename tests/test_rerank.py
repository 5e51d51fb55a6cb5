"""Rerank: cross-encoders (BERT, XLM-R, ModernBERT, Qwen3-Reranker) against sentence-transformers'
CrossEncoder.predict goldens (tests/fixtures/rerankers, scripts/make_reranker_fixtures.py),
the pair tokenisation and truncation rule, the activation rules, the cache, and a real pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engines import ENGINES

from embedpool.errors import ConfigError, InputError, ModelError
from embedpool.models import ResolvedModel, resolve_model
from embedpool.models.crossencoder import classifier_spec, score_activation
from embedpool.rerank import PairTokenizer, Ranked, Reranker, activate

FIXTURES = Path(__file__).parent / "fixtures" / "rerankers"
FAMILIES = ("bert", "xlmr", "modernbert")
FP32_TOL = 1e-4


def golden(name: str) -> tuple[dict[str, Any], Any]:
    d = FIXTURES / name
    return json.loads((d / "golden.json").read_text()), np.load(d / "golden.npz")


def pairs_of(g: dict[str, Any]) -> list[tuple[str, str]]:
    return [(q, d) for q in g["queries"] for d in g["documents"]]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def models() -> dict[str, ResolvedModel]:
    return {n: resolve_model(FIXTURES / n / "model") for n in FAMILIES}


@pytest.fixture(scope="module", params=ENGINES)
def fp32(models: dict[str, ResolvedModel], request: pytest.FixtureRequest) -> Any:
    """The fp32 rerankers on each engine (the engine is a test parameter)."""
    rerankers = {n: Reranker(m, precision="fp32", runtime=request.param) for n, m in models.items()}
    assert all(r.placement.runtime == request.param for r in rerankers.values())
    yield rerankers
    for r in rerankers.values():
        r.close()


# --- the model's files, read as CrossEncoder reads them -------------------------------------


def test_classifier_specs_follow_the_layouts(models: dict[str, ResolvedModel]) -> None:
    bert, xlmr, modern = (models[n].classifier for n in FAMILIES)
    assert bert is not None and xlmr is not None and modern is not None
    # ms-marco layout: pre-v4 config key says Identity; BertTokenizer-like token types
    assert (bert.kind, bert.activation, bert.token_types) == ("pooler", "identity", True)
    # CrossEncoder 6.3's own save: Sigmoid in config_sentence_transformers.json, no types
    assert (xlmr.kind, xlmr.activation, xlmr.token_types) == ("roberta", "sigmoid", False)
    # nothing saved: num_labels 1 -> Sigmoid; ModernBERT's mean pooling read from config
    assert (modern.kind, modern.activation, modern.pooling) == ("modernbert", "sigmoid", "mean")
    for n in FAMILIES:
        g, _ = golden(n)
        assert models[n].dim == 1
        assert models[n].max_length == g["max_length"]
        expected = {"Identity": "identity", "Sigmoid": "sigmoid"}[g["activation"]]
        assert models[n].classifier.activation == expected  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("st_cfg", "config", "labels", "expected"),
    [
        ({"activation_fn": "torch.nn.modules.linear.Identity"}, {}, 1, "identity"),
        (
            {},
            {"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}},
            1,
            "tanh",
        ),
        (
            {},
            {"sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"},
            3,
            "sigmoid",
        ),
        # a path outside torch is not trusted: CrossEncoder warns and uses its default
        ({"activation_fn": "mypkg.Custom"}, {}, 1, "sigmoid"),
        ({}, {}, 1, "sigmoid"),
        ({}, {}, 2, "identity"),
    ],
)
def test_activation_is_chosen_as_crossencoder_chooses(
    st_cfg: dict[str, Any], config: dict[str, Any], labels: int, expected: str
) -> None:
    assert score_activation(config, st_cfg, labels, Path("x")) == expected


def test_an_activation_embedpool_cannot_apply_is_refused() -> None:
    with pytest.raises(ModelError, match="Softplus"):
        score_activation(
            {}, {"activation_fn": "torch.nn.modules.activation.Softplus"}, 1, Path("x")
        )


def test_token_types_follow_the_tokenizer_class() -> None:
    config = {
        "architectures": ["BertForSequenceClassification"],
        "num_labels": 1,
        "type_vocab_size": 2,
    }
    assert classifier_spec(config, {"tokenizer_class": "BertTokenizer"}, {}, Path("x")).token_types
    assert not classifier_spec(
        config, {"tokenizer_class": "PreTrainedTokenizerFast"}, {}, Path("x")
    ).token_types
    with pytest.raises(ModelError, match="DebertaV2ForSequenceClassification"):
        classifier_spec(
            {**config, "architectures": ["DebertaV2ForSequenceClassification"]}, {}, {}, Path("x")
        )


# --- pairs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_pair_tokens_equal_the_reference(name: str, models: dict[str, ResolvedModel]) -> None:
    g, _ = golden(name)
    enc = PairTokenizer.for_model(models[name]).encode(pairs_of(g))
    assert [s.tolist() for s in enc.sequences] == g["input_ids"]
    if g["token_type_ids"] is not None:  # BERT: the first segment ends where type 1 starts
        for seg, types in zip(enc.segments, g["token_type_ids"], strict=True):
            assert types == [0] * seg + [1] * (len(types) - seg)


def test_a_query_that_leaves_no_room_is_refused(models: dict[str, ResolvedModel]) -> None:
    tok = PairTokenizer.for_model(models["bert"])
    with pytest.raises(InputError, match="window of 64 tokens"):
        tok.encode([("word " * 80, "a document")])


# --- scores against CrossEncoder.predict ----------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_equals_crossencoder(name: str, fp32: dict[str, Reranker]) -> None:
    g, gold = golden(name)
    r = fp32[name]
    pairs = pairs_of(g)
    logits = r.predict(pairs, raw=True)
    assert np.abs(logits - gold["logits"]).max() <= FP32_TOL
    scores = r.predict(pairs)
    assert np.abs(scores - gold["scores"]).max() <= FP32_TOL
    # the long document is cut (and reported) for every query; a short query loses nothing,
    # so CrossEncoder's longest_first cut the same tokens
    long_doc = g["documents"].index(max(g["documents"], key=len))
    cut = set(r.last_report.truncated)
    assert {i for i, (_, d) in enumerate(pairs) if d == g["documents"][long_doc]} <= cut
    assert all(len(g["input_ids"][i]) == g["max_length"] for i in cut)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_long_query_is_kept_whole(name: str, fp32: dict[str, Reranker]) -> None:
    """Where CrossEncoder would cut the query too, embedpool cuts only the document: the
    reference model on only_second-truncated pairs gives the same logits."""
    g, gold = golden(name)
    r = fp32[name]
    got = r.score(g["long_query"], g["long_query_documents"], raw=True)
    assert np.abs(got - gold["long_query_logits"]).max() <= FP32_TOL
    assert r.last_report.truncated == list(range(len(g["long_query_documents"])))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", FAMILIES)
def test_int8_keeps_the_rankings(name: str, engine: str, models: dict[str, ResolvedModel]) -> None:
    """Issue 19's bar: int8 against CrossEncoder's fp32 logits, Spearman >= 0.99 for every
    query (of 19 documents). The measurement means something only where a query's scores
    spread well beyond int8's rounding: the fixtures' heads read the pooled features' first
    principal component (train_like_head), so each query's logits spread (std >= 1, checked
    first) and no pair of documents is nearer than int8's error would swap by chance. On each
    engine: OpenVINO's int8 is its own recipe (graph.weight_int8)."""
    g, gold = golden(name)
    n = len(g["documents"])
    per_query = gold["logits"].reshape(len(g["queries"]), n)
    assert per_query.std(axis=1).min() >= 1.0, "fixture scores bunch: Spearman would be noise"
    with Reranker(models[name], precision="int8", runtime=engine) as r:
        assert (r.precision, r.placement.runtime) == ("int8", engine)
        scores = r.predict(pairs_of(g), raw=True).reshape(per_query.shape)
    rho = [spearman(s, ref) for s, ref in zip(scores, per_query, strict=True)]
    print(name, engine, "int8 Spearman per query:", [round(x, 4) for x in rho])
    assert min(rho) >= 0.99, rho
    # and no logit moves by more than a fifth of its query's spread
    assert (np.abs(scores - per_query).max(axis=1) / per_query.std(axis=1)).max() <= 0.2


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_classifier_keeps_its_last_layers_fp32(
    name: str, models: dict[str, ResolvedModel]
) -> None:
    """A cross-encoder's int8 graph: every encoder linear int8 but the last two layers' (at
    most half the layers: quantize.zero_points(classifier=True)); an embedder's recipe is
    unchanged by it."""
    from embedpool.graph import _family, quantize
    from embedpool.graph.compose import compose_parts

    model = models[name]
    fam, cfg = _family(model)
    parts = compose_parts(
        fam, fam.load_weights(model.weights_path, cfg), cfg, model.classifier, int8_ready=True
    )
    layers = 1 + max(lin.layer for lin in parts.linears)
    embedder = quantize.zero_points(parts.linears)
    assert {lin.layer for lin in parts.linears if lin.node in embedder} == set(range(layers))
    recipe = quantize.zero_points(parts.linears, classifier=True)
    fp32 = min(quantize.CLASSIFIER_FP32_LAYERS, layers // 2)
    assert fp32 >= 1  # the fixtures have 2 (BERT, XLM-R) and 4 (ModernBERT) layers
    assert set(recipe) == {
        lin.node for lin in parts.linears if lin.node in embedder and lin.layer < layers - fp32
    }
    assert all(recipe[k] == embedder[k] for k in recipe)
    assert quantize.recipe_key(classifier=True) != quantize.recipe_key()


def test_rank_is_best_first_with_top_n(fp32: dict[str, Reranker]) -> None:
    g, gold = golden("xlmr")
    r = fp32["xlmr"]
    query, docs = g["queries"][0], g["documents"]
    ranked = r.rank(query, docs)
    expected = gold["scores"][: len(docs)]
    assert [x.index for x in ranked] == list(np.argsort(-expected, kind="stable"))
    assert all(isinstance(x, Ranked) and x.document == docs[x.index] for x in ranked)
    assert [x.score for x in ranked] == sorted((x.score for x in ranked), reverse=True)
    top = r.rank(query, docs, top_n=2)
    assert top == ranked[:2]
    assert r.rank(query, docs, top_n=100) == ranked
    assert r.rank(query, []) == []


@pytest.mark.parametrize(
    ("query", "docs", "top_n", "match"),
    [
        (3, ["a"], None, "query is int"),
        ("q", "one string", None, "list of strings"),
        ("q", ["a", None], None, "document 1 is NoneType"),
        ("q", ["a"], 0, "top_n"),
    ],
)
def test_bad_input_names_what_was_wrong(
    fp32: dict[str, Reranker], query: Any, docs: Any, top_n: Any, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        fp32["bert"].rank(query, docs, top_n)


def test_an_embedding_model_is_not_a_reranker(real_model: ResolvedModel) -> None:
    with pytest.raises(ConfigError, match="not a cross-encoder"):
        Reranker(real_model, lazy=True)


def test_the_cache_is_keyed_by_query_and_document(
    tmp_path: Path, models: dict[str, ResolvedModel]
) -> None:
    from embedpool.cache import VectorCache

    g, gold = golden("bert")
    with (
        VectorCache.open(tmp_path / "c.sqlite") as cache,
        Reranker(models["bert"], precision="fp32", cache=cache) as r,
    ):
        docs = g["documents"]
        first = r.score(g["queries"][0], docs, raw=True)
        assert r.last_report.cache_hits == 0
        again = r.score(g["queries"][0], docs, raw=True)
        assert r.last_report.cache_hits == len(docs) and r.last_report.tokens == 0
        np.testing.assert_array_equal(first, again)
        other = r.score(g["queries"][1], docs, raw=True)  # same documents, another query
        assert r.last_report.cache_hits == 0
        assert np.abs(other - gold["logits"][len(docs) : 2 * len(docs)]).max() <= FP32_TOL


@pytest.mark.openvino
def test_the_cache_is_keyed_by_engine(tmp_path: Path, models: dict[str, ResolvedModel]) -> None:
    """int8 is another recipe on each engine: OpenVINO's reranker never reads the logits ONNX
    Runtime's cached for the same pairs (and gets its own, as without a cache)."""
    from embedpool.cache import VectorCache

    g, _ = golden("bert")
    query, docs = g["queries"][0], g["documents"]
    with VectorCache.open(tmp_path / "c.sqlite") as cache:
        with Reranker(models["bert"], precision="int8", runtime="onnxruntime", cache=cache) as r:
            ort_logits = r.score(query, docs, raw=True)
        with Reranker(models["bert"], precision="int8", runtime="openvino", cache=cache) as r:
            ov_logits = r.score(query, docs, raw=True)
            assert r.last_report.cache_hits == 0
            r.score(query, docs, raw=True)
            assert r.last_report.cache_hits == len(docs)
    with Reranker(models["bert"], precision="int8", runtime="openvino") as r:
        np.testing.assert_array_equal(ov_logits, r.score(query, docs, raw=True))
    assert np.abs(ov_logits - ort_logits).max() > 1e-3  # the recipes differ: keys must too


def test_activate_matches_torch_definitions() -> None:
    x = np.array([-30.0, -1.0, 0.0, 2.5, 30.0], dtype=np.float32)
    np.testing.assert_allclose(
        activate(x, "sigmoid"), 1 / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6
    )
    np.testing.assert_array_equal(activate(x, "identity"), x)
    np.testing.assert_allclose(activate(x, "tanh"), np.tanh(x), rtol=1e-6)


@pytest.mark.slow
def test_pairs_through_a_real_pool(models: dict[str, ResolvedModel]) -> None:
    """Token types (BERT) and scores survive the worker processes, in small batches."""
    g, gold = golden("bert")
    with Reranker(models["bert"], precision="fp32", workers=2, batch_tokens=128) as r:
        logits = r.predict(pairs_of(g), raw=True)
        assert r.executor.stats().backend == "pool"
    assert np.abs(logits - gold["logits"]).max() <= FP32_TOL


# --- Qwen3-Reranker: yes/no logits of a causal LM ---------------------------------------------

QWEN3 = FIXTURES / "qwen3" / "model"


@pytest.fixture(scope="module", params=ENGINES)
def qwen3(request: pytest.FixtureRequest) -> Any:
    with Reranker(QWEN3, precision="fp32", runtime=request.param) as r:
        assert r.placement.runtime == request.param
        yield r


def qwen3_copy(tmp_path: Path, *, drop: tuple[str, ...] = (), tie: bool = False) -> Path:
    """The fixture copied, less the files in ``drop``; ``tie``: a tied checkpoint
    (tie_word_embeddings true, no lm_head.weight), as the script's ``tie_lm_head``."""
    import shutil

    from safetensors.numpy import load_file, save_file

    target = tmp_path / "qwen3"
    shutil.copytree(QWEN3, target)
    for name in drop:
        path = target / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if tie:
        cfg = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
        tensors = load_file(target / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_qwen3_reranker_is_read_as_crossencoder_reads_it() -> None:
    g, _ = golden("qwen3")
    model = resolve_model(QWEN3)
    spec = model.classifier
    assert spec is not None and model.dim == 1 and model.max_length == g["max_length"]
    # LogitScore's token ids (1_LogitScore/config.json), the default Sigmoid it saved
    assert (spec.kind, spec.true_token, spec.false_token) == ("causal_lm", g["yes_id"], g["no_id"])
    assert spec.activation == "sigmoid" and not spec.tied_lm_head
    assert "<Document>: {{ document_text }}" in spec.pair_template  # chat_template.jinja


#: A chat model's template: system/user/assistant only, so a pair's roles render nothing.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_qwen3_plain_transformers_directory_scores_yes_and_no(
    tmp_path: Path, template: str | None
) -> None:
    """Without modules.json CrossEncoder takes the tokens "yes" and "no"; without a template
    that renders the pair's roles (none, or a chat model's), the model card's recipe (the
    same text here)."""
    g, _ = golden("qwen3")
    plain = qwen3_copy(
        tmp_path,
        drop=(
            "modules.json",
            "1_LogitScore",
            "chat_template.jinja",
            "config_sentence_transformers.json",
        ),
    )
    if template is not None:
        (plain / "chat_template.jinja").write_text(template)
    model = resolve_model(plain)
    assert model.classifier is not None
    assert (model.classifier.true_token, model.classifier.false_token) == (g["yes_id"], g["no_id"])
    enc = PairTokenizer.for_model(model).encode(pairs_of(g))
    assert [s.tolist() for s in enc.sequences] == g["input_ids"]


def test_qwen3_pair_tokens_equal_crossencoders(qwen3: Reranker) -> None:
    """The chat template rendered and tokenised as CrossEncoder does; a pair over the window
    loses the document's end, the template's suffix kept (CrossEncoder restores it)."""
    g, _ = golden("qwen3")
    enc = qwen3.tokenizer.encode(pairs_of(g))
    assert [s.tolist() for s in enc.sequences] == g["input_ids"]
    assert enc.truncated == g["truncated"] and any(g["truncated"])
    assert all(n > g["max_length"] for n, t in zip(enc.n_tokens, enc.truncated, strict=True) if t)


def test_qwen3_fp32_equals_crossencoder(qwen3: Reranker) -> None:
    g, gold = golden("qwen3")
    pairs = pairs_of(g)
    raw = qwen3.predict(pairs, raw=True)  # LogitScore: logit(yes) - logit(no)
    assert np.abs(raw - gold["logits"]).max() <= FP32_TOL
    assert np.abs(qwen3.predict(pairs) - gold["scores"]).max() <= FP32_TOL  # p(yes)
    assert qwen3.last_report.truncated == [i for i, t in enumerate(g["truncated"]) if t]
    # the card's recipe: transformers' yes and no logits of the last token (whole pairs)
    whole = ~np.asarray(g["truncated"])
    yes, no = gold["yes_no"][whole, 0], gold["yes_no"][whole, 1]
    assert np.abs(raw[whole] - (yes - no)).max() <= FP32_TOL
    p_yes = np.exp(yes) / (np.exp(yes) + np.exp(no))  # softmax over [no, yes]
    assert np.abs(qwen3.predict(pairs)[whole] - p_yes).max() <= FP32_TOL


def test_qwen3_instruction_is_crossencoders_prompt() -> None:
    g, gold = golden("qwen3")
    with Reranker(QWEN3, precision="fp32", instruction=g["instruction"]) as r:
        got = r.score(g["queries"][0], g["documents"], raw=True)
    assert np.abs(got - gold["instructed_logits"]).max() <= FP32_TOL
    assert np.abs(got - gold["logits"][: len(got)]).max() > 1e-3  # the instruction counts


def test_qwen3_tied_lm_head(tmp_path: Path) -> None:
    """The 0.6B/4B layout: no lm_head in the checkpoint, the token table's rows score."""
    g, gold = golden("qwen3")
    with Reranker(qwen3_copy(tmp_path, tie=True), precision="fp32") as r:
        assert r.classifier.tied_lm_head
        got = r.predict(pairs_of(g), raw=True)
    assert np.abs(got - gold["tied_logits"]).max() <= FP32_TOL
    assert np.abs(got - gold["logits"]).max() > 1e-2


def test_qwen3_without_lm_head_or_tie_is_refused(tmp_path: Path) -> None:
    """No lm_head.weight and no tie_word_embeddings: transformers would score with a random
    lm_head; embedpool names what is missing instead."""
    copy = qwen3_copy(tmp_path, tie=True)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ModelError, match=r"no lm_head\.weight"):
        Reranker(copy, precision="fp32", lazy=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_qwen3_int8_keeps_each_querys_ranking(engine: str) -> None:
    g, gold = golden("qwen3")
    with Reranker(QWEN3, precision="int8", runtime=engine) as r:
        assert (r.precision, r.placement.runtime) == ("int8", engine)
        scores = r.predict(pairs_of(g), raw=True)
    n = len(g["documents"])
    rho = [
        spearman(scores[q * n : (q + 1) * n], gold["logits"][q * n : (q + 1) * n])
        for q in range(len(g["queries"]))
    ]
    print("qwen3", engine, "int8 Spearman per query:", [round(x, 4) for x in rho])
    assert min(rho) >= 0.99, rho


def test_qwen3_a_query_that_fills_the_window_is_refused(qwen3: Reranker) -> None:
    with pytest.raises(InputError, match=r"prompt template take .* window of 128 tokens"):
        qwen3.score("word " * 120, ["a document"])


def test_qwen3_rerankers_are_known_models() -> None:
    from click.testing import CliRunner

    from embedpool.cli import main
    from embedpool.models import find_known

    listing = CliRunner().invoke(main, ["models"])
    assert listing.exit_code == 0, listing.output
    for size in ("0.6B", "4B", "8B"):
        km = find_known(f"Qwen/Qwen3-Reranker-{size}")
        assert km is not None and km.reranker and km.dim == 1 and km.family == "qwen3"
        line = next(x for x in listing.output.splitlines() if x.startswith(km.name + " "))
        assert "reranker" in line and "hub: Qwen/Qwen3-Reranker-" in line


@pytest.mark.slow
def test_qwen3_through_the_cli_and_serve(tmp_path: Path) -> None:
    """``embedpool rerank`` and ``embedpool serve --reranker`` (the cohere client, a pool
    worker) give CrossEncoder's scores for the Qwen3 reranker."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import cohere
    import httpx
    from polling import wait_ready

    g, gold = golden("qwen3")
    query, docs = g["queries"][1], g["documents"]
    n = len(docs)
    expected = gold["scores"][n : 2 * n]
    env = {**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            "rerank",
            query,
            *docs,
            "-m",
            str(QWEN3),
            "--precision",
            "fp32",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["index"] for r in out["results"]] == list(np.argsort(-expected, kind="stable"))
    assert max(abs(r["score"] - float(expected[r["index"]])) for r in out["results"]) <= 1e-4
    assert out["truncated"] == [docs.index(max(docs, key=len))]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            "rerank",
            g["queries"][0],
            *docs,
            "-m",
            str(QWEN3),
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--raw",
            "--instruction",
            g["instruction"],
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    got = {r["index"]: r["score"] for r in json.loads(res.stdout)["results"]}
    assert max(abs(got[i] - float(x)) for i, x in enumerate(gold["instructed_logits"])) <= 1e-4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    embedder = FIXTURES.parent / "families" / "xlmr" / "model"
    reranker = qwen3_copy(tmp_path)  # served models need names of their own (not "model")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedpool",
            "serve",
            "--port",
            str(port),
            "--model",
            str(embedder),
            "--reranker",
            str(reranker),
            "--precision",
            "fp32",
            "--workers",
            "1",
            "--no-cache",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        with httpx.Client(timeout=120) as http:
            co = cohere.ClientV2(base_url=url, api_key="unused", httpx_client=http)
            ranked = co.rerank(model="qwen3", query=query, documents=docs, top_n=5)
        assert [r.index for r in ranked.results] == list(np.argsort(-expected, kind="stable")[:5])
        assert (
            max(abs(r.relevance_score - float(expected[r.index])) for r in ranked.results) <= 1e-4
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM)
