"""RSS and speed of a real pool worker (``embedpool.executors.pool.worker.worker_main``) per setting.

Each run spawns one worker exactly as the supervisor does (spawn context, pipe protocol,
1 intra-op thread), with the default model's cached graph, and reads the worker's
``/proc/<pid>/status`` from here:

    load      VmRSS once the worker has sent Ready
    peak3     VmHWM over BATCHES batches of 3 x 256 tokens (the default 768-token budget)
    cps3      chunks per second at 3 x 256 (engine time reported by the worker)
    peak4     VmHWM over BATCHES batches of 4 x 256 tokens
    peak8     VmHWM over BATCHES batches of 8 x 256 tokens
    after8    VmRSS after them
    peak32    VmHWM over 2 batches of 32 x 256 tokens (what bare ORT was measured at)
    cps8      chunks per second at 8 x 256 (engine time reported by the worker)

The high-water mark is reset (``/proc/<pid>/clear_refs`` = 5) after a warm-up batch, so the
peaks are of steady batches, not of loading. Variants run interleaved, ROUNDS times, and the
median is printed, so the speed comparison sees the same CPU contention.

Variants (all on top of the worker's current code):

    before      EMBEDPOOL_MALLOC_TUNING=0, mem pattern on, ``onnx`` imported: the worker as it was
    default     the worker as it is (no onnx import; release_memory after load and batches)
    no-tuning   EMBEDPOOL_MALLOC_TUNING=0 only
    mmap-1M     default plus glibc's mmap/trim thresholds fixed at 1 MiB (rejected: slower)
    +onnx       default plus ``import onnx`` (what the lazy imports save)
    mem-pattern default plus SessionOptions.enable_mem_pattern = True (ORT's default)
    no-arena    default with ORT's CPU memory arena off (tensor by tensor from glibc)
    no-prepack  default plus session.disable_prepacking = 1
    dev-alloc   default plus session.use_device_allocator_for_initializers = 1

Run: .venv/bin/python benchmarks/worker_rss.py [--rounds 3] [--batches 5] [--variants a,b]
(needs the cached graphs; ``embedpool embed`` or prepare_onnx builds them.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpool.engine import Engine, EngineSpec
from embedpool.executors.pool.protocol import Embed, Ready, Result
from embedpool.models import resolve_model
from embedpool.testing import spawn_worker

SEQ = 256
#: A worker that is not ready by then is broken, not slow (loading takes ~1 s here).
READY_TIMEOUT_S = 120.0
BATCH_TIMEOUT_S = 300.0

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    # name: (environment of the worker, options for _TweakedSpec)
    "before": ({"EMBEDPOOL_MALLOC_TUNING": "0"}, {"import_onnx": True, "mem_pattern": True}),
    "default": ({}, {}),
    "no-tuning": ({"EMBEDPOOL_MALLOC_TUNING": "0"}, {}),
    # the rejected alternative: activations mmapped (freed at once), fixed thresholds
    "mmap-1M": (
        {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)},
        {},
    ),
    "+onnx": ({}, {"import_onnx": True}),
    "mem-pattern": ({}, {"mem_pattern": True}),
    "no-arena": ({}, {"arena": False}),
    "no-prepack": ({}, {"config": {"session.disable_prepacking": "1"}}),
    "dev-alloc": ({}, {"config": {"session.use_device_allocator_for_initializers": "1"}}),
}


@dataclass(frozen=True)
class _TweakedSpec:
    """An EngineSpec that changes the session options (or imports onnx) in the worker."""

    spec: EngineSpec
    import_onnx: bool = False
    mem_pattern: bool = False
    arena: bool | None = None
    config: tuple[tuple[str, str], ...] = ()

    def build(self) -> Engine:
        if self.import_onnx:
            import onnx  # noqa: F401  - what embedpool.graph used to import

        import embedpool.engine as engine_module

        plain = engine_module.session_options

        def tweaked(threads: int) -> Any:
            opts = plain(threads)
            opts.enable_mem_pattern = self.mem_pattern
            if self.arena is not None:
                opts.enable_cpu_mem_arena = self.arena
            for key, value in self.config:
                opts.add_session_config_entry(key, value)
            return opts

        engine_module.session_options = tweaked  # type: ignore[assignment]
        return self.spec.build()


def _status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM of ``pid`` in MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _batches(n: int, count: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """``count`` batches of ``n`` full-length sequences of ids from MiniLM's word range."""
    rng = np.random.default_rng(seed)
    return [
        tuple(
            np.concatenate([[101], rng.integers(1000, 29000, SEQ - 2), [102]]).astype(np.int32)
            for _ in range(n)
        )
        for _ in range(count)
    ]


def measure(precision: str, variant: str, batches: int) -> dict[str, float]:
    env, tweaks = VARIANTS[variant]
    spec: Any = EngineSpec(resolve_model(), precision, threads=1)  # type: ignore[arg-type]
    if tweaks:
        tweaks = dict(tweaks)
        tweaks["config"] = tuple(tweaks.get("config", {}).items())
        spec = _TweakedSpec(spec, **tweaks)
    proc, parent = spawn_worker(spec, env)
    try:
        if not parent.poll(READY_TIMEOUT_S):
            raise TimeoutError("worker not ready")
        ready = parent.recv()
        if not isinstance(ready, Ready):
            raise RuntimeError(f"worker failed: {ready}")
        pid = ready.pid
        row = {"load": _status(pid)["VmRSS"]}
        task = 0

        def run(seqs: tuple[np.ndarray, ...]) -> float:
            nonlocal task
            task += 1
            parent.send(Embed(task, seqs))
            if not parent.poll(BATCH_TIMEOUT_S):
                raise TimeoutError("batch timed out")
            res = parent.recv()
            if not isinstance(res, Result):
                raise RuntimeError(f"batch failed: {res}")
            return res.seconds

        for n, count, tag in (
            (3, batches, "3"),
            (4, batches, "4"),
            (8, batches, "8"),
            (32, 2, "32"),
        ):
            work = _batches(n, count + 1, seed=n)
            run(work[0])  # warm-up: first-run allocations and lazy kernels
            _reset_peak(pid)
            seconds = sum(run(b) for b in work[1:])
            st = _status(pid)
            row[f"peak{tag}"], row[f"after{tag}"] = st["VmHWM"], st["VmRSS"]
            row[f"cps{tag}"] = n * count / seconds
        return row
    finally:
        parent.close()  # EOF: the worker exits
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = args.variants.split(",")
    cols = ["load", "peak3", "cps3", "peak4", "peak8", "after8", "cps8", "peak32"]
    print(
        f"{'prec':5} {'variant':11} "
        + " ".join(f"{c:>8}" for c in cols)
        + "   (MiB; medians of rounds)"
    )
    for precision in args.precisions.split(","):
        rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        started = time.monotonic()
        for _ in range(args.rounds):
            for v in variants:
                rows[v].append(measure(precision, v, args.batches))
        for v in variants:
            med = {c: statistics.median(r[c] for r in rows[v]) for c in cols}
            print(f"{precision:5} {v:11} " + " ".join(f"{med[c]:8.1f}" for c in cols))
        print(f"  ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
