"""Large graphs written with their weights in a page-aligned side file, which ONNX Runtime
memory-maps, so that every worker on a machine shares one copy of the weights.

    <cache>/<model>-int8-<key>.onnx        the graph, initialisers by reference
    <cache>/<model>-int8-<key>.onnx.data   their bytes, each large one at a 4,096-byte offset

ONNX Runtime's CPU provider maps an external initialiser into memory instead of reading it
when its offset is page-aligned; the mapping is the file's page cache, shared by every
process that maps it (and charged to a memory cgroup once). Kernels that *pre-pack* their
constant weights (MatMul, MatMulIntegerToFloat) would copy them into private memory, so a
session on such a graph runs with ``session.disable_prepacking`` (``engine.session_options``):
MLAS then packs each weight panel as it multiplies, a cost of K x N copies against M x K x N
multiply-adds (M: a batch's tokens, hundreds).

Measured on Qwen3-Embedding-0.6B's shape (int8, vocabulary shrunk to 16,384; one or two
processes each running one ONNX Runtime session on 2 x 256 tokens, 1 thread; AMD EPYC Zen 3, a
shared machine; summed PSS of the processes, /proc/PID/smaps_rollup): embedded weights 921 MiB for one process, 2,002 MiB for two (2.17x); external
mapped weights without pre-packing 815 MiB and 1,195 MiB (1.47x, the second process adding its
activations and runtime only); with pre-packing 819 and 1,620 MiB. CPU seconds per run: 3.90
embedded, 3.70-4.09 mapped (the same within that machine's noise).

Also what lets a graph pass protobuf's 2 GB limit (an fp32 bge-m3 or a 0.6B decoder).
The onnx package writes external data, but not at aligned offsets, hence these few lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

#: Graphs whose initialisers hold more than this are written with external data: the
#: decoders and large encoders (the default model's 23-90 MB stay in one file).
EXTERNAL_MIN_BYTES = 256 * 1024**2
#: Initialisers at least this large go to the side file (smaller ones stay inline).
TENSOR_MIN_BYTES = 64 * 1024
#: Offsets of external initialisers: a multiple of the page size, as mmap needs.
ALIGN = 4096


def data_path(graph: Path) -> Path:
    """The side file of ``graph``."""
    return graph.with_name(graph.name + ".data")


def has_external_data(graph: Path) -> bool:
    return data_path(graph).is_file()


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(
    model: onnx.ModelProto,
    tmp: Path,
    final: Path,
    min_bytes: int = EXTERNAL_MIN_BYTES,
    tensor_min: int = TENSOR_MIN_BYTES,
) -> bool:
    """Write ``model`` to ``tmp`` (later renamed to ``final`` by the caller, the store's
    atomic build): as one file when its initialisers hold ``min_bytes`` or less, else with
    every initialiser of ``tensor_min`` bytes or more moved to ``data_path(final)`` at an
    ALIGN-ed offset (written under a temporary name and renamed before the graph, so a
    graph file never exists without its data). True when the side file was written."""
    import onnx

    if initializer_bytes(model) <= min_bytes:
        data_path(final).unlink(missing_ok=True)
        onnx.save(model, str(tmp))
        return False
    data = data_path(final)
    part = data.with_name(f".{data.name}.{os.getpid()}.tmp")
    try:
        with part.open("wb") as f:
            for t in model.graph.initializer:
                raw = t.raw_data
                if len(raw) < tensor_min:
                    continue
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset = f.tell()
                f.write(raw)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (
                    ("location", data.name),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, data)
    finally:
        part.unlink(missing_ok=True)
    onnx.save(model, str(tmp))
    return True
