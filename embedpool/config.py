"""Typed configuration and the one place that reads ``EMBEDPOOL_*`` environment variables.

Every reader validates and names the variable and the bad value in its error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from embedpool.errors import ConfigError


def env_str(
    name: str,
    default: str | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or value == "":
        return default
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_int(
    name: str,
    default: int | None = None,
    *,
    minimum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int | None:
    raw = env_str(name, None, environ=environ)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def env_float(
    name: str,
    default: float | None = None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float | None:
    raw = env_str(name, None, environ=environ)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name}={raw!r} must be within [{minimum}, {maximum}]")
    return value


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
}


def parse_bytes(text: str, *, what: str = "size") -> int:
    """'512M', '2GiB', '1500000' -> bytes. Binary units (an OOM killer counts pages, not SI)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"{what}={text!r} is not a size (e.g. 512M, 2G)") from None
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"{what}={text!r} is not a size (e.g. 512M, 2G)")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes for people, in the largest binary unit that keeps the number >= 1:
    ``'16.0 GiB'``, ``'512.0 MiB'``, ``'900 B'`` (the units ``parse_bytes`` reads)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def env_bytes(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    raw = env_str(name, None, environ=environ)
    return None if raw is None else parse_bytes(raw, what=name)


def cache_root() -> Path:
    """Where generated files (ONNX graphs, the vector cache) live: EMBEDPOOL_CACHE_DIR or the
    user cache directory."""
    raw = env_str("EMBEDPOOL_CACHE_DIR")
    if raw:
        return Path(raw).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("embedpool"))


def malloc_tuning_enabled() -> bool:
    """EMBEDPOOL_MALLOC_TUNING=0 turns off the workers' malloc_trim after load and after each
    batch (for comparisons); on by default."""
    return env_str("EMBEDPOOL_MALLOC_TUNING", "1", choices=("0", "1")) == "1"
