"""embedpool.models.filehash: hashes reused while a file's identity (size, mtime, ctime, inode,
device) is unchanged, rehashed when it changes, and never trusted for a file changed just
before it was hashed. The limit (a change keeping all five) is documented in the module."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from embedpool.models import filehash
from embedpool.models.filehash import HashCache, sha256_files


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every full hash the cache computes."""
    real = filehash.sha256_file
    seen: list[Path] = []

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(filehash, "sha256_file", counting)
    return seen


@pytest.fixture
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """No racy window: files written by the test a moment ago can be cached."""
    monkeypatch.setattr(filehash, "RACY_WINDOW_NS", 0)


def _write(path: Path, data: bytes) -> os.stat_result:
    path.write_bytes(data)
    return path.stat()


def test_hash_is_the_files_sha256_and_is_reused(
    tmp_path: Path, reads: list[Path], trusting: None
) -> None:
    f = tmp_path / "w.bin"
    _write(f, b"weights" * 1000)
    store = tmp_path / "hashes.json"
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert reads == [f]  # the second process-like cache read it from the file


@pytest.mark.parametrize("change", ["new-inode", "new-size"])
def test_content_change_with_restored_mtime_is_caught(
    tmp_path: Path, reads: list[Path], trusting: None, change: str
) -> None:
    f = tmp_path / "w.bin"
    st = _write(f, b"a" * 100)
    store = tmp_path / "hashes.json"
    sha256_files([f], HashCache(store))
    new = b"b" * (100 if change == "new-inode" else 101)
    if change == "new-inode":  # a new download or cp over it: written aside, renamed in
        tmp = tmp_path / "w.tmp"
        tmp.write_bytes(new)
        os.replace(tmp, f)
    else:
        f.write_bytes(new)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime restored
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(new).hexdigest()
    assert reads == [f, f]


def test_a_file_changed_just_before_hashing_is_never_trusted(
    tmp_path: Path, reads: list[Path]
) -> None:
    """Same size, same inode, mtime restored, within one timestamp tick: only the racy
    window (git's "racily clean" entries) can catch that, and it does."""
    f = tmp_path / "w.bin"
    st = _write(f, b"a" * 100)
    store = tmp_path / "hashes.json"
    sha256_files([f], HashCache(store))
    with f.open("r+b") as fh:  # in place: the inode stays
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(b"b" + b"a" * 99).hexdigest()
    assert reads == [f, f]


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"entries": 3}', b""], ids=["garbage", "wrong-shape", "empty"]
)
def test_a_damaged_cache_file_is_ignored(
    tmp_path: Path, reads: list[Path], trusting: None, content: bytes
) -> None:
    f = tmp_path / "w.bin"
    _write(f, b"x")
    store = tmp_path / "hashes.json"
    store.write_bytes(content)
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(b"x").hexdigest()
    assert sha256_files([f], HashCache(store))[f] == hashlib.sha256(b"x").hexdigest()
    assert reads == [f]  # rewritten whole by the first call


def test_an_unwritable_cache_dir_only_costs_full_hashes(
    tmp_path: Path, reads: list[Path], trusting: None
) -> None:
    f = tmp_path / "w.bin"
    _write(f, b"x")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    for _ in range(2):
        assert (
            sha256_files([f], HashCache(blocker / "hashes.json"))[f]
            == hashlib.sha256(b"x").hexdigest()
        )
    assert reads == [f, f]
