"""The suite's own cache directory (ONNX graphs, vector caches), whatever the environment says.

A user who runs the tests with EMBEDPOOL_CACHE_DIR set to their real cache must not find the
suite's fixture graphs there (62 of them, 155 MB, once). Kept between runs (it is the clone's,
gitignored) so graphs are built once; EMBEDPOOL_TEST_CACHE_DIR moves it. ``conftest.py`` sets
EMBEDPOOL_CACHE_DIR to it before embedpool is imported: every subprocess and Ray worker
inherits it. A module of its own (not conftest's): ``import conftest`` can find a
subdirectory's conftest.py first.
"""

from __future__ import annotations

import os
from pathlib import Path

SUITE_CACHE_DIR = Path(
    os.environ.get("EMBEDPOOL_TEST_CACHE_DIR")
    or Path(__file__).resolve().parents[1] / ".test-cache"
)
