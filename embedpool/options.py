"""What one embedding call may ask for besides its texts: a prompt and fewer dimensions.

The CLI (``--prompt``, ``--prompt-name``, ``--dimensions``), the library
(``Embedder.embed(texts, prompt=..., prompt_name=..., dimensions=...)``) and the server
(``prompt_name``, ``input_type``, ``dimensions``) all resolve them here, once per call, into a
``CallOptions``; every refusal is an ``OptionError`` naming the parameter, which the CLI turns
into exit 2 and the server into a 400 with that ``param``.

* The prompt is resolved as sentence-transformers' ``encode`` resolves it: an explicit prompt,
  else the named one, else the model's ``default_prompt_name``. ``input_type`` (the convention
  of Cohere, Voyage and NIM: query / document / passage) picks a prompt name
  (``TextSpec.prompt_name_for``). A prompt is part of the text: it is tokenised with it,
  truncated with it, and keys the vector cache with it (``cache.text_key``).
* ``dimensions``: a Matryoshka model (trained for it: the known-model table or config.json's
  ``matryoshka_dimensions``) keeps the first N values, normalised again when the model
  normalises (``vectors.truncate_dims``); any other model accepts only its own width.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedpool.errors import ConfigError, OptionError
from embedpool.modelspec import INPUT_TYPE_PROMPTS
from embedpool.tokenization import TextTokenizer
from embedpool.types import Vectors
from embedpool.vectors import truncate_dims


@dataclass(frozen=True)
class CallOptions:
    """One call's resolved options."""

    prompt: str = ""  # prepended to every text ("" for none)
    dimensions: int | None = None  # keep the first N values; None: the model's width
    normalize: bool = True  # renormalise after truncation (the model normalises its vectors)

    def shape(self, vectors: Vectors) -> Vectors:
        """The vectors as the caller asked for them (cut to ``dimensions``)."""
        if self.dimensions is None:
            return vectors
        return truncate_dims(vectors, self.dimensions, normalize=self.normalize)


def resolve_options(
    tokenizer: TextTokenizer,
    *,
    model: str,
    width: int,
    matryoshka: bool,
    normalize: bool,
    prompt: str | None = None,
    prompt_name: str | None = None,
    input_type: str | None = None,
    dimensions: int | None = None,
) -> CallOptions:
    """The call's options, checked against the model (``tokenizer``: its prompts and max
    length; ``width``: its vectors' width, 0 when not known yet; ``matryoshka``: trained for
    truncation). Raises OptionError."""
    if prompt is not None and prompt_name is not None:
        raise OptionError("give a prompt or a prompt name, not both", "prompt")
    if input_type is not None:
        name = input_type_prompt(tokenizer, input_type)
        if prompt_name is not None and prompt_name != name:
            raise OptionError(
                f"prompt_name {prompt_name!r} and input_type {input_type!r} "
                f"(prompt name {name!r} for this model) disagree: give one",
                "input_type",
            )
        prompt_name = name
    try:
        text = tokenizer.resolve_prompt(prompt, prompt_name)
        tokenizer.prompt_length(text)  # refuses a prompt that leaves no room for the text
    except ConfigError as exc:
        raise OptionError(str(exc), "prompt" if prompt is not None else "prompt_name") from None
    dims = check_dimensions(dimensions, model=model, width=width, matryoshka=matryoshka)
    return CallOptions(text, dims, normalize)


def prompt_names(tokenizer: TextTokenizer) -> list[str]:
    """The prompt names a model takes ("query" and "document" always, as in
    sentence-transformers, and its own)."""
    return sorted({"query", "document", *dict(tokenizer.text.prompts)})


def input_type_prompt(tokenizer: TextTokenizer, input_type: str) -> str:
    """The prompt name an ``input_type`` selects for this model; OptionError if unknown."""
    if not isinstance(input_type, str) or input_type not in INPUT_TYPE_PROMPTS:
        raise OptionError(
            f"input_type {input_type!r} is not one of {', '.join(sorted(INPUT_TYPE_PROMPTS))}",
            "input_type",
        )
    return tokenizer.text.prompt_name_for(input_type)


def check_dimensions(
    dimensions: int | None, *, model: str, width: int, matryoshka: bool
) -> int | None:
    """The dimensions to keep, or None for the model's full width. ``width`` 0: not known
    yet (a shipped graph before its engine loads); the upper bound is then checked when the
    vectors arrive (``truncate_dims``)."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise OptionError(f"dimensions must be an integer, got {dimensions!r}", "dimensions")
    if dimensions < 1 or (width and dimensions > width):
        raise OptionError(
            f"dimensions must be between 1 and model {model}'s width "
            f"{width or '(unknown)'}, got {dimensions}",
            "dimensions",
        )
    if dimensions == width:
        return None
    if not matryoshka:
        raise OptionError(
            f"model {model} was not trained for truncated dimensions "
            f"(Matryoshka); its vectors have {width} dimensions: omit "
            f"dimensions or ask for {width}",
            "dimensions",
        )
    return dimensions
