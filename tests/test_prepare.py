"""embedpool.prepare: the prepare step (dedupe, cache, tokenise) and the assembly step
(windows averaged once, any order, failures) that the job and the server share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from embedpool.models import resolve_model
from embedpool.prepare import Assembly, prepare
from embedpool.tokenization import TextTokenizer
from embedpool.types import Vectors
from embedpool.vectors import l2_normalize


class DictCache:
    """A cache hook over a dict, keyed as BoundCache keys: (prompt, text)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Vectors] = {}
        self.gets = 0

    def get_many(
        self, texts: Sequence[str], prompt: str = "", truncated: list[bool] | None = None
    ) -> list[Vectors | None]:
        self.gets += len(texts)
        return [self.data.get((prompt, t)) for t in texts]

    def put_many(
        self,
        texts: Sequence[str],
        vectors: Vectors,
        prompt: str = "",
        truncated: Sequence[bool] | None = None,
    ) -> None:
        for t, v in zip(texts, vectors, strict=True):
            self.data[(prompt, t)] = np.array(v)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.for_model(resolve_model())


def test_prepare_dedupes_asks_the_cache_once_per_text_and_tokenises_the_misses(
    tokenizer: TextTokenizer,
) -> None:
    cache = DictCache()
    cache.data[("", "cached")] = np.full(4, 0.5, dtype=np.float32)
    texts = ["a text", "cached", "a text", "another", "cached"]
    prep = prepare(texts, tokenizer, "truncate", 4, cache=cache)
    assert prep.texts == ["a text", "cached", "another"] and cache.gets == 3
    assert [prep.texts[u] for u in prep.missing] == ["a text", "another"]
    assert len(prep.encoded.sequences) == 2 and prep.encoded.owner == [0, 1]
    assert prep.hits() == 2
    prep.fill(np.eye(2, 4, dtype=np.float32))
    prep.store(cache, range(2))
    rows = prep.rows()
    np.testing.assert_array_equal(rows[0], rows[2])
    np.testing.assert_array_equal(rows[1], np.full(4, 0.5, dtype=np.float32))
    assert set(cache.data) == {("", "cached"), ("", "a text"), ("", "another")}


def test_tokenize_all_counts_every_input(tokenizer: TextTokenizer) -> None:
    cache = DictCache()
    cache.data[("", "cached text")] = np.zeros(4, dtype=np.float32)
    texts = ["cached text", "new text", "cached text", "x " * 400]
    prep = prepare(texts, tokenizer, "truncate", 4, cache=cache, tokenize_all=True)
    every = tokenizer.encode(texts, "truncate")
    assert prep.input_tokens() == sum(len(s) for s in every.sequences)
    assert prep.truncated_inputs() == [3]
    assert [prep.texts[u] for u in prep.missing] == ["new text", "x " * 400]
    assert len(prep.encoded.sequences) == 2 and prep.encoded.owner == [0, 1]


@pytest.mark.parametrize("normalize", [True, False])
def test_assembly_averages_windows_in_any_order(normalize: bool) -> None:
    owner = [0, 1, 1, 1, 2]
    rows = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    if normalize:  # what an engine of a model with Normalize returns
        rows = l2_normalize(rows)
    asm = Assembly(owner, 3, normalize)
    finished = [asm.put(s, rows[s]) for s in (3, 0, 4, 1, 2)]
    assert finished == [None, 0, 2, None, 1] and asm.complete
    mean = rows[1:4].mean(axis=0)
    want = l2_normalize(mean) if normalize else mean
    np.testing.assert_allclose(asm.vector(1), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(asm.vectors()[1], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(asm.vectors()[[0, 2]], rows[[0, 4]], rtol=1e-6, atol=1e-7)


def test_a_failed_window_fails_its_item_only() -> None:
    asm = Assembly([0, 0, 1], 2, True)
    assert asm.fail(0, "poison") is None
    assert asm.put(1, np.ones(3, dtype=np.float32)) is None
    assert asm.put(2, np.ones(3, dtype=np.float32)) == 1
    assert asm.failed == {0: "poison"} and asm.final().tolist() == [False, True]
