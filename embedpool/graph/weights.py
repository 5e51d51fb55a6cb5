"""Reading a checkpoint's tensors: safetensors in, float32 numpy arrays out, keyed without
any model prefix ("embeddings.word_embeddings.weight"), whatever wrapper saved them.

    model.safetensors                  one file
    model.safetensors.index.json  ──>  its shards (``weight_map``), read in turn
        └─ read_header: 8-byte length, JSON header {name: dtype, shape, data_offsets}
             └─ checked: a git-lfs pointer, a truncated download, a dtype or a size that
                does not fit, each a ModelError naming the file, the cause and the fix
        └─ load: F32 as is; F16, BF16 and F64 converted to float32; integer tensors dropped

Why our own reader rather than ``safetensors.numpy`` (the format is an 8-byte length, a JSON
header and raw little-endian data, so the reader is short): numpy has no bfloat16, so
``safetensors.numpy`` cannot load bf16 checkpoints at all, and they are common; its errors
("header too large") do not say that the file is a git-lfs pointer or a partial download;
and model resolution checks every weights file in the parent from its header alone (names,
dtypes, shapes against config.json) in milliseconds, before any worker starts. A pool worker
then needs no ``safetensors`` import to load a Dense head's weights.

Families check the keys and shapes they need (``families.<name>.check_weights``, given
``tensor_infos`` or loaded arrays: both have ``.shape``); this module only reads and
normalises names and dtypes.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from embedpool.errors import ModelError
from embedpool.graph.builder import Array

#: Safetensors key prefixes seen in the wild: bare BertModel, BertFor*, wrapped checkpoints.
PREFIXES = ("bert.", "model.", "encoder_model.", "0.auto_model.", "roberta.")
#: What a git-lfs pointer file starts with (a clone without git-lfs leaves these in place of
#: the weights; they are ~130 bytes of text).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
#: A header longer than this is not a header: the 8 bytes are text or garbage. Real headers
#: are a few KB to a few MB (one line per tensor); safetensors itself caps them at 100 MB.
MAX_HEADER_BYTES = 100_000_000
#: Little-endian numpy dtypes of the safetensors float dtypes embedpool converts.
FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
#: Integer / bool dtypes: buffers such as ``position_ids``, never weights; dropped on load.
INT_DTYPES = {
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "BOOL": 1,
}
INDEX_SUFFIX = ".index.json"


class HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it (no data read)."""

    dtype: str  # safetensors dtype: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in ``file``
    end: int
    file: Path


def normalise_key(key: str) -> str:
    """The key without a model prefix, with TF-era LayerNorm names made PyTorch's."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file, raw keys, checked against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(min(size, 64))
            if head.startswith(LFS_POINTER_PREFIX):
                raise ModelError(
                    f"{path} is a git-lfs pointer file ({size} bytes), not the weights: the "
                    "repository was cloned without git-lfs. Run `git lfs install && git lfs "
                    f"pull` in {path.parent}, or download the file again."
                )
            if size < 8:
                raise ModelError(_truncated(path, size, "8 bytes of header length"))
            (n,) = np.frombuffer(head[:8], dtype="<u8")
            n = int(n)
            if n > MAX_HEADER_BYTES:
                raise ModelError(
                    f"{path} is not a safetensors file (its first 8 bytes give a "
                    f"header of {n} bytes); download it again"
                )
            if 8 + n > size:
                raise ModelError(_truncated(path, size, f"a {n}-byte header"))
            f.seek(8)
            raw = f.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:
        raise ModelError(
            f"{path} has a corrupt safetensors header ({exc}); download it again"
        ) from exc
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = str(meta["dtype"])
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{path}: tensor {key!r} has a corrupt header entry ({exc}); "
                "download the file again"
            ) from exc
        itemsize = _itemsize(dtype, key, path)
        if end - start != math.prod(shape) * itemsize or start < 0:
            raise ModelError(
                f"{path}: tensor {key!r} ({dtype} {list(shape)}) spans "
                f"{end - start} bytes, expected {math.prod(shape) * itemsize}: "
                "the file is corrupt; download it again"
            )
        out[key] = TensorInfo(dtype, shape, base + start, base + end, path)
    needed = max((t.end for t in out.values()), default=base)
    if needed > size:
        raise ModelError(_truncated(path, size, f"{needed} bytes of tensors"))
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """The .safetensors files of a checkpoint: ``path`` itself, or the shards its index names."""
    if not path.name.endswith(INDEX_SUFFIX):
        return [path]
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot read the shard index {path}: {exc}") from exc
    files = []
    for name in shards:
        shard = path.parent / str(name)
        if shard.parent != path.parent or not shard.is_file():
            raise ModelError(
                f"{path} lists the shard {name}, which is missing: the download "
                "is incomplete; download the model again"
            )
        files.append(shard)
    return files


def tensor_infos(path: Path | str) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (one file or an index of shards), normalised keys, from
    the headers alone. Raises ModelError for anything unreadable (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} is missing")
    out: dict[str, TensorInfo] = {}
    for file in checkpoint_files(path):
        for key, info in read_header(file).items():
            name = normalise_key(key)
            if name in out and info.dtype in FLOAT_DTYPES and out[name].dtype in FLOAT_DTYPES:
                raise ModelError(
                    f"{path}: two tensors map to {name!r} ({key!r} and another); "
                    "embedpool cannot tell which one the model uses"
                )
            out[name] = info
    return out


def load_safetensors(path: Path | str) -> dict[str, Array]:
    """Float32 tensors keyed without any model prefix; non-float tensors are dropped."""
    infos = tensor_infos(path)
    out: dict[str, Array] = {}
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in infos.items():
        if info.dtype in FLOAT_DTYPES:
            by_file.setdefault(info.file, []).append((name, info))
    for file, items in by_file.items():
        try:
            with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for name, info in items:
                    out[name] = _to_float32(mm[info.start : info.end], info)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {file}: {exc}") from exc
    return out


def check_shapes(
    tensors: Mapping[str, HasShape],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    config: str = "config.json",
) -> None:
    """A ModelError naming every tensor whose shape is not what ``config`` implies."""
    wrong = [
        f"{k} is {list(tensors[k].shape)}, config.json implies {list(v)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    ]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ModelError(
            f"{where}: the weights do not match {config}: {shown}. The config "
            "belongs to another model or the weights are of another size."
        )


def _to_float32(buf: bytes, info: TensorInfo) -> Array:
    raw = np.frombuffer(buf, dtype=FLOAT_DTYPES[info.dtype])
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32: widen exactly
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)  # a copy: the mmap closes after loading
    return out.reshape(info.shape)


def _itemsize(dtype: str, key: str, path: Path) -> int:
    if dtype in FLOAT_DTYPES:
        return int(np.dtype(FLOAT_DTYPES[dtype]).itemsize)
    if dtype in INT_DTYPES:
        return INT_DTYPES[dtype]
    raise ModelError(
        f"{path}: tensor {key!r} has dtype {dtype}, which embedpool does not "
        f"read (it reads {', '.join(FLOAT_DTYPES)}); convert the checkpoint to "
        "float32, float16 or bfloat16"
    )


def _truncated(path: Path, size: int, needed: str) -> str:
    return (
        f"{path} is truncated ({size} bytes, too short for {needed}): the download is "
        "incomplete; download the file again"
    )
