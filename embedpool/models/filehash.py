"""sha256 of model files, remembered across runs the way git's index remembers file content.

Every cache key (the ONNX graph's, the vector cache's fingerprint) hashes the files the
vectors are computed from, and hashing a 90 MB checkpoint costs ~0.2 s on every start (a
base-sized model's 440 MB, about a second). So each hash is stored in
``<cache dir>/file-hashes.json`` next to the file's identity, and reused while that identity
is unchanged:

    key: absolute path     value: size, mtime_ns, ctime_ns, inode, device, sha256, hashed_at

What it catches. Any write through the file system changes the ctime, which no user call
can set back (``touch -d`` and ``os.utime`` restore the mtime, and change the ctime doing
it); a replaced file (a new download, ``cp`` over it, ``git checkout``) has a new inode and
usually a new size. Entries for files changed within RACY_WINDOW_NS before they were hashed
are not trusted (git's "racily clean" problem: the kernel's timestamps have a granularity of
a few ms, so a second write in the same tick as the hashed one would keep every field).

The limit. A change that keeps size, mtime, ctime, inode and device is not seen: writing a
block device underneath the file system, a file system that does not keep ctime, or a clock
set back. Delete ``file-hashes.json`` (or the whole cache dir) to force full hashes.
The file is a cache only: unreadable, corrupt or unwritable, it is ignored and every file is
hashed in full.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILENAME = "file-hashes.json"
#: Hash entries of files modified less than this before they were hashed are not reused
#: (timestamps advance in ticks of ~1-4 ms on Linux file systems, whole seconds on some;
#: two seconds covers FAT's granularity too). A fresh download is hashed again on its next
#: start, after which it is cached.
RACY_WINDOW_NS = 2_000_000_000
#: Entries kept: a few per model; older ones for files that no longer exist are dropped first.
MAX_ENTRIES = 4096
#: Read size for hashing: large reads keep the syscall count low on big checkpoints.
CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """The full sha256 of one file (no cache)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashCache:
    """``sha256(path)`` with the cache file at ``path``; ``None`` caches nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and isinstance(data.get("entries"), dict):
                    self._entries = data["entries"]
            except (OSError, ValueError):
                pass  # no file yet, or a damaged one: start empty

    def sha256(self, path: Path) -> str:
        key = str(path.resolve())
        st = path.stat()
        ident = _identity(st)
        entry = self._entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("id") == ident
            and isinstance(entry.get("sha256"), str)
            and max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS
            < int(entry.get("hashed_at", 0))
        ):
            return str(entry["sha256"])
        hashed_at = time.time_ns()
        digest = sha256_file(path)
        if _identity(path.stat()) == ident:  # unchanged while hashed: cacheable
            self._entries[key] = {"id": ident, "sha256": digest, "hashed_at": hashed_at}
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the entries back (atomically; lost updates between processes are harmless)."""
        if self.path is None or not self._dirty:
            return
        entries = self._entries
        if len(entries) > MAX_ENTRIES:
            alive = {k: v for k, v in entries.items() if Path(k).exists()}
            newest = sorted(
                alive.items(), key=lambda kv: int(kv[1].get("hashed_at", 0)), reverse=True
            )
            entries = dict(newest[:MAX_ENTRIES])
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": 1, "entries": entries}), encoding="utf-8")
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:  # a read-only or missing cache dir: hash in full next time
            with contextlib.suppress(OSError):
                tmp.unlink()


def default_cache() -> HashCache:
    """The cache under embedpool's cache directory (config.cache_root)."""
    from embedpool.config import cache_root

    try:
        root = cache_root()
    except Exception:  # a bad EMBEDPOOL_CACHE_DIR is reported by whoever uses the cache
        return HashCache(None)
    return HashCache(root / FILENAME)


def sha256_files(paths: Iterable[Path], cache: HashCache | None = None) -> dict[Path, str]:
    """sha256 of each file, through ``cache`` (the default one when None), saved once."""
    cache = cache if cache is not None else default_cache()
    out = {p: cache.sha256(p) for p in paths}
    cache.save()
    return out
