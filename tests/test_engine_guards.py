"""What the engine refuses, on every runtime, rather than return a wrong vector: a token id
past the model's embedding table (ONNX Runtime raised an obscure Gather error on it, OpenVINO
read past the table and returned a plausible vector) and a non-finite output. Either fails
that item alone, with an error naming the cause; the job's other items are embedded.

Real models throughout: the XLM-R fixture, copied and changed the way a real model goes
wrong (a token added to the tokenizer without resizing the embeddings; a corrupt weight)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from engines import ENGINES

from embedpool.job import Embedder, ItemError
from embedpool.models import resolve_model

FIXTURE = Path(__file__).parent / "fixtures" / "families" / "xlmr" / "model"
ADDED = "<added_without_resize>"


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)
    return out


def _corrupt_word_rows(model: Path, rows: list[int] | None = None) -> None:
    """Sets the word-embedding rows ``rows`` (None: all) of ``model``'s checkpoint to NaN."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name][slice(None) if rows is None else rows] = np.nan
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})


def _stream(
    model: Path, runtime: str, texts: list[str]
) -> tuple[list[tuple[bool, np.ndarray]], list[ItemError]]:
    """Each text's (ok, vector) and the job's item errors, in process (the pool's workers
    run the same ``Engine.embed``; tests/executors cover their failure handling)."""
    with Embedder(model, precision="fp32", runtime=runtime, threads=1) as emb:
        rows = [
            (bool(ok), vec)
            for w in emb.stream(texts)
            for ok, vec in zip(w.ok, w.vectors, strict=True)
        ]
        errors = list(emb.last_report.item_errors)
    return rows, errors


@pytest.mark.parametrize("runtime", ENGINES)
def test_a_token_id_past_the_embedding_table_fails_that_item_alone(
    runtime: str, tmp_path: Path
) -> None:
    model = _copy(tmp_path)
    tok_path = model / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    tok["added_tokens"].append(
        {
            "id": rows,  # one past the table: the tokenizer grew, the embeddings did not
            "content": ADDED,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
    )
    tok_path.write_text(json.dumps(tok))
    assert resolve_model(model).vocab_rows == rows
    texts = ["hello world", f"def f(): {ADDED} return 1", "return x"]
    got, errors = _stream(model, runtime, texts)
    assert [ok for ok, _ in got] == [True, False, True]
    assert [e.index for e in errors] == [1]
    assert f"token id {rows} " in errors[0].message
    assert f"outside the model's embedding table of {rows} rows" in errors[0].message
    alone, _ = _stream(model, runtime, ["hello world", "return x"])
    np.testing.assert_allclose(got[0][1], alone[0][1], atol=1e-6)
    np.testing.assert_allclose(got[2][1], alone[1][1], atol=1e-6)


@pytest.mark.parametrize("runtime", ENGINES)
def test_a_non_finite_vector_fails_that_item_alone(runtime: str, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    model = _copy(tmp_path)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    bad = tok.encode("return", add_special_tokens=False).ids[-1]
    assert bad not in tok.encode("hello world").ids
    _corrupt_word_rows(model, [bad])  # a corrupt row: every token of its text turns NaN
    got, errors = _stream(model, runtime, ["hello world", "return x", "hello"])
    assert [ok for ok, _ in got] == [True, False, True]
    assert [e.index for e in errors] == [1]
    assert "is not finite (NaN or inf)" in errors[0].message
    assert all(np.isfinite(v).all() for ok, v in got if ok)


@pytest.mark.parametrize("runtime", ENGINES)
def test_a_graph_that_gives_nan_fails_its_check_naming_the_file(
    runtime: str, tmp_path: Path
) -> None:
    """``models build`` / the prebuild verify each graph: one whose vectors are NaN is
    named, with the way out, not passed on."""
    from embedpool.engine import EngineSpec
    from embedpool.errors import ModelError
    from embedpool.graph.prebuild import verify_graph

    model_dir = _copy(tmp_path)
    _corrupt_word_rows(model_dir)
    model = resolve_model(model_dir)
    path = EngineSpec(model, "fp32", runtime=runtime).graph()  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="is not finite") as err:
        verify_graph(model, path, precision="fp32", runtime=runtime)
    assert str(path) in str(err.value) and "delete it and rebuild" in str(err.value)
