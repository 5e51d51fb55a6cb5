"""Dev-only: the conformance fixtures, small random-weight model directories saved the way
sentence-transformers saves them, with its golden vectors or the error embedpool must give.

    /work/devenv/bin/python scripts/make_conformance.py [--out tests/fixtures/conformance]

Needs torch, transformers and sentence-transformers (the dev venv); embedpool and CI never
do. tests/test_conformance.py runs the table without torch.

Layout of ``--out``:

- ``texts.json``: the texts every case embeds (cased and lower-case words, code, an empty
  string, unknown characters, one text over every case's max length).
- ``base/``: one tiny BERT (2 layers, hidden 16, 2 heads, a cased WordPiece vocabulary of
  ~300 tokens trained on CORPUS and every ASCII character, 64 positions, max length 24) in
  the plain Hugging Face layout. Its random weights (std WEIGHT_STD) are large enough that
  every pooling mode, Dense layer or lower-casing changes the vectors visibly (the script
  checks that against contrast cases).
- ``cases/<name>/``: ``case.json`` (what the case is, the transforms the test applies to the
  base + overlay, the expected outcome), the files that differ from ``base/`` (the overlay),
  and ``golden.npz``: ``SentenceTransformer(dir).encode(texts, **call)`` for each call in
  ``case.json`` (the model's own Normalize, or none). Larger broken files (truncated weights,
  git-lfs pointers, shards) are made by the test from the base, not committed.
- ``shipped.onnx``: the base's encoder exported with torch.onnx (dynamic batch and length,
  output last_hidden_state), which the bge-layout cases ship as ``onnx/model.onnx``.
- ``activations.json``: every torch activation a Dense module may save, on fixed inputs.

Before writing, the script checks that sentence-transformers' vectors do not depend on their
batch neighbours, and that each case differs from its contrast case (a skipped Dense,
lower-casing, pooling mode or prompt would be caught).
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sentence_transformers
import torch
import transformers
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

SEED = 1414
MAX_LENGTH = 24
#: The base's weight scale (HF's initializer_range; LayerNorms get 0.3 of noise). Large
#: enough that every contrast case moves vectors by cos < 0.99 (checked below), small enough
#: that activations stay in the range int8 calibration sees: at 0.3 the int8 rows fell to
#: min cos 0.93-0.97 (measured with scripts/make_conformance.py + tests' int8 rows), at 0.15
#: they are within the bar except where the head's Dense MatMuls are quantised.
WEIGHT_STD = 0.15
CORPUS = (
    """
Hello World hello world HELLO WORLD. The Quick Brown Fox jumps over the lazy dog; the quick
brown fox Jumps Over The Lazy Dog. def add(a, b): return a + b
class Cache(dict): value = self[key] = compute(key)
Search the Index, search the index: Represent this query. query: passage: Query Passage
Embeddings map each Text to a Vector and similar texts get nearby vectors.
"""
    * 4
    + " ".join(string.printable)
)  # every ASCII character: no [UNK] in code
TEXTS = [
    "Hello World",
    "hello world",
    "The Quick Brown Fox jumps over the lazy dog.",
    "def add(a, b): return a + b",
    "x",
    "",
    "Ünïcödé and émoji 🙂 mixed with Words",
    "Embeddings map each Text to a Vector and similar texts get nearby vectors. " * 3,
    "Search the Index for a Query",
]
#: The files of the base model (the Transformer module).
BASE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
OLD = "sentence_transformers.models."  # the type prefix sentence-transformers 2.x wrote
SHIPPED = Path("shipped.onnx")  # set by main: the base's encoder exported to ONNX
#: Activation classes a Dense module may save (torch.nn.modules.*), probed on fixed inputs.
ACTIVATIONS = (
    "Identity",
    "Tanh",
    "ReLU",
    "GELU",
    "Sigmoid",
    "SiLU",
    "LeakyReLU",
    "ELU",
    "Softplus",
    "Mish",
    "Hardtanh",
    "ReLU6",
    "SELU",
    "CELU",
    "Softsign",
    "Tanhshrink",
    "Hardsigmoid",
    "Hardswish",
    "LogSigmoid",
)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the base model --------------------------------------------------------------------------


def make_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)  # cased
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        [CORPUS],
        trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def make_base(out: Path) -> None:
    tok = make_tokenizer(MAX_LENGTH)
    torch.manual_seed(SEED)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        initializer_range=WEIGHT_STD,
    )
    model = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():  # LayerNorms away from the identity too
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for extra in set(p.name for p in out.iterdir()) - set(BASE_FILES):
        (out / extra).unlink()


def fresh(base: Path, tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(base, d)
    return d


def restore_base(d: Path, base: Path) -> None:
    """sentence-transformers' save rewrites the Transformer's files (same values, other bytes):
    put the base's back so that a case's overlay holds only what the case is about."""
    for name in BASE_FILES:
        if (base / name).exists():
            shutil.copy(base / name, d / name)
    (d / "README.md").unlink(missing_ok=True)


def st_save(d: Path, base: Path, modules: list[Any], **kwargs: Any) -> None:
    SentenceTransformer(modules=modules, **kwargs).save(str(d))
    restore_base(d, base)


def old_layout(
    d: Path,
    pooling: dict[str, Any],
    *,
    normalize: bool,
    extra: list[dict[str, Any]] | None = None,
    st_config: dict[str, Any] | None = None,
) -> None:
    """modules.json and configs as sentence-transformers 2.x wrote them (MiniLM's layout)."""
    mods = [
        {"idx": 0, "name": "0", "path": "", "type": OLD + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": OLD + "Pooling"},
    ]
    for m in extra or []:
        mods.append({"idx": len(mods), "name": str(len(mods)), **m})
    if normalize:
        mods.append(
            {
                "idx": len(mods),
                "name": str(len(mods)),
                "path": f"{len(mods)}_Normalize",
                "type": OLD + "Normalize",
            }
        )
    write_json(d / "modules.json", mods)
    write_json(d / "1_Pooling" / "config.json", {"word_embedding_dimension": 16, **pooling})
    write_json(
        d / "sentence_bert_config.json",
        st_config
        if st_config is not None
        else {"max_seq_length": MAX_LENGTH, "do_lower_case": False},
    )


def flags(*modes: str) -> dict[str, bool]:
    keys = {
        "cls": "pooling_mode_cls_token",
        "max": "pooling_mode_max_tokens",
        "mean": "pooling_mode_mean_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    return {k: m in modes for m, k in keys.items()}


# --- the cases --------------------------------------------------------------------------------

Case = dict[str, Any]


def new_pooling(
    d: Path,
    base: Path,
    mode: Any,
    *,
    normalize: bool = True,
    include_prompt: bool = True,
    **kwargs: Any,
) -> None:
    mods = [Transformer(str(d)), Pooling(16, pooling_mode=mode, include_prompt=include_prompt)]
    st_save(d, base, mods + ([Normalize()] if normalize else []), **kwargs)


def cases(base: Path, tmp: Path) -> list[tuple[str, Case, Callable[[Path], None]]]:
    """(name, case.json, builder) for every case; the builder writes into a copy of base."""
    out: list[tuple[str, Case, Callable[[Path], None]]] = []

    def add(name: str, about: str, build: Callable[[Path], None], **case: Any) -> None:
        out.append((name, {"about": about, **case}, build))

    # pooling, old flags (sentence-transformers 2.x) and the 6.x pooling_mode, every mode
    add(
        "mean-old-flags",
        "mean pooling + Normalize, old pooling_mode_* flags (MiniLM's layout)",
        lambda d: old_layout(d, flags("mean"), normalize=True),
    )
    add(
        "cls-new-string",
        "6.x pooling_mode 'cls', no Normalize: vectors as computed",
        lambda d: new_pooling(d, base, "cls", normalize=False),
        contrast="mean-old-flags",
    )
    for mode in ("max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"):
        add(
            f"{mode}-new",
            f"6.x pooling_mode {mode!r}, no Normalize",
            lambda d, mode=mode: new_pooling(d, base, mode, normalize=False),
            contrast="cls-new-string",
        )
    add(
        "cls+mean-old-flags",
        "both cls and mean flags: concatenated (cls, mean), 32 wide",
        lambda d: old_layout(d, flags("cls", "mean"), normalize=True),
    )
    add(
        "mean+max+cls-new-list",
        "6.x pooling_mode list, concatenated in the list's order",
        lambda d: new_pooling(d, base, ["mean", "max", "cls"], normalize=True),
    )
    add(
        "all-modes-old-flags",
        "every old flag on: six modes concatenated, 96 wide, no Normalize",
        lambda d: old_layout(
            d,
            flags("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"),
            normalize=False,
        ),
    )
    # Dense
    add(
        "labse-dense-tanh",
        "LaBSE's layout: CLS -> Dense 16->16 tanh -> Normalize",
        lambda d: dense_case(d, base, "cls", [(16, 16, True, torch.nn.Tanh(), False)], True),
        contrast="cls-new-string",
    )
    add(
        "dense-identity-no-normalize",
        "mean -> Dense 16->8 no bias, no activation; no Normalize",
        lambda d: dense_case(d, base, "mean", [(16, 8, False, torch.nn.Identity(), False)], False),
    )
    add(
        "dense-chain-residual",
        "mean -> Dense 16->24 GELU -> Dense 24->24 SiLU residual -> "
        "Dense 24->12 Softplus residual -> Normalize",
        lambda d: dense_case(
            d,
            base,
            "mean",
            [
                (16, 24, True, torch.nn.GELU(), False),
                (24, 24, True, torch.nn.SiLU(), True),
                (24, 12, True, torch.nn.Softplus(), True),
            ],
            True,
        ),
    )
    add(
        "dense-old-default-tanh",
        "an old Dense config without activation_function: tanh",
        lambda d: old_dense_default(d, base),
    )
    # text: lower-casing, max length, prompts
    add(
        "lowercase-st-config",
        "do_lower_case in sentence_bert_config.json, cased tokenizer",
        lambda d: old_layout(
            d,
            flags("mean"),
            normalize=True,
            st_config={"max_seq_length": MAX_LENGTH, "do_lower_case": True},
        ),
        contrast="mean-old-flags",
    )
    add(
        "bert-tokenizer-class",
        "tokenizer_config.json names BertTokenizer without "
        "do_lower_case: transformers 5 rebuilds it lower-casing (its default)",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            edit_json(d / "tokenizer_config.json", tokenizer_class="BertTokenizer"),
        ),
        contrast="mean-old-flags",
    )
    add(
        "max-seq-length-short",
        "sentence_bert_config.json max_seq_length 10 (< tokenizer 24)",
        lambda d: old_layout(
            d,
            flags("mean"),
            normalize=True,
            st_config={"max_seq_length": 10, "do_lower_case": False},
        ),
        contrast="mean-old-flags",
    )
    add(
        "plain-hf",
        "no sentence-transformers files: mean pooling, no Normalize, the "
        "tokenizer's model_max_length 16 < 64 positions",
        lambda d: edit_json(d / "tokenizer_config.json", model_max_length=16),
    )
    add(
        "plain-hf-no-max-length",
        "no sentence-transformers files and no model_max_length: "
        "min(1e30, max_position_embeddings 64)",
        lambda d: edit_json(d / "tokenizer_config.json", model_max_length=None),
    )
    prompts = {"query": "query: ", "doc": "passage: ", "long": "Represent this query: "}
    calls = {
        "default": {},
        "prompt_name=doc": {"prompt_name": "doc"},
        "prompt=": {"prompt": ""},
        "prompt=Search: ": {"prompt": "Search: "},
    }
    add(
        "default-prompt",
        "config_sentence_transformers.json prompts with default_prompt_name "
        "query (applied when no prompt is given)",
        lambda d: new_pooling(d, base, "mean", prompts=prompts, default_prompt_name="query"),
        calls=calls,
        contrast="mean-6x",
    )
    add(
        "mean-6x",
        "6.x mean + Normalize, no prompts (the contrast of the prompt cases)",
        lambda d: new_pooling(d, base, "mean"),
    )
    add(
        "include-prompt-false",
        "mean pooling with include_prompt false and a default prompt: "
        "the prompt's tokens ([CLS] included) are left out of the mean",
        lambda d: new_pooling(
            d, base, "mean", include_prompt=False, prompts=prompts, default_prompt_name="query"
        ),
        calls=calls,
        contrast="default-prompt",
    )
    add(
        "include-prompt-false-modes",
        "cls, lasttoken, weightedmean, max with include_prompt false and prompts (no default)",
        lambda d: new_pooling(
            d,
            base,
            ["cls", "lasttoken", "weightedmean", "max"],
            include_prompt=False,
            prompts=prompts,
        ),
        calls={
            "default": {},
            "prompt_name=query": {"prompt_name": "query"},
            "prompt_name=long": {"prompt_name": "long"},
        },
    )
    add(
        "truncate-dim",
        "config_sentence_transformers.json truncate_dim 8 after Normalize (not renormalised)",
        lambda d: (
            new_pooling(d, base, "mean"),
            edit_json(d / "config_sentence_transformers.json", truncate_dim=8),
        ),
    )
    # weights as they come, and the bge layout
    add(
        "bf16-weights",
        "model.safetensors in bfloat16 (sentence-transformers computes fp32)",
        lambda d: (old_layout(d, flags("mean"), normalize=True), to_dtype(d, torch.bfloat16)),
    )
    add(
        "fp16-weights",
        "model.safetensors in float16",
        lambda d: (old_layout(d, flags("cls"), normalize=True), to_dtype(d, torch.float16)),
    )
    add(
        "sharded-weights",
        "the weights in two shards + model.safetensors.index.json (made by the test from the base)",
        lambda d: (old_layout(d, flags("mean"), normalize=True), shard(d)),
        transforms=["shard"],
    )
    add(
        "onnx-shipped",
        "bge's layout: model.safetensors and onnx/model.onnx (shipped.onnx, "
        "exported from the base weights); embedpool uses the ONNX file, with the head from the "
        "configs",
        lambda d: (old_layout(d, flags("cls", "mean"), normalize=True), ship(d)),
        transforms=["shipped-onnx"],
    )
    add(
        "onnx-shipped-dense",
        "onnx/model.onnx with a Dense head and no Normalize",
        lambda d: (
            dense_case(d, base, "mean", [(16, 8, True, torch.nn.ReLU(), False)], False),
            ship(d),
        ),
        transforms=["shipped-onnx"],
    )
    # issue 22: lower-casing that transformers 5 rebuilds from config.json or a class name
    add(
        "tokenizer-class-absent",
        "tokenizer_config.json without tokenizer_class, model_type "
        "bert: transformers 5 rebuilds a BertTokenizer, lower-casing (cased tokenizer.json)",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            edit_json(d / "tokenizer_config.json", tokenizer_class=None),
        ),
        contrast="mean-old-flags",
    )
    add(
        "tokenizer-config-missing",
        "no tokenizer_config.json at all: the same rebuild",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            (d / "tokenizer_config.json").unlink(),
        ),
        transforms=["delete:tokenizer_config.json"],
        contrast="mean-old-flags",
    )
    add(
        "distilbert-tokenizer-class",
        "tokenizer_class DistilBertTokenizer (a BertTokenizer "
        "subclass with its own __init__): lower-cased",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            edit_json(d / "tokenizer_config.json", tokenizer_class="DistilBertTokenizer"),
        ),
        contrast="mean-old-flags",
    )
    add(
        "electra-tokenizer-strip-accents",
        "tokenizer_class ElectraTokenizerFast (resolves to "
        "BertTokenizer) with do_lower_case false, strip_accents true: cased, accents stripped",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            edit_json(
                d / "tokenizer_config.json",
                tokenizer_class="ElectraTokenizerFast",
                do_lower_case=False,
                strip_accents=True,
            ),
        ),
    )
    add(
        "convbert-tokenizer-class",
        "tokenizer_class ConvBertTokenizer (a BertTokenizer "
        "subclass without __init__): tokenizer.json as it is, cased",
        lambda d: (
            old_layout(d, flags("mean"), normalize=True),
            edit_json(d / "tokenizer_config.json", tokenizer_class="ConvBertTokenizer"),
        ),
    )
    # issue 22: shipped graphs that pool by themselves or take other inputs
    add(
        "onnx-pooled-output",
        "onnx/model.onnx outputs pooled vectors only (a mean over every "
        "token) beside model.safetensors, in a directory with include_prompt false and a "
        "default prompt: sentence-transformers computes from the safetensors, so must embedpool",
        lambda d: (
            new_pooling(
                d, base, "mean", include_prompt=False, prompts=prompts, default_prompt_name="query"
            ),
            test_transform(d, "shipped-onnx-pooled"),
        ),
        transforms=["shipped-onnx-pooled"],
        contrast="default-prompt",
    )
    add(
        "onnx-int32-inputs",
        "onnx/model.onnx whose inputs are int32 (cast inside): fed int32",
        lambda d: (
            old_layout(d, flags("cls", "mean"), normalize=True),
            test_transform(d, "shipped-onnx-int32"),
        ),
        transforms=["shipped-onnx-int32"],
    )
    out += refusals()
    return out


def test_transform(d: Path, kind: str) -> None:
    """tests/conformance.py's ONNX transforms (one implementation for script and test)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import conformance

    conformance.apply(d, kind)


def refusals() -> list[tuple[str, Case, Callable[[Path], None]]]:
    """Directories embedpool must refuse (exit 2, one line naming the cause)."""

    def mods(*types: str) -> list[dict[str, Any]]:
        return [
            {"idx": i, "name": str(i), "path": p, "type": t}
            for i, (p, t) in enumerate(zip(("", "1_Pooling", "2_X", "3_Y"), types, strict=False))
        ]

    def err(
        name: str,
        about: str,
        build: Callable[[Path], None],
        match: str,
        transforms: list[str] | None = None,
        from_case: str = "mean-old-flags",
    ) -> tuple[str, Case, Callable[[Path], None]]:
        return (
            name,
            {
                "about": about,
                "error": match,
                "transforms": transforms or [],
                "from_case": from_case,
            },
            build,
        )

    def nothing(d: Path) -> None:
        pass

    return [
        err(
            "truncated-weights",
            "model.safetensors cut short (a partial download)",
            nothing,
            r"model\.safetensors is truncated .*the download is incomplete",
            ["truncate:model.safetensors"],
        ),
        err(
            "lfs-pointer-weights",
            "a git-lfs pointer file in place of model.safetensors",
            nothing,
            r"model\.safetensors is a git-lfs pointer file .*git lfs pull",
            ["lfs:model.safetensors"],
        ),
        err(
            "lfs-pointer-onnx",
            "a git-lfs pointer in place of onnx/model.onnx",
            nothing,
            r"model\.onnx is a git-lfs pointer file.*git lfs pull",
            ["lfs:onnx/model.onnx"],
            from_case="onnx-shipped",
        ),
        err(
            "config-mismatch-width",
            "config.json says intermediate_size 48, the weights 32",
            lambda d: edit_json(d / "config.json", intermediate_size=48),
            r"do not match config\.json: encoder\.layer\.0\.intermediate\.dense\.weight is "
            r"\[32, 16\], config\.json implies \[48, 16\]",
        ),
        err(
            "config-mismatch-layers",
            "config.json says 1 layer, the weights have 2 "
            "(transformers would drop a layer with a warning)",
            lambda d: edit_json(d / "config.json", num_hidden_layers=1),
            r"the weights have 2 layers, config\.json says num_hidden_layers=1",
        ),
        err(
            "unsupported-module",
            "a CNN module (sentence-transformers has it, embedpool not)",
            lambda d: write_json(
                d / "modules.json", mods(OLD + "Transformer", OLD + "Pooling", OLD + "CNN")
            ),
            r"module 'sentence_transformers\.models\.CNN' .*is not one embedpool implements; "
            r"it supports sentence-transformers' Transformer, Pooling, Dense, Dropout, "
            r"Normalize",
        ),
        err(
            "custom-module",
            "a repository-local module class",
            lambda d: write_json(
                d / "modules.json",
                mods(OLD + "Transformer", OLD + "Pooling", "modeling_custom.CustomPooling"),
            ),
            r"module 'modeling_custom\.CustomPooling' .*is not one embedpool implements",
        ),
        err(
            "unknown-pooling-key",
            "1_Pooling/config.json with a key embedpool does not know",
            lambda d: edit_json(d / "1_Pooling" / "config.json", pooling_mode_frobnicate=True),
            r"pooling keys \['pooling_mode_frobnicate'\] are unknown to embedpool",
        ),
        err(
            "unknown-pooling-mode",
            "pooling_mode 'attention' (not a sentence-transformers mode)",
            lambda d: write_json(
                d / "1_Pooling" / "config.json",
                {"embedding_dimension": 16, "pooling_mode": "attention"},
            ),
            r"pooling mode 'attention' is not supported \(embedpool supports cls, max, mean, "
            r"mean_sqrt_len_tokens, weightedmean, lasttoken\)",
        ),
        err(
            "unknown-st-config-key",
            "sentence_bert_config.json with an unknown key",
            lambda d: edit_json(d / "sentence_bert_config.json", frobnicate=1),
            r"sentence_bert_config\.json: key 'frobnicate' is unknown to embedpool",
        ),
        err(
            "unknown-prompts-key",
            "config_sentence_transformers.json with an unknown key",
            lambda d: write_json(
                d / "config_sentence_transformers.json", {"prompts": {}, "pooling_after": "dense"}
            ),
            r"config_sentence_transformers\.json: keys \['pooling_after'\] are unknown",
        ),
        err(
            "dense-bin-only",
            "a Dense module with only pytorch_model.bin",
            nothing,
            r"2_Dense has only pytorch_model\.bin.*save_file",
            ["rename:2_Dense/model.safetensors:2_Dense/pytorch_model.bin"],
            from_case="labse-dense-tanh",
        ),
        err(
            "dense-custom-activation",
            "a Dense activation that is not a torch.nn class",
            lambda d: edit_json(d / "2_Dense" / "config.json", activation_function="my_pkg.Swish"),
            r"activation_function 'my_pkg\.Swish' is not one embedpool implements",
            from_case="labse-dense-tanh",
        ),
        err(
            "weights-bin-only",
            "only pytorch_model.bin, no safetensors",
            nothing,
            r"has neither onnx/model\.onnx, model\.onnx nor model\.safetensors\. It has "
            r"pytorch_model\.bin",
            ["rename:model.safetensors:pytorch_model.bin"],
        ),
        # issue 22
        err(
            "onnx-pooled-output-only",
            "a pooled-output onnx/model.onnx and no safetensors to build from",
            nothing,
            r"model\.onnx outputs no token states \(sentence_embedding "
            r"\(rank 2\)\): pooled vectors cannot be checked against the directory's pooling",
            ["rename:model.safetensors:pytorch_model.bin"],
            from_case="onnx-pooled-output",
        ),
        err(
            "onnx-pooled-dense",
            "a pooled-output onnx/model.onnx beside a Dense module, no safetensors",
            nothing,
            r"model\.onnx outputs no token states",
            ["shipped-onnx-pooled", "rename:model.safetensors:pytorch_model.bin"],
            from_case="onnx-shipped-dense",
        ),
        err(
            "onnx-renamed-inputs",
            "onnx/model.onnx whose input_ids input is named ids",
            nothing,
            r"model\.onnx has inputs \['ids'\] that embedpool does not feed \(its "
            r"inputs: ids, attention_mask, token_type_ids\)",
            ["onnx-rename-input:input_ids:ids"],
            from_case="onnx-shipped",
        ),
        err(
            "truncated-onnx",
            "onnx/model.onnx cut short (a partial download)",
            nothing,
            r"model\.onnx is truncated or not an ONNX model .*download it again",
            ["truncate:onnx/model.onnx"],
            from_case="onnx-shipped",
        ),
        err(
            "auto-map-remote-code",
            "config.json auto_map to jina's remote BERT (ALiBi): model_type bert, other maths",
            lambda d: edit_json(
                d / "config.json",
                auto_map={
                    "AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
                    "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel",
                },
            ),
            r"config\.json: auto_map names remote code \(jinaai/jina-bert-implementation--"
            r"configuration_bert\.JinaBertConfig\) .*Known remote code: nomic_bert",
        ),
        err(
            "empty-directory",
            "an empty directory (a download that never started)",
            nothing,
            r"is not a model directory: it has none of config\.json, modules\.json",
            ["clear"],
        ),
        err(
            "config-not-object",
            "config.json is a JSON list",
            nothing,
            r"config\.json: expected a JSON object \(the model's configuration\), got list",
            ["write:config.json:[1, 2, 3]"],
        ),
    ]


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    write_json(path, data)


def dense_case(
    d: Path,
    base: Path,
    mode: str,
    layers: list[tuple[int, int, bool, torch.nn.Module, bool]],
    normalize: bool,
) -> None:
    torch.manual_seed(SEED + len(layers))
    dense = []
    for n_in, n_out, bias, act, residual in layers:
        layer = Dense(n_in, n_out, bias=bias, activation_function=act, use_residual=residual)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.4)
        dense.append(layer)
    mods = [Transformer(str(d)), Pooling(16, pooling_mode=mode), *dense]
    st_save(d, base, mods + ([Normalize()] if normalize else []))


def old_dense_default(d: Path, base: Path) -> None:
    dense_case(d, base, "mean", [(16, 16, True, torch.nn.Tanh(), False)], True)
    edit_json(d / "2_Dense" / "config.json", activation_function=None)


def to_dtype(d: Path, dtype: torch.dtype) -> None:
    w = load_file(d / "model.safetensors")
    save_file(
        {k: v.to(dtype) for k, v in w.items()}, d / "model.safetensors", metadata={"format": "pt"}
    )


def shard(d: Path) -> None:
    """Two shards and an index; the test makes the same from the base (sharded_weights in
    tests/conformance.py), so only case.json is committed."""
    w = load_file(d / "model.safetensors")
    names = sorted(w)
    parts = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in parts.items():
        save_file({k: w[k] for k in keys}, d / file, metadata={"format": "pt"})
    write_json(
        d / "model.safetensors.index.json",
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}},
    )
    (d / "model.safetensors").unlink()


def ship(d: Path) -> None:
    """The bge layout: the base's exported encoder as onnx/model.onnx (the test copies
    shipped.onnx there: transform "shipped-onnx")."""
    (d / "onnx").mkdir(exist_ok=True)
    shutil.copy(SHIPPED, d / "onnx" / "model.onnx")


def export_onnx(d: Path, dest: Path) -> None:
    """The base's encoder as ONNX, as optimum exports it (outputs last_hidden_state).
    A freshly loaded model: torch's exporter leaves the one it traced altered."""

    class Encoder(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = BertModel.from_pretrained(
        str(d), add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = ids.clone()
    mask[1, 3:] = 0
    names = ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]
    torch.onnx.export(
        Encoder(model),
        (ids, mask, torch.zeros_like(ids)),
        str(dest),
        input_names=names[:3],
        output_names=names[3:],
        dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
        dynamo=False,
        opset_version=17,
    )


# --- embedpool's table of the tokenizers transformers rebuilds --------------------------------


def check_tokenizer_tables() -> None:
    """embedpool.models.hf_tokenizer's tables, recomputed from the installed transformers:
    every class name it resolves (tokenizer modules, its aliases, ``<Model>Tokenizer[Fast]``
    for every config class) and every model type's registered class, classified as the
    module classifies them. Fails, naming the difference, when transformers changed."""
    import importlib
    import inspect
    import pkgutil
    import sys
    import warnings

    import transformers.models as tm
    from transformers import BertTokenizer
    from transformers.models.auto import tokenization_auto as ta
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.mpnet.tokenization_mpnet import MPNetTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from embedpool.models import hf_tokenizer as hf

    warnings.filterwarnings("ignore")
    generic = (
        "TokenizersBackend",
        "PythonBackend",
        "PreTrainedTokenizerFast",
        "MistralCommonBackend",
    )
    names = {v for v in ta.TOKENIZER_MAPPING_NAMES.values() if v}
    for m in pkgutil.iter_modules(tm.__path__):
        for sub in (f"tokenization_{m.name}", f"tokenization_{m.name}_fast"):
            try:
                mod = importlib.import_module(f"transformers.models.{m.name}.{sub}")
            except Exception:  # a tokenizer module that needs an absent extra
                continue
            names |= {n for n, c in vars(mod).items() if inspect.isclass(c) and "Tokenizer" in n}
    for cfg_name in CONFIG_MAPPING_NAMES.values():
        names |= {
            cfg_name.removesuffix("Config") + "Tokenizer",
            cfg_name.removesuffix("Config") + "TokenizerFast",
        }
    names |= {n + "Fast" for n in names} | {n.removesuffix("Fast") for n in names}
    names = {n for n in names if not n.endswith("FastFast")}

    def resolve(name: str) -> Any:
        try:
            return ta.tokenizer_class_from_name(name)
        except Exception:
            return None

    def kind(cls: Any) -> str:
        if cls is None or cls.__name__ in generic or "__init__" not in cls.__dict__:
            return "as-is"
        if issubclass(cls, (BertTokenizer, MPNetTokenizer)):
            return "bert"
        try:
            src = inspect.getsource(cls.__init__)
        except (OSError, TypeError):
            src = ""
        return "other" if "BertNormalizer" in src else "as-is"

    def stripped(name: str) -> Any:
        base = name.removesuffix("Fast")
        return resolve(base) or (resolve(base + "Fast") if not base.endswith("Fast") else None)

    want = {
        "BERT_REBUILD_CLASSES": {n for n in names if kind(resolve(n)) == "bert"},
        "BERT_REBUILD_WHEN_STRIPPED": {n for n in names if kind(stripped(n)) == "bert"},
        "OTHER_REBUILD_CLASSES": {n for n in names if kind(resolve(n)) == "other"},
        "BERT_REBUILD_TYPES": {
            t for t, c in ta.TOKENIZER_MAPPING_NAMES.items() if c and kind(resolve(c)) == "bert"
        },
        "OTHER_REBUILD_TYPES": {
            t for t, c in ta.TOKENIZER_MAPPING_NAMES.items() if c and kind(resolve(c)) == "other"
        },
        "NAMED_CLASS_IGNORED_TYPES": {
            t
            for t, c in ta.TOKENIZER_MAPPING_NAMES.items()
            if c and c.removesuffix("Fast") in generic
        }
        | set(ta.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS),
    }
    wrong = [
        t
        for t in ta.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
        if t in want["BERT_REBUILD_TYPES"] | want["OTHER_REBUILD_TYPES"]
    ]
    bad = (
        [
            f"MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS has rebuilding types {wrong}: "
            "tokenizer_class() must return their registered class's kind"
        ]
        if wrong
        else []
    )
    for table, names_want in want.items():
        have = set(getattr(hf, table))
        if have != names_want:
            bad.append(
                f"{table}: add {sorted(names_want - have)}, drop {sorted(have - names_want)}"
            )
    if bad:
        raise SystemExit(
            "embedpool/models/hf_tokenizer.py is not transformers "
            f"{transformers.__version__}'s:\n  " + "\n  ".join(bad)
        )


# --- goldens ---------------------------------------------------------------------------------


def golden(d: Path, calls: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    model = SentenceTransformer(str(d), device="cpu")
    out = {}
    for key, kwargs in calls.items():
        vecs = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True, **kwargs)
        alone = np.stack([model.encode([t], convert_to_numpy=True, **kwargs)[0] for t in TEXTS])
        cos = (vecs * alone).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(alone, axis=1)
        assert cos.min() > 0.99999, (d.name, key, cos)  # the reference is batch-independent
        out[key] = vecs.astype(np.float32)
    return out


def overlay(d: Path, base: Path, dest: Path) -> None:
    for path in sorted(p for p in d.rglob("*") if p.is_file()):
        rel = path.relative_to(d)
        if (base / rel).is_file() and (base / rel).read_bytes() == path.read_bytes():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def st_outcome(d: Path) -> str:
    """What sentence-transformers itself does with a directory embedpool refuses."""
    try:
        vecs = SentenceTransformer(str(d), device="cpu").encode(TEXTS[:2])
        return f"loads and embeds (shape {list(vecs.shape)})"
    except Exception as exc:  # recorded for the reader, whatever it is
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def apply_transforms(d: Path, transforms: list[str]) -> None:
    """The test's own transforms (tests/conformance.py), to record what ST does with them."""
    for t in transforms:
        test_transform(d, t)


def activations() -> dict[str, Any]:
    x = torch.tensor(
        [
            -30.0,
            -20.5,
            -6.0,
            -3.0,
            -1.5,
            -1.0,
            -0.5,
            -1e-3,
            0.0,
            1e-3,
            0.5,
            1.0,
            1.5,
            3.0,
            6.0,
            19.5,
            20.5,
            30.0,
            90.0,
        ]
    )
    table = {"inputs": x.tolist()}
    for name in ACTIVATIONS:
        act = getattr(torch.nn, name)()
        table[
            f"torch.nn.modules.activation.{name}"
            if name != "Identity"
            else "torch.nn.modules.linear.Identity"
        ] = act(x).tolist()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "conformance",
    )
    args = parser.parse_args()
    check_tokenizer_tables()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "cases").mkdir(parents=True)
    write_json(out / "texts.json", TEXTS)
    write_json(out / "activations.json", activations())
    versions = {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        base = out / "base"
        make_base(base)
        global SHIPPED
        SHIPPED = out / "shipped.onnx"
        export_onnx(base, SHIPPED)
        built: dict[str, Path] = {}
        goldens: dict[str, np.ndarray] = {}
        for name, case, build in cases(base, tmp):
            src = built.get(case.get("from_case", ""), base)
            d = fresh(src, tmp, name)
            build(d)
            built[name] = d
            dest = out / "cases" / name
            dest.mkdir(parents=True)
            if "error" in case:
                probe = fresh(d, tmp, name + "-probe")
                apply_transforms(probe, case["transforms"])
                case["sentence_transformers_does"] = st_outcome(probe)
                overlay(d, src, dest)  # relative to its from_case, which the test builds first
            else:
                calls = case.setdefault("calls", {"default": {}})
                vecs = golden(d, calls)
                goldens[name] = vecs["default"]
                np.savez(dest / "golden.npz", **vecs)
                case["normalized"] = bool(
                    np.allclose(np.linalg.norm(vecs["default"], axis=1), 1, atol=1e-5)
                )
                overlay(d, base, dest)
                for rel in (
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json",
                    "onnx/model.onnx",
                ):
                    (dest / rel).unlink(missing_ok=True)  # the test makes these from the base
                if (dest / "onnx").is_dir() and not any((dest / "onnx").iterdir()):
                    (dest / "onnx").rmdir()
            case["versions"] = versions
            write_json(dest / "case.json", case)
        for name, case, _ in cases(base, tmp):
            contrast = case.get("contrast")
            if contrast:  # the case must change vectors visibly, or it proves nothing
                a, b = goldens[name], goldens[contrast]
                if a.shape == b.shape:
                    cos = (
                        (a * b).sum(1)
                        / np.linalg.norm(a, axis=1).clip(1e-9)
                        / np.linalg.norm(b, axis=1).clip(1e-9)
                    )
                    assert cos.min() < 0.99, (name, contrast, cos)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {len(list((out / 'cases').iterdir()))} cases, {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
