"""The Wyoming door: a conversation ("handle") service for Home Assistant's Assist pipeline.

Built on the `wyoming` package's own server classes. `describe` is answered with an `info` carrying
one `handle` program; a `transcript` becomes one protocol request on the same `Backend` as every
other door, answered with `handled {text}`, or `not-handled {text}` with a sentence a person
understands when it is spoken (busy, too warm, ...). Pure parts (`info`, `request_for`,
`answer_for`) are separate from the asyncio wiring. Zeroconf announcement is optional.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__
from daemon.protocol import Code, DoneEvent, ErrorEvent, Event, Message, Origin, Request, new_request_id

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import Config, GenerationConfig

log = structlog.get_logger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
SYSTEM_PROMPT = (
    "You are a voice assistant in a home. Your answer is spoken aloud: reply in one or two short, "
    "plain sentences, without lists, markup or emoji."
)
# What a speaker says when no answer can be given, by protocol code.
SPOKEN = {
    Code.THROTTLED: "I'm too warm to think right now. Please ask me again in a minute.",
    Code.QUEUE_FULL: "I'm busy with other questions. Please ask me again in a moment.",
    Code.MEMORY_LOW: "I'm short of memory right now. Please ask me again shortly.",
    Code.MODEL_UNAVAILABLE: "My language model isn't loaded right now, so I can't answer.",
    Code.SHUTTING_DOWN: "I'm restarting. Please ask me again in a moment.",
    Code.DEADLINE_EXCEEDED: "That took me too long. Please try a shorter question.",
    Code.PROMPT_TOO_LONG: "That was too long for me. Please ask a shorter question.",
    Code.INVALID_REQUEST: "I didn't understand that request.",
}
GENERIC_FAILURE = "Sorry, something went wrong and I can't answer that."
NO_ANSWER = "Sorry, I don't have an answer to that."


def info(model_name: str, languages: list[str]) -> Any:
    """The `info` event: one handle program with the served model."""
    from wyoming.info import Attribution, HandleModel, HandleProgram, Info

    attribution = Attribution(name="edgellm", url="https://github.com/edgellm/edgellm")
    model = HandleModel(
        name=model_name, attribution=attribution, installed=True,
        description=f"{model_name}, a local language model served by edgellm", version=__version__,
        languages=languages,
    )
    program = HandleProgram(
        name="edgellm", attribution=attribution, installed=True,
        description="A local language model as a conversation agent", version=__version__,
        models=[model], supports_handled_streaming=False,
    )
    return Info(handle=[program])


def request_for(text: str, language: str | None, defaults: GenerationConfig) -> Request:
    """A transcript as a protocol request: the short spoken-answer system prompt and the text."""
    system = SYSTEM_PROMPT if not language else f"{SYSTEM_PROMPT} Reply in the language {language}."
    return Request(
        id=new_request_id(),
        messages=(Message("system", system), Message("user", text)),
        max_tokens=defaults.max_tokens,
        temperature=defaults.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        min_p=defaults.min_p,
        repeat_penalty=defaults.repeat_penalty,
        seed=defaults.seed if defaults.seed >= 0 else None,
    )


def answer_for(event: DoneEvent | ErrorEvent) -> tuple[bool, str]:
    """(handled?, the text to speak)."""
    if isinstance(event, ErrorEvent):
        return False, SPOKEN.get(event.code, GENERIC_FAILURE)
    text = event.text.strip()
    return (True, text) if text else (False, NO_ANSWER)


class _Answer:
    """The Sink of one transcript: resolves a future with the final event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[DoneEvent | ErrorEvent] = loop.create_future()

    def emit(self, event: Event) -> None:
        if isinstance(event, (DoneEvent, ErrorEvent)):
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._set, event)

    def _set(self, event: DoneEvent | ErrorEvent) -> None:
        if not self.future.done():
            self.future.set_result(event)


def _handler_class() -> type:
    from wyoming.asr import Transcript
    from wyoming.handle import Handled, NotHandled
    from wyoming.info import Describe
    from wyoming.server import AsyncEventHandler

    class Handler(AsyncEventHandler):
        def __init__(self, door: WyomingDoor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            super().__init__(reader, writer)
            self.door = door
            peer = writer.get_extra_info("peername")
            self.origin = Origin("wyoming", f"{peer[0]}:{peer[1]}" if peer else "unknown")
            self.active: str | None = None

        async def handle_event(self, event: Any) -> bool:
            if Describe.is_type(event.type):
                await self.write_event(info(self.door.model_name(), self.door.languages).event())
            elif Transcript.is_type(event.type):
                transcript = Transcript.from_event(event)
                handled, text = await self.answer(transcript.text, transcript.language)
                reply = Handled(text=text) if handled else NotHandled(text=text)
                await self.write_event(reply.event())
            return True

        async def answer(self, text: str, language: str | None) -> tuple[bool, str]:
            if not text or not text.strip():
                return False, SPOKEN[Code.INVALID_REQUEST]
            backend = self.door.backend
            request = request_for(text, language, backend.defaults)
            sink = _Answer(self.door.loop)
            self.active = request.id
            backend.submit(request, sink, self.origin)
            try:
                event = await sink.future
            finally:
                self.active = None
            handled, spoken = answer_for(event)
            if isinstance(event, ErrorEvent):
                log.info("wyoming.not_handled", id=request.id, code=event.code, reason=event.message)
            return handled, spoken

        async def disconnect(self) -> None:
            if self.active is not None:
                self.door.backend.cancel(self.active)
                log.info("wyoming.client_gone", id=self.active)

    return Handler


class WyomingDoor:
    """Lifecycle: `await start()`, `await stop()`; `await reconfigure(cfg)` on SIGHUP."""

    def __init__(self, cfg: Config, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.backend = backend
        self.loop = loop
        # No list: Home Assistant then offers the agent in every language's pipeline (an empty list
        # means "any" to its Wyoming integration); the model answers in the language it is asked in.
        self.languages: list[str] = []
        self._server: Any = None
        self._zeroconf: Any = None

    def model_name(self) -> str:
        from daemon.transports.served import current_model

        return current_model(self.cfg, self.backend).primary

    async def start(self) -> None:
        from wyoming.server import AsyncTcpServer

        cfg = self.cfg.wyoming
        handler = _handler_class()
        server = AsyncTcpServer(cfg.host, cfg.port)
        await server.start(lambda reader, writer: handler(self, reader, writer))
        self._server = server
        log.info("wyoming.listening", host=cfg.host, port=cfg.port)
        if cfg.zeroconf:
            self._zeroconf = await announce(cfg.host, cfg.port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            zc, self._zeroconf = self._zeroconf, None
            with contextlib.suppress(Exception):
                await zc.async_unregister_all_services()
            await zc.async_close()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()
            log.info("wyoming.stopped")

    async def reconfigure(self, cfg: Config) -> None:
        old, self.cfg = self.cfg, cfg
        if cfg.wyoming != old.wyoming:
            await self.stop()
            await self.start()


def announce_address(host: str) -> str:
    """The IPv4 address to announce: the bound one, or for 0.0.0.0 the one that routes to the LAN."""
    if host not in ("0.0.0.0", "", "::"):
        return socket.gethostbyname(host)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("224.0.0.251", 5353))  # connect() on UDP sends nothing; it picks the interface
        return str(probe.getsockname()[0])
    finally:
        probe.close()


async def announce(host: str, port: int) -> Any:
    """Register `_wyoming._tcp.local.` (the `zeroconf` extra); returns the AsyncZeroconf to close."""
    try:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
    except ImportError as exc:
        raise RuntimeError(
            "wyoming.zeroconf = true needs the zeroconf package: pip install 'edgellm[zeroconf]'"
        ) from exc
    address = announce_address(host)
    name = f"edgellm-{socket.gethostname().split('.')[0]}"
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", addresses=[socket.inet_aton(address)], port=port,
        properties={"version": __version__}, server=f"{name}.local.",
    )
    # Announce on the interface that serves, only: a loopback-bound service stays on loopback.
    zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    await zc.async_register_service(info)
    log.info("wyoming.announced", service=info.name, address=address, port=port)
    return zc
