"""Batch planning: pure functions over token lengths, table-tested.

Padded cost of a batch is ``items x longest``; sorting by length keeps padding near zero,
and a padded-token budget (not an item count) bounds both the activation memory and the
latency of one batch whatever the text lengths are. How big a budget is decided in one
place, ``budget.batch_budget``; this module only cuts batches to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedpool.budget import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_ITEMS


@dataclass(frozen=True)
class Batch:
    """Indices into the sequence list, longest last; ``padded_tokens`` = items x longest."""

    indices: tuple[int, ...]
    longest: int

    @property
    def padded_tokens(self) -> int:
        return len(self.indices) * self.longest


def plan_batches(
    lengths: Sequence[int],
    token_budget: int = DEFAULT_BATCH_TOKENS,
    max_items: int = DEFAULT_MAX_BATCH_ITEMS,
) -> list[Batch]:
    """Sort by length and cut greedily so that ``items x longest <= token_budget``.

    A single sequence longer than the budget still forms a batch of its own.
    Batches are returned shortest first; every index appears exactly once.
    """
    if token_budget < 1 or max_items < 1:
        raise ValueError(
            f"token_budget and max_items must be >= 1, got {token_budget}, {max_items}"
        )
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[Batch] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        if current and (
            len(current) + 1 > max_items or (len(current) + 1) * max(longest, n) > token_budget
        ):
            batches.append(Batch(tuple(current), longest))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(Batch(tuple(current), longest))
    return batches


def dedupe(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Unique texts in first-seen order and, per input, the index of its unique text."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(t, len(first)) for t in texts]
    return list(first), inverse
