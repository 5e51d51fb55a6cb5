"""Texts to model-ready token sequences, with truncation counted per item.

The parent process tokenises (HF ``tokenizers``, in Rust, parallel over the batch) so that
batches can be planned by real token counts and workers receive compact int32 ids, not text.

A text becomes tokens exactly as sentence-transformers 6.2 (with transformers 5) makes them
(``modelspec.TextSpec``, read by ``models.layout``):

    prompt + text ──normalizer──> tokens ──[CLS] ... [SEP], at most max_length──> sequence
                                           (the special tokens the post-processor adds, kept
                                           on truncation: none / <|endoftext|> for Qwen)
       │              └─ tokenizer.json's, or the BertNormalizer transformers rebuilds from
       │                 tokenizer_config.json; a Lowercase in front when do_lower_case
       └─ the prompt resolved as ST's encode does (explicit > named > the model's default);
          it is part of the text, so it is truncated with it and counts toward max_length.
          Its length in tokens (with [CLS], without a trailing special token: ST's
          ``prompt_length``) is what a Pooling with include_prompt=False leaves out.

Each item becomes one sequence (``truncate``) or several overlapping windows (``window``,
each one ``[CLS] prompt window [SEP]``); every sequence is at most ``max_length`` tokens long.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from tokenizers import Encoding, Tokenizer, normalizers

from embedpool.errors import ConfigError, ModelError
from embedpool.modelspec import TextSpec
from embedpool.types import LongTextMode, TokenIds

if TYPE_CHECKING:
    from embedpool.models import ResolvedModel

#: Window mode: tokens shared by neighbouring windows. A quarter of the content width keeps
#: every token with some context on both sides while costing at most ~1.33x the tokens.
WINDOW_OVERLAP_FRACTION = 0.25
#: Texts per ``tokenizers`` call in ``encode``. Its Encoding objects (ids, type ids, token
#: strings, offsets, masks of the whole untruncated text) cost tens of KB per long text
#: beyond the ids kept: a job window of 8,192 at once was a 180 MB transient peak
#: (benchmarks/streaming.py). 256 still gives its thread pool plenty of texts per call.
ENCODE_SLICE = 256


@dataclass(frozen=True)
class Encoded:
    """The sequences of one batch of texts."""

    sequences: list[TokenIds]  # model-ready, each <= max_length
    owner: list[int]  # owner[i]: index of the text that sequences[i] belongs to
    n_tokens: list[int]  # per text: full token count with special tokens, before truncation
    truncated: list[bool]  # per text: tokens were dropped (truncate mode only)
    #: The prompt's length in tokens as sentence-transformers counts it ([CLS] and the
    #: prompt, no trailing special token), the same for every sequence; 0 without a prompt.
    #: Engine.embed(sequences, prompt_lengths) needs it for include_prompt=False models.
    prompt_length: int = 0
    prompt: str = ""  # the prompt that was prepended ("" for none)


class TextTokenizer:
    """Wraps a ``tokenizer.json`` with sentence-transformers' text handling (lower-casing,
    prompts, max length) and embedpool's own truncation report and windowing."""

    def __init__(
        self, tokenizer_path: Path, max_length: int, *, text: TextSpec | None = None
    ) -> None:
        """``text``: the model's TextSpec (lower-casing, normalizer, prompts); its max length
        is replaced by ``max_length``. Without one: the tokenizer as it is, no prompts."""
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
        tok.no_truncation()
        tok.no_padding()
        self.text = text if text is not None else TextSpec(max_length)
        if self.text.normalizer is not None:
            n = self.text.normalizer
            tok.normalizer = normalizers.BertNormalizer(
                clean_text=n.clean_text,
                handle_chinese_chars=n.handle_chinese_chars,
                strip_accents=n.strip_accents,
                lowercase=n.lowercase,
            )
            from tokenizers import pre_tokenizers

            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # rebuilt with it too
        if self.text.do_lower_case and not _has_lowercase(tok.normalizer):
            # what sentence-transformers 6 does: a Lowercase in front of the normalizer
            current = tok.normalizer
            rest: list[Any] = (
                list(cast(Iterable[Any], current))
                if isinstance(current, normalizers.Sequence)
                else [current]
                if current is not None
                else []
            )
            tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
        self._tok = tok
        self.max_length = max_length
        # The special tokens the post-processor puts around a text: [CLS] / [SEP] (BERT),
        # <s> / </s> (XLM-R), nothing / <|endoftext|> (Qwen3-Embedding), none at all (Qwen2).
        full, bare = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        at = (
            next(
                (i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare),
                None,
            )
            if bare
            else None
        )
        if at is None:
            raise ModelError(
                f"{tokenizer_path}: cannot tell the special tokens its "
                f"post-processor adds ('a' gives {full}, without them {bare})"
            )
        self._prefix = np.array(full[:at], dtype=np.int32)
        self._suffix = np.array(full[at + len(bare) :], dtype=np.int32)
        self.pad_id = int(tok.token_to_id("[PAD]") or 0)
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._prompt_lengths: dict[str, int] = {}

    @property
    def backend(self) -> Tokenizer:
        """The ``tokenizers`` Tokenizer as configured here (normalizer, lower-casing), no
        truncation or padding: what pair encoding (``rerank.PairTokenizer``) starts from."""
        return self._tok

    @classmethod
    def for_model(cls, model: ResolvedModel) -> TextTokenizer:
        """The tokenizer exactly as the model's files configure it."""
        return cls(model.tokenizer_path, model.max_length, text=model.text)

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The prompt texts get: ``prompt`` ("" for none) > ``prompt_name`` > the model's
        default prompt (TextSpec.resolve_prompt); ConfigError for an unknown name."""
        try:
            return self.text.resolve_prompt(prompt, prompt_name) or ""
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None

    def prompt_length(self, prompt: str) -> int:
        """sentence-transformers' ``prompt_length``: the prompt tokenised alone, minus a
        trailing special token ([CLS] and the prompt's tokens); 0 for no prompt."""
        if not prompt:
            return 0
        if prompt not in self._prompt_lengths:
            ids = self._tok.encode(prompt).ids
            n = len(ids) - (1 if ids and ids[-1] in self._special else 0)
            if n + self._suffix.size >= self.max_length:
                raise ConfigError(
                    f"the prompt {prompt!r} is {n - self._prefix.size} tokens; "
                    f"with max length {self.max_length} no token of the text "
                    "would fit"
                )
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def count(
        self, texts: Sequence[str], *, prompt: str | None = None, prompt_name: str | None = None
    ) -> list[int]:
        """Full token counts (special tokens and prompt included), without building sequences."""
        p = self.resolve_prompt(prompt, prompt_name)
        return [len(e.ids) for e in self._tok.encode_batch([p + t for t in texts])]

    def encodings(
        self, texts: Sequence[str], *, prompt: str = "", add_special_tokens: bool = True
    ) -> list[Encoding]:
        """The ``tokenizers`` encodings of ``prompt + text`` (ids, tokens, offsets, special
        tokens mask), untruncated: what token counting (``/tokenize``, ``embedpool tokenize``)
        reports, in the exact tokenisation the model is fed."""
        return list(
            self._tok.encode_batch(
                [prompt + t for t in texts], add_special_tokens=add_special_tokens
            )
        )

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of token ids (ValueError for an id outside the vocabulary)."""
        size = self._tok.get_vocab_size(with_added_tokens=True)
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{size - 1})")
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_ids(self, text: str) -> list[int]:
        """Content ids of a text without special tokens (used by test hooks)."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def encode(
        self,
        texts: Sequence[str],
        mode: LongTextMode = "truncate",
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
    ) -> Encoded:
        """The texts' sequences. ``prompt`` / ``prompt_name`` as in sentence-transformers'
        ``encode``: neither applies the model's default prompt (if it has one); ``prompt=""``
        applies none."""
        p = self.resolve_prompt(prompt, prompt_name)
        plen = self.prompt_length(p)
        pre, suf = self._prefix, self._suffix
        keep = max(plen - pre.size, 0)  # prompt tokens after [CLS], repeated in every window
        sequences: list[TokenIds] = []
        owner: list[int] = []
        n_tokens: list[int] = []
        truncated: list[bool] = []
        width = self.max_length - pre.size - suf.size
        for i, enc in self._encodings(texts, p):
            ids = np.asarray(enc.ids, dtype=np.int32)
            if not ids.size:
                raise ConfigError(
                    f"text {i} is empty and this model's tokenizer adds no "
                    "special tokens: it has no token to embed"
                )
            n_tokens.append(int(ids.size))
            content = ids[pre.size : ids.size - suf.size]
            if ids.size <= self.max_length:
                sequences.append(ids)
                owner.append(i)
                truncated.append(False)
            elif mode == "truncate":
                sequences.append(np.concatenate([pre, content[:width], suf]))
                owner.append(i)
                truncated.append(True)
            else:
                head, body = content[:keep], content[keep:]
                w = width - keep
                stride = max(1, w - int(w * WINDOW_OVERLAP_FRACTION))
                starts = list(range(0, max(1, body.size - w) + stride, stride))
                starts = [
                    s for s in starts if s < body.size and (s == 0 or s + w - stride < body.size)
                ]
                for s in starts:
                    sequences.append(np.concatenate([pre, head, body[s : s + w], suf]))
                    owner.append(i)
                truncated.append(False)
        return Encoded(sequences, owner, n_tokens, truncated, prompt_length=plen, prompt=p)

    def _encodings(self, texts: Sequence[str], prompt: str) -> Iterator[tuple[int, Encoding]]:
        """``(index, Encoding)`` of each ``prompt + text``, ENCODE_SLICE texts per call."""
        for start in range(0, len(texts), ENCODE_SLICE):
            batch = [prompt + t for t in texts[start : start + ENCODE_SLICE]]
            yield from enumerate(self._tok.encode_batch(batch), start=start)


def _has_lowercase(normalizer: object) -> bool:
    """sentence-transformers' check: a Lowercase, or a Sequence holding one (a BertNormalizer
    that lower-cases does not count, so ST adds a Lowercase in front of it too)."""
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)  # type: ignore[attr-defined]
    return False
