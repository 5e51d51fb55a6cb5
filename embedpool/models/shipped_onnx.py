"""A shipped ``onnx/model.onnx``, checked before any work: its inputs and outputs, read from
the file without its weights, against what embedpool feeds and reads.

    inputs   input_ids, attention_mask (required), token_type_ids (optional); int64 or
             int32 each (both are legal exports: embedpool feeds the type declared). Any
             other input (renamed ids, position_ids, past key values) is refused by name.
    output   token states [batch, seq, width]: ``last_hidden_state`` or ``token_embeddings``
             by name, else the first rank-3 output. The directory's 1_Pooling, Dense and
             Normalize are applied to it (``graph.head.head_numpy``).
             A graph with only pooled [batch, dim] outputs cannot be checked against
             1_Pooling (its pooling, prompt handling and Dense are invisible): it is not
             used. ``resolve`` builds the model from model.safetensors instead, as
             sentence-transformers itself does, or refuses it when there is none.

Own code, for the parent process: ``onnx.load`` parses every initializer (the whole weights)
and imports ``onnx``; ONNX Runtime loads them too. This walks the protobuf's framing (tag,
length) over a memory map and skips the initializers' bytes, so a 1 GB graph is checked in
milliseconds, and a truncated file (a partial download) is found here, in one line, instead
of in every pool worker. The engine takes the same decisions (``feed_types``,
``choose_output``) from ONNX Runtime's view of the graph.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedpool.errors import ModelError

#: What embedpool feeds a shipped encoder; the first two are required.
REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
#: Output names that carry token states, in order of preference.
TOKEN_STATE_OUTPUTS = ("last_hidden_state", "token_embeddings")
#: ONNX TensorProto element types embedpool feeds token ids and masks as.
INT32, INT64 = 6, 7
ELEM_NAMES = {
    1: "float",
    6: "int32",
    7: "int64",
    10: "float16",
    11: "double",
    16: "bfloat16",
    9: "bool",
    3: "int8",
    2: "uint8",
}


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: name, ONNX element type, rank (-1: unknown)."""

    name: str
    elem_type: int
    rank: int


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


class _Truncated(Exception):
    pass


def read_signature(path: Path) -> Signature:
    """The graph's inputs (initializers excluded) and outputs; a ModelError naming ``path``
    when it is not a complete ONNX file."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _signature(buf, path)
    except ValueError as exc:  # an empty file cannot be mapped
        raise ModelError(f"{path} is empty, not an ONNX model; download it again") from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def _signature(buf: mmap.mmap, path: Path) -> Signature:
    graph: tuple[int, int] | None = None
    has_opset = False
    try:
        for field, wire, start, end in _fields(buf, 0, len(buf)):
            if field == 7 and wire == 2:
                graph = (start, end)
            elif field == 8 and wire == 2:
                has_opset = True
        if graph is None or not has_opset:
            raise _Truncated
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        initializers: set[str] = set()
        for field, wire, start, end in _fields(buf, *graph):
            if wire != 2:
                continue
            if field == 11:
                inputs.append(_value_info(buf, start, end))
            elif field == 12:
                outputs.append(_value_info(buf, start, end))
            elif field == 5:
                initializers.add(_string_field(buf, start, end, 8))
    except _Truncated:
        raise ModelError(
            f"{path} is truncated or not an ONNX model (its protobuf ends "
            "inside a field, or has no graph); the download is incomplete: "
            "download it again"
        ) from None
    return Signature(tuple(t for t in inputs if t.name not in initializers), tuple(outputs))


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            nxt = pos + size
        elif wire == 5:
            nxt = pos + 4
        else:
            raise _Truncated
        if nxt > end or field == 0:
            raise _Truncated
        yield field, wire, pos, nxt
        pos = nxt


def _string_field(buf: mmap.mmap, start: int, end: int, number: int) -> str:
    for field, wire, s, e in _fields(buf, start, end):
        if field == number and wire == 2:
            return bytes(buf[s:e]).decode("utf-8", "replace")
    return ""


def _value_info(buf: mmap.mmap, start: int, end: int) -> Tensor:
    """ValueInfoProto: name (1), type (2) -> TypeProto.tensor_type (1) -> elem_type (1),
    shape (2) -> dim (1, repeated)."""
    name, elem, rank = "", 0, -1
    for field, wire, s, e in _fields(buf, start, end):
        if field == 1 and wire == 2:
            name = bytes(buf[s:e]).decode("utf-8", "replace")
        elif field == 2 and wire == 2:
            for f2, w2, s2, e2 in _fields(buf, s, e):
                if f2 != 1 or w2 != 2:
                    continue
                for f3, w3, s3, e3 in _fields(buf, s2, e2):
                    if f3 == 1 and w3 == 0:
                        elem, _ = _varint(buf, s3, e3)
                    elif f3 == 2 and w3 == 2:
                        rank = sum(
                            1 for f4, w4, _, _ in _fields(buf, s3, e3) if f4 == 1 and w4 == 2
                        )
    return Tensor(name, elem, rank)


# --- the decisions (shared with the engine) ---------------------------------------------------


def feed_types(inputs: Sequence[Tensor], where: object) -> dict[str, int]:
    """input name -> the ONNX element type embedpool feeds it (int32 or int64); a ModelError
    naming the inputs it cannot feed."""
    names = [t.name for t in inputs]
    unknown = [n for n in names if n not in REQUIRED_INPUTS + OPTIONAL_INPUTS]
    missing = [n for n in REQUIRED_INPUTS if n not in names]
    if unknown or missing:
        what = (
            f"inputs {unknown} that embedpool does not feed"
            if unknown
            else f"no {' or '.join(missing)} input"
        )
        raise ModelError(
            f"{where} has {what} (its inputs: {', '.join(names) or 'none'}); embedpool feeds "
            "input_ids and attention_mask, and token_type_ids when the graph has it. "
            "Re-export it with those inputs (optimum-cli export onnx), or remove it to "
            "build the graph from model.safetensors"
        )
    bad = [t for t in inputs if t.elem_type not in (INT32, INT64)]
    if bad:
        t = bad[0]
        raise ModelError(
            f"{where}: input {t.name} is {ELEM_NAMES.get(t.elem_type, t.elem_type)}"
            "; embedpool feeds token ids and masks as int64 or int32"
        )
    return {t.name: t.elem_type for t in inputs}


def choose_output(outputs: Sequence[Tensor]) -> Tensor | None:
    """The token-state output embedpool reads (rank 3, by name first), or None when the graph
    has none: only pooled vectors, or outputs that do not declare their shape."""
    for name in TOKEN_STATE_OUTPUTS:
        for t in outputs:
            if t.name == name and t.rank == 3:
                return t
    return next((t for t in outputs if t.rank == 3), None)


def pooled_refusal(path: Path, outputs: Sequence[Tensor], tdir: Path) -> ModelError:
    shown = ", ".join(f"{t.name} (rank {t.rank})" for t in outputs) or "none"
    return ModelError(
        f"{path} outputs no token states ({shown}): pooled vectors cannot be checked against "
        "the directory's pooling (1_Pooling, include_prompt, Dense), and there is no "
        f"{tdir / 'model.safetensors'} to build the model from instead; ship a graph that "
        "outputs last_hidden_state"
    )
