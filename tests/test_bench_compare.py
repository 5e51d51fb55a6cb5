"""``embedpool bench``'s peers and inputs: every ``--compare`` target the CLI offers has a
runner, a sentence-transformers peer whose packages are missing is refused before anything
runs (naming the pip command), and ``--input`` times the user's own texts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedpool.bench import RUNNERS, _corpus, peer_modules, st_onnx_qconfig
from embedpool.cli import COMPARE_TARGETS
from embedpool.errors import ConfigError
from embedpool.runtimes import parse_cpuinfo


def test_every_compare_target_has_a_runner() -> None:
    assert set(COMPARE_TARGETS) == set(RUNNERS) - {"embedpool"}


def test_input_file_gives_the_users_texts(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text(
        '{"id": "a", "text": "first text"}\n{"id": "b", "text": "second"}\n'
        '{"id": "c", "text": "third"}\n',
        encoding="utf-8",
    )
    assert _corpus(2, str(path)) == ["first text", "second"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="no texts"):
        _corpus(5, str(empty))
    assert _corpus(3, None) != _corpus(3, str(path))  # the built-in corpus otherwise


def test_missing_sentence_transformers_backend_is_refused_at_once(tmp_path: Path) -> None:
    """The project venv never has torch: --compare st-onnx names what to install, exit 2,
    before embedpool's own run starts (no graph is built: the cache dir stays empty)."""
    res = subprocess.run(
        [sys.executable, "-m", "embedpool", "bench", "--compare", "st-onnx", "--chunks", "5"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path)},
    )
    assert res.returncode == 2, res.stderr
    assert "pip install 'sentence-transformers[onnx]'" in res.stderr
    assert "--peer-python" in res.stderr
    assert not any(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        ("fpu sse4_2 avx avx2 fma", "avx2"),  # Zen 3, Haswell..Comet Lake
        ("avx2 avx512f avx512bw avx512vl", "avx512"),  # Skylake-SP
        ("avx2 avx512f avx512bw avx512_vnni", "avx512_vnni"),  # Cascade Lake
        ("avx2 avx_vnni", "avx512_vnni"),  # Alder Lake: VNNI without AVX-512
        ("avx2 avx512f avx512bw avx512_vnni avx512_bf16", "avx512_vnni"),  # Zen 4
        ("fp asimd asimddp", "arm64"),
    ],
)
def test_onnx_int8_peer_takes_its_best_config_for_the_cpu(flags: str, config: str) -> None:
    cpu = parse_cpuinfo(f"model name\t: some CPU\nflags\t\t: {flags}\n")
    assert st_onnx_qconfig(cpu) == config


def test_int8_peers_need_their_quantisers_modules() -> None:
    assert peer_modules("st-openvino") == ("sentence_transformers", "torch", "optimum.intel")
    assert peer_modules("st-openvino-int8")[-1] == "datasets"
    assert peer_modules("st-onnx-int8") == peer_modules("st-onnx")
