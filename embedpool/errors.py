"""Every exception embedpool raises on purpose.

    EmbedpoolError                       base of all of them
    ├── ConfigError (ValueError)         a bad option or EMBEDPOOL_* variable; names it and its value
    │   └── MissingExtraError (ImportError) an optional extra is not installed; names the pip command
    ├── ModelError                       a model cannot be resolved, verified or loaded
    │   ├── ModelNotFoundError (FileNotFoundError)  lists the sources tried and how to pass a directory
    │   └── ModelIntegrityError          a weights file whose sha256 is not the expected one
    ├── InputError (ValueError)          one bad input record: carries source, line number and id
    ├── JobFailedError                   --strict and bad input, or nothing could be embedded
    ├── CacheError                       the cache file is unreadable or corrupt; names path and --rebuild
    └── PoolError
        ├── WorkerStartError             a worker died while loading its engine; carries its traceback
        ├── PoolBroken (concurrent.futures.process.BrokenProcessPool)
        │   │                            the pool cannot go on (no worker can be started)
        │   └── DeviceLost               its GPU was lost; the device executor moves to the CPU
        ├── IntakeClosed                 the executor is stopping: no new batches
        ├── PoisonInputError             an input kept killing workers; carries the item's id
        ├── QueueFull                    the server's batcher refused a request: sizes, Retry-After
        ├── PoolUnavailable              a request's batch could not be embedded (broken, closed, timeout)
        └── ItemFailed                   one input of a request could not be embedded; its index

Messages say what happened, the likely cause, what to do, and the data (pid, signal, sizes).
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool


class EmbedpoolError(Exception):
    """Base class of embedpool's own errors."""


class ConfigError(EmbedpoolError, ValueError):
    """A bad option value or EMBEDPOOL_* environment variable."""


class ModelError(EmbedpoolError):
    """A model could not be resolved, verified or loaded."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No source had the model."""


class ModelIntegrityError(ModelError):
    """A weights file's checksum does not match."""


class InputError(EmbedpoolError, ValueError):
    """One bad input record."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None,
                 item_id: str | None = None) -> None:
        where = source
        if line is not None:
            where = f"{source}:{line}" if source else f"line {line}"
        ident = f" (id {item_id!r})" if item_id is not None else ""
        super().__init__(f"{where}{ident}: {message}" if where else f"{message}{ident}")
        self.source = source
        self.line = line
        self.item_id = item_id
        self.reason = message


class JobFailedError(EmbedpoolError):
    """The job as a whole failed (strict mode with bad input, or nothing embedded)."""


class CacheError(EmbedpoolError):
    """The cache database is unreadable or corrupt."""


class PoolError(EmbedpoolError):
    """Base class of worker-pool failures."""


class WorkerStartError(PoolError):
    """A worker failed while loading its engine."""


class PoolBroken(PoolError, BrokenProcessPool):
    """The pool cannot make progress any more."""


class DeviceLost(PoolBroken):
    """A pool's GPU was lost (a sticky CUDA error): it cannot go on, but the CPU can."""


class WorkersCannotStart(PoolBroken):
    """No worker could be started any more, and none is alive (``faults.start_failure``)."""


class PoisonInputError(PoolError):
    """An input kept killing the workers that tried to embed it."""


class QueueFull(PoolError):
    """Admission refused: too many tokens queued. ``retry_after`` is in whole seconds."""

    def __init__(self, queued_tokens: int, request_tokens: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"server busy: {queued_tokens} tokens queued, this request needs {request_tokens}, "
            f"limit {limit}; retry after {retry_after} s")
        self.queued_tokens = queued_tokens
        self.request_tokens = request_tokens
        self.limit = limit
        self.retry_after = retry_after


class PoolUnavailable(PoolError):
    """The executor could not embed a batch of this request (broken, closed or timed out)."""


class ItemFailed(PoolError):
    """One input of a request could not be embedded (a poison input); ``index`` is its position."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"input {index} could not be embedded: {reason}")
        self.index = index
        self.reason = reason


class IntakeClosed(PoolError):
    """The executor is stopping and takes no new batches (those already submitted finish)."""


class MissingExtraError(ConfigError, ImportError):
    """An optional extra (``pip install 'embedpool[ray]'``) is not installed; names it."""
