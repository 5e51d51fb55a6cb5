"""Models: a name, directory or hub id in, a verified ``ResolvedModel`` out.

    resolve_model(spec) ──> resolve.load_directory(dir)
                              ├─ layout.read_layout     modules.json, Pooling, Dense, Normalize,
                              │                         sentence_bert_config.json, prompts,
                              │                         tokenizer_config.json -> HeadSpec, TextSpec
                              ├─ weights' headers       git-lfs pointer, truncated, config mismatch
                              ├─ filehash.sha256_files  every file used, hashed (cached on stat)
                              └─ known.KNOWN_MODELS     prompts and Matryoshka facts by name

The modules: ``resolve`` (ResolvedModel and the sources tried), ``layout`` (the
sentence-transformers layout, honoured or refused), ``filehash`` (file hashes cached like
git's index), ``known`` (the table of models embedpool knows by name).
"""

from __future__ import annotations

from embedpool.models.filehash import sha256_file
from embedpool.models.known import KNOWN_MODELS, KnownModel, find_known
from embedpool.models.resolve import (
    DEFAULT_MODEL,
    ResolvedModel,
    load_directory,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "ResolvedModel",
    "find_known",
    "load_directory",
    "resolve_model",
    "sha256_file",
]
