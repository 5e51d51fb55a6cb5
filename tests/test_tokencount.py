"""``embedpool tokenize``: token counts, ids, tokens and offsets in the model's own tokenizer,
the prompt counted, one JSON line per text; bad options are exit 2 with the error first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from embedpool.cli import main
from embedpool.models import ResolvedModel
from embedpool.tokenization import TextTokenizer

TEXTS = ["def add(a, b): return a + b", "Héllo Wörld", "long " * 300, ""]


@pytest.fixture(scope="module")
def tokenizer(real_model: ResolvedModel) -> TextTokenizer:
    return TextTokenizer.for_model(real_model)


def run(*args: str, stdin: str | None = None) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["tokenize", *args], input=stdin)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_counts_are_what_the_model_is_fed(tokenizer: TextTokenizer) -> None:
    records = run(*TEXTS)
    assert [r["index"] for r in records] == list(range(len(TEXTS)))
    fed = tokenizer.encode(TEXTS)  # what embedding feeds, before truncation
    assert [r["n_tokens"] for r in records] == fed.n_tokens
    assert [r["fits"] for r in records] == [not t for t in fed.truncated]
    assert records[2]["fits"] is False and records[2]["max_length"] == tokenizer.max_length
    for r, text in zip(records, TEXTS, strict=True):
        assert len(r["ids"]) == len(r["tokens"]) == len(r["offsets"]) == r["n_tokens"]
        assert r["offsets"][0] is None and r["offsets"][-1] is None  # [CLS], [SEP]
        for token, span in zip(r["tokens"][1:-1], r["offsets"][1:-1], strict=True):
            # MiniLM lower-cases and strips accents: compare the normalised piece
            piece = text[span[0] : span[1]].lower()
            assert token.removeprefix("##") in (piece, piece.replace("é", "e").replace("ö", "o"))


def test_prompt_is_counted_and_not_in_the_offsets(tokenizer: TextTokenizer) -> None:
    plain, prompted = run("sort a list")[0], run("sort a list", "--prompt", "query: ")[0]
    prompt_tokens = prompted["n_tokens"] - plain["n_tokens"]
    assert prompt_tokens == len(tokenizer.token_ids("query: ")) > 0
    assert prompted["n_tokens"] == tokenizer.count(["sort a list"], prompt="query: ")[0]
    assert prompted["offsets"][1 : 1 + prompt_tokens] == [None] * prompt_tokens
    assert prompted["offsets"][1 + prompt_tokens :] == plain["offsets"][1:]


def test_inputs_stdin_and_counts_only(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    src = tmp_path / "chunks.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS[:2]))
    )
    records = run("--input", str(src), "--counts-only")
    assert [r["id"] for r in records] == ["c0", "c1"]
    assert set(records[0]) == {"index", "id", "n_tokens", "max_length", "fits"}
    assert [r["n_tokens"] for r in records] == tokenizer.count(TEXTS[:2])
    piped = run(stdin="one line\nanother line\n")
    assert [r["n_tokens"] for r in piped] == tokenizer.count(["one line", "another line"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["x", "--prompt-name", "nope"], "nope"),
        (["x", "--prompt", "a", "--prompt-name", "query"], "--prompt"),
        (["x", "--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
    ],
    ids=["unknown-prompt", "both-prompts", "unknown-model"],
)
def test_bad_options_exit_2(args: list[str], needle: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedpool", "tokenize", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert needle in lines[0] and "Traceback" not in done.stderr, done.stderr
