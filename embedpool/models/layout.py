"""A model directory's sentence-transformers layout, read exactly as sentence-transformers 6.2
(with transformers 5) reads it, into a ``modelspec.HeadSpec`` and ``TextSpec``.

    modules.json ─┬─ Transformer  (path "" or a subfolder)  sentence_bert_config.json:
                  │                                         max_seq_length, do_lower_case, ...
                  ├─ Pooling      1_Pooling/config.json     both layouts, every mode
                  ├─ Dense*       2_Dense/config.json + model.safetensors
                  ├─ Dropout*     a no-op at inference
                  └─ Normalize?
    config_sentence_transformers.json   prompts, default_prompt_name, similarity_fn_name,
                                        truncate_dim
    tokenizer_config.json               model_max_length; the tokenizer class transformers
                                        builds and, for a BertTokenizer, its do_lower_case,
                                        strip_accents, tokenize_chinese_chars (hf_tokenizer)
    no modules.json                     what SentenceTransformer(dir) builds: Transformer +
                                        mean pooling, no Normalize, the tokenizer's max
                                        length; sentence_bert_config.json and
                                        config_sentence_transformers.json are not read

Honour or refuse, never skip: a module type, a key or a value that embedpool does not
implement raises a ModelError naming the file, the key and what is supported. Keys known to
change nothing embedpool computes (versions, loading options, a dtype for torch) are listed
in the ``HARMLESS_*`` sets; anything else is refused, so a new sentence-transformers option
that changes vectors can never be silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpool.errors import ModelError
from embedpool.models.hf_tokenizer import bert_normalizer as bert_normalizer
from embedpool.modelspec import (
    POOLING_ORDER,
    DenseActivation,
    DenseSpec,
    HeadSpec,
    PoolingMode,
    PoolingSpec,
    TextSpec,
)

#: modules.json types embedpool implements (the last part of the class path).
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Dropout", "Normalize")
#: Legacy pooling flags, in the order sentence-transformers concatenates them.
LEGACY_POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
assert tuple(LEGACY_POOLING_FLAGS.values()) == POOLING_ORDER
#: torch activation classes a Dense module may name, and embedpool's name for each.
TORCH_ACTIVATIONS: dict[str, DenseActivation] = {
    "Identity": "identity",
    "Tanh": "tanh",
    "ReLU": "relu",
    "GELU": "gelu",
    "Sigmoid": "sigmoid",
    "SiLU": "silu",
    "LeakyReLU": "leakyrelu",
    "ELU": "elu",
    "Softplus": "softplus",
    "Mish": "mish",
    "Hardtanh": "hardtanh",
    "ReLU6": "relu6",
    "SELU": "selu",
    "CELU": "celu",
    "Softsign": "softsign",
    "Tanhshrink": "tanhshrink",
    "Hardsigmoid": "hardsigmoid",
    "Hardswish": "hardswish",
    "LogSigmoid": "logsigmoid",
}
#: sentence-transformers' default Transformer output (its only text modality).
DEFAULT_MODALITY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
#: The file names sentence-transformers tries, in order, for the Transformer's config.
ST_CONFIG_NAMES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")
#: transformers' model_max_length when tokenizer_config.json has none (int(1e30)).
VERY_LARGE = int(1e30)
#: config.json model_types whose positions start at pad_token_id + 1 (RoBERTa's offset).
PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "xlm_roberta"})

# Keys that change nothing embedpool computes. Everything else in these files is honoured
# (it has a field above) or refused.
HARMLESS_ST_CONFIG = frozenset({"unpad_inputs", "backend", "cache_dir"})
#: loading options for torch / transformers; ``dtype`` only sets the torch compute type,
#: embedpool computes in fp32 (or its int8 recipe) whatever the checkpoint's dtype
HARMLESS_MODEL_KWARGS = frozenset(
    {
        "torch_dtype",
        "dtype",
        "attn_implementation",
        "trust_remote_code",
        "low_cpu_mem_usage",
        "device_map",
        "revision",
        "cache_dir",
        "local_files_only",
        "token",
        "file_name",
        "provider",
        "export",
        "subfolder",
    }
)
HARMLESS_LOAD_KWARGS = frozenset(
    {
        "trust_remote_code",
        "revision",
        "cache_dir",
        "local_files_only",
        "token",
        "use_fast",
        "subfolder",
    }
)
HARMLESS_PROMPTS_CONFIG = frozenset({"__version__", "requirements"})


@dataclass(frozen=True)
class Layout:
    """What a directory says about the head and the text, and the files it was read from."""

    transformer_dir: Path  # config.json, tokenizer and weights live here
    head: HeadSpec
    text: TextSpec
    similarity_fn_name: str | None
    files: tuple[tuple[str, Path], ...]  # (role, path) of every config file read
    sentence_transformers: bool  # modules.json was there


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist; a ModelError when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def read_config(path: Path) -> dict[str, Any] | None:
    """config.json as an object, or None when it does not exist; a ModelError when it is
    there but not a JSON object (a config of another kind, or a damaged file)."""
    data = read_json(path)
    if data is not None and not isinstance(data, dict):
        raise ModelError(
            f"{path}: expected a JSON object (the model's configuration), got "
            f"{type(data).__name__} {str(data)[:60]}"
        )
    return data


def read_layout(directory: Path) -> Layout:
    """The directory's head, text and config files (see the module docstring)."""
    modules = read_json(directory / "modules.json")
    if modules is None:
        return _plain_layout(directory)
    where = directory / "modules.json"
    if not isinstance(modules, list) or not modules:
        raise ModelError(f"{where}: expected a non-empty list of modules")
    files: list[tuple[str, Path]] = [("st:modules", where)]
    kinds = [_module_kind(m, where) for m in modules]
    _check_order(kinds, modules, where)
    tdir = _subdir(directory, modules[0], where)
    config = read_config(tdir / "config.json") or {}
    st_cfg, st_path = _st_config(tdir)
    if st_path is not None:
        files.append(("st:sentence_bert_config", st_path))
    hidden = hidden_size(config)
    pooling: PoolingSpec | None = None
    dense: list[DenseSpec] = []
    normalize = False
    width = hidden
    for kind, module in zip(kinds[1:], modules[1:], strict=True):
        mdir = _subdir(directory, module, where)
        if kind == "Pooling":
            pooling, width = _pooling(mdir, hidden, files)
        elif kind == "Dense":
            spec = _dense(mdir, width, len(dense), files)
            dense.append(spec)
            width = spec.out_features
        elif kind == "Normalize":
            _normalize(mdir, files)
            normalize = True
        # Dropout: identity at inference (sentence-transformers encodes in eval mode)
    assert pooling is not None  # _check_order requires one
    prompts_cfg = directory / "config_sentence_transformers.json"
    prompts, default_name, similarity, truncate_dim = _prompts_config(prompts_cfg)
    if prompts_cfg.is_file():
        files.append(("st:prompts", prompts_cfg))
    text = TextSpec(
        max_length=max_length(tdir, config, st_cfg, files),
        do_lower_case=_bool(st_cfg, "do_lower_case", st_path),
        prompts=prompts,
        default_prompt_name=default_name,
        normalizer=bert_normalizer(read_json(tdir / "tokenizer_config.json"), config, tdir),
    )
    head = HeadSpec(pooling, tuple(dense), normalize=normalize, truncate_dim=truncate_dim)
    return Layout(tdir, head, text, similarity, tuple(files), True)


def _plain_layout(directory: Path) -> Layout:
    """What SentenceTransformer(dir) builds without modules.json: Transformer + mean pooling.
    (For a *ForCausalLM it picks last-token pooling, but those are decoders embedpool refuses
    when it resolves the family.)"""
    config = read_config(directory / "config.json") or {}
    files: list[tuple[str, Path]] = []
    text = TextSpec(
        max_length=max_length(directory, config, {}, files),
        normalizer=bert_normalizer(
            read_json(directory / "tokenizer_config.json"), config, directory
        ),
    )
    head = HeadSpec(PoolingSpec(("mean",)), normalize=False)
    return Layout(directory, head, text, None, tuple(files), False)


# --- modules.json ------------------------------------------------------------------------------


def _module_kind(module: Any, where: Path) -> str:
    if not isinstance(module, dict):
        raise ModelError(f"{where}: every module must be an object, got {module!r}")
    unknown = set(module) - {"idx", "name", "path", "type", "kwargs"}
    if unknown:
        raise ModelError(
            f"{where}: module {module.get('name')!r} has keys {sorted(unknown)} "
            "that embedpool does not know"
        )
    if module.get("kwargs"):
        raise ModelError(
            f"{where}: module {module.get('type')!r} takes forward kwargs "
            f"{module['kwargs']} (task-specific adapters); embedpool does not "
            "implement them"
        )
    ref = str(module.get("type", ""))
    kind = ref.rsplit(".", 1)[-1]
    if not ref.startswith("sentence_transformers.") or kind not in SUPPORTED_MODULES:
        raise ModelError(
            f"{where}: module {ref!r} (path {module.get('path', '')!r}) is not one embedpool "
            f"implements; it supports sentence-transformers' {', '.join(SUPPORTED_MODULES)} "
            "(Dropout is a no-op at inference). Its vectors cannot be computed without it, "
            "so the model is refused rather than embedded without the module."
        )
    return kind


def _check_order(kinds: list[str], modules: list[Any], where: Path) -> None:
    """Transformer, Pooling, then Dense / Dropout, then at most one Normalize (then Dropout):
    the order HeadSpec computes. Anything else is refused."""
    order = " -> ".join(kinds)
    if kinds[0] != "Transformer" or kinds.count("Transformer") != 1:
        raise ModelError(f"{where}: the first module must be the only Transformer (found {order})")
    if kinds.count("Pooling") != 1 or kinds[1] != "Pooling":
        raise ModelError(
            f"{where}: embedpool needs exactly one Pooling module right after the "
            f"Transformer (found {order}); without it there is no sentence vector"
        )
    if kinds.count("Normalize") > 1 or (
        "Normalize" in kinds and "Dense" in kinds[kinds.index("Normalize") :]
    ):
        raise ModelError(
            f"{where}: modules in the order {order} are not supported (Normalize "
            "must come once, after every Dense)"
        )


def _subdir(directory: Path, module: dict[str, Any], where: Path) -> Path:
    rel = str(module.get("path", ""))
    path = (directory / rel).resolve() if rel else directory
    if path != directory and directory not in path.parents:
        raise ModelError(f"{where}: module path {rel!r} leaves the model directory")
    return path


# --- Transformer: sentence_bert_config.json, tokenizer_config.json, max length ---------------


def _st_config(tdir: Path) -> tuple[dict[str, Any], Path | None]:
    for name in ST_CONFIG_NAMES:
        data = read_json(tdir / name)
        if data is not None:
            path = tdir / name
            if not isinstance(data, dict):
                raise ModelError(f"{path}: expected a JSON object")
            _check_st_config(data, path)
            return data, path
    return {}, None


def _check_st_config(cfg: dict[str, Any], path: Path) -> None:
    def refuse(key: str, why: str) -> ModelError:
        return ModelError(
            f"{path}: {key}={cfg[key]!r} {why}; embedpool refuses the model "
            "rather than compute different vectors"
        )

    for key, value in cfg.items():
        if key in HARMLESS_ST_CONFIG or key in ("max_seq_length", "do_lower_case"):
            continue
        if key == "transformer_task":
            if value != "feature-extraction":
                raise refuse(key, "is not the feature-extraction task embedpool implements")
        elif key == "modality_config":
            if value not in (None, DEFAULT_MODALITY):
                raise refuse(key, "is not the plain text modality")
        elif key == "module_output_name":
            if value not in (None, "token_embeddings"):
                raise refuse(key, "is not token_embeddings")
        elif key in ("model_args", "model_kwargs"):
            _check_kwargs(cfg, key, HARMLESS_MODEL_KWARGS, path)
        elif key in ("tokenizer_args", "processor_kwargs"):
            _check_kwargs(cfg, key, HARMLESS_LOAD_KWARGS | {"model_max_length"}, path)
        elif key in ("config_args", "config_kwargs"):
            _check_kwargs(cfg, key, HARMLESS_LOAD_KWARGS, path)
        elif key in (
            "processing_kwargs",
            "query_length",
            "document_length",
            "query_expansion",
            "tokenizer_name_or_path",
        ):
            if value:
                raise refuse(key, "changes how texts are tokenised")
        else:
            raise ModelError(
                f"{path}: key {key!r} is unknown to embedpool, so it cannot tell "
                "whether it changes the vectors; refused. Known keys: "
                "max_seq_length, do_lower_case, transformer_task, modality_config, "
                "module_output_name, model/tokenizer/config kwargs, "
                f"{', '.join(sorted(HARMLESS_ST_CONFIG))}"
            )


def _check_kwargs(cfg: dict[str, Any], key: str, harmless: frozenset[str], path: Path) -> None:
    value = cfg[key] or {}
    if not isinstance(value, dict):
        raise ModelError(f"{path}: {key} must be an object, got {value!r}")
    unknown = sorted(set(value) - harmless)
    if unknown:
        raise ModelError(
            f"{path}: {key} sets {unknown}, which embedpool does not implement "
            f"(it accepts {', '.join(sorted(harmless))}); refused rather than "
            "compute different vectors"
        )


def max_length(
    tdir: Path, config: Mapping[str, Any], st_cfg: Mapping[str, Any], files: list[tuple[str, Path]]
) -> int:
    """The max sequence length sentence-transformers uses, capped by the positions the model
    has. ST: ``model_max_length`` in sentence_bert_config.json's tokenizer kwargs, else its
    ``max_seq_length``, as given; else min(tokenizer_config.json ``model_max_length`` (1e30
    when absent), config.json ``max_position_embeddings``). A value above the positions the
    model has would crash sentence-transformers on long texts; embedpool caps it there
    (RoBERTa-style models lose ``pad_token_id + 1`` positions to their offset)."""
    tok_cfg_path = tdir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path)
    if tok_cfg is not None:
        files.append(("tokenizer_config", tok_cfg_path))
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
    kwargs = st_cfg.get("tokenizer_args") or st_cfg.get("processor_kwargs") or {}
    # nomic-ai's NomicBert configs name it n_positions (its config maps the usual name to it)
    max_pos = config.get("max_position_embeddings", config.get("n_positions"))
    if kwargs.get("model_max_length") is not None:  # wins over max_seq_length in ST too
        length = _int(kwargs["model_max_length"], "model_max_length", tdir)
    elif st_cfg.get("max_seq_length") is not None:
        length = _int(st_cfg["max_seq_length"], "max_seq_length", tdir)
    else:
        raw = tok_cfg.get("model_max_length")
        length = VERY_LARGE if raw is None else _int(raw, "model_max_length", tok_cfg_path)
        if isinstance(max_pos, int) and max_pos != -1:
            length = min(length, max_pos)
    if isinstance(max_pos, int) and max_pos > 0:
        usable = max_pos
        if str(config.get("model_type", "")) in PADDED_POSITIONS:
            usable -= int(config.get("pad_token_id", 1)) + 1
        length = min(length, usable)
    if length >= VERY_LARGE:
        raise ModelError(
            f"{tdir}: no max length: neither sentence_bert_config.json "
            "max_seq_length, tokenizer_config.json model_max_length nor "
            "config.json max_position_embeddings says one; set max_seq_length"
        )
    if length < 2:
        raise ModelError(f"{tdir}: max length {length} leaves no room for a text")
    return length


def hidden_size(config: Mapping[str, Any]) -> int | None:
    """The encoder's width: ``hidden_size``, or NomicBert's ``n_embd``."""
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


# --- Pooling, Dense, Normalize ---------------------------------------------------------------

POOLING_KEYS = frozenset(
    {
        "embedding_dimension",
        "word_embedding_dimension",
        "pooling_mode",
        "include_prompt",
        *LEGACY_POOLING_FLAGS,
    }
)


def _pooling(
    mdir: Path, hidden: int | None, files: list[tuple[str, Path]]
) -> tuple[PoolingSpec, int | None]:
    path = mdir / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: the Pooling module's config is missing or not an object")
    files.append(("st:pooling", path))
    spec = pooling_spec(cfg, str(path))
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if dim is not None and hidden is not None and dim != hidden:
        raise ModelError(
            f"{path}: embedding_dimension {dim} is not the encoder's hidden size "
            f"{hidden} (config.json): the files belong to different models"
        )
    width = dim if isinstance(dim, int) else hidden
    return spec, None if width is None else width * len(spec.modes)


def pooling_spec(cfg: Mapping[str, Any], where: str) -> PoolingSpec:
    """Both layouts: the 6.x ``pooling_mode`` (a string or a list, concatenated in its order)
    wins; else the old ``pooling_mode_*`` flags (concatenated in POOLING_ORDER; none set means
    mean, as sentence-transformers does)."""
    unknown = sorted(set(cfg) - POOLING_KEYS)
    if unknown:
        raise ModelError(
            f"{where}: pooling keys {unknown} are unknown to embedpool (known: "
            f"pooling_mode, include_prompt, embedding_dimension and the old "
            "pooling_mode_* flags); refused rather than pool differently"
        )
    if "pooling_mode" in cfg:
        raw = cfg["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else None
        if not modes:
            raise ModelError(f"{where}: pooling_mode {raw!r} is not a mode or a list of modes")
    else:
        modes = [m for key, m in LEGACY_POOLING_FLAGS.items() if cfg.get(key)] or ["mean"]
    bad = [m for m in modes if m not in POOLING_ORDER]
    if bad:
        raise ModelError(
            f"{where}: pooling mode {bad[0]!r} is not supported (embedpool "
            f"supports {', '.join(POOLING_ORDER)})"
        )
    include_prompt = cfg.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ModelError(f"{where}: include_prompt must be true or false, got {include_prompt!r}")
    return PoolingSpec(tuple(modes), include_prompt=include_prompt)  # type: ignore[arg-type]


DENSE_KEYS = frozenset(
    {
        "in_features",
        "out_features",
        "bias",
        "activation_function",
        "module_input_name",
        "module_output_name",
        "use_residual",
    }
)


def _dense(mdir: Path, width: int | None, index: int, files: list[tuple[str, Path]]) -> DenseSpec:
    from embedpool.graph.weights import tensor_infos

    path = mdir / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: the Dense module's config is missing or not an object")
    unknown = sorted(set(cfg) - DENSE_KEYS)
    if unknown:
        raise ModelError(
            f"{path}: Dense keys {unknown} are unknown to embedpool (known: "
            f"{', '.join(sorted(DENSE_KEYS))}); refused rather than ignored"
        )
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key) not in (None, "sentence_embedding"):
            raise ModelError(
                f"{path}: {key}={cfg[key]!r}: embedpool implements Dense on the "
                "sentence embedding only"
            )
    try:
        n_in, n_out = int(cfg["in_features"]), int(cfg["out_features"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: in_features and out_features are required ({exc})") from exc
    if width is not None and n_in != width:
        raise ModelError(
            f"{path}: in_features {n_in} does not match the {width} values the "
            "modules before it produce"
        )
    weights = mdir / "model.safetensors"
    if not weights.is_file():
        if (mdir / "pytorch_model.bin").is_file():
            raise ModelError(
                f"{mdir} has only pytorch_model.bin, which embedpool does not read (it needs "
                "torch to unpickle). Convert it once where torch is installed: python -c "
                f'"import torch; from safetensors.torch import save_file; '
                f"save_file(torch.load('{mdir}/pytorch_model.bin'), "
                f"'{mdir}/model.safetensors')\""
            )
        raise ModelError(f"{mdir}: the Dense module's model.safetensors is missing")
    bias = _bool(cfg, "bias", path, default=True)
    residual = _bool(cfg, "use_residual", path, default=False)
    spec = DenseSpec(n_in, n_out, bias, _activation(cfg, path), weights, residual=residual)
    infos = tensor_infos(weights)
    expected: dict[str, tuple[int, ...]] = {"linear.weight": (n_out, n_in)}
    if bias:
        expected["linear.bias"] = (n_out,)
    if residual and n_in != n_out:
        expected["residual.weight"] = (n_out, n_in)
    for key, shape in expected.items():
        if key not in infos:
            raise ModelError(f"{weights}: {key} is missing")
        if infos[key].shape != shape:
            raise ModelError(
                f"{weights}: {key} is {list(infos[key].shape)}, {path.name} implies {list(shape)}"
            )
    files += [(f"st:dense:{index}:config", path), (f"st:dense:{index}:weights", weights)]
    return spec


def _activation(cfg: Mapping[str, Any], path: Path) -> DenseActivation:
    if "activation_function" not in cfg:
        return "tanh"  # sentence-transformers' Dense default
    ref = cfg["activation_function"]
    name = str(ref).rsplit(".", 1)[-1]
    if not isinstance(ref, str) or not ref.startswith("torch.nn.") or name not in TORCH_ACTIVATIONS:
        raise ModelError(
            f"{path}: activation_function {ref!r} is not one embedpool implements (torch.nn "
            f"classes: {', '.join(TORCH_ACTIVATIONS)}). sentence-transformers itself replaces "
            "a non-torch activation with Tanh unless trust_remote_code is set."
        )
    return TORCH_ACTIVATIONS[name]


def _normalize(mdir: Path, files: list[tuple[str, Path]]) -> None:
    path = mdir / "config.json"
    cfg = read_json(path)
    if cfg is None:
        return  # older saves: an empty 2_Normalize folder
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    files.append(("st:normalize", path))
    for key, value in cfg.items():
        if key not in ("module_input_name", "module_output_name"):
            raise ModelError(f"{path}: Normalize key {key!r} is unknown to embedpool; refused")
        if value not in (None, "sentence_embedding"):
            raise ModelError(
                f"{path}: {key}={value!r}: embedpool normalises the sentence embedding only"
            )


# --- config_sentence_transformers.json --------------------------------------------------------


def _prompts_config(
    path: Path,
) -> tuple[tuple[tuple[str, str], ...], str | None, str | None, int | None]:
    """(prompts, default_prompt_name, similarity_fn_name, truncate_dim)."""
    cfg = read_json(path)
    if cfg is None:
        return (), None, None, None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    known = HARMLESS_PROMPTS_CONFIG | {
        "prompts",
        "default_prompt_name",
        "similarity_fn_name",
        "model_type",
        "truncate_dim",
    }
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ModelError(
            f"{path}: keys {unknown} are unknown to embedpool, so it cannot tell "
            f"whether they change the vectors; refused (known: {sorted(known)})"
        )
    model_type = cfg.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise ModelError(
            f"{path}: model_type {model_type!r} is not a SentenceTransformer "
            "(embedpool embeds dense sentence vectors only)"
        )
    raw = cfg.get("prompts") or {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str | None) for k, v in raw.items()
    ):
        raise ModelError(f"{path}: prompts must map names to strings, got {raw!r}")
    prompts = tuple((k, v or "") for k, v in raw.items())
    default = cfg.get("default_prompt_name")
    if default is not None and default not in dict(prompts):
        raise ModelError(
            f"{path}: default_prompt_name {default!r} is not one of the prompts "
            f"{sorted(dict(prompts))}"
        )
    similarity = cfg.get("similarity_fn_name")
    # sentence-transformers keeps only the single-vector similarities it supports
    similarity = similarity if similarity in SIMILARITY_FNS else None
    truncate = cfg.get("truncate_dim")
    if truncate is not None and (not isinstance(truncate, int) or truncate <= 0):
        raise ModelError(f"{path}: truncate_dim must be a positive integer, got {truncate!r}")
    return prompts, default, similarity, truncate


# --- small readers -----------------------------------------------------------------------------


def _bool(cfg: Mapping[str, Any], key: str, path: Path | None, default: bool = False) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def _int(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelError(f"{where}: {key} must be a positive integer, got {value!r}")
    return min(int(value), VERY_LARGE)
