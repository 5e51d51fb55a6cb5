"""Texts to model-ready token sequences, with truncation counted per item.

The parent process tokenises (HF ``tokenizers``, in Rust, parallel over the batch) so that
batches can be planned by real token counts and workers receive compact int32 ids, not text.

Each item becomes one sequence (``truncate``) or several overlapping windows (``window``);
every sequence is ``[CLS] content [SEP]`` and at most ``max_length`` tokens long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from embedpool.errors import ModelError
from embedpool.types import LongTextMode, TokenIds

#: Window mode: tokens shared by neighbouring windows. A quarter of the content width keeps
#: every token with some context on both sides while costing at most ~1.33x the tokens.
WINDOW_OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class Encoded:
    """The sequences of one batch of texts."""

    sequences: list[TokenIds]  # model-ready, each <= max_length
    owner: list[int]  # owner[i]: index of the text that sequences[i] belongs to
    n_tokens: list[int]  # per text: full token count with special tokens, before truncation
    truncated: list[bool]  # per text: tokens were dropped (truncate mode only)


class TextTokenizer:
    """Wraps a ``tokenizer.json`` with embedpool's own truncation and windowing."""

    def __init__(self, tokenizer_path: Path, max_length: int) -> None:
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.max_length = max_length
        probe = tok.encode("a").ids
        if len(probe) < 2:
            raise ModelError(f"{tokenizer_path}: tokenizer adds no special tokens; "
                             "embedpool expects [CLS] ... [SEP]")
        self._cls = np.array(probe[:1], dtype=np.int32)
        self._sep = np.array(probe[-1:], dtype=np.int32)
        self.pad_id = int(tok.token_to_id("[PAD]") or 0)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Full token counts (special tokens included), without building sequences."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts))]

    def token_ids(self, text: str) -> list[int]:
        """Content ids of a text without special tokens (used by test hooks)."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def encode(self, texts: Sequence[str], mode: LongTextMode = "truncate") -> Encoded:
        sequences: list[TokenIds] = []
        owner: list[int] = []
        n_tokens: list[int] = []
        truncated: list[bool] = []
        width = self.max_length - 2
        stride = max(1, width - int(width * WINDOW_OVERLAP_FRACTION))
        for i, enc in enumerate(self._tok.encode_batch(list(texts))):
            ids = np.asarray(enc.ids, dtype=np.int32)
            n_tokens.append(int(ids.size))
            content = ids[1:-1]
            if ids.size <= self.max_length:
                sequences.append(ids)
                owner.append(i)
                truncated.append(False)
            elif mode == "truncate":
                sequences.append(np.concatenate([self._cls, content[:width], self._sep]))
                owner.append(i)
                truncated.append(True)
            else:
                starts = list(range(0, max(1, content.size - width) + stride, stride))
                starts = [s for s in starts if s < content.size and (s == 0 or s + width - stride < content.size)]
                for s in starts:
                    sequences.append(np.concatenate([self._cls, content[s:s + width], self._sep]))
                    owner.append(i)
                truncated.append(False)
        return Encoded(sequences, owner, n_tokens, truncated)
