"""``embedpool bench``: throughput and memory on a deterministic corpus, against peers.

Each contender runs in its own fresh subprocess (``python -m embedpool.bench RUNNER CONFIG``)
so that its peak RSS (whole process tree, sampled every 100 ms) is its own, and all of them
run in the same invocation on the same corpus and model files, one after the other.

The fastembed peer gets the model as a plain fp32 ONNX export (last_hidden_state output, the
layout every hub ONNX export has) built from the same safetensors, with the tokenizer files
and the model's own max length (256 for MiniLM), at fastembed's default settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BenchConfig:
    chunks: int = 2000
    batch_size: int | None = None
    model: str = "all-MiniLM-L6-v2"
    precision: str = "auto"
    batch_tokens: int | None = None
    threads: int | None = None
    workers: int | str | None = "auto"
    pool_options: dict[str, Any] = field(default_factory=dict)
    long_text: str = "truncate"
    compare: str | None = None
    device: str = "auto"
    cpu_workers: int | None = None


def token_stats(lengths: list[int], max_length: int) -> dict[str, Any]:
    a = np.asarray(lengths)
    return {"tokens_total": int(a.sum()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max()),
            "over_max_length": round(float((a > max_length).mean()), 3),
            "max_length": max_length}


def _corpus(n: int) -> list[str]:
    from embedpool.corpus import stdlib_chunks

    return [c.text for c in stdlib_chunks(n)]


def run_embedpool(cfg: BenchConfig) -> dict[str, Any]:
    """Runs inside the child process."""
    from embedpool.job import Embedder
    from embedpool.progress import RssTracker

    texts = _corpus(cfg.chunks)
    tracker = RssTracker()
    events: list[dict[str, Any]] = []
    keep = ("scale", "emergency", "worker_death", "split", "retry", "recycle",
            "graph_built", "graph_fallback")
    t0 = time.perf_counter()
    items: int | None
    tokens: int | None
    if cfg.batch_size is not None:
        items, tokens = cfg.batch_size, cfg.batch_tokens or cfg.batch_size * 512
    else:  # the device's defaults (a GPU's batches are much bigger)
        items, tokens = None, cfg.batch_tokens
    with Embedder(cfg.model, precision=cfg.precision, device=cfg.device,
                  cpu_workers=cfg.cpu_workers, threads=cfg.threads, workers=cfg.workers,
                  long_text=cfg.long_text,  # type: ignore[arg-type]
                  batch_tokens=tokens, max_batch_items=items, pool_options=cfg.pool_options,
                  on_event=lambda e: events.append(e) if e.get("event") in keep else None) as emb:
        load_s = time.perf_counter() - t0
        vecs = emb.embed(texts)
        report = emb.last_report
        device = emb.device
        precision, tokens, items = emb.precision, emb.batch_tokens, emb.max_batch_items
    peak = tracker.close()
    return {"runner": "embedpool", "chunks": len(texts), "seconds": report.seconds,
            "chunks_per_s": len(texts) / report.seconds, "tokens_per_s": report.tokens / report.seconds,
            "load_s": load_s, "peak_rss_bytes": peak, "truncated": report.truncated,
            "dim": int(vecs.shape[1]), "events": events, "device": device,
            "settings": {"precision": precision, "workers": cfg.workers, "threads": cfg.threads,
                         "batch_tokens": tokens, "max_batch_items": items,
                         "device": cfg.device, "cpu_workers": cfg.cpu_workers}}


def export_for_fastembed(model_spec: str, out_dir: Path) -> tuple[Path, Any]:
    """A plain fp32 ONNX (last_hidden_state) + tokenizer files, as a hub export would be."""
    import shutil

    from embedpool.graph.families.bert import BertConfig, build_bert, load_weights
    from embedpool.models import resolve_model

    m = resolve_model(model_spec)
    cfg = BertConfig.from_dict(m.config)
    onnx_model = build_bert(load_weights(m.weights_path, cfg), cfg, pooling=m.pooling,
                            fused=False, pool=False)
    import onnx

    onnx.save(onnx_model, str(out_dir / "model.onnx"))
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json", "vocab.txt"):
        if (m.directory / name).is_file():
            shutil.copy(m.directory / name, out_dir / name)
    tcfg_path = m.directory / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    tcfg["model_max_length"] = m.max_length  # the model's real window (256 for MiniLM)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return out_dir, m


def run_fastembed(cfg: BenchConfig) -> dict[str, Any]:
    """Runs inside the child process: fastembed at its default settings (batch 256)."""
    from embedpool.progress import RssTracker

    texts = _corpus(cfg.chunks)
    with tempfile.TemporaryDirectory(prefix="embedpool-fastembed-") as tmp:
        model_dir, m = export_for_fastembed(cfg.model, Path(tmp))
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        name = f"embedpool-bench/{m.name}"
        TextEmbedding.add_custom_model(
            model=name, pooling=PoolingType.MEAN if m.pooling == "mean" else PoolingType.CLS,
            normalization=True, sources=ModelSource(hf=name), dim=m.dim, model_file="model.onnx")
        tracker = RssTracker()
        t0 = time.perf_counter()
        fe = TextEmbedding(model_name=name, specific_model_path=str(model_dir))
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        vecs = np.stack(list(fe.embed(texts)))
        seconds = time.perf_counter() - t1
        peak = tracker.close()
    return {"runner": "fastembed", "chunks": len(texts), "seconds": seconds,
            "chunks_per_s": len(texts) / seconds, "load_s": load_s, "peak_rss_bytes": peak,
            "dim": int(vecs.shape[1]), "settings": {"batch_size": 256, "parallel": None}}


RUNNERS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "embedpool": run_embedpool, "fastembed": run_fastembed}


def _in_subprocess(runner: str, cfg: BenchConfig) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "embedpool.bench", runner,
                           json.dumps(asdict(cfg))], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} benchmark failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from embedpool.models import resolve_model
    from embedpool.progress import fmt_bytes
    from embedpool.tokenization import TextTokenizer

    m = resolve_model(cfg.model)
    texts = _corpus(cfg.chunks)
    stats = token_stats(TextTokenizer.for_model(m).count(texts), m.max_length)
    echo(f"corpus: {len(texts)} chunks of Python {sys.version.split()[0]} stdlib source; tokens "
         f"mean {stats['mean']} p50 {stats['p50']} p90 {stats['p90']} p99 {stats['p99']} "
         f"max {stats['max']}; {stats['over_max_length']:.0%} over max length {m.max_length}")
    results: dict[str, Any] = {"corpus": stats, "runs": []}
    ours = _in_subprocess("embedpool", cfg)
    results["runs"].append(ours)
    where = ("in-process" if cfg.workers is None
             else f"workers {cfg.workers}" + (f" x {cfg.threads} threads" if cfg.threads else ""))
    echo(f"embedpool ({ours['settings']['precision']}, {where}): device {ours['device']}")
    echo(f"embedpool: {ours['chunks_per_s']:.1f} chunks/s, "
         f"{ours['tokens_per_s']:.0f} tokens/s, peak RSS {fmt_bytes(ours['peak_rss_bytes'])} "
         f"(load {ours['load_s']:.1f} s)")
    for e in ours.get("events", []):
        if e.get("event") == "graph_built":  # a cold cache: what the first run paid first
            results["cold_build"] = {k: e[k] for k in ("precision", "seconds", "peak_rss",
                                                       "size_bytes", "built")}
            echo(f"  cold build: the {e['precision']} graph in {e['seconds']:.1f} s, peak RSS "
                 f"{fmt_bytes(e['peak_rss'])} (its own process, before any worker; included "
                 "in load and in the peak above)")
            continue
        echo("  decision: " + ", ".join(f"{k}={v}" for k, v in e.items() if k != "ts"))
    if cfg.compare:
        peer = _in_subprocess(cfg.compare, cfg)
        results["runs"].append(peer)
        speed = ours["chunks_per_s"] / peer["chunks_per_s"]
        mem = peer["peak_rss_bytes"] / max(ours["peak_rss_bytes"], 1)
        results["ratio"] = {"throughput": round(speed, 2), "peak_rss_peer_over_ours": round(mem, 2)}
        echo(f"{cfg.compare} (defaults): {peer['chunks_per_s']:.1f} chunks/s, peak RSS "
             f"{fmt_bytes(peer['peak_rss_bytes'])}")
        echo(f"ratio: embedpool is {speed:.2f}x {cfg.compare}'s throughput with "
             f"1/{mem:.1f} of its peak RSS")
    return results


if __name__ == "__main__":
    runner, raw = sys.argv[1], sys.argv[2]
    out = RUNNERS[runner](BenchConfig(**json.loads(raw)))
    print(json.dumps(out, default=str))
