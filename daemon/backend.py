"""What a transport sees of the daemon: submit, cancel, status. Nothing about threads or models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from daemon.config import GenerationConfig
    from daemon.protocol import Event, Origin, Request


class Sink(Protocol):
    """Where a request's events go. `emit` must never block: it may run on the inference thread."""

    def emit(self, event: Event) -> None: ...


StatusProvider = Callable[[], dict[str, Any]]
StateListener = Callable[[dict[str, Any]], None]


class Backend(Protocol):
    """The daemon as every transport sees it.

    `submit` never raises for request-level problems: a full queue, a throttled governor or a
    duplicate id reach the sink as a final `ErrorEvent`. Every submitted request gets exactly one
    final event (`done` or `error`).
    """

    @property
    def defaults(self) -> GenerationConfig: ...

    def submit(self, request: Request, sink: Sink, origin: Origin) -> None: ...

    def cancel(self, request_id: str) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def add_status_section(self, name: str, provider: StatusProvider) -> None: ...

    def remove_status_section(self, name: str) -> None: ...

    def add_state_listener(self, listener: StateListener) -> None: ...

    def remove_state_listener(self, listener: StateListener) -> None: ...

    def can_accept(self) -> bool: ...

    def set_keep_alive(self, seconds: float | None) -> None: ...
