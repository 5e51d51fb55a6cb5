"""Prompts and dimensions where a text enters the library and the CLI: the real default model
(a prompt is exactly the prefixed text), sentence-transformers' golden vectors (conformance
fixtures, prompts with include_prompt=false, in process and in the pool), the cache key, and
Matryoshka truncation into every output format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import conformance as C
import numpy as np
import pytest

from embedpool.cache import VectorCache, text_key
from embedpool.errors import OptionError
from embedpool.job import Embedder
from embedpool.models import ResolvedModel

CLI = [sys.executable, "-m", "embedpool"]
TEXTS = [
    "def add(a, b): return a + b",
    "hello world",
    "",
    "naïve café ☕",
    "x " * 254,  # 256 tokens with [CLS] and [SEP]: MiniLM's max length, but not with a prompt
    "y " * 400,
]  # truncated with or without one
PROMPT = "query: "  # 2 tokens in MiniLM's vocabulary ("query", ":")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=240, check=False)


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


# --- the library, the real default model -----------------------------------------------------


def test_a_prompt_gives_exactly_the_vectors_of_the_prefixed_text(real_model: ResolvedModel) -> None:
    with Embedder(real_model, workers=None) as e:
        got = e.embed(TEXTS, prompt=PROMPT)
        prompted = e.last_report
        want = e.embed([PROMPT + t for t in TEXTS])
        prefixed = e.last_report
        plain = e.embed(TEXTS)
        unprompted = e.last_report
    np.testing.assert_array_equal(got, want)
    assert np.sum(got[:2] * plain[:2], axis=1).max() < 0.99  # the prompt did change them
    # the prompt counts toward max length, as sentence-transformers counts it
    assert prompted.truncated == prefixed.truncated == 2 and unprompted.truncated == 1
    assert prompted.tokens == prefixed.tokens == unprompted.tokens + 2 * (len(TEXTS) - 2)


def test_the_prompt_is_part_of_the_cache_key(real_model: ResolvedModel, tmp_path: Path) -> None:
    cache = VectorCache.open(tmp_path / "v.sqlite3")
    try:
        with Embedder(real_model, workers=None, cache=cache) as e:
            plain = e.embed(["x"])
            prompted = e.embed(["x"], prompt=PROMPT)
            assert e.last_report.cache_hits == 0  # "x" cached without a prompt is not served
            again = e.embed(["x"], prompt=PROMPT)
            assert e.last_report.cache_hits == 1
            prefixed = e.embed([PROMPT + "x"])
            assert e.last_report.cache_hits == 0  # keyed apart (include_prompt=false differs)
    finally:
        cache.close()
    np.testing.assert_array_equal(again, prompted)
    np.testing.assert_array_equal(prefixed, prompted)
    assert float(plain[0] @ prompted[0]) < 0.99
    assert (
        len(
            {
                text_key("x"),
                text_key("x", PROMPT),
                text_key(PROMPT + "x"),
                text_key("", PROMPT + "x"),
            }
        )
        == 4
    )


def test_library_refusals(real_model: ResolvedModel) -> None:
    with Embedder(real_model, workers=None, lazy=True) as e:
        with pytest.raises(
            OptionError,
            match=r"prompt name 'query ' is not one of the "
            r"model's prompts: \['document', 'query'\]",
        ):
            e.embed(["a"], prompt_name="query ")
        with pytest.raises(
            OptionError,
            match=r"all-MiniLM-L6-v2 was not trained for "
            r"truncated dimensions.* 384 dimensions",
        ):
            e.embed(["a"], dimensions=128)
        assert e.embed(["a"], dimensions=384).shape == (1, 384)  # its own width: accepted


# --- sentence-transformers' golden vectors ---------------------------------------------------

CALLS = [(name, call) for name in C.names(errors=False) for call in C.case(name).get("calls", {})]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conformance")
    return {name: C.materialise(name, root) for name in {n for n, _ in CALLS}}


@pytest.mark.parametrize(("name", "call"), CALLS, ids=[f"{n}-{c}" for n, c in CALLS])
def test_prompt_calls_through_the_embedder(dirs: dict[str, Path], name: str, call: str) -> None:
    kwargs: dict[str, Any] = C.case(name)["calls"][call]
    with Embedder(dirs[name], precision="fp32", workers=None) as e:
        got = e.embed(C.TEXTS, **kwargs)
    assert C.cosines(got, C.golden(name)[call]).min() >= 0.9999


@pytest.mark.slow
def test_prompt_calls_through_the_pool(dirs: dict[str, Path]) -> None:
    """include_prompt=false in worker processes: each call's own prompt is left out."""
    name = "include-prompt-false-modes"
    with Embedder(dirs[name], precision="fp32", workers=1) as e:
        for call, kwargs in C.case(name)["calls"].items():
            got = e.embed(C.TEXTS, **kwargs)
            assert C.cosines(got, C.golden(name)[call]).min() >= 0.9999, call


# --- Matryoshka ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["include-prompt-false-modes", "plain-hf"], ids=["normalised", "unnormalised"]
)
def test_dimensions_keep_the_first_values(tmp_path: Path, name: str) -> None:
    d = C.matryoshka(name, tmp_path)
    cache = VectorCache.open(tmp_path / "v.sqlite3")
    try:
        with Embedder(d, precision="fp32", workers=None, cache=cache) as e:
            assert e.model.matryoshka and e.model.matryoshka_dims == (16, 8, 4)
            full = e.embed(C.TEXTS)
            cut = e.embed(C.TEXTS, dimensions=8)
            assert e.last_report.cache_hits == len(C.TEXTS)  # the cache keeps whole vectors
            normalize = e.model.normalize
    finally:
        cache.close()
    want = full[:, :8]
    if normalize:
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert cut.shape == (len(C.TEXTS), 8)
    np.testing.assert_allclose(cut, want, rtol=1e-5, atol=1e-6)


# --- the CLI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_prompt_equals_the_prefixed_text(tmp_path: Path) -> None:
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    res = run_cli(
        "embed",
        str(jsonl(tmp_path / "t.jsonl", TEXTS)),
        "--out",
        str(a),
        "--prompt",
        PROMPT,
        "--workers",
        "0",
        "--no-cache",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    assert "truncated 2" in res.stderr
    res = run_cli(
        "embed",
        str(jsonl(tmp_path / "p.jsonl", [PROMPT + t for t in TEXTS])),
        "--out",
        str(b),
        "--workers",
        "0",
        "--no-cache",
        "-q",
    )
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(a), np.load(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prompt-name", "search"],
            r"prompt name 'search' is not one of the model's prompts: "
            r"\['document', 'query'\]",
        ),
        (["--prompt", "q: ", "--prompt-name", "query"], "--prompt and --prompt-name: give one"),
        (
            ["--dimensions", "128"],
            r"all-MiniLM-L6-v2 was not trained for truncated dimensions "
            r"\(Matryoshka\); its vectors have 384 dimensions",
        ),
        (["--dimensions", "0"], "between 1 and model all-MiniLM-L6-v2's width 384, got 0"),
        (["--dimensions", "385"], "between 1 and model all-MiniLM-L6-v2's width 384, got 385"),
    ],
    ids=["unknown-name", "both", "not-matryoshka", "zero", "too-wide"],
)
def test_cli_refusals_exit_2_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o.npy"
    res = run_cli(
        "embed",
        str(jsonl(tmp_path / "t.jsonl", TEXTS)),
        "--out",
        str(out),
        *args,
        "--workers",
        "1",
        "-q",
        "--cache",
        str(tmp_path / "c.sqlite3"),
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedpool: "), res.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("ext", [".jsonl", ".npy", ".parquet"])
def test_cli_dimensions_into_every_format(tmp_path: Path, ext: str) -> None:
    d = C.matryoshka("include-prompt-false-modes", tmp_path)
    inp = jsonl(tmp_path / "t.jsonl", C.TEXTS)
    full, cut = tmp_path / "full.npy", tmp_path / f"cut{ext}"
    cache = str(tmp_path / "c.sqlite3")
    for out, extra in ((full, []), (cut, ["--dimensions", "4"])):
        res = run_cli(
            "embed",
            str(inp),
            "--out",
            str(out),
            "--model",
            str(d),
            "--precision",
            "fp32",
            "--workers",
            "0",
            "-q",
            "--cache",
            cache,
            *extra,
        )
        assert res.returncode == 0, res.stderr
    assert f"cache hits {len(C.TEXTS)}" in res.stderr
    if ext == ".npy":
        got = np.load(cut)
    elif ext == ".jsonl":
        got = np.array(
            [json.loads(line)["embedding"] for line in cut.read_text().splitlines()],
            dtype=np.float32,
        )
    else:
        import pyarrow.parquet as pq

        got = np.array(pq.read_table(cut).column("embedding").to_pylist(), dtype=np.float32)
    want = np.load(full)[:, :4]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert got.shape == (len(C.TEXTS), 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
