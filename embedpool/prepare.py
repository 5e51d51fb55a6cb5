"""The steps on either side of the executor, written once for the job and the server.

::

    texts ──prepare──▶ dedupe ──▶ cache lookup ──misses──▶ tokenise ──▶ sequences (owner: miss)
                                     │ hits                                  │ plan: plan_batches
                                     ▼                                       ▼ (the job per window,
    rows in input order ◀── Prepared.rows ◀── cache writes ◀── Assembly ◀──   the server's batcher
                            (dedupe undone)   (Prepared.store)  (windows       over its FIFO window)
                                                                 averaged)

* ``prepare`` turns one group of texts (a job's window, one HTTP request) into the unique
  texts, what the cache already holds (keyed by the text and the call's prompt) and the
  token sequences of the rest, each sequence owned by one missing text. ``tokenize_all``
  tokenises the hits too, for callers that report every input's tokens (the server's usage).
* ``Assembly`` folds sequence vectors, in any order, into one vector per text: a text of
  several windows (``long_text="window"``) is averaged by ``vectors.combine_windows``, the
  one place windows are averaged; a failed sequence fails its text.
* ``Prepared.fill``/``store``/``rows`` put finished vectors back, write them to the cache and
  undo the dedupe.

Batches are planned by ``batching.plan_batches`` in both callers: the job over a window's
sequences, the server's micro-batcher over the sequences of every waiting request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedpool.batching import dedupe
from embedpool.tokenization import Encoded, TextTokenizer
from embedpool.types import LongTextMode, Vectors
from embedpool.vectors import combine_windows


class VectorCacheHook(Protocol):
    """What the prepare and assembly steps need from a vector cache (``cache.BoundCache``):
    keys are the texts and the call's prompt; the cache itself is bound to the model's
    fingerprint."""

    def get_many(
        self, texts: Sequence[str], prompt: str = "", truncated: list[bool] | None = None
    ) -> list[Vectors | None]: ...

    def put_many(
        self,
        texts: Sequence[str],
        vectors: Vectors,
        prompt: str = "",
        truncated: Sequence[bool] | None = None,
    ) -> None: ...


@dataclass
class Prepared:
    """One group of texts ready to run (see the module docstring)."""

    #: The unique texts, and per input the index of its unique text.
    texts: list[str]
    inverse: list[int]
    #: (n_unique, dim): cache hits filled now, the missing texts by ``fill``.
    vectors: Vectors
    #: Unique indices the executor must compute; ``encoded.owner`` indexes this list.
    missing: list[int]
    encoded: Encoded
    #: Per unique text: tokens were dropped (truncate mode), and its tokens as fed to the
    #: model (the sum over its windows); known for every text with ``tokenize_all``, else
    #: for the missing ones (a hit: 0 tokens, and truncated as the cache remembers it).
    truncated: list[bool]
    tokens: list[int]
    prompt: str

    @property
    def sequences_tokens(self) -> int:
        """Tokens the executor runs (the missing texts' sequences)."""
        return sum(len(s) for s in self.encoded.sequences)

    def hits(self) -> int:
        """Inputs the cache answered."""
        found = np.ones(len(self.texts), dtype=bool)
        found[self.missing] = False
        return int(found[self.inverse].sum()) if self.inverse else 0

    def input_tokens(self) -> int:
        """Tokens of every input as the model is fed them (duplicates counted each time)."""
        return (
            int(np.asarray(self.tokens, dtype=np.int64)[self.inverse].sum()) if self.inverse else 0
        )

    def truncated_inputs(self) -> list[int]:
        """Indices of the inputs whose text was truncated."""
        return [i for i, u in enumerate(self.inverse) if self.truncated[u]]

    def first_input(self, unique: int) -> int:
        """The first input index whose text is ``unique``."""
        return self.inverse.index(unique)

    def fill(self, vectors: Vectors, which: Sequence[int] | None = None) -> None:
        """Put the vectors of missing texts ``which`` (indices into ``missing``; None: all,
        in order) into ``vectors``."""
        ks = range(len(self.missing)) if which is None else which
        self.vectors[[self.missing[k] for k in ks]] = vectors

    def store(self, cache: VectorCacheHook | None, which: Iterable[int]) -> None:
        """Write the finished vectors of missing texts ``which`` (indices into ``missing``)
        to ``cache``, whole (before any ``dimensions`` cut)."""
        us = [self.missing[k] for k in which]
        if cache is not None and us:
            cache.put_many(
                [self.texts[u] for u in us],
                self.vectors[us],
                self.prompt,
                [self.truncated[u] for u in us],
            )

    def rows(self) -> Vectors:
        """(n_inputs, dim): one row per input, in input order (the dedupe undone)."""
        out: Vectors = self.vectors[self.inverse]
        return out


def prepare(
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    long_text: LongTextMode,
    dim: int,
    *,
    prompt: str = "",
    cache: VectorCacheHook | None = None,
    tokenize_all: bool = False,
) -> Prepared:
    """Dedupe ``texts``, look the unique ones up in ``cache`` and tokenise the misses (every
    unique text with ``tokenize_all``), ``prompt`` in front of each (see the module
    docstring)."""
    uniq, inverse = dedupe(texts)
    vectors = np.zeros((len(uniq), dim), dtype=np.float32)
    missing = list(range(len(uniq)))
    truncated = [False] * len(uniq)
    if cache is not None and uniq:
        # the cache remembers truncation: a hit reports it as its first run did
        found = cache.get_many(uniq, prompt, truncated)
        missing = []
        for u, vec in enumerate(found):
            if vec is None:
                missing.append(u)
            else:
                vectors[u] = vec
    tokens = [0] * len(uniq)
    if tokenize_all and len(missing) < len(uniq):
        every = tokenizer.encode(uniq, long_text, prompt=prompt)
        position = {u: k for k, u in enumerate(missing)}
        rows = [j for j, o in enumerate(every.owner) if o in position]
        enc = Encoded(
            [every.sequences[j] for j in rows],
            [position[every.owner[j]] for j in rows],
            [every.n_tokens[u] for u in missing],
            [every.truncated[u] for u in missing],
            every.prompt_length,
            every.prompt,
        )
        _count(every, range(len(uniq)), truncated, tokens)
    else:
        enc = tokenizer.encode([uniq[u] for u in missing], long_text, prompt=prompt)
        _count(enc, missing, truncated, tokens)
    return Prepared(uniq, inverse, vectors, missing, enc, truncated, tokens, prompt)


def _count(enc: Encoded, owners: Sequence[int], truncated: list[bool], tokens: list[int]) -> None:
    """Per owner of ``enc`` (``owners[o]``: its unique index): truncated, tokens fed."""
    for o, u in enumerate(owners):
        truncated[u] = enc.truncated[o]
    for seq, o in zip(enc.sequences, enc.owner, strict=True):
        tokens[owners[o]] += len(seq)


class Assembly:
    """Sequence vectors in, in any order; one vector per item out (see the module docstring).

    ``owner[s]`` is the item of sequence ``s``. An item is final once every one of its
    sequences is in; ``put`` and ``fail`` return it then (``fail`` marks it failed: it never
    gets a vector). Not thread-safe: callers that fill from several threads hold a lock.
    """

    def __init__(self, owner: Sequence[int], n_items: int, normalize: bool) -> None:
        self.owner = np.asarray(owner, dtype=np.intp)
        self.n_items = n_items
        self.normalize = normalize
        self.counts = np.bincount(self.owner, minlength=n_items)
        self.remaining = self.counts.copy()
        self.failed: dict[int, str] = {}
        self.rows: Vectors | None = None
        self._order = np.argsort(self.owner, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(self.counts)])

    def put(self, seq: int, row: Vectors) -> int | None:
        """Fold in sequence ``seq``'s vector; its item if that is now final (and not failed)."""
        if self.rows is None:
            self.rows = np.zeros((len(self.owner), row.shape[-1]), dtype=np.float32)
        self.rows[seq] = row
        return self._arrived(seq)

    def fail(self, seq: int, reason: str) -> int | None:
        """Sequence ``seq`` could not be embedded: its item fails (the first reason stays)."""
        self.failed.setdefault(int(self.owner[seq]), reason)
        self._arrived(seq)
        return None

    def _arrived(self, seq: int) -> int | None:
        item = int(self.owner[seq])
        self.remaining[item] -= 1
        return item if self.remaining[item] == 0 and item not in self.failed else None

    @property
    def complete(self) -> bool:
        return bool((self.remaining == 0).all())

    def final(self) -> np.ndarray:
        """Per item: all its sequences are in and none failed."""
        ok: np.ndarray = self.remaining == 0
        for item in self.failed:
            ok[item] = False
        return ok

    def vector(self, item: int) -> Vectors:
        """The final vector of one item (``combine_windows`` over its sequences)."""
        assert self.rows is not None
        seqs = self._order[self._starts[item] : self._starts[item + 1]]
        out: Vectors = combine_windows(self.rows[seqs], [0] * len(seqs), 1, self.normalize)[0]
        return out

    def vectors(self) -> Vectors:
        """(n_items, dim): every item's vector, once all are in."""
        assert self.rows is not None
        return combine_windows(
            self.rows[self._order], self.owner[self._order].tolist(), self.n_items, self.normalize
        )
