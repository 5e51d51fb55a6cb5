"""``embedpool bench``: throughput and memory on a deterministic corpus, against peers.

Each contender runs in its own fresh subprocess (``python -m embedpool.bench RUNNER CONFIG``)
so that its peak RSS (whole process tree, sampled every 100 ms) is its own, and all of them
run in the same invocation on the same corpus and model files, one after the other.

The fastembed peer gets the model as a plain fp32 ONNX export (last_hidden_state output, the
layout every hub ONNX export has) built from the same safetensors, with the tokenizer files
and the model's own max length (256 for MiniLM), at fastembed's default settings.

The sentence-transformers peers (``st-torch``, ``st-onnx``, ``st-onnx-int8``, ``st-openvino``,
``st-openvino-int8``) load the model's own directory with ``SentenceTransformer(path,
backend=...)`` at its defaults (batch 32); ``-int8`` is its own quantised export
(``export_dynamic_quantized_onnx_model`` with the config for this CPU, ``st_onnx_qconfig``:
avx512_vnni, avx512 or avx2; or ``export_static_quantized_openvino_model`` calibrated on its
default dataset, which needs the hub, so here 300 texts of the corpus are given instead). A
peer whose package is missing fails with the pip command that installs it. Each peer's
vectors are compared with sentence-transformers' fp32 (torch) on the same texts when the
runner can compute them (``cos``), so a faster setting's quality is printed beside its speed.

``--input FILE`` times the user's own texts (JSONL records or a text file, read as
``embedpool embed`` reads them) instead of the built-in corpus, for every contender.
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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embedpool.runtimes import CpuFeatures


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
    engine: str = "auto"
    #: The user's texts (``--input``: JSONL or a text file); None: the built-in corpus.
    input: str | None = None
    #: The interpreter the sentence-transformers peers run in (one that has it and torch).
    peer_python: str | None = None
    #: Where a runner saves its vectors (.npy) for the quality comparison; set by run_bench.
    vectors_out: str | None = None
    #: The exact texts as a JSON list, for a peer in another interpreter (whose stdlib, and
    #: so built-in corpus, may differ, and which need not have embedpool's dependencies).
    texts_json: str | None = None


def token_stats(lengths: list[int], max_length: int) -> dict[str, Any]:
    a = np.asarray(lengths)
    return {
        "tokens_total": int(a.sum()),
        "mean": round(float(a.mean()), 1),
        "p50": int(np.percentile(a, 50)),
        "p90": int(np.percentile(a, 90)),
        "p99": int(np.percentile(a, 99)),
        "max": int(a.max()),
        "over_max_length": round(float((a > max_length).mean()), 3),
        "max_length": max_length,
    }


def _corpus(n: int, path: str | None = None) -> list[str]:
    """The first ``n`` texts: of the built-in corpus, or of ``path`` (``--input``)."""
    if path is None:
        from embedpool.corpus import stdlib_chunks

        return [c.text for c in stdlib_chunks(n)]
    from embedpool.errors import ConfigError
    from embedpool.inputs import read_inputs

    texts = [c.text for c in read_inputs([Path(path)]).chunks[:n]]
    if not texts:
        raise ConfigError(f"--input {path}: no texts in it")
    return texts


def _texts(cfg: BenchConfig) -> list[str]:
    """The texts every contender times (``texts_json`` when the parent wrote them)."""
    if cfg.texts_json is not None:
        texts: list[str] = json.loads(Path(cfg.texts_json).read_text(encoding="utf-8"))
        return texts
    return _corpus(cfg.chunks, cfg.input)


def run_embedpool(cfg: BenchConfig) -> dict[str, Any]:
    """Runs inside the child process."""
    from embedpool.job import Embedder
    from embedpool.progress import RssTracker

    texts = _texts(cfg)
    tracker = RssTracker()
    events: list[dict[str, Any]] = []
    keep = (
        "scale",
        "emergency",
        "worker_death",
        "split",
        "retry",
        "recycle",
        "graph_built",
        "graph_fallback",
    )
    t0 = time.perf_counter()
    items: int | None
    tokens: int | None
    if cfg.batch_size is not None:
        items, tokens = cfg.batch_size, cfg.batch_tokens or cfg.batch_size * 512
    else:  # the device's defaults (a GPU's batches are much bigger)
        items, tokens = None, cfg.batch_tokens
    with Embedder(
        cfg.model,
        precision=cfg.precision,
        device=cfg.device,
        runtime=cfg.engine,
        cpu_workers=cfg.cpu_workers,
        threads=cfg.threads,
        workers=cfg.workers,
        long_text=cfg.long_text,  # type: ignore[arg-type]
        batch_tokens=tokens,
        max_batch_items=items,
        pool_options=cfg.pool_options,
        on_event=lambda e: events.append(e) if e.get("event") in keep else None,
    ) as emb:
        load_s = time.perf_counter() - t0
        vecs = emb.embed(texts)
        if cfg.vectors_out:
            np.save(cfg.vectors_out, vecs)
        report = emb.last_report
        device = emb.device
        precision, tokens, items = emb.precision, emb.batch_tokens, emb.max_batch_items
    peak = tracker.close()
    return {
        "runner": "embedpool",
        "chunks": len(texts),
        "seconds": report.seconds,
        "chunks_per_s": len(texts) / report.seconds,
        "tokens_per_s": report.tokens / report.seconds,
        "load_s": load_s,
        "peak_rss_bytes": peak,
        "truncated": report.truncated,
        "dim": int(vecs.shape[1]),
        "events": events,
        "device": device,
        "settings": {
            "precision": precision,
            "workers": cfg.workers,
            "threads": cfg.threads,
            "batch_tokens": tokens,
            "max_batch_items": items,
            "device": cfg.device,
            "cpu_workers": cfg.cpu_workers,
        },
    }


def export_for_fastembed(model_spec: str, out_dir: Path) -> tuple[Path, Any]:
    """A plain fp32 ONNX (last_hidden_state) + tokenizer files, as a hub export would be."""
    import shutil

    from embedpool.graph.families.bert import BertConfig, build_bert, load_weights
    from embedpool.models import resolve_model

    m = resolve_model(model_spec)
    cfg = BertConfig.from_dict(m.config)
    onnx_model = build_bert(
        load_weights(m.weights_path, cfg), cfg, pooling=m.pooling, fused=False, pool=False
    )
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

    texts = _corpus(cfg.chunks, cfg.input)
    with tempfile.TemporaryDirectory(prefix="embedpool-fastembed-") as tmp:
        model_dir, m = export_for_fastembed(cfg.model, Path(tmp))
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        name = f"embedpool-bench/{m.name}"
        TextEmbedding.add_custom_model(
            model=name,
            pooling=PoolingType.MEAN if m.pooling == "mean" else PoolingType.CLS,
            normalization=True,
            sources=ModelSource(hf=name),
            dim=m.dim,
            model_file="model.onnx",
        )
        tracker = RssTracker()
        t0 = time.perf_counter()
        fe = TextEmbedding(model_name=name, specific_model_path=str(model_dir))
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        vecs = np.stack(list(fe.embed(texts)))
        seconds = time.perf_counter() - t1
        peak = tracker.close()
    return {
        "runner": "fastembed",
        "chunks": len(texts),
        "seconds": seconds,
        "chunks_per_s": len(texts) / seconds,
        "load_s": load_s,
        "peak_rss_bytes": peak,
        "dim": int(vecs.shape[1]),
        "settings": {"batch_size": 256, "parallel": None},
    }


#: What each sentence-transformers target needs besides torch, as pip installs it.
ST_INSTALL = {
    "torch": "sentence-transformers",
    "onnx": "'sentence-transformers[onnx]' (optimum-onnx, onnxruntime)",
    "openvino": "'sentence-transformers[openvino]' datasets (optimum-intel, openvino, nncf)",
}


def st_onnx_qconfig(cpu: CpuFeatures) -> str:
    """sentence-transformers' dynamic int8 config for ``cpu`` (its best on that CPU): the
    VNNI kernels where it has them, else AVX-512, else AVX2 (ARM: arm64)."""
    if cpu.tier in ("vnni", "avx512_bf16", "amx"):
        return "avx512_vnni"
    if {"avx512f", "avx512bw"} <= cpu.flags:
        return "avx512"
    if "avx2" in cpu.flags:
        return "avx2"
    return "arm64" if "asimd" in cpu.flags else "avx2"


def run_sentence_transformers(cfg: BenchConfig, backend: str, int8: bool) -> dict[str, Any]:
    """Runs inside the child process (an interpreter that has sentence-transformers:
    ``--peer-python``): ``SentenceTransformer(model_dir, backend=...)`` at its defaults;
    ``int8``: its own quantised export of the same model, made first (not timed). The peak
    RSS is this process's high-water mark (ru_maxrss), read before the fp32 reference is
    loaded for the quality figures."""
    import resource

    try:
        import sentence_transformers as st
    except ImportError as exc:
        raise SystemExit(
            f"sentence-transformers is not importable in {sys.executable} "
            f"({exc}): pip install {ST_INSTALL[backend]}, or pass "
            "--peer-python with a Python that has it"
        ) from None
    texts = _texts(cfg)
    path = cfg.model
    with tempfile.TemporaryDirectory(prefix="embedpool-st-") as tmp:
        try:
            model = st.SentenceTransformer(path, backend=backend, device="cpu")
            if int8:
                model = _st_int8(st, model, path, backend, Path(tmp), texts)
        except ImportError as exc:
            raise SystemExit(
                f"sentence-transformers' {backend} backend cannot load ({exc}): "
                f"pip install {ST_INSTALL[backend]}"
            ) from None
        t0 = time.perf_counter()
        vecs = model.encode(texts, convert_to_numpy=True)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if backend == "torch" and not int8:
        ref = vecs
    else:
        ref = st.SentenceTransformer(path, backend="torch", device="cpu").encode(
            texts, convert_to_numpy=True
        )
    if cfg.vectors_out:
        np.save(cfg.vectors_out, np.asarray(ref, dtype=np.float32))
    return {
        "runner": f"st-{backend}" + ("-int8" if int8 else ""),
        "chunks": len(texts),
        "seconds": seconds,
        "chunks_per_s": len(texts) / seconds,
        "peak_rss_bytes": peak,
        "dim": int(vecs.shape[1]),
        "cos": _cos_stats(vecs, ref),
        "settings": {
            "backend": backend,
            "int8": int8,
            "batch_size": 32,
            "sentence_transformers": st.__version__,
        },
    }


def _st_int8(st: Any, model: Any, path: str, backend: str, out: Path, texts: list[str]) -> Any:
    """sentence-transformers' own int8 export of ``model``, loaded back."""
    if backend == "onnx":
        from sentence_transformers.backend import export_dynamic_quantized_onnx_model

        from embedpool.runtimes import cpu_features

        config = st_onnx_qconfig(cpu_features())
        # the export writes only onnx/model_qint8_<config>.onnx: the model's own files first
        model.save(str(out))
        export_dynamic_quantized_onnx_model(model, config, str(out))
        # model_qint8_<config>.onnx, or quint8 where the config's weights are unsigned (avx2)
        (quantised,) = (out / "onnx").glob(f"model_q*int8_{config}.onnx")
        return st.SentenceTransformer(
            str(out),
            backend="onnx",
            device="cpu",
            model_kwargs={"file_name": f"onnx/{quantised.name}"},
        )
    if backend == "openvino":
        # export_static_quantized_openvino_model's calibration set (glue/sst2) comes from
        # the hub; the same quantisation on 300 texts of the corpus instead
        _ov_static(model, out, texts[:300])
        return st.SentenceTransformer(
            str(out),
            backend="openvino",
            device="cpu",
            model_kwargs={"file_name": "openvino/openvino_model_qint8_quantized.xml"},
        )
    raise SystemExit(f"sentence-transformers has no int8 export for backend {backend}")


def _ov_static(model: Any, out: Path, texts: list[str]) -> None:
    """optimum-intel's static int8 quantisation (what export_static_quantized_openvino_model
    runs), calibrated on ``texts`` instead of a hub dataset."""
    import shutil

    from datasets import Dataset
    from optimum.intel import OVConfig, OVQuantizationConfig, OVQuantizer

    ov_model = model[0].auto_model
    tok = model.tokenizer
    quantizer = OVQuantizer.from_pretrained(ov_model)
    data = Dataset.from_dict({"text": texts}).map(
        lambda x: tok(
            x["text"], padding="max_length", truncation=True, max_length=model.max_seq_length
        ),
        batched=True,
        remove_columns=["text"],
    )
    model.save(str(out))  # the model's own files, before the quantiser touches the model
    written = out / "quantised"
    quantizer.quantize(
        save_directory=written,
        calibration_dataset=data,
        ov_config=OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(texts))),
    )
    # where it writes the IR moved between optimum-intel releases: take the one it wrote
    xml = sorted(written.rglob("*.xml"))[0]
    if "FakeQuantize" not in xml.read_text(encoding="utf-8"):
        raise SystemExit(f"optimum-intel's static quantisation wrote no int8 model ({xml})")
    for suffix in (".xml", ".bin"):
        shutil.copyfile(
            xml.with_suffix(suffix),
            out / "openvino" / f"openvino_model_qint8_quantized{suffix}",
        )


def _cos_stats(a: Any, b: Any) -> dict[str, float]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}


def _st_runner(backend: str, int8: bool) -> Callable[[BenchConfig], dict[str, Any]]:
    return lambda cfg: run_sentence_transformers(cfg, backend, int8)


RUNNERS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "embedpool": run_embedpool,
    "fastembed": run_fastembed,
    "st-torch": _st_runner("torch", False),
    "st-onnx": _st_runner("onnx", False),
    "st-onnx-int8": _st_runner("onnx", True),
    "st-openvino": _st_runner("openvino", False),
    "st-openvino-int8": _st_runner("openvino", True),
}


def _in_subprocess(runner: str, cfg: BenchConfig) -> dict[str, Any]:
    python = sys.executable
    env = None
    if runner.startswith("st-"):
        import os

        python = cfg.peer_python or sys.executable
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        }
    proc = subprocess.run(
        [python, "-m", "embedpool.bench", runner, json.dumps(asdict(cfg))],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        from embedpool.errors import ConfigError

        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        if runner.startswith("st-") and "pip install" in tail[0]:
            raise ConfigError(f"--compare {runner}: {tail[0]}")
        raise RuntimeError(
            f"{runner} benchmark failed (exit {proc.returncode}):\n{_stderr_tail(proc.stderr)}"
        )
    last = proc.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def _stderr_tail(text: str, lines: int = 20, width: int = 400) -> str:
    """A failed peer's last ``lines`` lines of stderr, each cut at ``width`` characters (a
    traceback's last line can be a whole list of model types)."""
    return "\n".join(
        line if len(line) <= width else line[:width] + " ..."
        for line in text.strip().splitlines()[-lines:]
    )


#: The modules each sentence-transformers backend imports (checked before anything runs).
ST_MODULES = {
    "torch": ("sentence_transformers", "torch"),
    "onnx": ("sentence_transformers", "torch", "optimum.onnxruntime"),
    "openvino": ("sentence_transformers", "torch", "optimum.intel"),
}
#: What an int8 peer's quantisation imports besides its backend's modules (_ov_static's
#: calibration set is a ``datasets.Dataset``).
ST_INT8_MODULES = {"onnx": (), "openvino": ("datasets",)}


def peer_modules(compare: str) -> tuple[str, ...]:
    """The modules a ``st-*`` peer imports (its backend's, and its int8 export's)."""
    backend = compare.split("-")[1]
    extra = ST_INT8_MODULES[backend] if compare.endswith("-int8") else ()
    return ST_MODULES[backend] + extra


def _check_peer(cfg: BenchConfig) -> None:
    """A ``--compare st-*`` peer whose packages are missing is refused before anything runs
    (ConfigError: exit 2), naming the pip command."""
    if not (cfg.compare or "").startswith("st-"):
        return
    backend = (cfg.compare or "").split("-")[1]
    modules = peer_modules(cfg.compare or "")
    python = cfg.peer_python or sys.executable
    probe = (
        "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in "
        f"{modules!r}) else 3)"
    )
    try:
        ok = (
            subprocess.run(
                [python, "-c", probe], capture_output=True, timeout=120, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        from embedpool.errors import ConfigError

        raise ConfigError(
            f"--compare {cfg.compare} needs {', '.join(modules)} in "
            f"{python}: pip install {ST_INSTALL[backend]} there, or pass "
            "--peer-python with a Python that has them"
        )


def _compare(
    cfg: BenchConfig, m: Any, ours: dict[str, Any], mine: Path | None, echo: Callable[[str], None]
) -> dict[str, Any]:
    """The peer's run; for a sentence-transformers peer (given the model's directory), also
    both sides' cosines against its fp32 (torch) vectors of the same texts (``mine``: our
    vectors' .npy)."""
    if not (cfg.compare or "").startswith("st-") or mine is None:
        return _in_subprocess(cfg.compare or "", cfg)
    import dataclasses

    ref_path = mine.with_name("reference.npy")
    texts_path = mine.with_name("texts.json")
    texts_path.write_text(json.dumps(_corpus(cfg.chunks, cfg.input)), encoding="utf-8")
    peer = _in_subprocess(
        cfg.compare or "",
        dataclasses.replace(
            cfg, model=str(m.directory), vectors_out=str(ref_path), texts_json=str(texts_path)
        ),
    )
    ours["cos"] = _cos_stats(np.load(mine), np.load(ref_path))
    for name, run in (("embedpool", ours), (cfg.compare, peer)):
        echo(
            f"{name} against sentence-transformers fp32: cos mean {run['cos']['mean']:.5f} "
            f"min {run['cos']['min']:.5f}"
        )
    return peer


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    m = resolve_model(cfg.model)
    _check_peer(cfg)
    texts = _corpus(cfg.chunks, cfg.input)
    stats = token_stats(TextTokenizer.for_model(m).count(texts), m.max_length)
    what = f"of {cfg.input}" if cfg.input else f"of Python {sys.version.split()[0]} stdlib source"
    echo(
        f"corpus: {len(texts)} chunks {what}; tokens "
        f"mean {stats['mean']} p50 {stats['p50']} p90 {stats['p90']} p99 {stats['p99']} "
        f"max {stats['max']}; {stats['over_max_length']:.0%} over max length {m.max_length}"
    )
    results: dict[str, Any] = {"corpus": stats, "runs": []}
    scratch = tempfile.TemporaryDirectory(prefix="embedpool-bench-")
    mine = Path(scratch.name) / "ours.npy" if (cfg.compare or "").startswith("st-") else None
    try:
        return _run_bench(cfg, m, results, mine, echo)
    finally:
        scratch.cleanup()


def _run_bench(
    cfg: BenchConfig,
    m: Any,
    results: dict[str, Any],
    mine: Path | None,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    import dataclasses

    from embedpool.progress import fmt_bytes

    ours = _in_subprocess(
        "embedpool", dataclasses.replace(cfg, vectors_out=str(mine) if mine is not None else None)
    )
    results["runs"].append(ours)
    where = (
        "in-process"
        if cfg.workers is None
        else f"workers {cfg.workers}" + (f" x {cfg.threads} threads" if cfg.threads else "")
    )
    echo(f"embedpool ({ours['settings']['precision']}, {where}): device {ours['device']}")
    echo(
        f"embedpool: {ours['chunks_per_s']:.1f} chunks/s, "
        f"{ours['tokens_per_s']:.0f} tokens/s, peak RSS {fmt_bytes(ours['peak_rss_bytes'])} "
        f"(load {ours['load_s']:.1f} s)"
    )
    for e in ours.get("events", []):
        if e.get("event") == "graph_built":  # a cold cache: what the first run paid first
            results["cold_build"] = {
                k: e[k] for k in ("precision", "seconds", "peak_rss", "size_bytes", "built")
            }
            echo(
                f"  cold build: the {e['precision']} graph in {e['seconds']:.1f} s, peak RSS "
                f"{fmt_bytes(e['peak_rss'])} (its own process, before any worker; included "
                "in load and in the peak above)"
            )
            continue
        echo("  decision: " + ", ".join(f"{k}={v}" for k, v in e.items() if k != "ts"))
    if cfg.compare:
        peer = _compare(cfg, m, ours, mine, echo)
        results["runs"].append(peer)
        speed = ours["chunks_per_s"] / peer["chunks_per_s"]
        mem = peer["peak_rss_bytes"] / max(ours["peak_rss_bytes"], 1)
        results["ratio"] = {"throughput": round(speed, 2), "peak_rss_peer_over_ours": round(mem, 2)}
        echo(
            f"{cfg.compare} (defaults): {peer['chunks_per_s']:.1f} chunks/s, peak RSS "
            f"{fmt_bytes(peer['peak_rss_bytes'])}"
        )
        echo(
            f"ratio: embedpool is {speed:.2f}x {cfg.compare}'s throughput with "
            f"1/{mem:.1f} of its peak RSS"
        )
    return results


if __name__ == "__main__":
    runner, raw = sys.argv[1], sys.argv[2]
    out = RUNNERS[runner](BenchConfig(**json.loads(raw)))
    print(json.dumps(out, default=str))
