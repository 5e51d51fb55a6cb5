"""OpenAI's embeddings wire format: request parsing and validation, response rendering
(float and base64), the published schemas, and OpenAI's error shape.

Validation is by hand, not by pydantic, so that every error names the field *and the input
index* (``input[2] must be a string, got integer``), as OpenAI's own API does. The pydantic
models below only document the responses in ``/openapi.json``; the request schema is built per
app (:func:`embedding_request_schema`) so that it states exactly what the handler accepts.

Choices a client may notice:

* ``input`` as token-id arrays is refused with 400: the usual sender is LangChain's
  ``OpenAIEmbeddings``, which sends *tiktoken* ids that mean nothing to this model's vocabulary
  (set ``check_embedding_ctx_length=False`` there to send text).
* An empty string is embedded (as ``[CLS] [SEP]``), as the CLI does.
* ``dimensions``: a model trained for it (Matryoshka) keeps the first N values, normalised
  again; any other model accepts only its own width (``options.check_dimensions``).
* ``prompt_name`` (one of the model's prompts) and ``input_type`` (query, document, passage:
  the convention of Cohere, Voyage and NIM, mapped to the model's prompt names) choose the
  prompt put before every input; with neither, the model's default prompt applies. Both may be
  given only when they agree. The openai client sends them with ``extra_body``.
* ``usage.prompt_tokens`` counts the tokens fed to the model (after truncation).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from embedpool.modelspec import INPUT_TYPE_PROMPTS
from embedpool.types import Vectors

#: Truncated indices listed in the header at most (the count header is always exact).
MAX_HEADER_INDICES = 512


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(
            self.status,
            self.message,
            type=self.type,
            param=self.param,
            code=self.code,
            headers=self.headers,
        )


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 400 ``invalid_request_error`` naming ``param``."""
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- schemas
class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    truncated_indices: list[int] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


#: The error statuses every API route documents, all in OpenAI's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)
}


@dataclass(frozen=True)
class ServedModel:
    """The model as clients may name it."""

    names: tuple[str, ...]  # names[0] is the canonical one, echoed in responses
    dim: int
    max_length: int
    #: The prompt names a request may send (``options.prompt_names``).
    prompt_names: tuple[str, ...] = ("document", "query")
    #: input_type -> the prompt name it selects for this model (``options.input_type_prompt``).
    input_types: tuple[tuple[str, str], ...] = ()
    matryoshka: bool = False  # any dimensions from 1 to dim, not only dim
    normalize: bool = True  # the model normalises: truncated vectors are normalised again

    def lookup(self, name: str) -> str | None:
        """The canonical name for ``name`` (exact, then case-insensitive), or None."""
        if name in self.names:
            return self.names[0]
        low = name.lower()
        return self.names[0] if any(n.lower() == low for n in self.names) else None

    def not_found(self, name: str) -> ApiError:
        return ApiError(
            404,
            f"The model '{name}' does not exist on this server. "
            f"Served models: {', '.join(self.names)}.",
            param="model",
            code="model_not_found",
        )


def embedding_request_schema(served: ServedModel, max_items: int) -> dict[str, Any]:
    """The JSON schema of a request body this server accepts (published in /openapi.json).

    Every body valid under it is embedded (or refused only for its size, 413, or for server
    state, 429/503); token-id arrays, empty arrays, dimensions the model cannot give, unknown
    prompt names, a prompt_name and input_type that disagree, and unknown model names are
    outside it, as the handler refuses them. Model names are matched case-insensitively too,
    which the schema does not spell out (stricter than the handler, never looser).
    """

    def nullable(schema: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [schema, {"type": "null"}]}

    def given(field: str) -> dict[str, Any]:
        return {"required": [field], "properties": {field: {"type": "string"}}}

    dims: dict[str, Any] = (
        {"type": "integer", "minimum": 1, "maximum": served.dim}
        if served.matryoshka
        else {"type": "integer", "enum": [served.dim]}
    )
    # prompt_name and input_type together only when they name the same prompt
    agree = [
        {
            "properties": {
                "prompt_name": {"const": name},
                "input_type": {"enum": [t for t, n in served.input_types if n == name]},
            }
        }
        for name in sorted({n for _, n in served.input_types})
    ]
    return {
        "title": "EmbeddingRequest",
        "type": "object",
        "required": ["input"],
        "anyOf": [{"not": given("prompt_name")}, {"not": given("input_type")}, *agree],
        "properties": {
            "input": {
                "description": "A text, or a list of texts (not token ids).",
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": max_items,
                    },
                ],
            },
            "model": {
                "description": "A served model name; omitted or null: the served model.",
                **nullable({"type": "string", "enum": list(served.names)}),
            },
            "encoding_format": {
                "default": "float",
                **nullable({"type": "string", "enum": ["float", "base64"]}),
            },
            "dimensions": {
                "description": "Keep the first N dimensions, normalised again "
                "(Matryoshka models); other models: their own width.",
                **nullable(dims),
            },
            "prompt_name": {
                "description": "The model's prompt to put before every input; "
                "default: the model's default prompt.",
                **nullable({"type": "string", "enum": list(served.prompt_names)}),
            },
            "input_type": {
                "description": "query, document or passage: the model's prompt "
                "for that kind of input.",
                **nullable({"type": "string", "enum": sorted(INPUT_TYPE_PROMPTS)}),
            },
            "user": {"description": "Accepted and ignored.", **nullable({"type": "string"})},
        },
    }


# ----------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class EmbeddingCall:
    """A validated request."""

    texts: list[str]
    model: str
    encoding_format: Literal["float", "base64"]
    prompt_name: str | None = None  # checked against the model by options.resolve_options
    input_type: str | None = None
    dimensions: int | None = None


def type_name(value: Any) -> str:
    """A JSON value's type as JSON names it (for error messages; every dialect uses it)."""
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 ``invalid_json`` (bad UTF-8, bad syntax, absurd nesting)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc}"[:300], None, "invalid_json"
        ) from None


def parse_embedding_request(body: Any, served: ServedModel, max_items: int) -> EmbeddingCall:
    """Validate an OpenAI embeddings body; every error names the field and input index."""
    if not isinstance(body, dict):
        raise bad_request(
            f"the request body must be a JSON object, got {type_name(body)}", None, "invalid_type"
        )
    model = _parse_model(body.get("model"), served)
    if "input" not in body:
        raise bad_request(
            "'input' is required: a string or an array of strings",
            "input",
            "missing_required_parameter",
        )
    texts = _parse_input(body["input"], max_items)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise bad_request(
            f"'encoding_format' must be 'float' or 'base64', got {fmt!r}"[:300], "encoding_format"
        )
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise bad_request(
            f"'dimensions' must be an integer, got {type_name(dims)}", "dimensions", "invalid_type"
        )
    strings = {}
    for field in ("user", "prompt_name", "input_type"):
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            raise bad_request(
                f"'{field}' must be a string, got {type_name(value)}", field, "invalid_type"
            )
        strings[field] = value
    return EmbeddingCall(
        texts,
        model,
        "base64" if fmt == "base64" else "float",
        prompt_name=strings["prompt_name"],
        input_type=strings["input_type"],
        dimensions=dims,
    )


def _parse_model(name: Any, served: ServedModel) -> str:
    if name is None:
        return served.names[0]
    if not isinstance(name, str):
        raise bad_request(
            f"'model' must be a string, got {type_name(name)}", "model", "invalid_type"
        )
    found = served.lookup(name)
    if found is None:
        raise served.not_found(name)
    return found


def _parse_input(value: Any, max_items: int) -> list[str]:
    if isinstance(value, str):
        items: list[Any] = [value]
        single = True
    elif isinstance(value, list):
        items, single = value, False
    else:
        raise bad_request(
            f"'input' must be a string or an array of strings, got {type_name(value)}",
            "input",
            "invalid_type",
        )
    if not items:
        raise bad_request(
            "'input' is an empty array: send at least one string", "input", "empty_input"
        )
    if not single and len(items) > max_items:
        raise bad_request(
            f"'input' has {len(items)} items; this server accepts at most "
            f"{max_items} per request: split it into several requests",
            "input",
            "too_many_inputs",
        )
    first = items[0]
    if not single and (
        isinstance(first, list) or (isinstance(first, int) and not isinstance(first, bool))
    ):
        raise bad_request(
            "'input' is token ids, which this server does not accept: it embeds "
            "text with its own tokenizer, and token arrays usually come from "
            "tiktoken (LangChain's OpenAIEmbeddings: set "
            "check_embedding_ctx_length=False). Send the texts instead.",
            "input",
            "unsupported_token_input",
        )
    for i, item in enumerate(items):
        where = "input" if single else f"input[{i}]"
        if not isinstance(item, str):
            raise bad_request(
                f"{where} must be a string, got {type_name(item)}", where, "invalid_type"
            )
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"{where} is not valid Unicode text ({exc.reason} at character {exc.start})",
                where,
                "invalid_text",
            ) from None
    return list(items)


# ----------------------------------------------------------------------------- rendering
def render_embeddings(
    vectors: Vectors, fmt: str, model: str, prompt_tokens: int, truncated: Sequence[int]
) -> bytes:
    """The response body. base64 is little-endian float32, as the openai client decodes it."""
    data: list[dict[str, Any]] = []
    if fmt == "base64":
        le = vectors.astype("<f4", copy=False)
        for i in range(le.shape[0]):
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(le[i].tobytes()).decode("ascii"),
                }
            )
    else:
        for i, row in enumerate(vectors.tolist()):
            data.append({"object": "embedding", "index": i, "embedding": row})
    body: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    if truncated:
        body["truncated_indices"] = list(truncated)
    return json.dumps(body, separators=(",", ":")).encode()


def truncation_headers(truncated: Sequence[int]) -> dict[str, str]:
    """``X-Embedpool-Truncated`` (the count) and the first indices, for clients that only
    look at headers."""
    headers = {"X-Embedpool-Truncated": str(len(truncated))}
    if truncated:
        shown = ",".join(str(i) for i in truncated[:MAX_HEADER_INDICES])
        headers["X-Embedpool-Truncated-Indices"] = shown
    return headers


def model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "embedpool"}
