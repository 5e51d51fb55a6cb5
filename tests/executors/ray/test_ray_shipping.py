"""Shipping the model to Ray nodes: where an actor finds the graph, the sha256 checks, and the
object store on a real local cluster (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from embedpool.errors import ModelIntegrityError
from embedpool.executors.ray.shipping import ModelShipment, locate_model, sha256_bytes

DEADLINE_S = 90.0


def _shipment(files: dict[str, bytes], origin: Path, payload: Any = None) -> ModelShipment:
    manifest = tuple(sorted((k, sha256_bytes(v)) for k, v in files.items()))
    return ModelShipment(manifest, str(origin), [payload], sum(map(len, files.values())))


FILES = {"model.onnx": b"onnx-bytes" * 100, "1_Pooling/config.json": b'{"mean": true}'}


@pytest.mark.parametrize(
    ("at_origin", "in_cache", "want"),
    [
        (True, False, "driver path"),
        (False, True, "node cache"),
        (False, False, "object store"),
    ],
    ids=["driver-path", "node-cache", "object-store"],
)
def test_locate_model_sources(tmp_path: Path, at_origin: bool, in_cache: bool, want: str) -> None:
    origin, cache = tmp_path / "origin", tmp_path / "cache"
    for base, present in ((origin, at_origin), (cache, in_cache)):
        for rel, data in FILES.items():
            if present:
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                (base / rel).write_bytes(data)
    fetched: list[int] = []

    def fetch() -> dict[str, bytes]:
        fetched.append(1)
        return FILES

    where, source = locate_model(_shipment(FILES, origin), fetch, cache)
    assert source == want
    assert where == (origin if at_origin else cache)
    assert all((where / rel).read_bytes() == data for rel, data in FILES.items())
    assert len(fetched) == (want == "object store")


def test_locate_model_rejects_damaged_bytes(tmp_path: Path) -> None:
    damaged = {**FILES, "model.onnx": b"tampered"}
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*sha256"):
        locate_model(_shipment(FILES, tmp_path / "absent"), lambda: damaged, tmp_path / "c")
    assert not (tmp_path / "c" / "model.onnx").exists()


@pytest.mark.ray
def test_model_files_travel_through_the_object_store(
    ray_cluster: ModuleType, tmp_path: Path
) -> None:
    """A node without the driver's path fetches the bytes once, then uses its cache."""
    shipment = _shipment(FILES, tmp_path / "not-on-any-node", ray_cluster.put(FILES))

    def on_node(s: ModelShipment, cache: str) -> tuple[str, str]:
        import ray

        where, source = locate_model(s, lambda: ray.get(s.payload[0]), Path(cache))
        return str(where), source

    remote = ray_cluster.remote(num_cpus=0)(on_node)
    cache = tmp_path / "node-cache"
    first = ray_cluster.get(remote.remote(shipment, str(cache)), timeout=DEADLINE_S)
    again = ray_cluster.get(remote.remote(shipment, str(cache)), timeout=DEADLINE_S)
    assert first == (str(cache), "object store") and again == (str(cache), "node cache")
    assert (cache / "model.onnx").read_bytes() == FILES["model.onnx"]
