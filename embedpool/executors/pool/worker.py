"""The worker process: build the engine once, answer Embed messages, never outlive the parent.

``worker_main`` is a plain top-level function with explicit arguments so that it runs under
``spawn`` and ``forkserver`` (nothing inherited but what is passed). Its life:

    limit_threads(threads)          OMP/MKL/OPENBLAS env before anything heavy is imported
    die_with_parent(parent_pid)     PR_SET_PDEATHSIG(SIGKILL) + a parent-pid watchdog thread
    spec = pickle.loads(blob)       (the spec is unpickled here, after the env is set, so that
    engine = spec.build()            importing onnxruntime/numpy sees it; errors are reported)
    release_memory()                malloc_trim(0): load-time garbage back to the kernel
    send Ready | StartFailed(traceback)
    loop: Embed -> Result | TaskFailed (release_memory() after each batch);
          Leave -> send Leaving, exit 0;  EOF -> exit

No orphans, three ways: the pipe's EOF while idle; PR_SET_PDEATHSIG while busy in native code
(Linux); a watchdog thread that notices the parent pid is gone (other platforms, and
forkserver, where the direct parent is the fork server, not the pool).
SIGINT and SIGTERM are ignored: a Ctrl-C, ``kill -TERM -PGID`` or systemd's
``KillMode=control-group`` reach the whole process group, and the pool, not each worker,
decides how in-flight batches end (a worker that died of them would be counted as a crash and
respawned during the graceful drain). The pool ends its workers with Leave, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from embedpool.executors.pool.protocol import (
    Embed,
    Leave,
    Leaving,
    Ready,
    Result,
    StartFailed,
    TaskFailed,
)
from embedpool.faults import engine_error_kind
from embedpool.proc import pid_alive, rss_bytes

#: Variables read by the common native thread pools. ONNX Runtime's own pool is sized by the
#: engine's intra-op setting; these keep numpy's BLAS and any OpenMP library from starting one
#: thread per core in every worker (workers x cores threads: the oversubscription that
#: sentence-transformers users hit, #372 / #1585).
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
#: How often the watchdog checks that the parent is alive. Only matters where PDEATHSIG does
#: not exist or cannot fire (forkserver); one check a second costs nothing.
WATCHDOG_INTERVAL_S = 1.0
PR_SET_PDEATHSIG = 1
#: Signals a group-wide stop delivers to every worker too: the pool handles the stop.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def limit_threads(threads: int) -> None:
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)


def die_with_parent(parent_pid: int) -> None:
    """Make sure this process ends when ``parent_pid`` does, whatever it is doing."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    # The parent may have died before prctl ran (then it never fires).
    if not pid_alive(parent_pid):
        os._exit(1)
    original_ppid = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            if not pid_alive(parent_pid) or (
                original_ppid == parent_pid and os.getppid() != original_ppid
            ):
                os._exit(1)  # no cleanup: there is nobody left to report to

    threading.Thread(target=watchdog, name="embedpool-parent-watchdog", daemon=True).start()


#: Added to this worker's oom_score_adj (-1000..1000): when a cgroup or the host runs out of
#: memory, the kernel kills the process with the highest score, which is roughly its share of
#: memory. A worker is disposable (its batch is retried, split, on a fresh one); the supervisor
#: holds every finished vector and the job's state. Without this, a supervisor that holds many
#: results can outscore a worker and the whole job dies (seen in tests/executors/pool/test_pressure.py).
#: Raising one's own score needs no privilege.
WORKER_OOM_SCORE_ADJ = 300


def prefer_oom_kill() -> None:
    """Make the kernel's OOM killer pick this worker before the supervisor (Linux)."""
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:
            current = int(f.read().strip() or 0)
            f.seek(0)
            f.write(str(min(1000, current + WORKER_OOM_SCORE_ADJ)))
    except (OSError, ValueError):  # not Linux, or a sandbox without /proc: nothing to do
        pass


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt/malloc_trim exist), else None; looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - odd sandboxes
        return None
    return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def release_memory() -> bool:
    """Give freed heap pages back to the kernel (glibc ``malloc_trim(0)``; else nothing).

    glibc keeps what a process frees for reuse: after loading, the model file's parse
    buffers; after a batch, its activation tensors (glibc raises its mmap threshold to
    32 MiB after the first large free, so they come from the heap). The worker's RSS then
    sits at its largest batch's high-water mark, and recycling decisions read that number.
    Called after loading and after each batch (benchmarks/worker_rss.py, int8, 8 x 256 tokens:
    RSS after load 161 -> 147 MiB, after a batch 200 -> 147, peak 317 -> 285; fp32 after a
    batch 331 -> 164). It costs ~0.4 ms against a batch's ~1.4 s, and the speed is unchanged.
    Measured and rejected: a fixed 1 MiB M_MMAP_THRESHOLD (activations mmapped, so freed at
    once) lowered the int8 peak by another ~10 MiB but ran ~10% slower, the price of
    faulting fresh zero pages for every tensor of every batch.
    With ONNX Runtime's arena on (which keeps activations itself) it still pays, mostly at
    load: RSS after load int8 100 vs 106 MiB, fp32 151 vs 180; peak at 3 x 256 tokens 133 vs
    136 and 181 vs 207 MiB, same speed (worker_rss.py --variants default,no-tuning).
    EMBEDPOOL_MALLOC_TUNING=0 turns this off (for comparisons). Returns whether it trimmed.
    """
    libc = _glibc()
    from embedpool.config import malloc_tuning_enabled

    if libc is None or not malloc_tuning_enabled():
        return False
    libc.malloc_trim(0)
    return True


def worker_main(
    conn: Connection,
    spec_blob: bytes,
    worker_id: int,
    threads: int,
    parent_pid: int,
    gc_rss_bytes: int | None = None,
) -> None:
    """Entry point of a worker process (the ``target`` of its ``Process``).

    ``spec_blob`` is the pickled engine spec; ``gc_rss_bytes``: above this RSS the worker runs
    ``gc.collect()`` before reporting it, so the supervisor's recycling decision is made on
    memory that is really held, not on garbage.
    """
    limit_threads(threads)
    die_with_parent(parent_pid)
    prefer_oom_kill()
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    pid = os.getpid()
    try:
        from embedpool.executor import EngineRecipe, with_threads  # numpy: after limit_threads

        spec: EngineRecipe = with_threads(pickle.loads(spec_blob), threads)
        engine = spec.build()
        dim = int(engine.dim)
        release_memory()  # the model file's parse buffers, freed but kept by the heap
    except BaseException as exc:  # everything, SystemExit included, is reported
        conn.send(
            StartFailed(worker_id, pid, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        )
        conn.close()
        sys.exit(3)
    conn.send(Ready(worker_id, pid, dim, rss_bytes() or 0))

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the supervisor is gone
        if isinstance(msg, Embed):
            _embed(conn, engine, msg, gc_rss_bytes)
        elif isinstance(msg, Leave):
            conn.send(Leaving(worker_id, msg.reason))
            conn.close()
            return
        else:  # pragma: no cover - protocol bug
            raise TypeError(f"worker {worker_id}: unexpected message {msg!r}")


def _embed(conn: Connection, engine: Any, msg: Embed, gc_rss_bytes: int | None) -> None:
    from embedpool.executor import embed_sequences  # imported since start (with_threads)

    started = time.perf_counter()
    try:
        vectors = embed_sequences(engine, msg.sequences, msg.prompt_lengths)
    except Exception as exc:
        conn.send(
            TaskFailed(
                msg.task_id,
                f"{type(exc).__name__}: {exc}",
                traceback.format_exc(),
                str(engine_error_kind(exc)),
            )
        )
        return
    seconds = time.perf_counter() - started
    release_memory()  # so the reported RSS, which drives recycling and scaling, is what is live
    rss = rss_bytes() or 0
    if gc_rss_bytes is not None and rss > gc_rss_bytes:
        gc.collect()
        rss = rss_bytes() or 0
    conn.send(Result(msg.task_id, vectors, seconds, rss))
