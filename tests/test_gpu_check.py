"""benchmarks/gpu_check.sh without a GPU: the scripts parse, the report step turns step
results (as the GPU steps write them) into the table the note quotes, and the Qwen3-0.6B rows'
corpus and vectors steps run on the CPU (a small fixture; fp16 on ORT's CPU provider)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_scripts_parse() -> None:
    for script in ("benchmarks/gpu_check.sh", "scripts/setup"):
        res = subprocess.run(
            ["bash", "-n", str(ROOT / script)], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr


def test_an_unknown_option_is_refused() -> None:
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--gpu-please"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2 and "unknown option --gpu-please" in res.stderr


def test_report_from_step_results(tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    steps.mkdir()
    results = {
        "machine": {"gpu": "NVIDIA H200, 143771 MiB, 570.86.15"},
        "vectors": {
            "cuda_fp32": {"cos_mean": 0.9999991, "cos_min": 0.999993, "meets_0.999": True},
            "cuda_fp16": {"error": "the graph builder makes no fp16"},
        },
        "embedpool_gpu": {"chunks_per_s": 3000.0, "peak_tree_rss_bytes": 900 * 2**20},
        "st_gpu": {"chunks_per_s": 2500.0},
        "efficiency": {
            "runs": {
                "1": {"tokens_per_s": 1000.0, "efficiency": 1.0},
                "16": {"tokens_per_s": 14800.0, "efficiency": 0.925},
                "8": {"error": "boom"},
            }
        },
        "st_setup": {"error": "exit 1: no index"},
    }
    for name, data in results.items():
        (steps / f"{name}.json").write_text(json.dumps(data))
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "report", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "gpu_check.txt").read_text()
    assert text == res.stdout
    assert "gpu: NVIDIA H200" in text
    assert "vectors cuda fp32 vs cpu fp32: cos mean 0.999999, min 0.999993 (meets 0.999)" in text
    assert "vectors cuda fp16: the graph builder makes no fp16" in text
    assert "tree RSS peak 0.88 GiB (<= 1 GiB)" in text
    assert "ratio embedpool / sentence-transformers: 1.20x" in text
    assert "   16      14800   0.93" in text and "8 error: boom" in text
    assert "step st_setup failed: exit 1: no index" in text
    merged = json.loads((tmp_path / "gpu_check.json").read_text())
    assert merged["ratio_embedpool_over_st"] == 1.2
    assert set(merged["steps"]) == set(results)


def test_report_has_the_qwen3_rows(tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    steps.mkdir()
    results = {
        "qwen3_vectors": {
            "device": "cuda:0",
            "embedpool_fp16": {"cos_mean": 0.99962, "cos_min": 0.99931, "meets_0.999": True},
            "st_fp16": {"cos_mean": 0.9991, "cos_min": 0.9987, "meets_0.999": False},
        },
        "qwen3_embedpool_gpu": {"chunks_per_s": 900.0, "peak_tree_rss_bytes": 3 * 2**30},
        "qwen3_st_gpu": {"chunks_per_s": 600.0},
        "qwen3_make": {"error": "exit 1: no sentence_transformers.base"},
    }
    for name, data in results.items():
        (steps / f"{name}.json").write_text(json.dumps(data))
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "report", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "gpu_check.txt").read_text()
    assert (
        "qwen3-0.6b embedpool fp16 (cuda:0) vs embedpool cpu fp32: cos mean 0.999620, "
        "min 0.999310 (meets 0.999)"
    ) in text
    assert (
        "qwen3-0.6b sentence-transformers fp16 (cuda:0) vs embedpool cpu fp32: "
        "cos mean 0.999100, min 0.998700 (MISSES 0.999)" in text
    )
    assert (
        "qwen3-0.6b embedpool fp16 cuda: 900.0 chunks/s (256 tokens), tree RSS peak 3.00 GiB"
        in text
    )
    assert "qwen3-0.6b ratio embedpool / sentence-transformers: 1.50x" in text
    assert "step qwen3_make failed: exit 1: no sentence_transformers.base" in text
    assert (
        json.loads((tmp_path / "gpu_check.json").read_text())["qwen3_ratio_embedpool_over_st"]
        == 1.5
    )


def test_qwen3_corpus_and_vectors_steps_on_the_cpu(tmp_path: Path) -> None:
    """The Qwen3 rows' CPU-checkable steps on the small qwen3 fixture: 256-token chunks in the
    corpus format, and the fp16 graph (ORT's CPU provider here, CUDA on the GPU machine)
    against the fp32 one at the bar."""
    env = {**os.environ, "EMBEDPOOL_CACHE_DIR": str(tmp_path / "cache")}
    script = str(ROOT / "benchmarks/gpu_check.py")
    corpus = tmp_path / "corpus.json"
    model = ROOT / "tests/fixtures/families/qwen3/model"
    for args in (
        ["qwen3_corpus", str(model), "3", str(corpus)],
        [
            "qwen3_vectors",
            str(tmp_path / "v.json"),
            str(corpus),
            "3",
            "cpu",
            str(tmp_path / "absent.npy"),
        ],
    ):
        res = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
    data = json.loads(corpus.read_text())
    assert len(set(data["texts"])) == 3 and data["model_dir"] == str(model)
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["chunks"] == 3 and 250 <= got["tokens_max"] <= 262, got
    assert got["embedpool_fp16"]["meets_0.999"] and got["embedpool_fp16"]["cos_min"] <= 1.0001
    assert "st_fp16" not in got
