"""Ray backend vs the local engine (and the local pool) on the same batches; Ray's start-up.

    .venv/bin/python benchmarks/ray_bench.py [--chunks 400] [--precision int8]
        [--rounds 3] [--address ADDR] [--actors N] [--no-pool] [--fake]

Corpus: ``--chunks`` code chunks of the interpreter's own stdlib (embedpool.corpus), tokenised
with the model's tokenizer, cut into WorkBatches with embedpool's default padded-token
budget. Every executor embeds exactly these batches; build/start time is measured apart from
throughput.

Measured:
- ``ray.init`` (a fresh local instance, dashboard off) unless ``--address`` is given;
- ``RayExecutor(...)`` until the first actor is ready: ships the ONNX graph and starts
  actors (cold: the first executor on the cluster; warm: a second one);
- throughput (chunks/s) of the local in-process engine (1 process x all cores), the local
  pool (N workers x 1 thread) and the Ray backend (N actors x 1 CPU), all built first and
  then timed in ``--rounds`` interleaved passes in rotating order (the median is reported,
  every pass listed), so a noisy neighbour hurts all three alike; and the min cosine of
  Ray's vectors to the local engine's.

Until ``embedpool.graph.prepare_onnx`` lands, the driver builds the int8 graph itself with
``embedpool.graph.bert`` + ``quantize``; actors only ever receive the ONNX bytes.
``--fake`` runs embedpool.testing.FakeEngine (sleeps 20 us per token) instead: the ratio then
measures the backend's dispatch overhead, not model compute.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedpool.batching import plan_batches
from embedpool.executor import BatchResult, WorkBatch
from embedpool.executors.inprocess import InProcessExecutor
from embedpool.models import ResolvedModel, resolve_model
from embedpool.types import Precision, TokenIds


class _Runs(Protocol):
    def run(self, batches: Iterable[WorkBatch]) -> Iterator[BatchResult]: ...


def ensure_graph(model: ResolvedModel, precision: Precision, tmp: Path) -> None:
    """Stand in for prepare_onnx while it raises NotImplementedError (driver only)."""
    import embedpool.graph as graph

    try:
        graph.prepare_onnx(model, precision)
        return
    except NotImplementedError:
        pass
    import onnx

    from embedpool.graph.families.bert import BertConfig, build_bert, load_weights
    from embedpool.graph.quantize import quantize_shipped

    cfg = BertConfig.from_dict(model.config)
    fp32 = tmp / "model-fp32.onnx"
    onnx.save(
        build_bert(
            load_weights(model.weights_path, cfg),
            cfg,
            pooling=model.pooling,
            normalize=model.normalize,
        ),
        fp32,
    )
    path = fp32
    if precision == "int8":
        path = tmp / "model-int8.onnx"
        quantize_shipped(fp32, path)

    def prepare(model: ResolvedModel, precision: Precision, cache_dir: Path | None = None) -> Path:
        return path

    graph.prepare_onnx = prepare


def corpus_batches(model: ResolvedModel, n: int) -> list[WorkBatch]:
    from embedpool.corpus import stdlib_chunks
    from embedpool.tokenization import TextTokenizer

    chunks = stdlib_chunks(n)
    tok = TextTokenizer(model.tokenizer_path, model.max_length)
    seqs: list[TokenIds] = tok.encode([c.text for c in chunks]).sequences
    return [
        WorkBatch(i, tuple(seqs[j] for j in b.indices), tuple(chunks[j].id for j in b.indices))
        for i, b in enumerate(plan_batches([len(s) for s in seqs]))
    ]


def timed_run(ex: _Runs, batches: list[WorkBatch]) -> tuple[float, dict[int, BatchResult]]:
    started = time.perf_counter()
    out = {r.batch_id: r for r in ex.run(batches)}
    return time.perf_counter() - started, out


def min_cos(a: dict[int, BatchResult], b: dict[int, BatchResult]) -> float:
    return float(min(np.min(np.sum(a[k].vectors * b[k].vectors, axis=1)) for k in b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=400)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed passes per executor, interleaved; the median is reported",
    )
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--address", default=None, help="join this cluster instead of a local one")
    ap.add_argument("--actors", type=int, default=None, help="default: cluster CPUs")
    ap.add_argument("--no-pool", action="store_true", help="skip the local process pool")
    ap.add_argument("--fake", action="store_true", help="FakeEngine: overhead only")
    args = ap.parse_args()

    import ray

    from embedpool.engine import EngineSpec, usable_cores
    from embedpool.executors.ray.executor import RayExecutor
    from embedpool.testing import FakeEngineSpec

    cores = usable_cores()
    model = resolve_model()
    batches = corpus_batches(model, args.chunks)
    n = sum(len(b.sequences) for b in batches)
    report: dict[str, Any] = {
        "chunks": n,
        "batches": len(batches),
        "tokens": sum(b.tokens for b in batches),
        "cores": cores,
        "precision": args.precision,
        "fake": args.fake,
    }
    closers: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.fake:
            ensure_graph(model, args.precision, Path(tmp))

        def spec(threads: int) -> Any:
            if args.fake:
                return FakeEngineSpec(dim=model.dim, threads=threads, delay_per_token_s=20e-6)
            return EngineSpec(model, args.precision, threads=threads)

        runners: dict[str, _Runs] = {}
        runners[f"local_1x{cores}"] = InProcessExecutor(spec(cores))
        if not args.no_pool:
            from embedpool.executors.pool.config import PoolConfig
            from embedpool.executors.pool.pool import Pool

            try:  # workers build their own graph: needs the real prepare_onnx
                pool = Pool(spec(1), PoolConfig(workers=cores, threads=1, precision=args.precision))
                closers.append(pool)
                runners[f"pool_{cores}x1"] = pool
            except Exception as exc:
                report["pool"] = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"

        started = time.perf_counter()
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # As RayExecutor's own local instance: workers at nice 0, not Ray's 15.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        report["ray_init_s"] = round(time.perf_counter() - started, 2)
        events: list[dict[str, Any]] = []
        for label in ("cold", "warm"):  # warm: a second executor after the first closed
            started = time.perf_counter()
            ex = RayExecutor(spec(1), actors=args.actors, on_event=events.append)
            report[f"ray_actors_ready_{label}_s"] = round(time.perf_counter() - started, 2)
            if label == "cold":
                ex.close()  # its actors hold the cluster's CPUs
        closers.append(ex)
        runners[f"ray_{len(ex.handles)}x1"] = ex
        ready = [e for e in events if e["event"] == "worker_ready"]
        report["ray_model_sources"] = sorted({str(e["model_source"]) for e in ready})
        report["ray_actor_startup_s"] = [e["startup_s"] for e in ready]

        speeds: dict[str, list[float]] = {k: [] for k in runners}
        results: dict[str, dict[int, BatchResult]] = {}
        for r in range(args.rounds):
            names = list(runners)
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                secs, results[name] = timed_run(runners[name], batches)
                speeds[name].append(n / secs)
        for name, xs in speeds.items():
            report[f"{name}_chunks_s"] = round(float(np.median(xs)), 1)
            report[f"{name}_runs"] = [round(x, 1) for x in xs]
        local_key, ray_key = next(iter(runners)), next(k for k in runners if k.startswith("ray"))
        report["ray_min_cos_to_local"] = round(min_cos(results[ray_key], results[local_key]), 7)
        for other in runners:
            if other != ray_key:
                report[f"ray_vs_{other.split('_')[0]}"] = round(
                    report[f"{ray_key}_chunks_s"] / report[f"{other}_chunks_s"], 3
                )
        for c in reversed(closers):
            c.close()
        ray.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
