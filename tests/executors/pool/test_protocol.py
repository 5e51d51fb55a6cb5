"""embedpool.executors.pool.protocol: the wire messages are frozen, pickle exactly (vectors too), and
importing them loads no numpy (the worker imports the protocol before limiting threads)."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import numpy as np
import pytest

from embedpool.executors.pool.protocol import (
    Embed,
    Leave,
    Leaving,
    Ready,
    Result,
    StartFailed,
    TaskFailed,
)

MESSAGES = [
    Embed(7, (np.array([101, 5, 102], dtype=np.int32), np.array([101, 102], dtype=np.int32))),
    Leave("scale-down"),
    Ready(1, 4242, 384, 90_000_000),
    StartFailed(1, 4242, "OSError('no model')", "Traceback ..."),
    Result(7, np.arange(6, dtype=np.float32).reshape(2, 3), 0.25, 91_000_000),
    TaskFailed(7, "ValueError('bad')", "Traceback ...", "engine_error"),
    Leaving(1, "recycle"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_messages_pickle_exactly_and_are_frozen(message: object) -> None:
    back = pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is type(message)
    for f in dataclasses.fields(message):  # type: ignore[arg-type]
        want, got = getattr(message, f.name), getattr(back, f.name)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype
        elif isinstance(want, tuple):
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w)
        else:
            assert got == want
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, dataclasses.fields(message)[0].name, None)  # type: ignore[arg-type]


def test_importing_the_protocol_loads_no_numpy() -> None:
    code = "import sys, embedpool.executors.pool.protocol; sys.exit('numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
