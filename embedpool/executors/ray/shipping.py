"""Getting the model's ONNX graph to every Ray node, once, checked by sha256.

A node needs ``embedpool`` (same version) and ``onnxruntime`` installed, but not the model
package or the hub. The driver builds or finds the ONNX graph once (``graph.prepare_onnx``)
and puts its bytes in the object store with one ``ray.put``; actors receive the reference
*nested* in a ``ModelShipment``, so Ray does not fetch it unless needed. An actor uses, in
order:

1. the driver's own file, if that path exists on its node with the same sha256 (a
   single-machine cluster copies nothing);
2. the node cache ``$EMBEDPOOL_CACHE_DIR/ray-models/<digest>/`` from an earlier actor;
3. else it fetches the bytes, checks every sha256 and writes them there atomically (temp
   file + rename, so concurrent actors on one node are safe).

No node rebuilds or quantises the graph.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from embedpool.config import cache_root
from embedpool.errors import ModelIntegrityError
from embedpool.models import sha256_file

if TYPE_CHECKING:
    from embedpool.engine import EngineSpec


@dataclass(frozen=True)
class ModelShipment:
    """A model's graph in the object store, as handed to every actor.

    ``payload`` holds the ObjectRef of a ``dict[relpath, bytes]`` inside a list so that Ray
    passes it as a reference instead of fetching it before the actor's ``__init__`` runs.
    """

    manifest: tuple[tuple[str, str], ...]  # (relative path, sha256)
    origin: str  # the directory the files came from on the driver
    payload: list[Any]
    nbytes: int

    @property
    def digest(self) -> str:
        text = "|".join(f"{p}={h}" for p, h in self.manifest)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def graph_name(self) -> str:
        """The ONNX file's name within the shipped directory."""
        return self.manifest[0][0]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def has_files(directory: Path, manifest: Iterable[tuple[str, str]]) -> bool:
    return all(
        (directory / rel).is_file() and sha256_file(directory / rel) == digest
        for rel, digest in manifest
    )


def write_files(
    directory: Path, files: Mapping[str, bytes], manifest: Iterable[tuple[str, str]]
) -> None:
    """Check every sha256, then write each file atomically (temp name + rename)."""
    for rel, digest in manifest:
        data = files.get(rel)
        if data is None or sha256_bytes(data) != digest:
            got = "missing" if data is None else sha256_bytes(data)
            raise ModelIntegrityError(
                f"model file {rel} from the Ray object store has sha256 {got}, expected "
                f"{digest}; the object was damaged in transit or the driver's file changed."
            )
    for rel, digest in manifest:
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and sha256_file(target) == digest:
            continue
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(files[rel])
        os.replace(tmp, target)


def node_cache_dir(digest: str) -> Path:
    """Where this node keeps shipped models; the temp dir if the cache is not writable."""
    for base in (cache_root(), Path(tempfile.gettempdir()) / "embedpool"):
        target = base / "ray-models" / digest
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK):
            return target
    raise ModelIntegrityError(
        f"no writable directory for the shipped model {digest}: tried "
        f"{cache_root()} and {tempfile.gettempdir()}"
    )


def locate_model(
    shipment: ModelShipment, fetch: Callable[[], Mapping[str, bytes]], cache_dir: Path | None = None
) -> tuple[Path, str]:
    """(directory holding the shipment's files, where they came from) on this node."""
    origin = Path(shipment.origin)
    if has_files(origin, shipment.manifest):
        return origin, "driver path"
    target = cache_dir if cache_dir is not None else node_cache_dir(shipment.digest)
    if has_files(target, shipment.manifest):
        return target, "node cache"
    write_files(target, fetch(), shipment.manifest)
    return target, "object store"


def ship_model(spec: EngineSpec, ray: ModuleType) -> ModelShipment:
    """Put the spec's ready ONNX graph in the object store (built here if need be)."""
    from embedpool.graph.external import data_path

    onnx_path = spec.graph()  # the file its runtime reads (EngineSpec.graph)
    files = {onnx_path.name: onnx_path.read_bytes()}
    side = data_path(onnx_path)
    if side.is_file():  # a large graph's weights (graph/external.py) travel beside it
        files[side.name] = side.read_bytes()
    manifest = tuple(sorted((rel, sha256_bytes(b)) for rel, b in files.items()))
    ref = ray.put(files)
    return ModelShipment(
        manifest, str(onnx_path.parent), [ref], sum(len(b) for b in files.values())
    )
