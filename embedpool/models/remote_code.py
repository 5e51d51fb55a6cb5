"""Remote code: ``auto_map`` in config.json, honoured only where embedpool knows the code.

A config.json with ``auto_map`` tells transformers (with ``trust_remote_code``) to build the
model from Python files of the repository, or of another one (``"owner/repo--module.Class"``),
instead of its own class for ``model_type``. That code can change the maths with no field
embedpool reads: jina-embeddings-v2 is ``model_type: bert`` with ALiBi attention,
jina-embeddings-v3 is ``xlm-roberta`` with rotary positions and LoRA adapters. Building the
``model_type``'s graph for them would give wrong vectors without an error, so a model whose
encoder embedpool builds from safetensors is refused when its ``auto_map`` names code outside
``KNOWN_REMOTE_CODE``.

``KNOWN_REMOTE_CODE``, the allow-list: per model type, the repository and modules whose code
embedpool's family reproduces, checked against the reference:

- ``nomic_bert``: nomic-ai/nomic-bert-2048's ``configuration_hf_nomic_bert`` and
  ``modeling_hf_nomic_bert`` (nomic-embed-text-v1/v1.5, CodeRankEmbed). transformers 5 has
  the same model natively (its NomicBertModel loads these checkpoints, tested in
  tests/test_families.py against the family's goldens); the fields that would make nomic-ai's
  code differ (``rotary_emb_fraction``, ``prenorm``, biases, ...) are refused by the family.

The same module names copied into the model directory (what ``save_pretrained`` writes for a
remote-code model) are accepted by name: embedpool cannot tell an edited copy from the
original. A directory that ships ``onnx/model.onnx`` is not checked here: its graph, exported
from that code, is the maths embedpool runs.

gte-Qwen2 (``model_type: qwen2``, ``auto_map`` to its own ``modeling_qwen``) is refused so: its
card says its attention is bidirectional, its config.json says nothing embedpool reads, and
its code is the only reference (trust_remote_code). The refusal of a decoder names the
explicit choice instead: without ``auto_map``, ``is_causal`` in config.json decides (false:
bidirectional), as in transformers 5 and sentence-transformers 6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embedpool.errors import ModelError

#: model_type -> (the repository the code lives in, the modules embedpool reproduces).
KNOWN_REMOTE_CODE: dict[str, tuple[str, frozenset[str]]] = {
    "nomic_bert": (
        "nomic-ai/nomic-bert-2048",
        frozenset({"configuration_hf_nomic_bert", "modeling_hf_nomic_bert"}),
    ),
}

#: Decoder model types whose attention ``is_causal`` in config.json states (families qwen2,
#: qwen3): the way out the refusal names for them.
DECODER_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def check_remote_code(config: Mapping[str, Any], where: str) -> None:
    """Refuse ``config``'s ``auto_map`` unless every reference is known code for its
    model_type (see the module docstring)."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    model_type = str(config.get("model_type", ""))
    refs = _refs(auto_map)
    known = KNOWN_REMOTE_CODE.get(model_type)
    unknown = [r for r in refs if known is None or not _is_known(r, *known)]
    if not unknown and refs:
        return
    allowed = "; ".join(
        f"{t}: {repo} ({', '.join(sorted(mods))})" for t, (repo, mods) in KNOWN_REMOTE_CODE.items()
    )
    shown = unknown[0] if unknown else repr(auto_map)
    attention = (
        " A decoder whose code changes only its attention mask (gte-Qwen2's, "
        'bidirectional by its card): remove auto_map and state "is_causal": false '
        "(or true) in config.json, which embedpool builds as it says."
        if model_type in DECODER_TYPES
        else ""
    )
    raise ModelError(
        f"{where}: auto_map names remote code ({shown}) that builds model_type "
        f"{model_type!r} its own way, which embedpool cannot check; refused rather than "
        f"build transformers' {model_type!r} in its place. Known remote code: {allowed}. "
        f"An onnx/model.onnx exported from the model is used as it is.{attention}"
    )


def _refs(auto_map: Any) -> list[str]:
    """Every class reference in ``auto_map`` (values are strings, or [slow, fast] lists)."""
    if not isinstance(auto_map, dict):
        return [repr(auto_map)]
    out: list[str] = []
    for value in auto_map.values():
        items = value if isinstance(value, list | tuple) else [value]
        out += [str(v) for v in items if v is not None]
    return out


def _is_known(ref: str, repo: str, modules: frozenset[str]) -> bool:
    source, sep, local = ref.partition("--")
    if sep and source != repo:
        return False
    module = (local if sep else ref).rsplit(".", 1)[0]
    return module in modules
