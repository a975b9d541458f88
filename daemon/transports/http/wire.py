"""The HTTP door's plumbing without routes: the sink that carries a request's events to its handler,
the one mapping of errors to responses, and the NDJSON / server-sent-event framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from daemon.protocol import DoneEvent, EdgeError, ErrorEvent, Event, Origin, QueuedEvent, Request, TokenEvent
from daemon.transports.http import ollama, openai
from daemon.transports.http.common import UNAUTHORIZED, error_details, error_headers, http_status

if TYPE_CHECKING:
    from daemon.backend import Backend

log = structlog.get_logger(__name__)

NDJSON = "application/x-ndjson"


class Run:
    """One submitted request seen from a handler: `await next()` until the `DoneEvent`; an error
    event is raised as `EdgeError`. `close()` cancels it unless it finished (the client left)."""

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop, request: Request, origin: Origin) -> None:
        self.backend = backend
        self.loop = loop
        self.request = request
        self.started = time.monotonic()
        self.finished = False
        # Unbounded, yet bounded in practice: one request emits at most max_tokens + 2 events.
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        backend.submit(request, self, origin)

    def emit(self, event: Event) -> None:  # Sink: any thread, never blocks
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> TokenEvent | DoneEvent:
        while True:
            event = await self._events.get()
            if isinstance(event, QueuedEvent):
                continue
            if isinstance(event, ErrorEvent):
                self.finished = True
                raise EdgeError(event.code, event.message, retry_after_ms=event.retry_after_ms)
            if isinstance(event, DoneEvent):
                self.finished = True
            assert isinstance(event, (TokenEvent, DoneEvent))
            return event

    def elapsed_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            log.info("http.client_gone", id=self.request.id, cancelled=self.backend.cancel(self.request.id))


def api_of(request: web.Request) -> str:
    return "openai" if request.path.startswith("/v1/") else "ollama"


def error_response(api: str, exc: EdgeError) -> web.Response:
    details = error_details(exc.code, exc.message)
    if api == "openai":
        body: dict[str, Any] = openai.error_body(exc.code, exc.message, details)
    else:
        body = {"error": exc.message, "code": exc.code, **details}
    headers = error_headers(exc.code, exc.retry_after_ms)
    if exc.code == UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(body, status=http_status(exc.code), headers=headers)


def now() -> str:
    return ollama.iso(datetime.now(UTC))


def ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
