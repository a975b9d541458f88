"""The `json` of a constrained request's `done` event, added on the way to every door.

A `Backend` that wraps the worker: for a request with a grammar, the sink it hands on turns the
final `done` into one carrying the parsed answer (`daemon.constraints.parse_answer`). Every other
event and every other request passes untouched. (Engine v2 can set it in the worker instead.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from daemon.constraints import parse_answer
from daemon.protocol import DoneEvent

if TYPE_CHECKING:
    from daemon.backend import Backend, Sink, StateListener, StatusProvider
    from daemon.config import GenerationConfig
    from daemon.protocol import Event, Origin, Request


class _JsonSink:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def emit(self, event: Event) -> None:
        if isinstance(event, DoneEvent):
            event = replace(event, constrained=True, json_value=parse_answer(event.text, event.finish_reason))
        self._sink.emit(event)


class JsonAnswers:
    """Backend decorator; lifecycle is the wrapped backend's."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def defaults(self) -> GenerationConfig:
        return self.inner.defaults

    def submit(self, request: Request, sink: Sink, origin: Origin) -> None:
        self.inner.submit(request, sink if request.grammar is None else _JsonSink(sink), origin)

    def cancel(self, request_id: str) -> bool:
        return self.inner.cancel(request_id)

    def status(self) -> dict[str, Any]:
        return self.inner.status()

    def add_status_section(self, name: str, provider: StatusProvider) -> None:
        self.inner.add_status_section(name, provider)

    def remove_status_section(self, name: str) -> None:
        self.inner.remove_status_section(name)

    def add_state_listener(self, listener: StateListener) -> None:
        self.inner.add_state_listener(listener)

    def remove_state_listener(self, listener: StateListener) -> None:
        self.inner.remove_state_listener(listener)

    def can_accept(self) -> bool:
        return self.inner.can_accept()
