"""What a model computes, as read from its files: the contract between model resolution
(``embedpool.models``, which reads directories) and the graph builder (``embedpool.graph``,
which turns weights into ONNX). Pure frozen dataclasses: no I/O, no numpy, no onnx.

    model directory ──models.resolve_model──> ResolvedModel
                                                ├─ family + encoder config   (config.json)
                                                ├─ TextSpec   how a text becomes tokens
                                                │             (max length, lower-casing, prompts)
                                                ├─ HeadSpec   what follows the encoder, in order:
                                                │             Pooling -> Dense* -> Normalize?
                                                │             -> truncate_dim?
                                                └─ files      every file the vectors depend on,
                                                              with its sha256 (cache keys)
    ResolvedModel + precision ──graph.prepare_onnx──> one ONNX file: ids in, vectors out

Every sentence-transformers module in ``modules.json`` maps onto one field here or is
refused while resolving: nothing a model directory says is silently skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

#: sentence-transformers' pooling modes. With the old ``pooling_mode_*`` flags its
#: ``Pooling.forward`` concatenates the active modes in this order; a 6.x ``pooling_mode``
#: list is concatenated in the list's own order. Several modes make the output
#: ``len(modes) x hidden`` wide.
PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
POOLING_ORDER: tuple[PoolingMode, ...] = (
    "cls",
    "max",
    "mean",
    "mean_sqrt_len_tokens",
    "weightedmean",
    "lasttoken",
)

#: Activations of a sentence-transformers ``Dense`` module, by the short lower-case name of
#: the torch class it saves (``torch.nn.modules.activation.Tanh`` -> ``"tanh"``). torch
#: instantiates each with its default arguments (GELU: erf, LeakyReLU: slope 0.01, ELU and
#: CELU: alpha 1, Softplus: beta 1 threshold 20, Hardtanh: [-1, 1]).
DenseActivation = Literal[
    "identity",
    "tanh",
    "relu",
    "gelu",
    "sigmoid",
    "silu",
    "leakyrelu",
    "elu",
    "softplus",
    "mish",
    "hardtanh",
    "relu6",
    "selu",
    "celu",
    "softsign",
    "tanhshrink",
    "hardsigmoid",
    "hardswish",
    "logsigmoid",
]
DENSE_ACTIVATIONS: tuple[DenseActivation, ...] = get_args(DenseActivation)

#: What ``TextSpec.prompt_name_for`` maps an API ``input_type`` to, in order of preference:
#: sentence-transformers' ``encode_query`` uses "query", ``encode_document`` the first of
#: "document", "passage", "corpus" that the model has (Cohere, Voyage and NIM call them
#: query / document / passage).
INPUT_TYPE_PROMPTS: dict[str, tuple[str, ...]] = {
    "query": ("query",),
    "document": ("document", "passage", "corpus"),
    "passage": ("passage", "document", "corpus"),
}


@dataclass(frozen=True)
class PoolingSpec:
    """``1_Pooling/config.json`` (both layouts: the ``pooling_mode_*`` flags and the 6.x
    ``pooling_mode`` string or list)."""

    modes: tuple[PoolingMode, ...]  # non-empty, concatenated in this order
    #: False: prompt tokens are left out of the pooled tokens (sentence-transformers masks the
    #: first ``prompt_length`` tokens, [CLS] included, when a prompt was added).
    include_prompt: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("PoolingSpec needs at least one mode")
        bad = [m for m in self.modes if m not in POOLING_ORDER]
        if bad:
            raise ValueError(f"pooling modes {bad} are not among {POOLING_ORDER}")


@dataclass(frozen=True)
class DenseSpec:
    """One ``Dense`` module (``2_Dense/``): ``activation(x @ W.T + b)``, plus ``x`` (or
    ``x @ R.T`` when the widths differ) when ``residual``."""

    in_features: int
    out_features: int
    bias: bool
    activation: DenseActivation
    weights: Path  # model.safetensors of the module (keys linear.weight, linear.bias)
    residual: bool = False  # use_residual (key residual.weight when in != out)

    def __post_init__(self) -> None:
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(
                f"Dense widths must be positive, got {self.in_features} -> {self.out_features}"
            )
        if self.activation not in DENSE_ACTIVATIONS:
            raise ValueError(
                f"Dense activation {self.activation!r} is not among {DENSE_ACTIVATIONS}"
            )


@dataclass(frozen=True)
class HeadSpec:
    """What turns token states into the sentence vector, applied in this order."""

    pooling: PoolingSpec
    dense: tuple[DenseSpec, ...] = ()
    #: A ``Normalize`` module is present: vectors are L2-normalised (as sentence-transformers
    #: returns them). Without one they are returned as the model computes them.
    normalize: bool = True
    #: ``config_sentence_transformers.json`` truncate_dim: sentence-transformers keeps the
    #: first N values of the final vector, after Normalize (so not renormalised).
    truncate_dim: int | None = None

    def __post_init__(self) -> None:
        if self.truncate_dim is not None and self.truncate_dim <= 0:
            raise ValueError(f"truncate_dim must be positive, got {self.truncate_dim}")

    def out_dim(self, hidden: int) -> int:
        width = self.dense[-1].out_features if self.dense else hidden * len(self.pooling.modes)
        return min(width, self.truncate_dim) if self.truncate_dim else width

    def key(self) -> dict[str, object]:
        """Everything that shapes the output, without file paths (cache keys must not change
        when a model directory moves; the Dense weights are keyed by their files' hashes)."""
        return {
            "modes": list(self.pooling.modes),
            "include_prompt": self.pooling.include_prompt,
            "dense": [
                [d.in_features, d.out_features, d.bias, d.activation, d.residual]
                for d in self.dense
            ],
            "normalize": self.normalize,
            "truncate_dim": self.truncate_dim,
        }


@dataclass(frozen=True)
class BertNormalizerSpec:
    """A ``tokenizers`` BertNormalizer that replaces the one in ``tokenizer.json``.

    transformers 5 rebuilds a ``BertTokenizer`` (``tokenizer_config.json``
    ``tokenizer_class``) from its vocabulary and the arguments in ``tokenizer_config.json``,
    so ``do_lower_case`` (default True), ``strip_accents`` and ``tokenize_chinese_chars`` there
    win over the normalizer saved in ``tokenizer.json``."""

    lowercase: bool = True
    strip_accents: bool | None = None
    handle_chinese_chars: bool = True
    clean_text: bool = True


@dataclass(frozen=True)
class TextSpec:
    """How a text becomes token ids, resolved exactly as sentence-transformers resolves it."""

    #: ``sentence_bert_config.json`` max_seq_length, else min(max_position_embeddings
    #: (minus RoBERTa's padding offset), the tokenizer's model_max_length).
    max_length: int
    #: ``sentence_bert_config.json`` do_lower_case: a Lowercase normalizer in front of the
    #: tokenizer's own (what sentence-transformers 6 does; the prompt is lower-cased too).
    do_lower_case: bool = False
    #: ``config_sentence_transformers.json`` prompts (name -> text prepended to the input).
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None
    #: transformers' rebuild of a BertTokenizer's normalizer (see BertNormalizerSpec).
    normalizer: BertNormalizerSpec | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.default_prompt_name is not None and self.default_prompt_name not in dict(
            self.prompts
        ):
            raise ValueError(
                f"default prompt name {self.default_prompt_name!r} is not one of "
                f"the prompts {sorted(dict(self.prompts))}"
            )

    def prompt(self, name: str) -> str:
        for key, value in self.prompts:
            if key == name:
                return value
        raise KeyError(name)

    def resolve_prompt(
        self, prompt: str | None = None, prompt_name: str | None = None
    ) -> str | None:
        """The prompt a text gets, as sentence-transformers' ``encode`` resolves it: an
        explicit ``prompt`` (``""`` for none) wins over ``prompt_name``, which wins over the
        model's ``default_prompt_name``. "query" and "document" always exist (empty unless
        the model sets them). An unknown name raises KeyError naming the known ones."""
        if prompt is not None:
            return prompt
        prompts = {"query": "", "document": "", **dict(self.prompts)}
        if prompt_name is not None:
            if prompt_name not in prompts:
                raise KeyError(
                    f"prompt name {prompt_name!r} is not one of the model's "
                    f"prompts: {sorted(prompts)}"
                )
            return prompts[prompt_name]
        if self.default_prompt_name is not None:
            return prompts[self.default_prompt_name]
        return None

    def prompt_name_for(self, input_type: str) -> str:
        """The prompt name an API ``input_type`` (query, document, passage) selects: the
        first of INPUT_TYPE_PROMPTS[input_type] whose prompt is not empty (e5's "passage"
        for input_type document, where sentence-transformers saved "document" as ""); else
        the first the model has, counting "query" and "document", which every model has
        (empty unless set, as in sentence-transformers)."""
        try:
            candidates = INPUT_TYPE_PROMPTS[input_type]
        except KeyError:
            raise KeyError(
                f"input_type {input_type!r} is not one of {sorted(INPUT_TYPE_PROMPTS)}"
            ) from None
        have = dict(self.prompts)
        return next(
            (n for n in candidates if have.get(n)),
            next((n for n in candidates if n in {"query", "document", *have}), candidates[0]),
        )

    def key(self) -> dict[str, object]:
        return {
            "max_length": self.max_length,
            "do_lower_case": self.do_lower_case,
            "prompts": [list(p) for p in self.prompts],
            "default_prompt_name": self.default_prompt_name,
            "normalizer": None
            if self.normalizer is None
            else [
                self.normalizer.lowercase,
                self.normalizer.strip_accents,
                self.normalizer.handle_chinese_chars,
                self.normalizer.clean_text,
            ],
        }


@dataclass(frozen=True)
class FileRef:
    """A file the vectors are computed from, by its role and content hash."""

    role: str  # "weights", "onnx", "tokenizer", "config", "st:modules", "st:dense:0", ...
    path: Path
    sha256: str


@dataclass(frozen=True)
class ModelFiles:
    """Every file the vectors depend on. Its ``digest`` keys the graph cache and the vector
    cache, so a change to any of them yields new vectors, with or without ``--no-cache``."""

    refs: tuple[FileRef, ...] = field(default_factory=tuple)

    def by_role(self, role: str) -> FileRef | None:
        return next((r for r in self.refs if r.role == role), None)

    def digest(self, exclude_roles: tuple[str, ...] = ()) -> str:
        """sha256 over (role, sha256) of every file, paths left out: the same files in
        another directory give the same digest."""
        h = hashlib.sha256()
        for role, sha in sorted(
            (r.role, r.sha256) for r in self.refs if r.role not in exclude_roles
        ):
            h.update(f"{role}\0{sha}\n".encode())
        return h.hexdigest()


#: What a cross-encoder's classification head looks like, by the transformers class it was
#: saved from: ``pooler`` (BertForSequenceClassification: [CLS] -> pooler.dense -> tanh ->
#: classifier), ``roberta`` (XLMRobertaForSequenceClassification: <s> -> classifier.dense ->
#: tanh -> classifier.out_proj), ``modernbert`` (ModernBertForSequenceClassification: cls or
#: mean pooling -> head.dense -> activation -> head.norm -> classifier), ``causal_lm`` (a
#: ``*ForCausalLM`` reranker such as Qwen3-Reranker: the last token's lm_head logits of the
#: true and false tokens, ``yes`` - ``no``, sentence-transformers' LogitScore).
ClassifierKind = Literal["pooler", "roberta", "modernbert", "causal_lm"]
#: The activations sentence-transformers' CrossEncoder applies to the logits in ``predict``
#: that embedpool implements (torch's Identity, Sigmoid, Tanh).
ScoreActivation = Literal["identity", "sigmoid", "tanh"]


@dataclass(frozen=True)
class ClassifierSpec:
    """A cross-encoder's head (``*ForSequenceClassification``): token states of a
    ``[CLS] query [SEP] document [SEP]`` pair in, ``num_labels`` logits out. ``activation``
    is what CrossEncoder.predict applies after the graph (scores); the graph returns logits."""

    kind: ClassifierKind
    num_labels: int
    labels: tuple[str, ...]  # config.json id2label, in id order
    activation: ScoreActivation
    #: The tokenizer hands the model token_type_ids (BertTokenizer does; XLM-R's does not):
    #: the document's tokens are segment 1.
    token_types: bool = False
    pooling: Literal["cls", "mean"] = "cls"  # ModernBERT's classifier_pooling
    head_activation: str = "tanh"  # ModernBERT's classifier_activation
    head_bias: bool = True  # ModernBERT's classifier_bias (head.dense)
    norm_bias: bool = True  # ModernBERT's norm_bias (head.norm)
    #: causal_lm: the vocabulary ids whose last-token logits score a pair (LogitScore's
    #: true_token_id / false_token_id; false -1: the true logit alone), whether lm_head is
    #: the token table (tie_word_embeddings), and the chat template (jinja source) that
    #: renders a [query, document] pair as the prompt (graph-free: applied in the parent).
    true_token: int = -1
    false_token: int = -1
    tied_lm_head: bool = False
    pair_template: str = ""

    def __post_init__(self) -> None:
        if self.num_labels < 1 or len(self.labels) != self.num_labels:
            raise ValueError(f"num_labels {self.num_labels} with labels {self.labels}")

    def key(self) -> dict[str, object]:
        """What shapes the graph's logits (the activation is applied after the graph)."""
        return {
            "kind": self.kind,
            "num_labels": self.num_labels,
            "token_types": self.token_types,
            "pooling": self.pooling,
            "head_activation": self.head_activation,
            "head_bias": self.head_bias,
            "norm_bias": self.norm_bias,
            **(
                {
                    "true_token": self.true_token,
                    "false_token": self.false_token,
                    "tied_lm_head": self.tied_lm_head,
                }
                if self.kind == "causal_lm"
                else {}
            ),
        }
