"""Token counts in a model's own tokenizer, for ``embedpool tokenize``: what a chunker needs
to cut its chunks to the model's window.

Each text is tokenised exactly as it is embedded (``TextTokenizer``: the model's normalizer,
lower-casing and prompt, special tokens), but not truncated, and reported as one record:
``n_tokens`` (special tokens and prompt included, the number the model's ``max_length``
bounds), ``fits``, and per token its ``id``, ``token`` and character ``offsets`` into the
text (``null`` for special tokens and the prompt's tokens, which are not in the text).
Offsets come from the ``tokenizers`` library (characters, not bytes: Python slices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from embedpool.tokenization import TextTokenizer

#: Texts tokenised per call of the Rust tokenizer (it is parallel over a batch).
BATCH = 256


def token_records(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    prompt: str = "",
    ids: Sequence[str] | None = None,
    details: bool = True,
) -> Iterator[dict[str, Any]]:
    """One record per text (``ids``: the texts' own ids, echoed as ``id``)."""
    shift = len(prompt)
    limit = tokenizer.max_length
    for start in range(0, len(texts), BATCH):
        part = texts[start : start + BATCH]
        for k, enc in enumerate(tokenizer.encodings(part, prompt=prompt)):
            index = start + k
            record: dict[str, Any] = {"index": index}
            if ids is not None:
                record["id"] = ids[index]
            n = len(enc.ids)
            record.update({"n_tokens": n, "max_length": limit, "fits": n <= limit})
            if details:
                offsets: list[list[int] | None] = []
                for (a, b), special in zip(enc.offsets, enc.special_tokens_mask, strict=True):
                    offsets.append(None if special or a < shift else [a - shift, b - shift])
                record.update(
                    {"ids": list(enc.ids), "tokens": list(enc.tokens), "offsets": offsets}
                )
            yield record
