from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from embedpool.errors import ConfigError
from embedpool.models import resolve_model
from embedpool.modelspec import BertNormalizerSpec, TextSpec
from embedpool.tokenization import TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    m = resolve_model()
    return TextTokenizer(m.tokenizer_path, m.max_length)


def test_short_text_is_one_untruncated_sequence(tok: TextTokenizer) -> None:
    enc = tok.encode(["hello world"])
    assert len(enc.sequences) == 1 and enc.truncated == [False]
    seq = enc.sequences[0]
    assert seq[0] == 101 and seq[-1] == 102  # [CLS] ... [SEP]
    assert enc.n_tokens == [len(seq)]


def test_long_text_truncated_and_counted(tok: TextTokenizer) -> None:
    text = "word " * 1000
    enc = tok.encode([text, "short"])
    assert enc.truncated == [True, False]
    assert len(enc.sequences[0]) == tok.max_length
    assert enc.sequences[0][-1] == 102
    assert enc.n_tokens[0] == 1002


@pytest.mark.parametrize("n_words", [300, 600, 1000], ids=["1.2x", "2.3x", "4x"])
def test_window_mode_covers_every_token(tok: TextTokenizer, n_words: int) -> None:
    words = [f"w{i}" for i in range(n_words)]
    text = " ".join(words)
    content = tok.token_ids(text)
    enc = tok.encode([text], mode="window")
    assert enc.truncated == [False]
    assert len(enc.sequences) >= 2
    covered: set[int] = set()
    width = tok.max_length - 2
    for seq in enc.sequences:
        assert len(seq) <= tok.max_length and seq[0] == 101 and seq[-1] == 102
        body = list(seq[1:-1])
        # every window is a contiguous slice of the content
        starts = [i for i in range(len(content)) if content[i : i + len(body)] == body]
        assert starts, "window is not a slice of the text"
        covered.update(range(starts[0], starts[0] + len(body)))
        assert len(body) <= width
    assert covered == set(range(len(content)))


def test_empty_text_is_cls_sep(tok: TextTokenizer) -> None:
    enc = tok.encode([""])
    assert [list(s) for s in enc.sequences] == [[101, 102]]


# --- sentence-transformers' text handling, on the conformance base's cased tokenizer --------

BASE_TOKENIZER = Path(__file__).parent / "fixtures" / "conformance" / "base" / "tokenizer.json"


def _tok(**text: Any) -> TextTokenizer:
    spec = TextSpec(max_length=text.pop("max_length", 24), **text)
    return TextTokenizer(BASE_TOKENIZER, spec.max_length, text=spec)


def test_do_lower_case_lower_cases_text_and_prompt() -> None:
    cased, lower = _tok(), _tok(do_lower_case=True)
    assert (
        cased.encode(["Hello World"]).sequences[0].tolist()
        != cased.encode(["hello world"]).sequences[0].tolist()
    )
    assert (
        lower.encode(["Hello World"]).sequences[0].tolist()
        == cased.encode(["hello world"]).sequences[0].tolist()
    )
    assert (
        lower.encode(["x"], prompt="QUERY: ").sequences[0].tolist()
        == cased.encode(["x"], prompt="query: ").sequences[0].tolist()
    )


def test_bert_normalizer_from_tokenizer_config_replaces_tokenizer_json() -> None:
    rebuilt = _tok(normalizer=BertNormalizerSpec(lowercase=True))
    cased = _tok()
    assert (
        rebuilt.encode(["Hello Wörld"]).sequences[0].tolist()
        == cased.encode(["hello world"]).sequences[0].tolist()
    )  # lower-cased, accents stripped


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ({}, "query: "),
        ({"prompt": ""}, ""),
        ({"prompt": "Search: "}, "Search: "),
        ({"prompt_name": "doc"}, "passage: "),
        ({"prompt_name": "document"}, ""),
        ({"prompt": "x: ", "prompt_name": "doc"}, "x: "),
    ],
    ids=[
        "default",
        "empty-overrides-default",
        "explicit",
        "named",
        "st-placeholder",
        "explicit-wins",
    ],
)
def test_prompt_resolution_as_sentence_transformers(call: dict[str, str], expected: str) -> None:
    tok = _tok(prompts=(("query", "query: "), ("doc", "passage: ")), default_prompt_name="query")
    enc = tok.encode(
        ["hello world"], prompt=call.get("prompt"), prompt_name=call.get("prompt_name")
    )
    assert enc.prompt == expected
    assert (
        enc.sequences[0].tolist() == _tok().encode([expected + "hello world"]).sequences[0].tolist()
    )


def test_unknown_prompt_name_names_the_known_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"prompt name 'qury' is not one of the model's "
        r"prompts: \['doc', 'document', 'query'\]",
    ):
        _tok(prompts=(("doc", "d: "),)).encode(["x"], prompt_name="qury")


def test_prompt_counts_toward_max_length_and_its_length_is_st_s() -> None:
    tok = _tok(max_length=12)
    prompt_ids = tok.token_ids("Represent this query: ")
    enc = tok.encode(["hello world " * 20], prompt="Represent this query: ")
    seq = enc.sequences[0].tolist()
    assert len(seq) == 12 and enc.truncated == [True]
    assert seq[1 : 1 + len(prompt_ids)] == prompt_ids  # the prompt is kept, the text cut
    assert enc.prompt_length == 1 + len(prompt_ids)  # [CLS] + prompt, no [SEP]
    assert enc.n_tokens == [tok.count(["hello world " * 20], prompt="Represent this query: ")[0]]


def test_window_mode_repeats_the_prompt_in_every_window() -> None:
    tok = _tok(max_length=12)
    prompt_ids = tok.token_ids("query: ")
    text = " ".join(["hello world Search the Index"] * 8)
    content = tok.token_ids(text)
    enc = tok.encode([text], mode="window", prompt="query: ")
    assert len(enc.sequences) >= 3
    covered: list[int] = []
    for seq in enc.sequences:
        ids = seq.tolist()
        assert len(ids) <= 12 and ids[1 : 1 + len(prompt_ids)] == prompt_ids
        covered += ids[1 + len(prompt_ids) : -1]
    assert set(covered) == set(content)


def test_a_prompt_that_leaves_no_room_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no token of the text would fit"):
        _tok(max_length=6).encode(["x"], prompt="Represent this query for searching: ")
