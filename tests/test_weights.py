"""embedpool.graph.weights: checkpoints as they come (fp32, fp16, bf16, sharded, prefixed) and
the errors for files that are not what they claim (git-lfs pointers, partial downloads,
configs of another model). ``safetensors.numpy`` is the reference reader where it can read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embedpool.errors import ModelError
from embedpool.graph.families.bert import BertConfig, check_weights, load_weights
from embedpool.graph.weights import load_safetensors, tensor_infos

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 90868376\n"
)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "bert.embeddings.word_embeddings.weight": rng.normal(size=(11, 4)).astype(np.float32),
        "bert.encoder.layer.0.output.LayerNorm.gamma": rng.normal(size=4).astype(np.float32),
        "bert.embeddings.position_ids": np.arange(7, dtype=np.int64)[None],
        "cls.bias": rng.normal(size=3).astype(np.float32),
    }


def _write_raw(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand (numpy cannot express bf16 or f8)."""
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_fp32_keys_and_values_match_the_reference_reader(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    got = load_safetensors(path)
    ref = load_file(str(path))
    assert set(got) == {
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.output.LayerNorm.weight",
        "cls.bias",
    }  # prefix gone, TF name fixed, int buffer dropped
    assert np.array_equal(
        got["embeddings.word_embeddings.weight"], ref["bert.embeddings.word_embeddings.weight"]
    )
    assert all(v.dtype == np.float32 for v in got.values())


def test_fp16_is_widened_exactly(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    half = {k: v.astype(np.float16) for k, v in _tensors().items() if v.dtype == np.float32}
    save_file(half, str(path))
    got = load_safetensors(path)
    assert np.array_equal(got["cls.bias"], half["cls.bias"].astype(np.float32))


def test_bf16_is_widened_exactly(tmp_path: Path) -> None:
    """bf16 is the top 16 bits of a float32; the load restores exactly those floats."""
    values = np.array([[1.0, -2.5, 3.140625], [1e-3, 65504.0, -0.0]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "model.safetensors"
    _write_raw(path, {"model.w": ("BF16", (2, 3), bits.tobytes())})
    got = load_safetensors(path)["w"]
    assert got.dtype == np.float32 and got.shape == (2, 3)
    assert np.array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))
    assert abs(got[0, 2] - 3.140625) == 0 and abs(got[1, 0] - 1e-3) < 1e-5


def test_sharded_checkpoint_loads_like_one_file(tmp_path: Path) -> None:
    whole = _tensors()
    names = sorted(whole)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for file, keys in shards.items():
        save_file({k: whole[k] for k in keys}, str(tmp_path / file))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
        )
    )
    save_file(whole, str(tmp_path / "one.safetensors"))
    got, want = load_safetensors(index), load_safetensors(tmp_path / "one.safetensors")
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelError,
        match=r"lists the shard model-00002-of-00002\.safetensors, "
        r"which is missing: the download is incomplete",
    ):
        load_safetensors(index)


def _broken(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    blob = path.read_bytes()
    if kind == "lfs-pointer":
        path.write_bytes(LFS_POINTER)
    elif kind == "truncated-data":
        path.write_bytes(blob[:-10])
    elif kind == "truncated-header":
        path.write_bytes(blob[:20])
    elif kind == "tiny":
        path.write_bytes(blob[:3])
    elif kind == "garbage":
        path.write_bytes(b"<html>404 not found</html>" * 4)
    elif kind == "f8":
        _write_raw(path, {"w": ("F8_E4M3", (2,), b"\x01\x02")})
    elif kind == "bad-size":
        _write_raw(path, {"w": ("F32", (3,), b"\x00" * 8)})
    return path


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("lfs-pointer", r"is a git-lfs pointer file \(\d+ bytes\), not the weights.*git lfs pull"),
        ("truncated-data", r"is truncated .*the download is incomplete; download the file again"),
        ("truncated-header", r"is truncated .*header.*the download is incomplete"),
        ("tiny", r"is truncated \(3 bytes"),
        ("garbage", r"is not a safetensors file"),
        ("f8", r"dtype F8_E4M3, which embedpool does not read"),
        ("bad-size", r"spans 8 bytes, expected 12: the file is corrupt"),
    ],
    ids=lambda v: v if "\\" not in v and "(" not in v else None,
)
def test_broken_files_name_the_cause_and_the_fix(tmp_path: Path, kind: str, match: str) -> None:
    path = _broken(tmp_path, kind)
    for read in (tensor_infos, load_safetensors):
        with pytest.raises(ModelError, match=match) as info:
            read(path)
        assert str(path) in str(info.value)


TINY = {
    "model_type": "bert",
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "intermediate_size": 16,
    "max_position_embeddings": 12,
}


def _bert(cfg: dict[str, Any], layers: int) -> dict[str, np.ndarray]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    w = {
        "embeddings.word_embeddings.weight": np.zeros((20, h)),
        "embeddings.position_embeddings.weight": np.zeros((cfg["max_position_embeddings"], h)),
        "embeddings.LayerNorm.weight": np.zeros(h),
        "embeddings.LayerNorm.bias": np.zeros(h),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (inter, h),
            "output.dense": (h, inter),
            "attention.output.LayerNorm": (h, 0),
            "output.LayerNorm": (h, 0),
        }.items():
            w[p + name + ".weight"] = np.zeros((o, n) if n else (o,))
            w[p + name + ".bias"] = np.zeros(o)
    return {k: v.astype(np.float32) for k, v in w.items()}


@pytest.mark.parametrize(
    ("config", "layers", "match"),
    [
        (
            {"hidden_size": 16, "num_attention_heads": 2},
            1,
            r"do not match config\.json: embeddings\.word_embeddings\.weight is \[20, 8\], "
            r"config\.json implies \[20, 16\]",
        ),
        (
            {"intermediate_size": 32},
            1,
            r"intermediate\.dense\.weight is \[16, 8\], config\.json "
            r"implies \[32, 8\]",
        ),
        ({"max_position_embeddings": 64}, 1, r"position_embeddings\.weight is \[12, 8\]"),
        ({}, 2, r"the weights have 2 layers, config\.json says num_hidden_layers=1"),
    ],
    ids=["hidden", "intermediate", "positions", "extra-layer"],
)
def test_config_that_does_not_fit_the_weights_names_the_mismatch(
    tmp_path: Path, config: dict[str, Any], layers: int, match: str
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_bert(TINY, layers), str(path))
    cfg = BertConfig.from_dict({**TINY, **config})
    with pytest.raises(ModelError, match=match):
        check_weights(tensor_infos(path), cfg, str(path))  # from the headers alone
    with pytest.raises(ModelError, match=match):
        load_weights(path, cfg)


def test_config_that_fits_passes_from_headers_and_arrays(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_bert(TINY, 1), str(path))
    cfg = BertConfig.from_dict(TINY)
    check_weights(tensor_infos(path), cfg, str(path))
    assert load_weights(path, cfg)["encoder.layer.0.output.dense.weight"].shape == (8, 16)
