"""The conformance fixtures (tests/fixtures/conformance, made by scripts/make_conformance.py):
model directories materialised from the base model, a case's overlay and its transforms, and
sentence-transformers' golden vectors for them. Used by tests/test_conformance.py."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
CASES = FIXTURES / "cases"
TEXTS: list[str] = json.loads((FIXTURES / "texts.json").read_text(encoding="utf-8"))
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"
)
#: Files of a case directory that are not part of the model.
NOT_MODEL = {"case.json", "golden.npz"}


@cache
def case(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CASES / name / "case.json").read_text(encoding="utf-8"))
    return data


def names(*, errors: bool) -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if ("error" in case(p.name)) == errors)


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(CASES / name / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def materialise(name: str, dest: Path) -> Path:
    """The case's model directory under ``dest``: its base (the base model, or the case it
    starts from), its overlay, then its transforms."""
    c = case(name)
    d = dest / name
    if c.get("from_case"):
        shutil.copytree(materialise(c["from_case"], dest / f".from-{name}"), d)
    else:
        shutil.copytree(FIXTURES / "base", d)
    for path in (CASES / name).rglob("*"):
        rel = path.relative_to(CASES / name)
        if path.is_file() and str(rel) not in NOT_MODEL:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, d / rel)
    for t in c.get("transforms", []):
        apply(d, t)
    return d


def apply(d: Path, transform: str) -> None:
    kind, _, arg = transform.partition(":")
    if kind == "shard":
        sharded_weights(d)
    elif kind == "shipped-onnx":
        (d / "onnx").mkdir(exist_ok=True)
        shutil.copy(FIXTURES / "shipped.onnx", d / "onnx" / "model.onnx")
    elif kind == "truncate":
        p = d / arg
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "lfs":
        (d / arg).write_bytes(LFS_POINTER)
    elif kind == "rename":
        src, dst = arg.split(":")
        (d / src).rename(d / dst)
    elif kind == "delete":
        (d / arg).unlink()
    elif kind == "clear":  # an empty directory (a download that never started)
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif kind == "write":  # write:FILE:TEXT
        rel, text = arg.split(":", 1)
        (d / rel).write_text(text, encoding="utf-8")
    elif kind in ONNX_EDITS:
        (d / "onnx").mkdir(exist_ok=True)
        target = d / "onnx" / "model.onnx"
        edit_onnx(target if target.is_file() else FIXTURES / "shipped.onnx", target, kind, arg)
    else:
        raise ValueError(f"unknown transform {transform!r}")


#: Transforms that write onnx/model.onnx: shipped.onnx (the base's encoder) changed as
#: exporters and users leave it.
ONNX_EDITS = ("shipped-onnx-pooled", "shipped-onnx-int32", "onnx-rename-input")


def edit_onnx(src: Path, dest: Path, kind: str, arg: str = "") -> None:
    """``shipped-onnx-pooled``: its only output the mean of the token states over the
    sequence (a graph that pools by itself, whatever the directory's 1_Pooling says);
    ``shipped-onnx-int32``: every input int32, cast to int64 inside (a legal export);
    ``onnx-rename-input:OLD:NEW``: an input renamed."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    g = model.graph

    def rename_input(old: str, new: str) -> None:
        for node in g.node:
            node.input[:] = [new if i == old else i for i in node.input]
        for inp in g.input:
            if inp.name == old:
                inp.name = new

    if kind == "shipped-onnx-pooled":
        hidden = g.output[0].name
        g.node.append(
            helper.make_node("ReduceMean", [hidden], ["sentence_embedding"], axes=[1], keepdims=0)
        )
        del g.output[:]
        g.output.append(
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 16])
        )
    elif kind == "shipped-onnx-int32":
        for inp in list(g.input):
            name = inp.name
            rename_input(name, name + "_i64")
            inp.name = name
            inp.type.tensor_type.elem_type = TensorProto.INT32
            g.node.insert(
                0, helper.make_node("Cast", [name], [name + "_i64"], to=TensorProto.INT64)
            )
    elif kind == "onnx-rename-input":
        old, new = arg.split(":")
        rename_input(old, new)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


def sharded_weights(d: Path) -> None:
    """model.safetensors as two shards and an index (what scripts/make_conformance.py did)."""
    w = load_file(str(d / "model.safetensors"))
    keys = sorted(w)
    parts = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for file, ks in parts.items():
        save_file({k: w[k] for k in ks}, str(d / file), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}})
    )
    (d / "model.safetensors").unlink()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1).clip(1e-12)
    nb = np.linalg.norm(b, axis=1).clip(1e-12)
    cos: np.ndarray = (a * b).sum(1) / na / nb
    return cos


def mixed_prompt_batches(name: str, model: Any, per_batch: int = 7) -> list[tuple[Any, np.ndarray]]:
    """Every prompt call of case ``name`` (``case.json`` calls) mixed into batches of
    ``per_batch`` sequences, so that one batch holds sequences with different prompt lengths
    (as the server's micro-batcher mixes requests): [(WorkBatch, golden rows)]."""
    from embedpool.executor import WorkBatch
    from embedpool.tokenization import TextTokenizer

    tok = TextTokenizer.for_model(model)
    seqs: list[Any] = []
    plens: list[int] = []
    rows: list[np.ndarray] = []
    for call, kwargs in case(name)["calls"].items():
        enc = tok.encode(TEXTS, **kwargs)
        assert len(enc.sequences) == len(TEXTS)
        seqs += enc.sequences
        plens += [enc.prompt_length] * len(enc.sequences)
        rows.append(golden(name)[call])
    want = np.concatenate(rows)
    order = np.random.default_rng(0).permutation(len(seqs))
    out = []
    for b, start in enumerate(range(0, len(order), per_batch)):
        idx = order[start : start + per_batch]
        out.append(
            (
                WorkBatch(
                    b,
                    tuple(seqs[i] for i in idx),
                    tuple(str(i) for i in idx),
                    prompt_lengths=tuple(plens[i] for i in idx),
                ),
                want[idx],
            )
        )
    assert len({p for batch, _ in out for p in batch.prompt_lengths}) > 1
    return out


def matryoshka(name: str, dest: Path, dims: tuple[int, ...] = (16, 8, 4)) -> Path:
    """Case ``name``'s model marked as trained for truncated dimensions (config.json
    ``matryoshka_dimensions``, as nomic and gte-modernbert ship it): random weights, so only
    the arithmetic of truncation is tested with it, not its quality."""
    d = materialise(name, dest)
    cfg = json.loads((d / "config.json").read_text())
    cfg["matryoshka_dimensions"] = list(dims)
    (d / "config.json").write_text(json.dumps(cfg))
    return d
