"""Every exception embedpool raises on purpose.

    EmbedpoolError                       base of all of them
    ├── ConfigError (ValueError)         a bad option or EMBEDPOOL_* variable; names it and its value
    │   ├── MissingExtraError (ImportError) an optional extra is not installed; names the pip command
    │   ├── OptionError                  a refused call option (prompt, input_type, dimensions); its name
    │   └── DeviceError                  --device asks for what is not usable here; what is missing
    │       └── DeviceUnavailable        in a worker: ONNX Runtime's CUDA provider did not load
    ├── ModelError                       a model cannot be resolved, verified or loaded
    │   ├── ModelNotFoundError (FileNotFoundError)  lists the sources tried and how to pass a directory
    │   ├── ModelIntegrityError          a weights file whose sha256 is not the expected one
    │   └── BuildKilled                  the graph build's process died by a signal (an OOM kill)
    ├── InputError (ValueError)          one bad input record: carries source, line number and id
    ├── CacheError                       the cache file is unreadable or corrupt; names path and --rebuild
    └── PoolError
        ├── WorkerStartError             a worker died while loading its engine; carries its traceback
        ├── PoolBroken (concurrent.futures.process.BrokenProcessPool)
        │   │                            the pool cannot go on
        │   ├── DeviceLost               its GPU was lost; the device executor moves to the CPU
        │   └── WorkersCannotStart       no worker can be started and none is alive
        ├── IntakeClosed                 the executor is stopping: no new batches
        ├── QueueFull                    the server's batcher refused a request: sizes, Retry-After
        ├── PoolUnavailable              a request's batch could not be embedded (broken, closed, timeout)
        └── ItemFailed                   one input of a request could not be embedded; its index

Messages say what happened, the likely cause, what to do, and the data (pid, signal, sizes).
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from typing import Literal

#: What a DeviceError says is not there: the GPU package, the driver, or the device.
DeviceMissing = Literal["package", "driver", "device"]


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


class BuildKilled(ModelError):
    """The graph build's process died by a signal (most likely an OOM kill)."""


class OptionError(ConfigError):
    """A refused call option; ``param`` names it as the API spells it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class DeviceError(ConfigError):
    """``--device`` asks for a device that is not usable here; ``missing`` says what is not
    there: the package, the driver or the device (index out of range)."""

    def __init__(self, message: str, missing: DeviceMissing) -> None:
        super().__init__(message)
        self.missing = missing


class DeviceUnavailable(DeviceError):
    """Raised in a worker whose ONNX Runtime cannot run on the planned device (the CUDA
    provider does not load). ``auto`` falls back to the CPU on it; ``cuda`` reports it."""


class InputError(EmbedpoolError, ValueError):
    """One bad input record."""

    def __init__(
        self, message: str, *, source: str = "", line: int | None = None, item_id: str | None = None
    ) -> None:
        where = source
        if line is not None:
            where = f"{source}:{line}" if source else f"line {line}"
        ident = f" (id {item_id!r})" if item_id is not None else ""
        super().__init__(f"{where}{ident}: {message}" if where else f"{message}{ident}")
        self.source = source
        self.line = line
        self.item_id = item_id
        self.reason = message


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


class QueueFull(PoolError):
    """Admission refused: too many tokens queued. ``retry_after`` is in whole seconds."""

    def __init__(
        self, queued_tokens: int, request_tokens: int, limit: int, retry_after: int
    ) -> None:
        super().__init__(
            f"server busy: {queued_tokens} tokens queued, this request needs {request_tokens}, "
            f"limit {limit}; retry after {retry_after} s"
        )
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
