"""Cross-encoders (rerankers): a ``*ForSequenceClassification`` directory read into a
ResolvedModel whose ``classifier`` says what its head computes and how CrossEncoder scores.

What sentence-transformers 6.3's ``CrossEncoder`` does, and this module reads the same way:

- **head**: the transformers class in config.json ``architectures`` (BertFor-, XLMRobertaFor-,
  RobertaFor-, ModernBertForSequenceClassification), ``num_labels`` / ``id2label``, and for
  ModernBERT ``classifier_pooling``, ``classifier_activation``, ``classifier_bias``,
  ``norm_bias``. Anything else is refused with the ONNX route.
- **activation** applied to the logits by ``predict`` (``CrossEncoder.get_default_activation_fn``
  and ``_parse_model_config``): config_sentence_transformers.json ``activation_fn`` (6.x),
  else config.json ``sentence_transformers.activation_fn`` (4.x-5.x), else config.json
  ``sbert_ce_default_activation_function`` (< 4.0); a path that does not start with
  ``torch.`` is not trusted (without trust_remote_code) and falls to the default: Sigmoid
  when num_labels is 1, else Identity.
- **token types**: the tokenizer hands the model ``token_type_ids`` when its
  ``model_input_names`` has them: tokenizer_config.json's own list, else the tokenizer
  class's default (BertTokenizer and its kin do, XLM-R's and the generic fast tokenizer do
  not); only a BERT encoder with a 2-row token-type table reads them.
- **max length**: the tokenizer's model_max_length, capped by the positions, as for
  embedders (``layout.max_length``).
- **causal-LM rerankers** (Qwen3-Reranker): config.json ``architectures[0]`` ending in
  ``ForCausalLM`` of a decoder family embedpool builds (qwen3), loaded as CrossEncoder 6.3
  loads it: modules.json ``[Transformer (text-generation), LogitScore]`` with
  ``1_LogitScore/config.json`` ``true_token_id`` / ``false_token_id``, or a plain
  transformers directory (no modules.json), where CrossEncoder takes the ids of the tokens
  ``yes`` and ``no``. The score is ``logit[true] - logit[false]`` of the last token (one
  label, so the default activation is Sigmoid: p(yes) of a softmax over [no, yes], the model
  card's score). A pair is rendered by the model's chat template (chat_template.jinja, else
  tokenizer_config.json ``chat_template``) from the messages ``query`` and ``document``, as
  CrossEncoder does; a template that renders no such roles (the original Qwen3-Reranker
  download carries Qwen3's chat template) gets the model card's recipe
  (``QWEN3_RERANKER_TEMPLATE``), which CrossEncoder 6.3 would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpool.errors import ModelError
from embedpool.modelspec import ClassifierKind, ClassifierSpec, ScoreActivation

if TYPE_CHECKING:
    from embedpool.models.layout import Layout

#: ``architectures[0]`` -> the head it has.
ARCHITECTURES: dict[str, ClassifierKind] = {
    "BertForSequenceClassification": "pooler",
    "XLMRobertaForSequenceClassification": "roberta",
    "RobertaForSequenceClassification": "roberta",
    "ModernBertForSequenceClassification": "modernbert",
}
#: Tokenizer classes whose default ``model_input_names`` include token_type_ids.
TOKEN_TYPE_TOKENIZERS = frozenset(
    {
        "BertTokenizer",
        "BertTokenizerFast",
        "ElectraTokenizer",
        "ElectraTokenizerFast",
        "MobileBertTokenizer",
        "MobileBertTokenizerFast",
        "ConvBertTokenizer",
        "ConvBertTokenizerFast",
        "SqueezeBertTokenizer",
        "SqueezeBertTokenizerFast",
    }
)
#: torch activation class names CrossEncoder may instantiate, by what embedpool computes.
ACTIVATIONS: dict[str, ScoreActivation] = {
    "Identity": "identity",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
}
#: Decoder model types whose ``*ForCausalLM`` embedpool scores as a reranker (the family's
#: decoder builder; others are refused naming these).
CAUSAL_LM_TYPES = frozenset({"qwen3"})
#: LogitScore's module type in modules.json.
LOGIT_SCORE = "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"
#: Qwen3-Reranker's prompt (its model card's ``format_instruction``, prefix and suffix, with
#: the card's default instruction) as a chat template over the roles CrossEncoder hands a
#: pair: ``query``, ``document`` and an optional ``system`` (the instruction). jinja drops
#: the template's final newline, so the suffix ends ``</think>\n\n`` as the card's does.
QWEN3_RERANKER_TEMPLATE = (
    '{%- set instruction = messages | selectattr("role", "eq", "system") | '
    'map(attribute="content") | first | default("Given a web search query, retrieve relevant '
    'passages that answer the query") -%}\n'
    '{%- set query_text = messages | selectattr("role", "eq", "query") | '
    'map(attribute="content") | first -%}\n'
    '{%- set document_text = messages | selectattr("role", "eq", "document") | '
    'map(attribute="content") | first -%}\n'
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
    'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n<Instruct>: {{ instruction }}\n<Query>: {{ query_text }}\n"
    "<Document>: {{ document_text }}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
    "\n\n\n"
)
#: ModernBERT classifier_activation values the graph computes (transformers' ACT2FN names).
MODERNBERT_HEAD_ACTIVATIONS = frozenset(
    {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh"}
)


def is_cross_encoder(config: Mapping[str, Any]) -> bool:
    """config.json names a sequence-classification head (what CrossEncoder loads)."""
    arch = config.get("architectures")
    return (
        isinstance(arch, list) and bool(arch) and str(arch[0]).endswith("ForSequenceClassification")
    )


def classifier_spec(
    config: Mapping[str, Any], tok_cfg: Mapping[str, Any], st_cfg: Mapping[str, Any], where: Path
) -> ClassifierSpec:
    """The head and scoring of the cross-encoder in ``where`` (see the module docstring).
    ``tok_cfg``: tokenizer_config.json; ``st_cfg``: config_sentence_transformers.json."""
    arch = str(config["architectures"][0])
    kind = ARCHITECTURES.get(arch)
    if kind is None:
        raise ModelError(
            f"{where}: {arch} is a classifier embedpool does not build (it "
            f"builds {', '.join(sorted(ARCHITECTURES))}). Export the model "
            "to ONNX (optimum-cli export onnx --task text-classification) so "
            "that onnx/model.onnx exists, and pass that directory."
        )
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: id2label keys must be label ids: {exc}") from exc
        num_labels = int(config.get("num_labels", len(labels)))
    else:
        num_labels = int(config.get("num_labels", 2))
        labels = tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(labels) != num_labels:
        raise ModelError(f"{where}: num_labels {num_labels} but id2label has {len(labels)}")
    names = tok_cfg.get("model_input_names")
    if isinstance(names, list):
        gives_types = "token_type_ids" in names
    else:
        gives_types = str(tok_cfg.get("tokenizer_class", "")) in TOKEN_TYPE_TOKENIZERS
    token_types = kind == "pooler" and gives_types and int(config.get("type_vocab_size", 2)) > 1
    fields: dict[str, Any] = {}
    if kind == "modernbert":
        pooling = str(config.get("classifier_pooling", "cls"))
        if pooling not in ("cls", "mean"):
            raise ModelError(f"{where}: classifier_pooling {pooling!r} is not cls or mean")
        act = str(config.get("classifier_activation", "gelu"))
        if act not in MODERNBERT_HEAD_ACTIVATIONS:
            raise ModelError(
                f"{where}: classifier_activation {act!r} is not one embedpool "
                f"computes ({', '.join(sorted(MODERNBERT_HEAD_ACTIVATIONS))})"
            )
        fields = {
            "pooling": pooling,
            "head_activation": act,
            "head_bias": bool(config.get("classifier_bias", False)),
            "norm_bias": bool(config.get("norm_bias", False)),
        }
    return ClassifierSpec(
        kind,
        num_labels,
        labels,
        score_activation(config, st_cfg, num_labels, where),
        token_types=token_types,
        **fields,
    )


def score_activation(
    config: Mapping[str, Any], st_cfg: Mapping[str, Any], num_labels: int, where: Path
) -> ScoreActivation:
    """The activation CrossEncoder.predict applies (see the module docstring)."""
    st_model = config.get("sentence_transformers")
    for path in (
        st_cfg.get("activation_fn"),
        st_model.get("activation_fn") if isinstance(st_model, dict) else None,
        config.get("sbert_ce_default_activation_function"),
    ):
        if path is None:
            continue
        path = str(path)
        if not path.startswith("torch."):
            break  # untrusted: CrossEncoder warns and uses its default
        name = path.rsplit(".", 1)[-1]
        if name not in ACTIVATIONS:
            raise ModelError(
                f"{where}: the activation {path} is not one embedpool applies "
                f"({', '.join(sorted(ACTIVATIONS))}); refused rather than "
                "score differently from CrossEncoder"
            )
        return ACTIVATIONS[name]
    return "sigmoid" if num_labels == 1 else "identity"


def is_causal_lm(config: Mapping[str, Any]) -> bool:
    """config.json names a causal LM (what CrossEncoder loads as a LogitScore reranker)."""
    arch = config.get("architectures")
    return isinstance(arch, list) and bool(arch) and str(arch[0]).endswith("ForCausalLM")


def causal_lm_spec(
    config: Mapping[str, Any],
    tdir: Path,
    logit_cfg: Mapping[str, Any] | None,
    st_cfg: Mapping[str, Any],
    files: list[tuple[str, Path]],
) -> ClassifierSpec:
    """The scoring of a causal-LM reranker in ``tdir`` (see the module docstring).
    ``logit_cfg``: LogitScore's config.json (None: a plain transformers directory)."""
    from tokenizers import Tokenizer

    where = tdir / "config.json"
    model_type = str(config.get("model_type", ""))
    if model_type not in CAUSAL_LM_TYPES:
        raise ModelError(
            f"{where}: a {config['architectures'][0]} reranker; embedpool scores "
            f"causal-LM rerankers of {', '.join(sorted(CAUSAL_LM_TYPES))} "
            f"(Qwen3-Reranker), not model_type {model_type!r}"
        )
    if logit_cfg is None:  # CrossEncoder's default: the tokens "yes" and "no"
        try:
            tok = Tokenizer.from_file(str(tdir / "tokenizer.json"))
        except Exception as exc:
            raise ModelError(
                f"{tdir / 'tokenizer.json'}: cannot read the tokenizer: {exc}"
            ) from exc
        true_id, false_id = tok.token_to_id("yes"), tok.token_to_id("no")
        if true_id is None or false_id is None:
            raise ModelError(
                f"{tdir}: a causal LM whose tokenizer has no 'yes' and 'no' "
                "tokens, which CrossEncoder scores by; save it with "
                "CrossEncoder (modules.json with a LogitScore naming its tokens)"
            )
    else:
        try:
            true_id = int(logit_cfg["true_token_id"])
            raw_false = logit_cfg.get("false_token_id")
            false_id = -1 if raw_false is None else int(raw_false)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{tdir}: LogitScore's config needs an integer true_token_id "
                f"(and false_token_id or null): {exc}"
            ) from exc
        if str(logit_cfg.get("module_input_name", "causal_logits")) != "causal_logits":
            raise ModelError(
                f"{tdir}: LogitScore reads {logit_cfg['module_input_name']!r}; "
                "embedpool computes it on the causal LM's logits only"
            )
    vocab = int(config.get("vocab_size", 0))
    for name, tid in (("true", true_id), ("false", false_id)):
        if (tid >= 0 or name == "true") and not 0 <= tid < vocab:
            raise ModelError(
                f"{where}: the {name} token id {tid} is outside the vocabulary of {vocab}"
            )
    template = pair_template(tdir, model_type, files)
    return ClassifierSpec(
        "causal_lm",
        1,
        ("score",),
        score_activation(config, st_cfg, 1, where),
        true_token=true_id,
        false_token=false_id,
        tied_lm_head=bool(config.get("tie_word_embeddings", False)),
        pair_template=template,
    )


def pair_template(tdir: Path, model_type: str, files: list[tuple[str, Path]]) -> str:
    """The chat template that renders a pair (see the module docstring): the model's own
    when it renders the ``query`` and ``document`` roles, else the card's recipe."""
    from embedpool.models.layout import read_json

    path = tdir / "chat_template.jinja"
    source: str | None = None
    if path.is_file():
        source = path.read_text(encoding="utf-8")
        files.append(("st:chat_template", path))
    else:
        tok_cfg = read_json(tdir / "tokenizer_config.json")
        raw = tok_cfg.get("chat_template") if isinstance(tok_cfg, dict) else None
        if isinstance(raw, list):  # named templates: transformers uses "default"
            raw = next(
                (
                    t.get("template")
                    for t in raw
                    if isinstance(t, dict) and t.get("name") == "default"
                ),
                None,
            )
        source = raw if isinstance(raw, str) else None
    if source is not None and _renders_pair(source):
        return source
    if model_type == "qwen3":
        return QWEN3_RERANKER_TEMPLATE
    raise ModelError(
        f"{tdir}: no chat template that renders a [query, document] pair (the "
        "roles 'query' and 'document', as CrossEncoder 6 requires); add a "
        "chat_template.jinja"
    )


def _renders_pair(source: str) -> bool:
    """The template renders a pair's query and then its document (``rerank.PairTemplate``
    builds from it); a chat model's template, which has no such roles, does not."""
    from embedpool.errors import ConfigError
    from embedpool.rerank import PairTemplate

    try:
        PairTemplate(source)
    except ConfigError:
        return False
    return True


def cross_encoder_layout(directory: Path) -> tuple[Layout, ClassifierSpec] | None:
    """The layout of a cross-encoder directory (CrossEncoder 6.x's modules.json with one
    sequence-classification Transformer, or the older plain transformers directory) and its
    classifier; None when ``directory`` is not a cross-encoder."""
    from embedpool.models.layout import Layout, bert_normalizer, max_length, read_json
    from embedpool.modelspec import HeadSpec, PoolingSpec, TextSpec

    tdir = directory
    modules = read_json(directory / "modules.json")
    if isinstance(modules, list) and modules and isinstance(modules[0], dict):
        tdir = directory / str(modules[0].get("path", "") or "")
    config = read_json(tdir / "config.json")
    if not isinstance(config, dict):
        return None
    if is_causal_lm(config):
        return _causal_lm_layout(directory, tdir, modules, config)
    if not is_cross_encoder(config):
        return None
    files: list[tuple[str, Path]] = []
    if isinstance(modules, list):
        if len(modules) != 1:
            raise ModelError(
                f"{directory / 'modules.json'}: a cross-encoder with "
                f"{len(modules)} modules; embedpool reads the one-module "
                "sequence-classification layout CrossEncoder saves"
            )
        files.append(("st:modules", directory / "modules.json"))
    st_bert = read_json(tdir / "sentence_bert_config.json")
    st_bert = st_bert if isinstance(st_bert, dict) else {}
    if st_bert:
        files.append(("st:sentence_bert_config", tdir / "sentence_bert_config.json"))
    st_path = directory / "config_sentence_transformers.json"
    st_cfg = read_json(st_path)
    st_cfg = st_cfg if isinstance(st_cfg, dict) else {}
    if st_cfg:
        files.append(("st:activation", st_path))
    tok_cfg = read_json(tdir / "tokenizer_config.json")
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
    spec = classifier_spec(config, tok_cfg, st_cfg, tdir / "config.json")
    text = TextSpec(
        max_length=max_length(tdir, config, st_bert, files),
        normalizer=bert_normalizer(tok_cfg or None, config, tdir),
    )
    # The head's fields are unused for a classifier (``classifier`` replaces them); no
    # Normalize, so an engine returns the graph's logits as they are.
    head = HeadSpec(PoolingSpec(("cls",)), normalize=False)
    return Layout(tdir, head, text, None, tuple(files), isinstance(modules, list)), spec


def _causal_lm_layout(
    directory: Path, tdir: Path, modules: Any, config: dict[str, Any]
) -> tuple[Layout, ClassifierSpec] | None:
    """A causal-LM reranker's layout: CrossEncoder's ``[Transformer, LogitScore]`` modules, or
    a plain transformers directory; None for a causal LM saved as something else (an
    embedder's modules.json with Pooling)."""
    from embedpool.models.layout import Layout, bert_normalizer, max_length, read_json
    from embedpool.modelspec import HeadSpec, PoolingSpec, TextSpec

    files: list[tuple[str, Path]] = []
    logit_cfg: dict[str, Any] | None = None
    if not isinstance(modules, list) and not _has_yes_no(tdir):
        return None  # a plain causal LM CrossEncoder could not score: not a reranker
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        if len(types) != 2 or types[1] != LOGIT_SCORE:
            return None
        files.append(("st:modules", directory / "modules.json"))
        lpath = directory / str(modules[1].get("path", "") or "") / "config.json"
        raw = read_json(lpath)
        if not isinstance(raw, dict):
            raise ModelError(f"{lpath}: LogitScore's config is missing or not a JSON object")
        logit_cfg = raw
        files.append(("st:logit_score", lpath))
    st_bert = read_json(tdir / "sentence_bert_config.json")
    st_bert = st_bert if isinstance(st_bert, dict) else {}
    if st_bert:
        files.append(("st:sentence_bert_config", tdir / "sentence_bert_config.json"))
    st_path = directory / "config_sentence_transformers.json"
    st_cfg = read_json(st_path)
    st_cfg = st_cfg if isinstance(st_cfg, dict) else {}
    if st_cfg:
        files.append(("st:activation", st_path))
    spec = causal_lm_spec(config, tdir, logit_cfg, st_cfg, files)
    tok_cfg = read_json(tdir / "tokenizer_config.json")
    text = TextSpec(
        max_length=max_length(tdir, config, st_bert, files),
        normalizer=bert_normalizer(tok_cfg if isinstance(tok_cfg, dict) else None, config, tdir),
    )
    head = HeadSpec(PoolingSpec(("lasttoken",)), normalize=False)
    return Layout(tdir, head, text, None, tuple(files), isinstance(modules, list)), spec


def _has_yes_no(tdir: Path) -> bool:
    """tokenizer.json's vocabulary has the tokens ``yes`` and ``no`` (read as JSON: a
    tokenizer embedpool cannot load is reported where it is loaded)."""
    from embedpool.models.layout import read_json

    tok = read_json(tdir / "tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = (
        {str(t.get("content")) for t in tok.get("added_tokens") or [] if isinstance(t, dict)}
        if isinstance(tok, dict)
        else set()
    )
    words = (
        set(vocab)
        if isinstance(vocab, dict)
        else {  # Unigram: [token, score] pairs
            str(v[0]) for v in vocab or [] if isinstance(v, list) and v
        }
    )
    return all(w in words or w in added for w in ("yes", "no"))


def refuse_cross_encoder(model: Any) -> None:
    """ConfigError when a cross-encoder (``ResolvedModel.classifier``) is asked to embed: it
    scores [query, document] pairs and makes no vectors (Embedder, serve --model)."""
    if getattr(model, "classifier", None) is not None:
        from embedpool.errors import ConfigError

        raise ConfigError(
            f"{model.name} is a cross-encoder (a reranker: it scores [query, "
            "document] pairs and makes no vectors); rerank with "
            "embedpool.Reranker, `embedpool rerank` or `serve --reranker`"
        )
