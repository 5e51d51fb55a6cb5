"""``embedpool rerank`` as a user runs it (real subprocesses): documents from arguments,
stdin and --input, JSON out with CrossEncoder's scores, exit 2 with one line for bad input;
and a cross-encoder refused where vectors are asked of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpool.errors import ConfigError
from embedpool.models import resolve_model

FIXTURES = Path(__file__).parent / "fixtures" / "rerankers"
BERT = FIXTURES / "bert" / "model"


def run(*args: str, stdin: str | None = None, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedpool", "rerank", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp / "cache")},
    )


def golden() -> tuple[dict[str, Any], Any]:
    return (
        json.loads((FIXTURES / "bert" / "golden.json").read_text()),
        np.load(FIXTURES / "bert" / "golden.npz"),
    )


@pytest.mark.slow
def test_documents_from_arguments_stdin_and_input(tmp_path: Path) -> None:
    g, gold = golden()
    query, docs = g["queries"][0], g["documents"][:5]
    res = run(query, *docs, "-m", str(BERT), "--precision", "fp32", "--workers", "0", tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    expected = gold["scores"][:5]
    assert [r["index"] for r in out["results"]] == list(np.argsort(-expected, kind="stable"))
    assert all(abs(r["score"] - float(expected[r["index"]])) <= 1e-4 for r in out["results"])
    assert all(r["document"] == docs[r["index"]] for r in out["results"])
    assert out["truncated"] == [] and out["query"] == query
    # stdin, one document per line; top-n; no text back
    res = run(
        query,
        "-m",
        str(BERT),
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--top-n",
        "2",
        "--no-documents",
        stdin="\n".join(d.replace("\n", " ") for d in docs) + "\n",
        tmp=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    top = json.loads(res.stdout)["results"]
    assert len(top) == 2 and all("document" not in r for r in top)
    # --input records: their ids come back; the long document is reported as cut
    src = tmp_path / "docs.jsonl"
    long_doc = max(g["documents"], key=len)
    src.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate([docs[0], long_doc])
        )
    )
    res = run(query, "-i", str(src), "-m", str(BERT), "--workers", "0", tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert sorted(r["id"] for r in out["results"]) == ["d0", "d1"]
    assert out["truncated"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["q", "a"], "--model is required"),
        (
            ["q", "a", "-m", str(FIXTURES.parent / "families" / "xlmr" / "model")],
            "not a cross-encoder",
        ),
        (["word " * 100, "a", "-m", str(BERT)], "shorten the query"),
        (["q", "a", "-m", str(BERT), "--top-n", "0"], "--top-n"),
    ],
)
def test_bad_input_exits_2_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = run(*args, "--no-cache", "--workers", "0", tmp=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_a_cross_encoder_makes_no_vectors() -> None:
    from embedpool import Embedder
    from embedpool.server import ServerSettings, create_app

    model = resolve_model(BERT)
    with pytest.raises(ConfigError, match="cross-encoder"):
        Embedder(model, lazy=True)
    with pytest.raises(ConfigError, match="serve --reranker"):
        create_app(ServerSettings(), model=model)


def int8_scores(engine: str, query: str, docs: list[str]) -> np.ndarray:
    """The BERT fixture's int8 scores on ``engine``, in this process."""
    from embedpool.rerank import Reranker

    with Reranker(BERT, precision="int8", runtime=engine) as r:
        return r.score(query, docs)


@pytest.mark.slow
@pytest.mark.openvino
def test_rerank_on_the_engine_asked(tmp_path: Path) -> None:
    """``--engine openvino`` reaches the reranker: its int8 scores are OpenVINO's recipe's,
    not ONNX Runtime's."""
    g, _ = golden()
    query, docs = g["queries"][0], g["documents"][:6]
    res = run(query, *docs, "-m", str(BERT), "--precision", "int8", "--engine", "openvino",
              "--workers", "0", "--no-cache", tmp=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = {r["index"]: r["score"] for r in json.loads(res.stdout)["results"]}
    ov, ort = int8_scores("openvino", query, docs), int8_scores("onnxruntime", query, docs)
    assert max(abs(got[i] - float(ov[i])) for i in range(len(docs))) <= 1e-6
    assert max(abs(got[i] - float(ort[i])) for i in range(len(docs))) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "precision"),
    [
        pytest.param("onnxruntime", "fp32", id="ort-fp32"),
        pytest.param("openvino", "int8", id="openvino-int8", marks=pytest.mark.openvino),
    ],
)
def test_serve_with_a_reranker(tmp_path: Path, engine: str, precision: str) -> None:
    """``embedpool serve --reranker`` (a pool worker of its own) answers the cohere client with
    CrossEncoder's scores, beside the embedding routes; ``--engine`` reaches the reranker (its
    int8 scores are then that engine's recipe's)."""
    import signal
    import socket

    import cohere
    import httpx
    from polling import wait_ready

    g, gold = golden()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    embedder = FIXTURES.parent / "families" / "xlmr" / "model"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedpool",
            "serve",
            "--port",
            str(port),
            "--model",
            str(embedder),
            "--reranker",
            str(BERT),
            "--precision",
            precision,
            "--engine",
            engine,
            "--workers",
            "1",
            "--no-cache",
            "--log-level",
            "warning",
        ],
        env={**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path / "cache")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        docs = g["documents"][:6]
        with httpx.Client(timeout=120) as http:
            co = cohere.ClientV2(base_url=url, api_key="unused", httpx_client=http)
            res = co.rerank(model=str(BERT), query=g["queries"][0], documents=docs)
            emb = http.post(f"{url}/v1/embeddings", json={"input": ["a text"]})
        if precision == "fp32":
            expected, tol = gold["scores"][:6], 1e-4
        else:
            expected, tol = int8_scores(engine, g["queries"][0], docs), 1e-6
            other = int8_scores("onnxruntime", g["queries"][0], docs)
            assert np.abs(other - expected).max() > 1e-4  # the engines' recipes tell apart
        assert [r.index for r in res.results] == list(np.argsort(-expected, kind="stable"))
        assert max(abs(r.relevance_score - float(expected[r.index])) for r in res.results) <= tol
        assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    # uvicorn drains, then re-raises the SIGTERM it caught: the signal's exit, not a crash
    assert proc.returncode in (0, -signal.SIGTERM)
