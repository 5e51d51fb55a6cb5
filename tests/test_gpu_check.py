"""benchmarks/gpu_check.sh without a GPU: the scripts parse, and the report step turns step
results (as the GPU steps write them) into the table the note quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_scripts_parse() -> None:
    for script in ("benchmarks/gpu_check.sh", "scripts/setup"):
        res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, res.stderr


def test_an_unknown_option_is_refused() -> None:
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--gpu-please"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "unknown option --gpu-please" in res.stderr


def test_report_from_step_results(tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    steps.mkdir()
    results = {
        "machine": {"gpu": "NVIDIA H200, 143771 MiB, 570.86.15"},
        "vectors": {"cuda_fp32": {"cos_mean": 0.9999991, "cos_min": 0.999993,
                                  "meets_0.999": True},
                    "cuda_fp16": {"error": "the graph builder makes no fp16"}},
        "embedpool_gpu": {"chunks_per_s": 3000.0, "peak_tree_rss_bytes": 900 * 2**20},
        "st_gpu": {"chunks_per_s": 2500.0},
        "efficiency": {"runs": {"1": {"tokens_per_s": 1000.0, "efficiency": 1.0},
                                "16": {"tokens_per_s": 14800.0, "efficiency": 0.925},
                                "8": {"error": "boom"}}},
        "st_setup": {"error": "exit 1: no index"},
    }
    for name, data in results.items():
        (steps / f"{name}.json").write_text(json.dumps(data))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "report",
                          str(tmp_path)], capture_output=True, text=True, check=False)
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
