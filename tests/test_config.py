"""embedpool.config: EMBEDPOOL_* readers name the variable and the bad value; sizes parse in
binary units."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpool.config import (
    cache_root,
    env_bytes,
    env_float,
    env_int,
    env_str,
    malloc_tuning_enabled,
    parse_bytes,
)
from embedpool.errors import ConfigError

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1500000", 1_500_000),
        ("512M", 512 * MiB),
        ("512mib", 512 * MiB),
        ("2G", 2048 * MiB),
        (" 1.5 GiB ", int(1.5 * 1024 * MiB)),
        ("64k", 64 * 1024),
        ("1t", 1024**4),
    ],
    ids=["plain", "M", "mib-lower", "G", "spaces-and-fraction", "k", "t"],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "M", "12 parsecs", "-1G", "0", "1e3x"],
    ids=["empty", "unit-only", "bad-unit", "negative", "zero", "junk"],
)
def test_parse_bytes_refuses_naming_what_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=f"--max-memory={text!r}"):
        parse_bytes(text, what="--max-memory")


def test_unset_or_empty_gives_the_default() -> None:
    assert env_str("EMBEDPOOL_X", "d", environ={}) == "d"
    assert env_str("EMBEDPOOL_X", "d", environ={"EMBEDPOOL_X": ""}) == "d"
    assert env_int("EMBEDPOOL_X", 4, environ={}) == 4
    assert env_float("EMBEDPOOL_X", None, environ={}) is None
    assert env_bytes("EMBEDPOOL_X", environ={}) is None


@pytest.mark.parametrize(
    ("read", "raw", "message"),
    [
        (
            lambda e: env_str("EMBEDPOOL_X", choices=("a", "b"), environ=e),
            "c",
            "is not one of a, b",
        ),
        (lambda e: env_int("EMBEDPOOL_X", environ=e), "four", "is not an integer"),
        (lambda e: env_int("EMBEDPOOL_X", minimum=1, environ=e), "0", "must be >= 1"),
        (lambda e: env_float("EMBEDPOOL_X", environ=e), "fast", "is not a number"),
        (
            lambda e: env_float("EMBEDPOOL_X", minimum=0, maximum=1, environ=e),
            "1.5",
            "must be within",
        ),
        (lambda e: env_bytes("EMBEDPOOL_X", environ=e), "lots", "is not a size"),
    ],
    ids=["choice", "int", "int-minimum", "float", "float-range", "bytes"],
)
def test_a_bad_value_names_the_variable_and_the_value(read: object, raw: str, message: str) -> None:
    assert callable(read)
    with pytest.raises(ConfigError, match=message) as info:
        read({"EMBEDPOOL_X": raw})
    assert f"EMBEDPOOL_X={raw!r}" in str(info.value)


def test_good_values_are_read() -> None:
    env = {"EMBEDPOOL_X": "7", "EMBEDPOOL_Y": "0.25", "EMBEDPOOL_Z": "1G"}
    assert env_int("EMBEDPOOL_X", environ=env, minimum=1) == 7
    assert env_float("EMBEDPOOL_Y", environ=env, minimum=0, maximum=1) == 0.25
    assert env_bytes("EMBEDPOOL_Z", environ=env) == 1024 * MiB


def test_cache_root_follows_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDPOOL_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("EMBEDPOOL_CACHE_DIR")
    assert cache_root().name == "embedpool"  # the user cache directory


def test_malloc_tuning_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDPOOL_MALLOC_TUNING", raising=False)
    assert malloc_tuning_enabled()
    monkeypatch.setenv("EMBEDPOOL_MALLOC_TUNING", "0")
    assert not malloc_tuning_enabled()
    monkeypatch.setenv("EMBEDPOOL_MALLOC_TUNING", "off")
    with pytest.raises(ConfigError, match="EMBEDPOOL_MALLOC_TUNING='off'"):
        malloc_tuning_enabled()
