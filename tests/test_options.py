"""embedpool.options: a call's prompt and dimensions, resolved and refused once for the CLI,
the library and the server (the model's own prompts come from a conformance fixture)."""

from __future__ import annotations

import conformance as C
import numpy as np
import pytest

from embedpool.errors import OptionError
from embedpool.models import resolve_model
from embedpool.options import CallOptions, check_dimensions, resolve_options
from embedpool.tokenization import TextTokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TextTokenizer]:
    root = tmp_path_factory.mktemp("options")
    return {
        name: TextTokenizer.for_model(resolve_model(C.materialise(name, root)))
        for name in ("default-prompt", "include-prompt-false-modes", "mean-old-flags")
    }


def resolve(tok: TextTokenizer, **kwargs: object) -> CallOptions:
    return resolve_options(tok, model="m", width=16, matryoshka=False, normalize=True, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "kwargs", "prompt"),
    [
        ("default-prompt", {}, "query: "),  # the model's default_prompt_name
        ("default-prompt", {"prompt": ""}, ""),  # explicit: none
        ("default-prompt", {"prompt_name": "doc"}, "passage: "),
        ("default-prompt", {"input_type": "passage"}, ""),  # "passage" missing: "document" is ""
        ("include-prompt-false-modes", {}, ""),  # no default
        ("include-prompt-false-modes", {"input_type": "query"}, "query: "),
        ("include-prompt-false-modes", {"input_type": "query", "prompt_name": "query"}, "query: "),
        ("include-prompt-false-modes", {"prompt": "Search: "}, "Search: "),
        ("mean-old-flags", {"input_type": "document"}, ""),  # no prompts: ST's empty defaults
    ],
)
def test_prompts_resolve_as_sentence_transformers_does(
    tokenizers: dict[str, TextTokenizer], name: str, kwargs: dict[str, str], prompt: str
) -> None:
    assert resolve(tokenizers[name], **kwargs).prompt == prompt


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        (
            {"prompt_name": "nope"},
            "prompt_name",
            r"'nope' is not one of the model's prompts: \['doc', 'document', 'long', 'query'\]",
        ),
        ({"prompt": "x", "prompt_name": "query"}, "prompt", "not both"),
        ({"input_type": "search"}, "input_type", "'search' is not one of document, passage, query"),
        ({"input_type": "query", "prompt_name": "doc"}, "input_type", "disagree"),
        ({"prompt": "word " * 40}, "prompt", "no token of the text would fit"),
    ],
)
def test_refusals_name_the_parameter(
    tokenizers: dict[str, TextTokenizer], kwargs: dict[str, str], param: str, message: str
) -> None:
    with pytest.raises(OptionError, match=message) as info:
        resolve(tokenizers["include-prompt-false-modes"], **kwargs)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("dims", "matryoshka", "want"),
    [(None, False, None), (16, False, None), (16, True, None), (8, True, 8), (1, True, 1)],
)
def test_dimensions_accepted(dims: int | None, matryoshka: bool, want: int | None) -> None:
    assert check_dimensions(dims, model="m", width=16, matryoshka=matryoshka) == want


@pytest.mark.parametrize(
    ("dims", "matryoshka", "message"),
    [
        (
            8,
            False,
            r"model m was not trained for truncated dimensions \(Matryoshka\); its vectors "
            r"have 16 dimensions",
        ),
        (0, True, "between 1 and model m's width 16, got 0"),
        (17, True, "between 1 and model m's width 16, got 17"),
        (-3, False, "between 1 and"),
        (True, True, "must be an integer"),
        ("8", True, "must be an integer"),
    ],
)
def test_dimensions_refused(dims: object, matryoshka: bool, message: str) -> None:
    with pytest.raises(OptionError, match=message) as info:
        check_dimensions(dims, model="m", width=16, matryoshka=matryoshka)  # type: ignore[arg-type]
    assert info.value.param == "dimensions"


def test_shape_keeps_the_first_values_and_normalises_as_the_model_does() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(5, 16)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    cut = CallOptions(dimensions=6, normalize=True).shape(unit)
    np.testing.assert_allclose(
        cut, unit[:, :6] / np.linalg.norm(unit[:, :6], axis=1, keepdims=True), rtol=1e-6
    )
    kept = CallOptions(dimensions=6, normalize=False).shape(raw)
    assert kept.flags.c_contiguous
    np.testing.assert_array_equal(kept, raw[:, :6])
    assert CallOptions().shape(raw) is raw
    zeros = CallOptions(dimensions=4).shape(np.zeros((2, 16), np.float32))
    assert zeros.shape == (2, 4) and not np.isnan(zeros).any()  # a failed row stays zeros


def test_width_not_known_yet_defers_the_upper_bound() -> None:
    assert check_dimensions(700, model="m", width=0, matryoshka=True) == 700


@pytest.mark.parametrize(
    ("known", "input_type", "prompt"),
    [
        ("e5-small-v2", "query", "query: "),
        ("e5-small-v2", "document", "passage: "),
        ("e5-small-v2", "passage", "passage: "),
        ("nomic-embed-text-v1.5", "passage", "search_document: "),
        ("nomic-embed-text-v1.5", "document", "search_document: "),
        ("all-MiniLM-L6-v2", "passage", ""),
    ],
)
def test_input_types_of_known_models(
    tmp_path_factory: pytest.TempPathFactory, known: str, input_type: str, prompt: str
) -> None:
    """input_type reaches the prompt the model was trained with, whichever name it has."""
    from embedpool.models import find_known, load_directory

    d = C.materialise("mean-6x", tmp_path_factory.mktemp("known"))  # no prompts of its own
    tok = TextTokenizer.for_model(load_directory(d, known=find_known(known)))
    assert resolve(tok, input_type=input_type).prompt == prompt
