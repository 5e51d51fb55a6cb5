"""Helpers the model-family fidelity tests share (tests/test_families.py, test_decoders.py,
test_gemma3.py): loading a fixture and its goldens (tests/fixtures/families/<name>/), embedding
its texts through an engine, an in-memory graph, the CLI or ``embedpool serve``, and cosines
against the reference (test_firstrun.py and test_engine_openvino.py use a few). Not a
conftest: the test modules import what they use by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from embedpool.engine import Engine
from embedpool.models import ResolvedModel, resolve_model
from embedpool.tokenization import TextTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "families"
F32 = npt.NDArray[np.float32]
CLI = [sys.executable, "-m", "embedpool"]
#: issue 11's int8 bar against the reference: the mean cosine, and every vector's.
INT8_MEAN, INT8_MIN = 0.99, 0.97


# --- fixtures and goldens --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fixture:
    model: ResolvedModel
    texts: list[str]
    input_ids: list[list[int]]
    vectors: F32
    query_vectors: F32
    prompt_name: str


def load_fixture(name: str, directory: Path | None = None) -> Fixture:
    root = FIXTURES / name
    gold = json.loads((root / "golden.json").read_text(encoding="utf-8"))
    vecs = np.load(root / "golden.npz")
    return Fixture(
        resolve_model(directory or root / "model"),
        gold["texts"],
        gold["input_ids"],
        vecs["vectors"],
        vecs["query_vectors"],
        gold["prompt_name"],
    )


def golden(name: str, key: str) -> F32:
    """One array of a fixture's golden.npz."""
    out: F32 = np.load(FIXTURES / name / "golden.npz")[key]
    return out


def copy_model(name: str, tmp: Path, **config_changes: Any) -> Path:
    """A copy of a fixture's model directory with config.json edited (None drops a key)."""
    dst = tmp / name
    shutil.copytree(FIXTURES / name / "model", dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def prompted(fx: Fixture) -> list[str]:
    """The texts with the fixture's prompt prepended, as sentence-transformers does."""
    cfg = json.loads((fx.model.directory / "config_sentence_transformers.json").read_text())
    return [cfg["prompts"][fx.prompt_name] + t for t in fx.texts]


@dataclasses.dataclass(frozen=True)
class LongGolden:
    """A fixture's long text (``long.json`` / ``long.npz``) and the reference's vector."""

    text: str
    input_ids: list[int]
    vector: F32
    max_seq_length: int


def load_long_golden(name: str) -> LongGolden:
    meta = json.loads((FIXTURES / name / "long.json").read_text(encoding="utf-8"))
    gold = np.load(FIXTURES / name / "long.npz")
    return LongGolden(
        meta["text"], gold["input_ids"].tolist(), gold["vector"], int(meta["max_seq_length"])
    )


@dataclasses.dataclass(frozen=True)
class LongFixture:
    """A fixture's model with its max length raised for the long text, and that text."""

    model: ResolvedModel
    text: str
    input_ids: list[int]
    vector: F32


# --- graphs ------------------------------------------------------------------------------------


def prepare_graphs(model: ResolvedModel, cache: Path) -> dict[str, Path]:
    """The model's fp32 and int8 graphs, built by prepare_onnx into ``cache``."""
    from embedpool.graph import prepare_onnx

    return {p: prepare_onnx(model, p, cache) for p in ("fp32", "int8")}


def checked_unfused_graph(fx: Fixture) -> onnx.ModelProto:
    """The standard-ops flavour of the fixture's graph, after the ONNX checker with full type
    inference, and asserted free of contrib ops."""
    from embedpool.graph import _family
    from embedpool.graph.compose import compose

    fam, cfg = _family(fx.model)
    graph = compose(
        fam, fam.load_weights(fx.model.weights_path, cfg), cfg, fx.model.head, fused=False
    )
    onnx.checker.check_model(graph, full_check=True)
    assert not {n.domain for n in graph.graph.node} - {"", "ai.onnx"}
    return graph


# --- embedding ---------------------------------------------------------------------------------


def encode(model: ResolvedModel, texts: list[str]) -> list[Any]:
    """The texts' token sequences, through embedpool's tokenizer at the model's max length."""
    return TextTokenizer(model.tokenizer_path, model.max_length).encode(texts).sequences


def embed(model: ResolvedModel, path: Path, texts: list[str]) -> F32:
    """One padded batch, as the goldens were made."""
    return Engine.for_model(path, model, threads=1).embed(encode(model, texts))


def embed_alone(model: ResolvedModel, path: Path, texts: list[str]) -> F32:
    """Each text in a batch of its own, through one engine."""
    engine = Engine.for_model(path, model, threads=1)
    return np.concatenate([engine.embed(encode(model, [t])) for t in texts])


def cosines(a: F32, b: F32) -> F32:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


def meets_bar(cos: F32, precision: str) -> None:
    """fp32: every vector at cos >= 0.9999 to the reference; int8: issue 11's bar."""
    if precision == "fp32":
        assert cos.min() >= 0.9999, cos
    else:
        assert cos.mean() >= INT8_MEAN and cos.min() >= INT8_MIN, cos


def padding_cosines(model: ResolvedModel, path: Path, texts: list[str]) -> F32:
    """Each text's vector in one padded batch against its vector alone."""
    return cosines(embed(model, path, texts), embed_alone(model, path, texts))


def embedder_matches_reference(embedder: Any, fx: Fixture, precision: str = "fp32") -> None:
    """An Embedder (pool or Ray) gives the reference's vectors for the fixture's texts, plain
    and with the ``query`` prompt by name (``precision``'s bar, meets_bar)."""
    meets_bar(cosines(embedder.embed(fx.texts), fx.vectors), precision)
    got = embedder.embed(fx.texts, prompt_name="query")
    meets_bar(cosines(got, fx.query_vectors), precision)


def long_cosine(model: ResolvedModel, path: Path, long: LongGolden | LongFixture) -> float:
    """The long text padded in a batch next to a one-token text: its cosine to the reference."""
    got = embed(model, path, [long.text, "x"])[:1]
    return float(cosines(got, long.vector[None])[0])


def run_graph(graph: onnx.ModelProto, fixture: Fixture) -> F32:
    """The fixture's texts through an in-memory graph, in one right-padded batch."""
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    seqs = encode(fixture.model, fixture.texts)
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in {i.name for i in sess.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    out: F32 = sess.run(None, feeds)[0]
    return out


def encoder_graph(
    fam: Any, weights: Any, cfg: Any, fx: Fixture, *, attention: str, fused: bool = True
) -> onnx.ModelProto:
    """The family's encoder with one ``attention`` variant (a benchmark alternative) and the
    fixture's head, as a whole graph (compose() builds only the shipped variant)."""
    from onnx import TensorProto, helper

    from embedpool.graph.builder import GraphBuilder
    from embedpool.graph.head import apply_head

    g = GraphBuilder()
    enc = fam.build_encoder(g, weights, cfg, fused=fused, attention=attention)
    apply_head(g, enc.hidden, enc.width, fx.model.head, "sentence_embedding")
    graph: onnx.ModelProto = g.finish(
        "m",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, None)],
        producer_version="test",
    )
    return graph


# --- the CLI and serve -------------------------------------------------------------------------


def jsonl(path: Path, texts: list[str]) -> Path:
    """The texts as an ``embed`` input file, one {"id", "text"} object a line."""
    path.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def cache_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "EMBEDPOOL_CACHE_DIR": str(cache)}


def cli_embed_query(fx: Fixture, tmp_path: Path, precision: str) -> F32:
    """``embedpool embed --prompt-name query`` on the fixture's texts in one pool worker."""
    out = tmp_path / "q.npy"
    res = subprocess.run(
        [
            *CLI,
            "embed",
            str(jsonl(tmp_path / "t.jsonl", fx.texts)),
            "--out",
            str(out),
            "--model",
            str(fx.model.directory),
            "--precision",
            precision,
            "--prompt-name",
            "query",
            "--workers",
            "1",
            "--no-cache",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=cache_env(tmp_path / "cache"),
    )
    assert res.returncode == 0, res.stderr
    got: F32 = np.load(out)
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_started(server: subprocess.Popen[str]) -> list[str]:
    """Reads a starting ``embedpool serve``'s stderr until uvicorn reports its startup (the
    lines read are returned); fails the test if the server exits first."""
    said: list[str] = []
    assert server.stderr is not None
    for line in server.stderr:  # blocks until uvicorn reports; ends if the server exits
        said.append(line)
        if "Application startup complete" in line:
            return said
    pytest.fail(f"serve exited {server.wait()} before it started: {''.join(said)}")


def openai_vectors(
    base_url: str, fx: Fixture, prompt_field: str = "prompt_name"
) -> list[tuple[F32, F32]]:
    """The official openai client asks the server for the fixture's texts, plain and with
    ``{prompt_field}: query`` (``prompt_name`` or ``input_type``): (got, reference) for each."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120.0)
    out = []
    for extra, want in (({}, fx.vectors), ({prompt_field: "query"}, fx.query_vectors)):
        got = client.embeddings.create(
            model=str(fx.model.directory), input=fx.texts, extra_body=extra
        )
        out.append((np.array([d.embedding for d in got.data], dtype=np.float32), want))
    return out


def serve_matches_reference(
    fx: Fixture, tmp_path: Path, precision: str = "fp32", prompt_field: str = "prompt_name"
) -> None:
    """``embedpool serve`` on 127.0.0.1 with one pool worker, asked by the openai client:
    plain and query-prompt vectors (by ``prompt_field``) equal to the reference at
    ``precision``'s bar."""
    port = free_port()
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--model",
            str(fx.model.directory),
            "--precision",
            precision,
            "--workers",
            "1",
            "--port",
            str(port),
            "--no-cache",
        ],
        env=cache_env(tmp_path / "cache"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_started(server)
        for got, want in openai_vectors(f"http://127.0.0.1:{port}/v1", fx, prompt_field):
            meets_bar(cosines(got, want), precision)
    finally:
        server.terminate()
        server.communicate(timeout=60)
