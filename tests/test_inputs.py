"""embedpool.inputs: JSONL records, text files and directories as (id, text) chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpool import inputs
from embedpool.inputs import Chunk, read_inputs, split_lines


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param(b"{not json", "not valid JSON", id="not-json"),
        pytest.param(b'{"id": "x"}', "missing field 'text'", id="no-text"),
        pytest.param(b'{"id": "x", "text": 3}', "must be a string, got int", id="text-int"),
        pytest.param(
            b'{"id": "x", "text": null}', "must be a string, got NoneType", id="text-null"
        ),
        pytest.param(b'["a"]', "expected a JSON object, got list", id="array"),
        pytest.param(b'{"id": "x", "text": "\xff\xfe"}', "not valid UTF-8", id="not-utf8"),
    ],
)
def test_bad_jsonl_line_is_reported_and_others_kept(
    tmp_path: Path, line: bytes, message: str
) -> None:
    src = _write(
        tmp_path / "in.jsonl",
        b'{"id": "a", "text": "first"}\n' + line + b'\n{"id": "b", "text": "last"}\n',
    )
    got = read_inputs([src])
    assert [c.id for c in got.chunks] == ["a", "b"]
    assert len(got.errors) == 1
    err = got.errors[0]
    assert err.line == 2
    assert message in str(err)
    assert f"{src}:2" in str(err)


def test_jsonl_ids_default_and_non_string(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.jsonl", b'{"text": "a"}\n\n{"id": 7, "text": ""}\n')
    got = read_inputs([src])
    assert got.chunks == [Chunk("x.jsonl:1", "a"), Chunk("7", "")]
    assert got.errors == []


def test_error_names_the_id(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.jsonl", b'{"id": "doc-9", "text": 1}\n')
    (err,) = read_inputs([src]).errors
    assert "doc-9" in str(err) and err.item_id == "doc-9"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(["x\n"] * 10, [(0, 10)], id="short-file-one-chunk"),
        pytest.param(["x\n"] * 130, [(0, 60), (60, 120), (120, 130)], id="hard-cut-at-max"),
        pytest.param(
            ["x\n"] * 45 + ["def f():\n"] + ["x\n"] * 30, [(0, 45), (45, 76)], id="cut-at-def"
        ),
        pytest.param(["x\n"] * 42 + ["\n"] + ["x\n"] * 30, [(0, 43), (43, 73)], id="cut-at-blank"),
    ],
)
def test_split_lines(lines: list[str], expected: list[tuple[int, int]]) -> None:
    assert split_lines(lines) == expected


def test_directory_chunks_name_file_and_lines(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("ignored")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    got = read_inputs([tmp_path])
    assert [c.id for c in got.chunks] == ["pkg/a.py:L1-L2"]
    assert len(got.errors) == 1 and "latin1.txt" in str(got.errors[0])


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    got = read_inputs([tmp_path / "nope.jsonl"])
    assert got.chunks == [] and "no such file" in str(got.errors[0])


#: (character, bytes of it before the cut): every way a cut can fall inside a character.
_CUTS = [(c, k) for c in ("é", "€", "🙂") for k in range(1, len(c.encode("utf-8")))]


@pytest.mark.parametrize(
    ("char", "offset"), _CUTS, ids=[f"{len(c.encode())}-bytes-cut-after-{k}" for c, k in _CUTS]
)
def test_a_file_cut_inside_a_character_is_read_up_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, char: str, offset: int
) -> None:
    encoded = char.encode("utf-8")
    limit = 1000
    monkeypatch.setattr(inputs, "MAX_FILE_BYTES", limit)
    head = b"x = 1\n" * ((limit - offset) // 6)
    head += b"#" * (limit - offset - len(head))
    src = _write(tmp_path / "big.py", head + encoded + b"\nafter the cut\n")
    got = read_inputs([src])
    assert "".join(c.text for c in got.chunks) == head.decode()
    assert len(got.errors) == 1 and f"only the first {limit} were read" in str(got.errors[0])


def test_invalid_utf8_before_the_cut_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "MAX_FILE_BYTES", 100)
    src = _write(tmp_path / "bad.txt", b"ok\n" + b"caf\xe9 " * 40)
    got = read_inputs([src])
    assert got.chunks == [] and "not valid UTF-8" in str(got.errors[0])
