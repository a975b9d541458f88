"""The HTTP door: aiohttp on the daemon's event loop, serving the Ollama and OpenAI APIs.

A thin adapter: each call becomes one protocol `Request` submitted to the same `Backend` as the
socket's (same queue, limits, governor and logs). Events reach the handler through `Run`, a `Sink`
that hands them to the loop with `call_soon_threadsafe`. Errors are mapped once, in `_errors`:
an `EdgeError`'s code picks the status (common.http_status), the API picks the body shape. A client
that disconnects has its handler cancelled (aiohttp's handler_cancellation), which cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from daemon.protocol import Code, DoneEvent, EdgeError, Origin, Request, TokenEvent, parse_json_object
from daemon.transports.http import ollama, openai
from daemon.transports.http import tools as T
from daemon.transports.http.common import ROUTE_ERRORS, UNAUTHORIZED, Constraints, ServedModel, error_details
from daemon.transports.http.wire import NDJSON, Run, api_of, error_response, ndjson, now, sse
from daemon.transports.served import current_model

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import Config

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpDoor:
    """Lifecycle: `await start()`, `await stop()`; `await reconfigure(cfg)` on SIGHUP."""

    def __init__(self, cfg: Config, backend: Backend, loop: asyncio.AbstractEventLoop,
                 constraints: Constraints = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.loop = loop
        self.constraints = constraints  # issue 9's compiler; None: tool calls unenforced, no format
        self._key: bytes | None = None
        self._runner: web.AppRunner | None = None
        self._last_used = datetime.now(UTC)
        self.runs: set[Run] = set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        http = self.cfg.http
        self._key = read_api_key(http.api_key_file) if http.api_key_file else None
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=self.cfg.socket.max_request_bytes
        )
        self._routes(app)
        # handler_cancellation: a client that hangs up cancels its handler, and so its request.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, http.host, http.port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.backend.add_status_section("http", self._status)
        log.info("http.listening", host=http.host, port=http.port, auth=self._key is not None)

    def _status(self) -> dict[str, Any]:
        return {"host": self.cfg.http.host, "port": self.cfg.http.port, "auth": self._key is not None,
                "active": len(self.runs)}

    async def stop(self) -> None:
        if self._runner is not None:
            self.backend.remove_status_section("http")
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("http.stopped")

    async def reconfigure(self, cfg: Config) -> None:
        old, self.cfg = self.cfg, cfg
        if cfg.http != old.http or cfg.socket.max_request_bytes != old.socket.max_request_bytes:
            await self.stop()
            await self.start()

    def _routes(self, app: web.Application) -> None:
        add = app.router
        add.add_get("/", self.root)
        add.add_get("/api/version", self.version)
        add.add_get("/api/tags", self.tags)
        add.add_get("/api/ps", self.ps)
        add.add_post("/api/show", self.show)
        add.add_post("/api/pull", self.pull)
        add.add_post("/api/chat", self.ollama_chat)
        add.add_post("/api/generate", self.ollama_generate)
        add.add_get("/v1/models", self.openai_models)
        add.add_post("/v1/chat/completions", self.openai_chat)
        add.add_post("/v1/completions", self.openai_completions)

    # --- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes the API's own error shape, mapped from the protocol code once."""
        api = api_of(request)
        try:
            return await handler(request)
        except EdgeError as exc:
            log.info("request.rejected", transport="http", peer=request.remote, path=request.path,
                     code=exc.code, reason=exc.message)
            return error_response(api, exc)
        except web.HTTPRequestEntityTooLarge:
            limit = self.cfg.socket.max_request_bytes
            return error_response(api, EdgeError(Code.PAYLOAD_TOO_LARGE, f"request body larger than {limit} bytes"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = ROUTE_ERRORS.get(exc.status, Code.INVALID_REQUEST)
            return error_response(api, EdgeError(code, f"{exc.reason}: {request.method} {request.path}"))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug costs one request a 500, never the door
            log.exception("http.internal_error", path=request.path)
            return error_response(api, EdgeError(Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._key is not None and request.path != "/":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                log.warning("http.unauthorized", peer=request.remote, path=request.path)
                raise EdgeError(UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")
        return await handler(request)

    # --- shared ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return parse_json_object(await request.read())

    def served(self) -> ServedModel:
        return current_model(self.cfg, self.backend)

    def _origin(self, request: web.Request) -> Origin:
        return Origin("http", f"{request.remote or 'unknown'} {request.path}")

    def _start(self, request: web.Request, protocol_request: Request) -> Run:
        run = Run(self.backend, self.loop, protocol_request, self._origin(request))
        self.runs.add(run)
        return run

    def _end(self, run: Run) -> None:
        run.close()
        self.runs.discard(run)
        self._last_used = datetime.now(UTC)

    @staticmethod
    async def _stream(request: web.Request, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response

    # --- Ollama ----------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")  # what Ollama answers; clients probe it

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(ollama.version_reply())

    async def tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(ollama.tags_reply(self.served()))

    async def ps(self, request: web.Request) -> web.StreamResponse:
        expires = ollama.expires_at(self._last_used, float(self.backend.status()["engine"]["keep_alive_s"]))
        return web.json_response(ollama.ps_reply(self.served(), expires))

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        served = self.served()
        served.resolve(body.get("model") or body.get("name"))
        return web.json_response(ollama.show_reply(served))

    async def pull(self, request: web.Request) -> web.StreamResponse:
        from daemon.models import list_models, models_dirs

        body = await self._body(request)
        present = [p.entry.name for p in list_models(models_dirs(self.cfg.state_dir)) if p.path is not None]
        reply = ollama.pull_reply(body, self.served(), present)
        if body.get("stream", True) is False:
            return web.json_response(reply)
        return web.Response(body=ndjson(reply), content_type=NDJSON)

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        plan = ollama.chat_plan(await self._body(request), self.backend.defaults, self.served(),
                       self.constraints, self.cfg.limits)
        return await self._ollama(request, plan, chat=True)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        plan = ollama.generate_plan(await self._body(request), self.backend.defaults, self.served(),
                       self.constraints, self.cfg.limits)
        return await self._ollama(request, plan, chat=False)

    async def _ollama(self, request: web.Request, plan: ollama.Plan, chat: bool) -> web.StreamResponse:
        if plan.keep_alive_s is not None:
            self.backend.set_keep_alive(plan.keep_alive_s)  # as Ollama: the latest request's keep_alive rules
        if plan.request is None:
            reply = ollama.load_reply(plan.model, now(), chat)
            return web.Response(body=ndjson(reply), content_type=NDJSON) if plan.stream else web.json_response(reply)
        tools = plan.tools if plan.choice.mode != "none" else ()
        run = self._start(request, plan.request)
        try:
            event = await run.next()  # before any header: a refusal gets its own status
            if not plan.stream:
                while not isinstance(event, DoneEvent):
                    event = await run.next()
                call = T.parse_call(event.text, tools) if tools else None
                if chat:
                    reply = ollama.chat_final(plan.model, now(), event, run.elapsed_ns(),
                                              "" if call else event.text, [call] if call else [])
                else:
                    reply = ollama.generate_final(plan.model, now(), event, run.elapsed_ns(), event.text)
                return web.json_response(reply)
            line = ollama.chat_line if chat else ollama.generate_line
            splitter = T.ReplySplitter(tools)
            response = await self._stream(request, NDJSON)
            try:
                while isinstance(event, TokenEvent):
                    text = splitter.feed(event.text)
                    if text:
                        await response.write(ndjson(line(plan.model, now(), text)))
                    event = await run.next()
                rest, call = splitter.finish()
                if rest:
                    await response.write(ndjson(line(plan.model, now(), rest)))
                if chat:
                    final = ollama.chat_final(plan.model, now(), event, run.elapsed_ns(), "", [call] if call else [])
                else:
                    final = ollama.generate_final(plan.model, now(), event, run.elapsed_ns(), "")
                await response.write(ndjson(final))
            except EdgeError as exc:  # after the headers: the error goes in the stream, as Ollama does
                await response.write(ndjson({"error": exc.message, "code": exc.code}))
            await response.write_eof()
            return response
        finally:
            self._end(run)

    # --- OpenAI ----------------------------------------------------------------------------

    async def openai_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openai.models_reply(self.served()))

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        plan = openai.chat_plan(await self._body(request), self.backend.defaults, self.served(),
                       self.constraints, self.cfg.limits)
        return await self._openai(request, plan, chat=True)

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        plan = openai.completion_plan(await self._body(request), self.backend.defaults, self.served(), self.cfg.limits)
        return await self._openai(request, plan, chat=False)

    async def _openai(self, request: web.Request, plan: openai.Plan, chat: bool) -> web.StreamResponse:
        cid = openai.completion_id("chatcmpl" if chat else "cmpl")
        tools = plan.tools if plan.choice.mode != "none" else ()
        run = self._start(request, plan.request)
        try:
            event = await run.next()
            if not plan.stream:
                while not isinstance(event, DoneEvent):
                    event = await run.next()
                if not chat:
                    return web.json_response(openai.text_completion(cid, plan.model, event))
                call = T.parse_call(event.text, tools) if tools else None
                return web.json_response(openai.chat_completion(cid, plan.model, event, [call] if call else []))
            response = await self._stream(request, "text/event-stream")
            splitter = T.ReplySplitter(tools)
            try:
                if chat:
                    await response.write(sse(openai.chat_chunk(cid, plan.model, {"role": "assistant", "content": ""})))
                while isinstance(event, TokenEvent):
                    text = splitter.feed(event.text)
                    if text:
                        chunk = (openai.chat_chunk(cid, plan.model, {"content": text}) if chat
                                 else openai.text_chunk(cid, plan.model, text))
                        await response.write(sse(chunk))
                    event = await run.next()
                rest, call = splitter.finish()
                calls = [call] if call else []
                if chat:
                    if rest:
                        await response.write(sse(openai.chat_chunk(cid, plan.model, {"content": rest})))
                    if calls:
                        delta = {"tool_calls": [{"index": 0, **c} for c in T.openai_tool_calls(calls)]}
                        await response.write(sse(openai.chat_chunk(cid, plan.model, delta)))
                    final = openai.chat_chunk(cid, plan.model, {}, openai.finish_reason(event, calls))
                else:
                    final = openai.text_chunk(cid, plan.model, rest, openai.finish_reason(event, ()))
                await response.write(sse(final))
                if plan.include_usage:
                    await response.write(sse(openai.usage_chunk(cid, plan.model, event, chat)))
            except EdgeError as exc:
                details = error_details(exc.code, exc.message)
                await response.write(sse(openai.error_body(exc.code, exc.message, details)))
            await response.write(sse("[DONE]"))
            await response.write_eof()
            return response
        finally:
            self._end(run)


def read_api_key(path: str) -> bytes:
    """The key file's content, without a trailing newline; empty or unreadable is an error."""
    try:
        key = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise RuntimeError(f"http.api_key_file: cannot read {path}: {exc.strerror or exc}") from exc
    if not key.strip():
        raise RuntimeError(f"http.api_key_file: {path} is empty")
    return key
