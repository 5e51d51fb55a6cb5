"""The wire protocol between the supervisor and its workers: a handful of frozen dataclasses.

Messages travel pickled over one duplex ``multiprocessing`` Pipe per worker; numpy arrays
pickle as raw buffers, so a result costs one copy of ``n x dim`` float32s and nothing else.
Workers send finished vectors (the model's head applied), never hidden states.

    supervisor -> worker            worker -> supervisor
    ---------------------           ------------------------------------------------
    Embed(task_id, sequences,       Ready(worker_id, pid, dim, rss)     once, after loading
          prompt_lengths)
    Leave(reason)                   StartFailed(worker_id, pid, error, traceback)
                                    Result(task_id, vectors, seconds, rss)
                                    TaskFailed(task_id, error, traceback, kind)
                                                                        an exception in embed
                                    Leaving(worker_id, reason)          before a cooperative exit

A worker has at most one ``Embed`` in flight, so a crash is always charged to exactly one
task. A worker that exits without ``Leaving`` crashed, whatever its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy stays out of the worker's first imports (see worker.limit_threads)
    from embedpool.types import TokenIds, Vectors


# --- supervisor -> worker ---------------------------------------------------------------


@dataclass(frozen=True)
class Embed:
    task_id: int
    sequences: tuple[TokenIds, ...]
    #: Per sequence, its prompt's length in tokens; None when no sequence has a prompt.
    prompt_lengths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Leave:
    reason: str  # "scale-down", "recycle", "shutdown"


# --- worker -> supervisor ---------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    worker_id: int
    pid: int
    dim: int
    rss: int  # bytes, after the engine is loaded


@dataclass(frozen=True)
class StartFailed:
    worker_id: int
    pid: int
    error: str  # repr of the exception
    traceback: str  # formatted in the worker, so the parent shows the worker's own frames


@dataclass(frozen=True)
class Result:
    task_id: int
    vectors: Vectors  # (len(sequences), dim) float32
    seconds: float  # time spent in engine.embed
    rss: int  # bytes after the batch (after gc when above the worker's gc bound)


@dataclass(frozen=True)
class TaskFailed:
    task_id: int
    error: str
    traceback: str
    kind: str  # faults.engine_error_kind of the exception: engine_error or device_oom


@dataclass(frozen=True)
class Leaving:
    worker_id: int
    reason: str


ToWorker = Embed | Leave
FromWorker = Ready | StartFailed | Result | TaskFailed | Leaving
