from __future__ import annotations

import pytest

from embedpool.batching import dedupe, plan_batches


@pytest.mark.parametrize(
    ("lengths", "budget", "max_items", "expected"),
    [
        pytest.param([], 100, 8, [], id="empty"),
        pytest.param([5], 100, 8, [(0,)], id="single"),
        pytest.param([10, 10, 10, 10], 40, 8, [(0, 1, 2, 3)], id="exactly-fits"),
        pytest.param([10, 10, 10, 10], 39, 8, [(0, 1, 2), (3,)], id="budget-cuts"),
        pytest.param([30, 10, 20], 1000, 8, [(1, 2, 0)], id="sorted-by-length"),
        pytest.param([10] * 5, 1000, 2, [(0, 1), (2, 3), (4,)], id="item-cap"),
        pytest.param([500, 3], 100, 8, [(1,), (0,)], id="oversized-alone"),
        pytest.param([4, 4, 9, 9], 18, 8, [(0, 1), (2, 3)], id="padding-counts-longest"),
        pytest.param([7, 7, 7], 20, 8, [(0, 1), (2,)], id="stable-ties"),
    ],
)
def test_plan_batches(
    lengths: list[int], budget: int, max_items: int, expected: list[tuple[int, ...]]
) -> None:
    batches = plan_batches(lengths, budget, max_items)
    assert [b.indices for b in batches] == expected
    for b in batches:
        assert len(b.indices) <= max_items
        assert b.padded_tokens <= budget or len(b.indices) == 1
        assert b.longest == max(lengths[i] for i in b.indices)


def test_plan_batches_covers_every_index_once() -> None:
    lengths = [(i * 37) % 300 + 1 for i in range(1000)]
    batches = plan_batches(lengths, 2048, 64)
    seen = sorted(i for b in batches for i in b.indices)
    assert seen == list(range(1000))


@pytest.mark.parametrize("budget,items", [(0, 8), (10, 0)], ids=["zero-budget", "zero-items"])
def test_plan_batches_rejects_bad_limits(budget: int, items: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_batches([1, 2], budget, items)


@pytest.mark.parametrize(
    ("texts", "uniq", "inverse"),
    [
        pytest.param([], [], [], id="empty"),
        pytest.param(["a", "b"], ["a", "b"], [0, 1], id="distinct"),
        pytest.param(["a", "b", "a", "a"], ["a", "b"], [0, 1, 0, 0], id="repeats"),
        pytest.param(["", " ", ""], ["", " "], [0, 1, 0], id="whitespace-differs"),
    ],
)
def test_dedupe(texts: list[str], uniq: list[str], inverse: list[int]) -> None:
    assert dedupe(texts) == (uniq, inverse)
    u, inv = dedupe(texts)
    assert [u[i] for i in inv] == texts
