"""embedpool.events: event records and exit codes as people read them.

(``exit_name`` and ``make_event``'s refusal are also exercised in tests/executors/pool/test_pool.py, next
to the pool that emits them; the ``Emitter`` and the causes of death with the fault policy in
tests/test_faults.py.)"""

from __future__ import annotations

import json
import signal
import time

import pytest

from embedpool import events


def test_make_event_has_name_time_and_fields_and_is_json() -> None:
    before = time.time()
    event = events.make_event(events.RETRY, batch_id=3, items=8, reason="worker died")
    assert event["event"] == "retry" and before <= event["ts"] <= time.time()
    assert event["batch_id"] == 3 and event["reason"] == "worker died"
    assert json.loads(json.dumps(event)) == event


def test_every_name_is_unique_and_accepted() -> None:
    assert len(set(events.ALL_EVENTS)) == len(events.ALL_EVENTS)
    for name in events.ALL_EVENTS:
        assert events.make_event(name)["event"] == name


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="poison_item"):
        events.make_event("poison")


@pytest.mark.parametrize(
    ("exitcode", "name"),
    [(-signal.SIGKILL, "SIGKILL(-9)"), (-200, "signal 200(-200)"), (3, "exit 3")],
    ids=["sigkill", "unknown-signal", "exit-code"],
)
def test_exit_name(exitcode: int, name: str) -> None:
    assert events.exit_name(exitcode) == name
