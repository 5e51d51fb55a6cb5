from __future__ import annotations

import pytest

from embedpool.models import resolve_model
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
        starts = [i for i in range(len(content)) if content[i:i + len(body)] == body]
        assert starts, "window is not a slice of the text"
        covered.update(range(starts[0], starts[0] + len(body)))
        assert len(body) <= width
    assert covered == set(range(len(content)))


def test_empty_text_is_cls_sep(tok: TextTokenizer) -> None:
    enc = tok.encode([""])
    assert [list(s) for s in enc.sequences] == [[101, 102]]
