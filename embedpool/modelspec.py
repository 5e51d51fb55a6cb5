"""What a model computes, as read from its files: the contract between model resolution
(``embedpool.models``, which reads directories) and the graph builder (``embedpool.graph``,
which turns weights into ONNX). Pure frozen dataclasses: no I/O, no numpy, no onnx.

    model directory ──models.resolve_model──> ResolvedModel
                                                ├─ family + encoder config   (config.json)
                                                ├─ TextSpec   how a text becomes tokens
                                                │             (max length, lower-casing, prompts)
                                                ├─ HeadSpec   what follows the encoder, in order:
                                                │             Pooling -> Dense* -> Normalize?
                                                └─ files      every file the vectors depend on,
                                                              with its sha256 (cache keys)
    ResolvedModel + precision ──graph.prepare_onnx──> one ONNX file: ids in, vectors out

Every sentence-transformers module in ``modules.json`` maps onto one field here or is
refused while resolving: nothing a model directory says is silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: sentence-transformers' pooling modes, in the order its ``Pooling.forward`` concatenates
#: them when several are on (the output is then ``len(modes) x hidden`` wide).
PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
POOLING_ORDER: tuple[PoolingMode, ...] = ("cls", "max", "mean", "mean_sqrt_len_tokens",
                                          "weightedmean", "lasttoken")

#: Activations of a sentence-transformers ``Dense`` module, by the short lower-case name the
#: graph builder emits (``torch.nn.modules.activation.Tanh`` -> ``"tanh"``).
DenseActivation = Literal["identity", "tanh", "relu", "gelu", "sigmoid", "silu", "leakyrelu",
                          "elu", "softplus", "mish", "hardtanh", "gelu_tanh"]


@dataclass(frozen=True)
class PoolingSpec:
    """``1_Pooling/config.json`` (both layouts: the ``pooling_mode_*`` flags and the 6.x
    ``pooling_mode`` string or list)."""

    modes: tuple[PoolingMode, ...]  # non-empty, in POOLING_ORDER
    #: False: prompt tokens are left out of the pooled tokens (sentence-transformers masks the
    #: first ``prompt_length`` tokens, [CLS] included, when a prompt was added).
    include_prompt: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("PoolingSpec needs at least one mode")
        if list(self.modes) != [m for m in POOLING_ORDER if m in self.modes]:
            raise ValueError(f"pooling modes {self.modes} must be unique and in the order "
                             f"{POOLING_ORDER}")


@dataclass(frozen=True)
class DenseSpec:
    """One ``Dense`` module (``2_Dense/``): ``activation(x @ W.T + b)``."""

    in_features: int
    out_features: int
    bias: bool
    activation: DenseActivation
    weights: Path  # model.safetensors of the module (keys linear.weight, linear.bias)


@dataclass(frozen=True)
class HeadSpec:
    """What turns token states into the sentence vector, applied in this order."""

    pooling: PoolingSpec
    dense: tuple[DenseSpec, ...] = ()
    #: A ``Normalize`` module is present: vectors are L2-normalised (as sentence-transformers
    #: returns them). Without one they are returned as the model computes them.
    normalize: bool = True

    def out_dim(self, hidden: int) -> int:
        return self.dense[-1].out_features if self.dense else hidden * len(self.pooling.modes)


@dataclass(frozen=True)
class TextSpec:
    """How a text becomes token ids, resolved exactly as sentence-transformers resolves it."""

    #: ``sentence_bert_config.json`` max_seq_length, else min(max_position_embeddings
    #: (minus RoBERTa's padding offset), the tokenizer's model_max_length).
    max_length: int
    #: ``sentence_bert_config.json`` do_lower_case: ``text.lower()`` before tokenising.
    do_lower_case: bool = False
    #: ``config_sentence_transformers.json`` prompts (name -> text prepended to the input).
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None

    def prompt(self, name: str) -> str:
        for key, value in self.prompts:
            if key == name:
                return value
        raise KeyError(name)


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
