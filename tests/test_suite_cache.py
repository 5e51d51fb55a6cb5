"""The suite writes into its own cache directory, never the user's (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from platformdirs import user_cache_dir
from suite_cache import SUITE_CACHE_DIR

from embedpool.config import cache_root
from embedpool.graph.prebuild import graph_dir


def test_the_suite_uses_its_own_cache_directory() -> None:
    """Here and in every subprocess a test starts (the CLI, pool workers, Ray workers)."""
    assert cache_root() == SUITE_CACHE_DIR == Path(os.environ["EMBEDPOOL_CACHE_DIR"])
    assert graph_dir().is_relative_to(SUITE_CACHE_DIR)
    assert not SUITE_CACHE_DIR.is_relative_to(Path(user_cache_dir("embedpool")))
    child = subprocess.run(
        [sys.executable, "-c", "from embedpool.config import cache_root; print(cache_root())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == str(SUITE_CACHE_DIR)


@pytest.mark.slow
def test_a_users_cache_directory_is_ignored(tmp_path: Path) -> None:
    """pytest started with the user's EMBEDPOOL_CACHE_DIR: the test above still passes, and
    nothing is written to the user's directory."""
    users = tmp_path / "users-real-cache"
    env = {**os.environ, "EMBEDPOOL_CACHE_DIR": str(users)}
    env.pop("EMBEDPOOL_TEST_CACHE_DIR", None)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_the_suite_uses_its_own_cache_directory",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert not users.exists()
