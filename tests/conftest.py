"""Suite-wide fixtures and plugins (the CI prerequisite rules live in ci_rules.py).

``ray_cluster``: a real local Ray cluster, started once per session and shared by the backend
and the server tests. ``.ci/run`` may start a head with ``scripts/ray-head`` and export
``RAY_ADDRESS``; then the tests join it. Otherwise the fixture starts a private instance on
this machine: 2 CPUs, dashboard off, a 200 MB object store (the tests move kilobytes; the
real-model tests move one int8 graph of ~23 MB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from suite_cache import SUITE_CACHE_DIR

# the suite's own cache directory, whatever the environment says (tests/suite_cache.py); set
# before embedpool is imported: every subprocess and Ray worker inherits it
os.environ["EMBEDPOOL_CACHE_DIR"] = str(SUITE_CACHE_DIR)
#: The engine of every test that does not name one: ONNX Runtime, so that a runner whose CPU
#: has avx512_bf16 (where --engine auto picks OpenVINO bf16: embedpool.runtimes) runs the same
#: suite as any other. Tests of the other engine name it (tests/engines.py); the auto choice
#: is tested as a pure function and through doctor (tests/test_runtimes.py).
os.environ.setdefault("EMBEDPOOL_ENGINE", "onnxruntime")

from embedpool.models import ResolvedModel

pytest_plugins = ["ci_rules", "pytester"]


@pytest.fixture(scope="session")
def real_model() -> ResolvedModel:
    """The real default model; a missing one fails under CI=true (see ci_rules)."""
    from ci_rules import missing

    from embedpool.errors import ModelNotFoundError
    from embedpool.models import resolve_model

    try:
        return resolve_model()
    except ModelNotFoundError as exc:  # a corrupt model is a failure, never a skip
        missing("model", str(exc))


#: Bytes of shared memory for the object store: big enough for one fp32 MiniLM graph
#: (~90 MB), small enough not to crowd the other engineers' tests on this 2-core machine.
OBJECT_STORE_BYTES = 200 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[ModuleType]:
    """The ``ray`` module, connected to a cluster with at least 2 CPUs."""
    from ci_rules import missing, ray_reason

    reason = ray_reason()
    if reason is not None:  # a skip locally, a failure under CI=true (tests/ci_rules.py)
        missing("ray", reason)
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Workers inherit the driver's environment on a local instance: their model cache
        # is the suite's (SUITE_CACHE_DIR), never the user's.
        os.environ.setdefault("RAY_worker_niceness", "0")  # as RayExecutor's own instance
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            log_to_driver=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def cgroup_factory() -> Iterator[Any]:
    """Makes child memory cgroups with a real limit (tests/cgroup_util.py) and removes them
    after the test."""
    import cgroup_util

    made: list[cgroup_util.MemoryCgroup] = []

    def make(limit: int) -> cgroup_util.MemoryCgroup:
        cg = cgroup_util.create_child(limit)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.remove()
