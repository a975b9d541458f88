"""The worker's state listeners (the MQTT door's retained status hangs on them): added, told every
change, removed when their door stops. The worker is not started: no model is needed."""

from __future__ import annotations

from typing import Any, NoReturn

import structlog

from daemon.config import Config
from daemon.worker import InferenceWorker


def _no_engine(*_args: Any) -> NoReturn:
    raise AssertionError("the worker is not started: no engine is built")


def test_a_removed_listener_hears_nothing_more_and_a_failing_one_does_not_stop_the_rest() -> None:
    worker = InferenceWorker(Config(), _no_engine, clock=lambda: 100.0)
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []

    def failing(_status: dict[str, Any]) -> None:
        raise RuntimeError("a door's bug")

    for listener in (failing, removed.append, kept.append):
        worker.add_state_listener(listener)
    with structlog.testing.capture_logs() as logs:
        worker.notify_listeners()
    assert len(kept) == len(removed) == 1 and kept[0]["state"] == "loading"
    assert [e["event"] for e in logs] == ["status.listener_failed"]

    worker.remove_state_listener(removed.append)
    worker.remove_state_listener(removed.append)  # a second removal (a door stopped twice) is harmless
    worker.remove_state_listener(failing)
    with structlog.testing.capture_logs() as logs:
        worker.notify_listeners()
    assert len(kept) == 2 and len(removed) == 1 and logs == []
