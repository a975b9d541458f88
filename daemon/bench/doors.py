"""How a benchmark client reaches each contender: one streamed request in, one `Trace` out.

A door is thread-safe: the concurrency figures run one request per client thread through it.
Every time is `time.perf_counter()` on the client side: TTFT is send → first token as a client
sees it; the contender's own timings (edgellm's `done.timings`, llama-server's `timings`) come
along for the cross-check.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon.bench.processes import BenchError
from daemon.bench.stats import rate
from daemon.client import Client, ClientError


@dataclass(frozen=True)
class Ask:
    """One request, the same for every contender: a raw completion, greedy, seeded (a JSON schema
    and a temperature only for edgellm's constrained-output figures)."""

    prompt: str
    max_tokens: int
    seed: int
    json_schema: dict[str, Any] | None = None
    temperature: float = 0.0


@dataclass
class Trace:
    """One request as measured: client-side times plus what the contender reported itself."""

    sent: float
    done: float
    first_token: float | None = None
    last_token: float | None = None
    token_events: int = 0
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    reported_decode_tps: float | None = None  # the contender's own decode rate
    reported_prompt_tps: float | None = None  # prompt tokens it evaluated per second of prompt time
    text: str = ""

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.sent) * 1000.0

    @property
    def client_decode_tps(self) -> float | None:
        """Token events after the first over the time from the first to the last, as received."""
        if self.first_token is None or self.last_token is None or self.token_events < 2:
            return None
        return rate(self.token_events - 1, self.last_token - self.first_token)


class Door(Protocol):
    name: str

    def run(self, ask: Ask, timeout: float = 600.0) -> Trace: ...


def _edgellm_request(ask: Ask) -> dict[str, Any]:
    request = {"id": uuid.uuid4().hex, "prompt": ask.prompt, "raw": True, "max_tokens": ask.max_tokens,
               "temperature": ask.temperature, "seed": ask.seed, "stream": True}
    if ask.json_schema is not None:
        request["json_schema"] = ask.json_schema
    return request


def _edgellm_event(trace: Trace, event: dict[str, Any], at: float) -> bool:
    """Fold one edgellm event into the trace; True at the final event."""
    kind = event.get("event")
    if kind == "token":
        if trace.first_token is None:
            trace.first_token = at
        trace.last_token = at
        trace.token_events += 1
        return False
    if kind == "error":
        raise BenchError(f"edgellm answered {event.get('code')}: {event.get('message')}")
    if kind != "done":
        return False
    trace.done = at
    trace.text = str(event.get("text", ""))
    usage = event.get("usage") or {}
    timings = event.get("timings") or {}
    trace.completion_tokens = int(usage.get("completion_tokens") or 0)
    trace.prompt_tokens = usage.get("prompt_tokens")
    trace.cached_tokens = timings.get("cached_tokens")
    tps = timings.get("tokens_per_second")
    trace.reported_decode_tps = None if tps is None else float(tps)
    prompt_ms = timings.get("prompt_ms")
    if trace.prompt_tokens is not None and prompt_ms:
        evaluated = trace.prompt_tokens - int(trace.cached_tokens or 0)
        trace.reported_prompt_tps = rate(evaluated, float(prompt_ms) / 1000.0) if evaluated > 0 else None
    return True


class SocketDoor:
    """edgellm's Unix socket: a new connection per request (as `edgellm ask` does), opened before
    the clock starts."""

    def __init__(self, path: Path) -> None:
        self.name = "socket"
        self.path = path

    def run(self, ask: Ask, timeout: float = 600.0) -> Trace:
        request = _edgellm_request(ask)
        try:
            with Client(self.path, timeout=timeout) as client:
                trace = Trace(sent=time.perf_counter(), done=0.0)
                for event in client.request(request):
                    if _edgellm_event(trace, event, time.perf_counter()):
                        return trace
        except ClientError as exc:
            raise BenchError(f"socket {self.path}: {exc}") from exc
        raise BenchError("the daemon closed the connection before the final event")


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttDoor:
    """edgellm over MQTT 5: one client for the whole run, answers on its own inbox (Response Topic),
    events routed to the waiting request by id."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.name = "mqtt"
        self.prefix = prefix
        self.inbox = f"bench/{uuid.uuid4().hex[:12]}/inbox"
        self._waiting: dict[str, queue.Queue[tuple[float, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: subscribed.set()
        # Send small packets at once, as the daemon does: else a PUBACK can hold the next request back
        # until the broker's delayed ACK (about 40 ms).
        self._client.on_socket_open = _no_delay
        self._client.connect(host, port)
        self._client.loop_start()
        self._client.subscribe(self.inbox, qos=1)
        self._online = threading.Event()
        if not subscribed.wait(15):
            self.close()
            raise BenchError(f"could not subscribe at the broker {host}:{port}")

    def wait_online(self, timeout: float) -> None:
        """Until the daemon's retained availability says `online`: it subscribes to its request topic
        before it publishes that, so a request sent now is delivered."""
        self._client.subscribe(f"{self.prefix}/availability", qos=1)
        if not self._online.wait(timeout):
            raise BenchError(f"{self.prefix}/availability did not say online within {timeout:.0f} s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        at = time.perf_counter()
        if msg.topic == f"{self.prefix}/availability":
            if msg.payload == b"online":
                self._online.set()
            return
        try:
            event = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        with self._lock:
            inbox = self._waiting.get(str(event.get("id")))
        if inbox is not None:
            inbox.put((at, event))

    def run(self, ask: Ask, timeout: float = 600.0) -> Trace:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        request = _edgellm_request(ask)
        inbox: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        with self._lock:
            self._waiting[request["id"]] = inbox
        try:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.inbox
            trace = Trace(sent=time.perf_counter(), done=0.0)
            self._client.publish(f"{self.prefix}/request", json.dumps(request), qos=1, properties=props)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    at, event = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise BenchError(f"no answer over MQTT within {timeout:.0f} s") from None
                if _edgellm_event(trace, event, at):
                    return trace
        finally:
            with self._lock:
                self._waiting.pop(request["id"], None)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class LlamaServerDoor:
    """llama.cpp's server: POST /completion with `stream: true`, read its server-sent events."""

    def __init__(self, host: str, port: int) -> None:
        self.name = "llama-server"
        self.host = host
        self.port = port

    def run(self, ask: Ask, timeout: float = 600.0) -> Trace:
        body = json.dumps({"prompt": ask.prompt, "n_predict": ask.max_tokens, "temperature": 0, "seed": ask.seed,
                           "stream": True, "cache_prompt": True})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
            trace = Trace(sent=time.perf_counter(), done=0.0)
            conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise BenchError(f"llama-server answered HTTP {response.status}: {response.read()[:300]!r}")
            while True:
                line = response.readline()
                if not line:
                    raise BenchError("llama-server closed the stream before its final chunk")
                at = time.perf_counter()
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("content"):
                    if trace.first_token is None:
                        trace.first_token = at
                    trace.last_token = at
                    trace.token_events += 1
                    trace.text += str(chunk["content"])
                if chunk.get("stop"):
                    trace.done = at
                    timings = chunk.get("timings") or {}
                    trace.completion_tokens = int(timings.get("predicted_n") or chunk.get("tokens_predicted") or 0)
                    trace.prompt_tokens = chunk.get("tokens_evaluated")
                    trace.cached_tokens = timings.get("cache_n")
                    trace.reported_decode_tps = timings.get("predicted_per_second")
                    trace.reported_prompt_tps = timings.get("prompt_per_second") if timings.get("prompt_n") else None
                    return trace
        except OSError as exc:
            raise BenchError(f"llama-server at {self.host}:{self.port}: {exc}") from exc
        finally:
            conn.close()


class BareDoor:
    """llama-cpp-python's high-level API in this process (`Llama.create_completion`, streamed), as a
    program that embeds it would use it. One request at a time; its rates come from llama.cpp's own
    performance counters."""

    def __init__(self, llm: Any) -> None:
        self.name = "bare"
        self.llm = llm
        self._lock = threading.Lock()

    def run(self, ask: Ask, timeout: float = 600.0) -> Trace:
        import llama_cpp

        with self._lock:
            ctx = self.llm._ctx.ctx
            prompt_tokens = len(self.llm.tokenize(ask.prompt.encode("utf-8"), add_bos=True))
            llama_cpp.llama_perf_context_reset(ctx)
            trace = Trace(sent=time.perf_counter(), done=0.0, prompt_tokens=prompt_tokens)
            for chunk in self.llm.create_completion(ask.prompt, max_tokens=ask.max_tokens, temperature=0.0,
                                                    seed=ask.seed, stream=True):
                at = time.perf_counter()
                choice = chunk["choices"][0]
                if choice.get("finish_reason") is not None:
                    break  # the closing chunk carries no token
                trace.text += choice["text"]
                if trace.first_token is None:
                    trace.first_token = at
                trace.last_token = at
                trace.token_events += 1
            trace.done = time.perf_counter()
            trace.completion_tokens = trace.token_events
            perf = llama_cpp.llama_perf_context(ctx)
            trace.reported_prompt_tps = rate(perf.n_p_eval, perf.t_p_eval_ms / 1000.0) if perf.n_p_eval else None
            trace.reported_decode_tps = rate(perf.n_eval, perf.t_eval_ms / 1000.0) if perf.n_eval else None
            return trace
