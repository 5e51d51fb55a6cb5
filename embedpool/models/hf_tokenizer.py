"""Which tokenizer transformers 5 builds for a model directory, and what of ``tokenizer.json``
it keeps: the one decision behind a directory's lower-casing.

sentence-transformers loads the tokenizer with ``AutoTokenizer.from_pretrained(dir)``. In
transformers 5 that picks a class (``tokenization_auto``: tokenizer_config.json
``tokenizer_class``, else config.json's, else the class registered for config.json
``model_type``, with the exceptions ``tokenizer_class`` below follows), and a class with its
own ``__init__`` *rebuilds* the pipeline from the vocabulary in ``tokenizer.json`` and the
arguments in tokenizer_config.json. For ``BertTokenizer`` and its relatives that means a
``BertNormalizer(lowercase=do_lower_case)`` with ``do_lower_case`` defaulting to True, and a
``BertPreTokenizer``: a cased ``tokenizer.json`` is lower-cased when tokenizer_config.json
lacks ``tokenizer_class``, is missing, or names such a class. Classes without their own
``__init__`` (``TokenizersBackend``, ``PreTrainedTokenizerFast``, ``ConvBertTokenizer``,
unknown names) use ``tokenizer.json`` as it is.

Own code because no library answers "what would transformers build" without importing
transformers (and torch-free embedpool never does). The tables are transformers 5.25's
(``TOKENIZER_MAPPING_NAMES``, ``tokenizer_class_from_name``,
``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``); ``scripts/make_conformance.py`` recomputes
them from the installed transformers and fails when they differ, and the conformance suite
holds sentence-transformers' vectors for each way a directory reaches the rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from embedpool.errors import ModelError
from embedpool.modelspec import BertNormalizerSpec

#: Class names (as tokenizer_config.json or config.json write them) that resolve to a class
#: rebuilding a BertNormalizer + BertPreTokenizer + WordPiece from the vocabulary.
BERT_REBUILD_CLASSES = frozenset(
    {
        "BertTokenizer",
        "BertTokenizerFast",
        "DistilBertTokenizer",
        "DistilBertTokenizerFast",
        "ElectraTokenizer",
        "ElectraTokenizerFast",
        "LayoutLMTokenizer",
        "LayoutLMTokenizerFast",
        "MobileBertTokenizer",
        "MobileBertTokenizerFast",
        "SqueezeBertTokenizer",
        "SqueezeBertTokenizerFast",
        "LxmertTokenizer",
        "LxmertTokenizerFast",
        "MPNetTokenizer",
        "MPNetTokenizerFast",
        "DPRContextEncoderTokenizer",
        "DPRQuestionEncoderTokenizer",
        "DPRReaderTokenizer",
    }
)
#: The DPR fast names resolve to classes without an ``__init__`` (tokenizer.json as is) when
#: they are looked up as written, and to the slow, rebuilding ones when transformers strips
#: "Fast" first (tokenizer_config.json's class for a model type it agrees with).
BERT_REBUILD_WHEN_STRIPPED = BERT_REBUILD_CLASSES | {
    "DPRContextEncoderTokenizerFast",
    "DPRQuestionEncoderTokenizerFast",
    "DPRReaderTokenizerFast",
}
#: Classes that rebuild a BertNormalizer with rules of their own (jieba, BPE, ...), which
#: embedpool does not reproduce: refused by name.
OTHER_REBUILD_CLASSES = frozenset(
    {
        "FunnelTokenizer",
        "FunnelTokenizerFast",
        "HerbertTokenizer",
        "HerbertTokenizerFast",
        "LayoutLMv2Tokenizer",
        "LayoutLMv2TokenizerFast",
        "OpenAIGPTTokenizer",
        "OpenAIGPTTokenizerFast",
        "RoFormerTokenizer",
        "RoFormerTokenizerFast",
        "SplinterTokenizer",
        "SplinterTokenizerFast",
    }
)
#: config.json model types whose registered tokenizer is one of BERT_REBUILD_CLASSES (used
#: when neither file names a class).
BERT_REBUILD_TYPES = frozenset(
    {
        "align",
        "bark",
        "bert",
        "blip",
        "bros",
        "chinese_clip",
        "convbert",
        "distilbert",
        "dpr",
        "electra",
        "ernie",
        "flava",
        "git",
        "grounding-dino",
        "layoutlm",
        "lxmert",
        "megatron-bert",
        "mm-grounding-dino",
        "mobilebert",
        "mpnet",
        "nezha",
        "nomic_bert",
        "qdqbert",
        "realm",
        "retribert",
        "squeezebert",
        "tvp",
        "vilt",
        "visual_bert",
    }
)
OTHER_REBUILD_TYPES = frozenset(
    {"funnel", "herbert", "layoutlmv2", "openai-gpt", "roformer", "splinter"}
)
#: Model types for which transformers ignores a named class that differs from the registered
#: one: those registered to TokenizersBackend / PreTrainedTokenizerFast (tokenizer.json as
#: is), and MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS (their registered class, none of them
#: a BERT one).
NAMED_CLASS_IGNORED_TYPES = frozenset(
    {
        "EvollaModel",
        "arctic",
        "aria",
        "beam",
        "bigbird_pegasus",
        "canary",
        "chatlm",
        "cohere_asr",
        "ernie4_5",
        "ernie4_5_moe",
        "flex_olmo",
        "fuyu",
        "glm",
        "glm4",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v",
        "glm4v_moe",
        "glm_image",
        "glmasr",
        "got_ocr2",
        "gpt_bigcode",
        "gradium_phonon_tts",
        "granite",
        "granitemoe",
        "granitemoehybrid",
        "granitemoeshared",
        "h2ovl_chat",
        "hyperclovax",
        "hyperclovax_vision_v2",
        "hyperclovax_vlm",
        "internlm2",
        "internlm3",
        "iquestcoder",
        "jamba",
        "kimi_k25",
        "kimi_linear",
        "kosmos-2",
        "llava",
        "llava_next",
        "mimo_v2_flash",
        "minicpm3",
        "minicpm_ocr",
        "minicpmv",
        "minicpmv4_6",
        "minicpmv4_7",
        "minimax_m2",
        "ministral",
        "ministral3",
        "mistral",
        "mistral3",
        "mistral_large4",
        "mixtral",
        "modernbert",
        "modernbert-decoder",
        "molmo",
        "molmo2",
        "nemo_speechlm",
        "nemotron",
        "nvfp4",
        "nystromformer",
        "olmo2",
        "olmo3",
        "olmo_hybrid",
        "omniasr",
        "opencua",
        "openvla",
        "paddleocr_vl",
        "pegasus_x",
        "persimmon",
        "phi3",
        "phi3_v",
        "phimoe",
        "pix2struct",
        "pixtral",
        "pocket_tts",
        "qwen2",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_5_moe_text",
        "qwen4_exp",
        "siglip2",
        "smolvlm",
        "stablelm",
        "step3_vl",
        "umt5",
        "vipllava",
        "voxtral",
        "voxtral_realtime",
        "xlm-roberta-xl",
    }
)
#: The special tokens each rebuilding class puts around a text when the files name none.
DEFAULT_SPECIALS = {"MPNetTokenizer": ("<s>", "</s>")}
BERT_SPECIALS = ("[CLS]", "[SEP]")

Rebuild = Literal["bert", "other", "as-is"]


def tokenizer_class(tok_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Rebuild, str]:
    """What AutoTokenizer builds: ("bert" | "other" | "as-is", the class name it went by)."""
    model_type = str(config.get("model_type") or "")
    named = tok_cfg.get("tokenizer_class") or config.get("tokenizer_class")
    if isinstance(named, str) and named:
        if model_type in NAMED_CLASS_IGNORED_TYPES:
            return "as-is", named
        if (
            named in BERT_REBUILD_WHEN_STRIPPED - BERT_REBUILD_CLASSES
            and model_type not in BERT_REBUILD_TYPES
        ):
            # looked up as written (no init: as is) or stripped (a rebuild) depending on a
            # registry of every model type; too rare to carry that table: refused
            return "other", named
        # a model type registered to another class looks the name up as written; else
        # transformers strips "Fast" first (only the DPR fast names differ between the two)
        table = (
            BERT_REBUILD_WHEN_STRIPPED
            if _registered_is(model_type, named)
            else BERT_REBUILD_CLASSES
        )
        if named in table:
            return "bert", named
        if named in OTHER_REBUILD_CLASSES:
            return "other", named
        return "as-is", named
    if model_type in BERT_REBUILD_TYPES:
        return "bert", f"the {model_type!r} default"
    if model_type in OTHER_REBUILD_TYPES:
        return "other", f"the {model_type!r} default"
    return "as-is", "none"


def _registered_is(model_type: str, named: str) -> bool:
    """Whether ``named`` is (modulo "Fast") the class registered for ``model_type``; called
    for BERT_REBUILD_TYPES (and DPR names only reach the table through those)."""
    registered = "MPNetTokenizer" if model_type == "mpnet" else "BertTokenizer"
    return model_type not in BERT_REBUILD_TYPES or named.removesuffix("Fast") == registered


def bert_normalizer(
    tok_cfg: Any, config: Any = None, tdir: Path | None = None
) -> BertNormalizerSpec | None:
    """The BertNormalizer transformers 5 rebuilds for a directory (tokenizer_config.json,
    config.json, the folder holding tokenizer.json), or None when it keeps ``tokenizer.json``'s
    own; a ModelError when it rebuilds a tokenizer embedpool cannot reproduce from
    ``tokenizer.json`` (checked when ``tdir`` is given)."""
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
    config = config if isinstance(config, dict) else {}
    kind, name = tokenizer_class(tok_cfg, config)
    where = Path(tdir or ".") / "tokenizer_config.json"
    if kind == "as-is":
        return None
    if kind == "other":
        raise ModelError(
            f"{where}: transformers builds the tokenizer as {name}, which "
            "rebuilds its normalizer by rules embedpool does not reproduce; "
            "refused rather than tokenise differently"
        )
    if tdir is not None:
        _check_wordpiece(tdir, tok_cfg, name)
    strip = tok_cfg.get("strip_accents")
    return BertNormalizerSpec(
        lowercase=_flag(tok_cfg, "do_lower_case", True, where),
        strip_accents=None if strip is None else _flag(tok_cfg, "strip_accents", True, where),
        handle_chinese_chars=_flag(tok_cfg, "tokenize_chinese_chars", True, where),
    )


def _flag(cfg: Mapping[str, Any], key: str, default: bool, where: Path) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _check_wordpiece(tdir: Path, tok_cfg: Mapping[str, Any], name: str) -> None:
    """The rebuild keeps tokenizer.json's vocabulary only: its model must be the WordPiece
    the class builds, and the tokens around a text the ones the class adds."""
    import json

    path = tdir / "tokenizer.json"
    if not path.is_file():
        return  # ResolvedModel names the missing tokenizer.json
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    model = data.get("model") if isinstance(data, dict) else None
    model = model if isinstance(model, dict) else {}
    if (
        model.get("type", "WordPiece") != "WordPiece"
        or model.get("continuing_subword_prefix", "##") != "##"
        or model.get("max_input_chars_per_word", 100) != 100
    ):
        raise ModelError(
            f"{path}: transformers rebuilds this tokenizer as {name} (a WordPiece with prefix "
            f"'##'), not the {model.get('type')!r} model saved here; refused rather than "
            "tokenise differently from sentence-transformers"
        )
    default = DEFAULT_SPECIALS.get(name.removesuffix("Fast"), BERT_SPECIALS)
    want = (
        _token(tok_cfg.get("cls_token")) or default[0],
        _token(tok_cfg.get("sep_token")) or default[1],
    )
    got = _template_specials(data.get("post_processor"))
    if got is not None and got != want:
        raise ModelError(
            f"{path}: transformers rebuilds this tokenizer as {name}, which puts {want[0]} ... "
            f"{want[1]} around a text; tokenizer.json puts {got[0]} ... {got[1]}. Set "
            "cls_token and sep_token in tokenizer_config.json; refused until they agree"
        )


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_specials(proc: Any) -> tuple[str, str] | None:
    """The first and last special tokens tokenizer.json's post-processor puts around one
    text (None: a post-processor this does not read)."""
    if not isinstance(proc, dict):
        return None
    if proc.get("type") == "Sequence":
        found = [_template_specials(p) for p in proc.get("processors") or []]
        return next((f for f in found if f is not None), None)
    if proc.get("type") in ("BertProcessing", "RobertaProcessing"):
        try:
            return str(proc["cls"][0]), str(proc["sep"][0])
        except (KeyError, IndexError, TypeError):
            return None
    if proc.get("type") == "TemplateProcessing":
        specials = [
            p["SpecialToken"]["id"]
            for p in proc.get("single") or []
            if isinstance(p, dict) and "SpecialToken" in p
        ]
        return (str(specials[0]), str(specials[-1])) if len(specials) >= 2 else None
    return None
