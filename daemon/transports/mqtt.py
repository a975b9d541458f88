"""The MQTT door: request/response over a broker, with no lost prompts.

Threads. paho's network thread only moves packets; every callback puts a small item on one
queue. One dispatcher thread (`mqtt-dispatch`) takes items off that queue and owns all the
state: requests in progress, the PUBACKs we owe, the journal, subscriptions, status. Sinks
(called on the inference thread) also just enqueue, so `emit` never blocks and no state is
shared between threads without the queue.

Delivery. Requests are subscribed with QoS 1 on a persistent session (MQTT 5 clean start false
+ session expiry, or 3.1.1 clean session false) under a stable client id, with manual acks. A
request is acknowledged only after its final event has been PUBACKed by the broker; for a
`done` answer the journal is written first. So:

  journal write → publish answer → broker PUBACK → PUBACK the request.

A crash before the journal write leaves the request at the broker: it is redelivered and
generated (its first generation never finished). A crash after it finds the answer in the
journal on redelivery: re-published, never generated twice.

Everything about names, routing and payload validation is in `daemon.mqtt_topics` (pure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon import homeassistant
from daemon.journal import Journal
from daemon.mqtt_topics import (
    Accepted,
    Backoff,
    Route,
    default_client_id,
    error_event,
    event_payload,
    fleet_hops,
    ha_prompt_request,
    handoff_user_properties,
    interpret_request,
    make_topics,
    parse_cancel,
    shared_filter,
    should_bounce,
)
from daemon.protocol import (
    Code,
    DoneEvent,
    EdgeError,
    ErrorEvent,
    Event,
    Origin,
    Request,
)

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import MqttConfig

log = structlog.get_logger(__name__)

JOURNAL_FILE = "mqtt-journal.sqlite3"
# Change-triggered status publishes are coalesced to at most one per this many seconds.
STATUS_MIN_INTERVAL_S = 1.0
# PUBACK reason 16: the broker took the message but no one subscribes to the topic.
NO_MATCHING_SUBSCRIBERS = 16
# A hand-off that reached no member (PUBACK 16: every member is full or leaving, so none is
# subscribed; the broker dropped it) is published again after a jittered backoff in these bounds.
HANDOFF_RETRY_MIN_S = 0.25
HANDOFF_RETRY_MAX_S = 2.0
# A running member that refused a fleet request gives the fleet this long to take it, then answers
# its refusal (the fleet has had no room all that time).
HANDOFF_GIVE_UP_S = 30.0
# Of `stop()`'s time, what the end needs: `offline` PUBACKed, DISCONNECT sent.
STOP_RESERVE_S = 1.0
# Of `stop()`'s time, what hand-offs get after the drain: a full peer needs a moment to make room.
STOP_HANDOFF_S = 4.0
# Keys of [mqtt] that a SIGHUP applies without a new connection.
_LIVE_KEYS = frozenset(
    {
        "enabled", "status_interval_s", "max_payload_bytes", "offline_buffer", "journal_max_entries",
        "journal_max_age_s", "reconnect_min_s", "reconnect_max_s", "fleet", "homeassistant",
    }
)


@dataclass(frozen=True)
class _Source:
    """What we need to hand a fleet request back to the fleet: the message as it came."""

    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    expiry_s: int | None
    received_at: float
    user_properties: tuple[tuple[str, str], ...] = ()
    hops: int = 0


@dataclass(eq=False)
class _Pending:
    """One request id we are answering (or one rejected/replayed message we are answering).

    `acks` are the deliveries of this id we owe a PUBACK (mid → qos): the first one, plus every
    duplicate that arrived while it was in progress. They are all acknowledged when every
    publish of the final event has been PUBACKed by the broker.
    """

    request_id: str | None
    routes: list[Route]
    acks: dict[int, int] = field(default_factory=dict)
    request: Request | None = None
    stream: bool = False
    retain: bool = False
    fleet: bool = False
    source: _Source | None = None
    seq: int = 0
    final_payload: bytes | None = None
    outstanding: set[int] = field(default_factory=set)
    finalized: bool = False


@dataclass(eq=False)
class _Handoff:
    """A fleet request on its way back to the fleet. Our copy (`pending.acks`) is acknowledged only
    once the broker has PUBACKed the re-published one with a member to give it to."""

    pending: _Pending
    source: _Source
    hops: int
    # What to answer if the fleet cannot take it (a refusal); None for a leaving member's request,
    # which then stays unacknowledged in our session for our next start.
    fallback: dict[str, Any] | None
    started_at: float
    backoff: Backoff
    due: float | None = None


class _RequestSink:
    """The `Sink` the backend sees: hands every event to the dispatcher (never blocks)."""

    def __init__(self, transport: MqttTransport, pending: _Pending) -> None:
        self._transport = transport
        self._pending = pending

    def emit(self, event: Event) -> None:
        self._transport._post("event", self._pending, event)


@dataclass
class _Counters:
    received: int = 0
    answered: int = 0
    rejected: int = 0
    replayed: int = 0
    duplicates: int = 0
    handed_off: int = 0
    bounced: int = 0
    left_for_redelivery: int = 0
    tokens_dropped: int = 0
    answers_dropped: int = 0
    reconnects: int = 0
    connects: int = 0


class MqttTransport:
    """Lifecycle: `start()` (returns at once; connects in the background, so the daemon serves
    the socket while the broker is down), `reconfigure(cfg)` on SIGHUP, `stop(drain)`."""

    def __init__(
        self,
        cfg: MqttConfig,
        backend: Backend,
        *,
        state_dir: Path,
        version: str,
        hostname: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.state_dir = state_dir
        self.version = version
        self._hostname = hostname or socket.gethostname()
        self._clock = clock
        self.topics = make_topics(cfg.node_id, cfg.prefix, self._hostname)
        self.client_id = cfg.client_id or default_client_id(self.topics.node_id)
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client: paho.Client | None = None
        self._journal: Journal | None = None
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.counters = _Counters()
        # Dispatcher-owned state.
        self._pending: dict[str, _Pending] = {}
        self._publish_mids: dict[int, _Pending] = {}
        self._handoff_mids: dict[int, _Handoff] = {}
        self._handoffs_waiting: list[_Handoff] = []
        self._buffered_mids: set[int] = set()
        self._subscribed: set[str] = set()
        self._accepting = True
        self._stopping = False
        self._status_dirty = True
        self._last_status: dict[str, Any] | None = None
        self._last_status_at = -1e9
        self._discovered_model: str | None = None
        self._offline_mid: int | None = None
        self._offline_published = threading.Event()
        # Read from other threads (status section); plain values, written by the dispatcher.
        self._connected = False
        self._setup_error: str | None = None
        self._journal_entries = 0
        self._idle = threading.Event()
        self._idle.set()

    # --- lifecycle (called by the service) -------------------------------------------------

    def start(self) -> None:
        self._journal = self._open_journal()
        self.backend.add_status_section("mqtt", self.status_section)
        self.backend.add_state_listener(self._on_backend_state)
        self._thread = threading.Thread(target=self._dispatch_forever, name="mqtt-dispatch", daemon=True)
        self._thread.start()
        self._start_client(self.cfg)

    def _open_journal(self) -> Journal | None:
        try:
            journal = Journal(
                self.state_dir / JOURNAL_FILE,
                max_entries=self.cfg.journal_max_entries,
                max_age_s=self.cfg.journal_max_age_s,
            )
            self._journal_entries = journal.count()
        except (sqlite3.Error, OSError) as exc:
            # Serve anyway: without the journal a redelivered request is generated again.
            log.error("mqtt.journal_unavailable", path=str(self.state_dir / JOURNAL_FILE), error=str(exc))
            return None
        return journal

    def _start_client(self, cfg: MqttConfig) -> None:
        """Build and connect the paho client. A broken setting (unreadable password file, bad TLS
        files) is logged and shown in status; the daemon keeps serving the socket, and a reload
        with a fixed config tries again."""
        try:
            if not cfg.host:
                raise ValueError("mqtt.host is empty")
            client = self._make_client(cfg)
        except (OSError, ValueError) as exc:
            self._client = None
            self._setup_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "mqtt.setup_failed", error=self._setup_error,
                hint="check mqtt.host, mqtt.password_file and mqtt.tls.* in the config, then reload",
            )
            return
        self._setup_error = None
        self._client = client
        self._connect(client, cfg)
        log.info(
            "mqtt.starting", broker=self._broker_name(cfg), client_id=self.client_id, prefix=self.topics.prefix,
            protocol=cfg.protocol, fleet=cfg.fleet.enabled,
        )

    def stop(self, drain: bool = True, timeout_s: float = 10.0) -> None:
        """Leave the fleet, stop taking requests, let answers in flight reach the broker (when
        `drain`), hand every fleet request we hold and will not answer back to the fleet, publish
        `offline`, disconnect. Our own requests not answered stay at the broker, unacked, for the
        next start; so does a fleet request no member could take before the time ran out.

        The service stops the worker first, so queued and running requests have normally ended
        with `shutting_down` (and been handed off) by now. A generation that did not end in time is
        handed back here, and whatever it emits later is ignored: the fleet answers it, once."""
        if self._thread is None or self._stopping:
            return
        self._call(self._begin_stop)
        deadline = time.monotonic() + timeout_s
        end = deadline - min(STOP_RESERVE_S, timeout_s / 4)
        if drain:
            self._wait_idle(max(time.monotonic(), end - STOP_HANDOFF_S))
        self._call(self._hand_back_unfinished)
        if drain:
            self._wait_idle(end)
        self._call(self._give_up_handoffs)
        self._call(self._publish_offline)
        self._offline_published.wait(max(0.0, min(2.0, deadline - time.monotonic())))
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
        thread, self._thread = self._thread, None
        self._inbox.put(("quit",))
        thread.join(5.0)
        if self._journal is not None:
            self._journal.close()
        log.info("mqtt.stopped", inflight_left=len(self._pending))

    def _wait_idle(self, until: float) -> None:
        """Until every answer and hand-off is PUBACKed (or `until`, or the connection is gone)."""
        while time.monotonic() < until and self._connected and not self._idle.wait(0.05):
            pass

    def stop_accepting(self) -> None:
        """Start of a drain: leave the fleet and take no new requests (they stay at the broker)."""
        self._call(self._stop_accepting)

    def reconfigure(self, cfg: MqttConfig) -> None:
        """SIGHUP. Fleet, Home Assistant, limits and backoff change live; anything about the
        connection (broker, credentials, TLS, protocol, client id, prefix) reconnects."""
        self._call(lambda: self._reconfigure(cfg))

    def status_section(self) -> dict[str, Any]:
        """The `mqtt` section of the daemon status (any thread; reads plain values only)."""
        c = self.counters
        return {
            "connected": self._connected,
            "error": self._setup_error,
            "broker": self._broker_name(self.cfg),
            "client_id": self.client_id,
            "prefix": self.topics.prefix,
            "fleet": {
                "enabled": self.cfg.fleet.enabled,
                "member": shared_filter(self.cfg.fleet.group, self.cfg.fleet.topic) in self._subscribed,
            },
            "inflight": len(self._pending),
            "offline_buffered": len(self._buffered_mids),
            "offline_buffer": self.cfg.offline_buffer,
            "journal_entries": self._journal_entries,
            **dataclasses.asdict(c),
        }

    # --- plumbing ----------------------------------------------------------------------------

    def _post(self, kind: str, *args: Any) -> None:
        if self._thread is None and kind != "quit":
            return  # stopped: nobody would read it (a removed transport's listener must not leak)
        self._inbox.put((kind, *args))

    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run `fn` on the dispatcher and wait for it (so the caller sees its effect)."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        self._post("call", fn, done)
        done.wait(timeout)

    def _dispatch_forever(self) -> None:
        while True:
            timeout = self._next_tick_in()
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = ("tick",)
            kind = item[0]
            if kind == "quit":
                return
            try:
                self._handle(item)
            except Exception:
                # A bug in handling one item must not take the door down.
                log.exception("mqtt.dispatch_failed", item=kind)
            # Before a caller wakes: `stop()` reads `_idle` right after its call returns.
            self._idle_check()
            if kind == "call":
                item[2].set()

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind in ("message", "published", "connected", "disconnected") and item[1] is not self._client:
            # From a client replaced by a reload: its acks and mids mean nothing to the new one.
            pass
        elif kind == "message":
            self._on_message_item(item[2])
        elif kind == "event":
            self._on_event(item[1], item[2])
        elif kind == "published":
            self._on_published(item[2], item[3])
        elif kind == "connected":
            self._on_connected(item[2])
        elif kind == "disconnected":
            self._on_disconnected(item[2])
        elif kind == "state":
            self._on_state(item[1])
        elif kind == "call":
            item[1]()
        self._retry_due_handoffs()
        self._maybe_publish_status()

    def _next_tick_in(self) -> float:
        now = self._clock()
        due = self._last_status_at + (STATUS_MIN_INTERVAL_S if self._status_dirty else self.cfg.status_interval_s)
        for handoff in self._handoffs_waiting:
            if handoff.due is not None:
                due = min(due, handoff.due)
        return max(0.05, min(due - now, self.cfg.status_interval_s))

    def _idle_check(self) -> None:
        busy = (
            any(p.outstanding or not p.finalized for p in self._pending.values())
            or bool(self._handoff_mids)
            or bool(self._handoffs_waiting)
        )
        if busy:
            self._idle.clear()
        else:
            self._idle.set()

    # --- paho client -------------------------------------------------------------------------

    @staticmethod
    def _broker_name(cfg: MqttConfig) -> str:
        return f"unix:{cfg.host}" if cfg.transport == "unix" else f"{cfg.host}:{cfg.port}"

    def _make_client(self, cfg: MqttConfig) -> paho.Client:
        v5 = cfg.protocol == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            transport="unix" if cfg.transport == "unix" else "tcp",
            reconnect_on_failure=True,
            manual_ack=True,
        )
        # An exception in one of our callbacks must never end paho's network thread.
        client.suppress_exceptions = True
        if cfg.username:
            client.username_pw_set(cfg.username, _read_password(cfg.password_file))
        if cfg.tls.enabled:
            client.tls_set(
                ca_certs=cfg.tls.ca_file or None,
                certfile=cfg.tls.cert_file or None,
                keyfile=cfg.tls.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
            )
            if not cfg.tls.verify:
                client.tls_insecure_set(True)
        client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_socket_open = _disable_nagle
        return client

    def _connect(self, client: paho.Client, cfg: MqttConfig) -> None:
        host = cfg.host
        port = cfg.port if cfg.transport != "unix" else 1
        if cfg.protocol == "5":
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            client.connect_async(host, port, keepalive=cfg.keepalive_s, clean_start=False, properties=props)
        else:
            client.connect_async(host, port, keepalive=cfg.keepalive_s)
        client.loop_start()

    # paho callbacks: network thread. They only enqueue (and pick the next reconnect delay,
    # which paho reads on this same thread right after).

    def _cb_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_refused", reason=str(reason), broker=self._broker_name(self.cfg))
            return
        self._post("connected", client, bool(flags.session_present))

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        delay = self._backoff.next_delay()
        _set_next_reconnect_delay(client, delay)
        log.info("mqtt.connect_failed", broker=self._broker_name(self.cfg), retry_in_s=round(delay, 2))

    def _cb_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if not self._stopping:
            _set_next_reconnect_delay(client, self._backoff.next_delay())
        self._post("disconnected", client, str(reason))

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._post("message", client, msg)

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        self._post("published", client, mid, reason)

    def _cb_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("mqtt.subscribe_refused", reasons=refused, hint="check the broker ACL for this client")

    # --- connection state (dispatcher) -------------------------------------------------------

    def _on_connected(self, session_present: bool) -> None:
        self._connected = True
        self._backoff.reset()
        self.counters.connects += 1
        if self.counters.connects > 1:
            self.counters.reconnects += 1
        if not session_present:
            # A new session: PUBACKs owed to the old one would now acknowledge unrelated messages.
            for pending in self._pending.values():
                pending.acks.clear()
            for handoff in [*self._handoff_mids.values(), *self._handoffs_waiting]:
                handoff.pending.acks.clear()
            self._subscribed.clear()
        log.info(
            "mqtt.connected", broker=self._broker_name(self.cfg), session_present=session_present,
            reconnects=self.counters.reconnects, buffered=len(self._buffered_mids),
        )
        self._sync_subscriptions()
        self._publish_raw(self.topics.availability, b"online", retain=True)
        self._status_dirty = True
        self._last_status = None
        if self.cfg.homeassistant.enabled:
            self._publish_discovery()

    def _on_disconnected(self, reason: str) -> None:
        was = self._connected
        self._connected = False
        if was and not self._stopping:
            log.warning("mqtt.disconnected", reason=reason, inflight=len(self._pending))

    def _wanted_subscriptions(self) -> set[str]:
        wanted = {self.topics.request, self.topics.cancel}
        if self.cfg.homeassistant.enabled:
            wanted |= {self.topics.ha_prompt, f"{self.cfg.homeassistant.prefix}/status"}
        if self.cfg.fleet.enabled and self._accepting and self.backend.can_accept():
            wanted.add(shared_filter(self.cfg.fleet.group, self.cfg.fleet.topic))
        return wanted

    def _sync_subscriptions(self) -> None:
        """Make the (persistent) session's subscriptions what we want now, including dropping
        filters an earlier run subscribed (the broker remembers them across restarts)."""
        client = self._client
        if client is None or not self._connected:
            return
        wanted = self._wanted_subscriptions()
        remembered = set(self._journal.get_meta("subscriptions") or []) if self._journal else set()
        stale = (remembered | self._subscribed) - wanted
        new = wanted - self._subscribed
        if stale:
            client.unsubscribe(sorted(stale))
            log.info("mqtt.unsubscribed", filters=sorted(stale))
        if new:
            client.subscribe([(f, 1) for f in sorted(new)])
            log.info("mqtt.subscribed", filters=sorted(new))
        self._subscribed = wanted
        if self._journal is not None and remembered != wanted:
            self._journal.set_meta("subscriptions", sorted(wanted))

    # --- incoming messages (dispatcher) ------------------------------------------------------

    def _on_message_item(self, msg: paho.MQTTMessage) -> None:
        self.counters.received += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        try:
            if topic == self.topics.request:
                self._on_request(msg, fleet=False)
            elif self.cfg.fleet.enabled and topic == self.cfg.fleet.topic:
                self._on_request(msg, fleet=True)
            elif topic == self.topics.cancel:
                self._on_cancel(msg)
                self._ack(msg.mid, msg.qos)
            elif topic == self.topics.ha_prompt and self.cfg.homeassistant.enabled:
                self._on_ha_prompt(msg)
            elif topic == f"{self.cfg.homeassistant.prefix}/status":
                if msg.payload.strip() == b"online" and self.cfg.homeassistant.enabled:
                    log.info("mqtt.homeassistant_online", action="re-publishing discovery")
                    self._publish_discovery()
                self._ack(msg.mid, msg.qos)
            else:
                log.warning("mqtt.unexpected_topic", topic=topic)
                self._ack(msg.mid, msg.qos)
        except Exception as exc:
            log.exception("mqtt.message_failed", topic=topic)
            error = ErrorEvent(None, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            self._answer_once(None, [Route(self.topics.error)], error.to_dict(), msg)

    def _on_request(self, msg: paho.MQTTMessage, *, fleet: bool) -> None:
        props = msg.properties
        response_topic = _prop(props, "ResponseTopic")
        correlation = _prop(props, "CorrelationData")
        expiry = _prop(props, "MessageExpiryInterval")
        if not self._accepting:
            self._refuse_while_stopping(msg, fleet, response_topic, correlation, expiry)
            return
        decision = interpret_request(
            bytes(msg.payload),
            self.topics,
            self.backend.defaults,
            max_payload_bytes=self.cfg.max_payload_bytes,
            response_topic=response_topic if isinstance(response_topic, str) else None,
            correlation=bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None,
            expiry_s=expiry if isinstance(expiry, int) else None,
        )
        if not isinstance(decision, Accepted):
            self.counters.rejected += 1
            log.info(
                "mqtt.request_rejected", topic=msg.topic, code=decision.error.code, reason=decision.error.message,
                id=decision.error.id,
            )
            self._answer_once(decision.error.id, [decision.route], decision.error.to_dict(), msg)
            return
        request, route = decision.request, decision.route
        stored = self._journal_get(request.id)
        if stored is not None:
            self.counters.replayed += 1
            log.info("mqtt.request_replayed", id=request.id, dup=bool(msg.dup), to=route.topic)
            self._answer_once(request.id, [route], stored, msg)
            return
        existing = self._pending.get(request.id)
        if existing is not None:
            self._attach_duplicate(existing, msg, route)
            return
        pending = _Pending(
            request_id=request.id,
            routes=[route],
            request=request,
            stream=request.stream,
            fleet=fleet,
            source=self._source_of(msg, response_topic, correlation, expiry),
        )
        if msg.qos > 0:
            pending.acks[msg.mid] = msg.qos
        origin = Origin("mqtt", f"{'fleet' if fleet else 'topic'}={msg.topic} reply={route.topic}")
        self._submit(pending, request, origin)

    def _journal_get(self, request_id: str) -> dict[str, Any] | None:
        if self._journal is None:
            return None
        try:
            return self._journal.get(request_id)
        except Exception:
            log.exception("mqtt.journal_read_failed", id=request_id)
            return None

    def _submit(self, pending: _Pending, request: Request, origin: Origin) -> None:
        self._pending[request.id] = pending
        try:
            self.backend.submit(request, _RequestSink(self, pending), origin)
        except Exception as exc:  # the contract says submit never raises; a bug must not lose the answer
            log.exception("mqtt.submit_failed", id=request.id)
            error = ErrorEvent(request.id, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            self._on_event(pending, error)

    def _attach_duplicate(self, existing: _Pending, msg: paho.MQTTMessage, route: Route) -> None:
        """Same id while in progress: no second generation; its PUBACK waits for the first's answer."""
        self.counters.duplicates += 1
        log.info("mqtt.duplicate_in_progress", id=existing.request_id, dup=bool(msg.dup))
        if msg.qos > 0:
            existing.acks[msg.mid] = msg.qos
        if route not in existing.routes:
            existing.routes.append(route)
            if existing.finalized and existing.final_payload is not None:
                self._publish_final(existing, route, existing.final_payload)
        if existing.finalized and not existing.outstanding:
            self._complete(existing)

    def _refuse_while_stopping(
        self, msg: paho.MQTTMessage, fleet: bool, response_topic: Any, correlation: Any, expiry: Any
    ) -> None:
        """Shutting down: a fleet request goes back to the fleet; our own stays at the broker."""
        if fleet:
            pending = _Pending(request_id=None, routes=[], fleet=True, finalized=True)
            if msg.qos > 0:
                pending.acks[msg.mid] = msg.qos
            source = self._source_of(msg, response_topic, correlation, expiry)
            self._hand_off(pending, source, hops=source.hops, fallback=None)
        else:
            self.counters.left_for_redelivery += 1

    def _source_of(self, msg: paho.MQTTMessage, response_topic: Any, correlation: Any, expiry: Any) -> _Source:
        user = _prop(msg.properties, "UserProperty")
        user_properties = tuple((str(k), str(v)) for k, v in user) if isinstance(user, list) else ()
        return _Source(
            bytes(msg.payload),
            response_topic if isinstance(response_topic, str) else None,
            bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None,
            expiry if isinstance(expiry, int) else None,
            self._clock(),
            user_properties,
            fleet_hops(user_properties),
        )

    def _on_cancel(self, msg: paho.MQTTMessage) -> None:
        response_topic = _prop(msg.properties, "ResponseTopic")
        correlation = _prop(msg.properties, "CorrelationData")
        reply: dict[str, Any]
        try:
            request_id = parse_cancel(bytes(msg.payload))
        except EdgeError as exc:
            reply = error_event(exc, None).to_dict()
            topic = response_topic if isinstance(response_topic, str) else self.topics.error
        else:
            cancelled = self.backend.cancel(request_id)
            log.info("mqtt.cancel", id=request_id, cancelled=cancelled)
            if not isinstance(response_topic, str):
                return
            reply = {"event": "cancel", "id": request_id, "cancelled": cancelled}
            topic = response_topic
        corr = bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None
        self._publish_raw(topic, event_payload(reply), correlation=corr)

    def _on_ha_prompt(self, msg: paho.MQTTMessage) -> None:
        request_id = f"ha-{uuid.uuid4().hex[:16]}"
        route = Route(self.topics.ha_answer)
        try:
            request = ha_prompt_request(
                bytes(msg.payload), request_id, self.backend.defaults, self.cfg.max_payload_bytes
            )
        except EdgeError as exc:
            self._answer_once(request_id, [route], exc.to_event(request_id).to_dict(), msg, retain=True)
            return
        pending = _Pending(request_id=request_id, routes=[route], request=request, retain=True)
        if msg.qos > 0:
            pending.acks[msg.mid] = msg.qos
        self._submit(pending, request, Origin("mqtt", "homeassistant"))

    # --- events from the backend (dispatcher) ------------------------------------------------

    def _on_event(self, pending: _Pending, event: Event) -> None:
        if pending.finalized:
            return
        if not event.final:
            if not pending.stream:
                return
            pending.seq += 1
            if not self._connected:
                # Tokens are not buffered: the final answer carries the whole text, and `seq`
                # shows the client what it missed.
                self.counters.tokens_dropped += 1
                return
            payload = event_payload(event.to_dict(), pending.seq)
            for route in pending.routes:
                self._publish_raw(route.topic, payload, correlation=route.correlation)
            return
        pending.finalized = True
        if isinstance(event, ErrorEvent) and event.code == Code.SHUTTING_DOWN:
            self._not_answered_on_shutdown(pending)
            return
        client_saw_events = pending.seq > 0
        pending.seq += 1
        final = event.to_dict()
        if pending.stream or not pending.retain:
            final["seq"] = pending.seq
        if isinstance(event, ErrorEvent) and self._bounce(pending, event.code, final, client_saw_events):
            return
        if isinstance(event, DoneEvent) and pending.request_id is not None and self._journal is not None:
            try:
                self._journal.put(pending.request_id, final)
                self._journal_entries = self._journal.count()
            except Exception:
                # Without the record a redelivery would generate again; still answer now.
                log.exception("mqtt.journal_write_failed", id=pending.request_id)
        payload = event_payload(final)
        pending.final_payload = payload
        for route in pending.routes:
            self._publish_final(pending, route, payload)
        if not pending.outstanding:
            self._forget(pending)

    def _not_answered_on_shutdown(self, pending: _Pending) -> None:
        """`shutting_down` is not an answer for MQTT: the prompt must survive the restart."""
        if pending.fleet and pending.source is not None:
            self._hand_off(pending, pending.source, hops=pending.source.hops, fallback=None)
        else:
            self.counters.left_for_redelivery += 1
            log.info("mqtt.left_for_redelivery", id=pending.request_id)
            self._forget(pending)

    def _answer_once(
        self,
        request_id: str | None,
        routes: list[Route],
        event: dict[str, Any],
        msg: paho.MQTTMessage,
        *,
        retain: bool = False,
    ) -> None:
        """Publish one final event for a message that starts no generation (error, replay)."""
        pending = _Pending(request_id=None, routes=routes, retain=retain, finalized=True)
        if msg.qos > 0:
            pending.acks[msg.mid] = msg.qos
        payload = event_payload(event)
        pending.final_payload = payload
        # If nothing could be published (offline buffer full) the message stays unacked and the
        # broker redelivers it after the reconnect.
        for route in routes:
            self._publish_final(pending, route, payload)

    def _publish_final(self, pending: _Pending, route: Route, payload: bytes) -> None:
        client = self._client
        if client is None:
            return
        offline = not self._connected
        if offline and len(self._buffered_mids) >= self.cfg.offline_buffer:
            self.counters.answers_dropped += 1
            log.warning(
                "mqtt.answer_dropped", id=pending.request_id, reason="offline buffer full",
                offline_buffer=self.cfg.offline_buffer, redelivery="the request stays unacked at the broker",
            )
            return
        info = client.publish(
            route.topic, payload, qos=1, retain=pending.retain, properties=self._publish_props(route.correlation)
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.counters.answers_dropped += 1
            log.error("mqtt.publish_failed", id=pending.request_id, rc=int(info.rc))
            return
        if offline or info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._buffered_mids.add(info.mid)
        self._publish_mids[info.mid] = pending
        pending.outstanding.add(info.mid)

    def _on_published(self, mid: int, reason: ReasonCode | None) -> None:
        self._buffered_mids.discard(mid)
        if mid == self._offline_mid:
            self._offline_published.set()
            return
        handed = self._handoff_mids.pop(mid, None)
        if handed is not None:
            self._on_handoff_acked(handed, reason)
            return
        pending = self._publish_mids.pop(mid, None)
        if pending is None:
            return
        if reason is not None and reason.is_failure:
            # The broker refused our answer (usually its ACL). Retrying will not help: ack the request.
            log.error("mqtt.answer_refused_by_broker", id=pending.request_id, reason=str(reason))
        pending.outstanding.discard(mid)
        if pending.finalized and not pending.outstanding:
            self._complete(pending)

    def _complete(self, pending: _Pending) -> None:
        """Every publish of the final event is at the broker: acknowledge every delivery."""
        for mid, qos in pending.acks.items():
            self._ack(mid, qos)
        pending.acks.clear()
        if pending.request_id is not None and pending.request is not None:
            self.counters.answered += 1
        self._forget(pending)

    def _forget(self, pending: _Pending) -> None:
        if pending.request_id is not None and self._pending.get(pending.request_id) is pending:
            del self._pending[pending.request_id]
        self._status_dirty = True

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0 and self._client is not None:
            self._client.ack(mid, qos)

    # --- fleet ---------------------------------------------------------------------------------

    def _bounce(self, pending: _Pending, code: str, final: dict[str, Any], client_saw_events: bool) -> bool:
        """A fleet request this member refused for lack of room (queue full, governor) goes back to
        the fleet with its hop count raised, so a peer with room answers it; `final` is answered
        only when the fleet has refused it `FLEET_MAX_HOPS` times or cannot take it at all."""
        source = pending.source
        if not pending.fleet or source is None:
            return False
        if not should_bounce(code, source.hops, client_saw_events=client_saw_events, v5=self.cfg.protocol == "5"):
            return False
        self.counters.bounced += 1
        log.info("mqtt.fleet_bounced", id=pending.request_id, code=code, hops=source.hops + 1)
        self._hand_off(pending, source, hops=source.hops + 1, fallback=final)
        return True

    def _hand_off(self, pending: _Pending, source: _Source, *, hops: int, fallback: dict[str, Any] | None) -> None:
        """Give a fleet request we will not answer back to the fleet: re-publish it to the fleet
        topic and acknowledge our copy once the broker has PUBACKed it with a member to deliver to.
        A leaving member is no longer subscribed, so a peer gets it; a full one is not either."""
        self._forget(pending)
        handoff = _Handoff(
            pending, source, hops, fallback, self._clock(), Backoff(HANDOFF_RETRY_MIN_S, HANDOFF_RETRY_MAX_S)
        )
        self._publish_handoff(handoff)

    def _publish_handoff(self, handoff: _Handoff) -> None:
        client = self._client
        if client is None:
            self._give_up(handoff, "no MQTT client")
            return
        source = handoff.source
        props = None
        if self.cfg.protocol == "5":
            props = _properties(PacketTypes.PUBLISH)
            if source.response_topic is not None:
                props.ResponseTopic = source.response_topic
            if source.correlation is not None:
                props.CorrelationData = source.correlation
            if source.expiry_s is not None:
                left = source.expiry_s - int(self._clock() - source.received_at)
                if left <= 0:
                    # Expired on its way back: the broker would discard it unanswered too.
                    log.info("mqtt.handoff_expired", id=handoff.pending.request_id)
                    self._acknowledge(handoff.pending)
                    return
                props.MessageExpiryInterval = left
            user_properties = handoff_user_properties(source.user_properties, handoff.hops)
            if user_properties:
                props.UserProperty = user_properties
        info = client.publish(self.cfg.fleet.topic, source.payload, qos=1, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("mqtt.handoff_publish_failed", id=handoff.pending.request_id, rc=int(info.rc))
            self._retry_handoff_later(handoff)
            return
        self._handoff_mids[info.mid] = handoff

    def _on_handoff_acked(self, handoff: _Handoff, reason: ReasonCode | None) -> None:
        request_id = handoff.pending.request_id
        if reason is not None and reason.value == NO_MATCHING_SUBSCRIBERS:
            # No member is subscribed right now (all full, or leaving) and the broker dropped the
            # copy: ours is still unacknowledged. Try again once a member may have made room.
            self._retry_handoff_later(handoff)
            return
        if reason is not None and reason.is_failure:
            # The broker refused it (usually its ACL): publishing it again will not help.
            log.error(
                "mqtt.handoff_refused_by_broker", id=request_id, reason=str(reason),
                hint=f"the daemon needs write access to {self.cfg.fleet.topic}",
            )
            self._give_up(handoff, str(reason))
            return
        self.counters.handed_off += 1
        log.info("mqtt.handed_off", id=request_id, topic=self.cfg.fleet.topic, hops=handoff.hops)
        self._acknowledge(handoff.pending)

    def _retry_handoff_later(self, handoff: _Handoff) -> None:
        now = self._clock()
        if handoff.fallback is not None and not self._stopping and now - handoff.started_at >= HANDOFF_GIVE_UP_S:
            self._give_up(handoff, f"no fleet member had room for {HANDOFF_GIVE_UP_S:.0f} s")
            return
        delay = handoff.backoff.next_delay()
        handoff.due = now + delay
        self._handoffs_waiting.append(handoff)
        if handoff.backoff.attempt == 1:
            log.info(
                "mqtt.handoff_waiting", id=handoff.pending.request_id, retry_in_s=round(delay, 2),
                reason="no fleet member is subscribed (all are full or leaving)",
            )

    def _retry_due_handoffs(self) -> None:
        if not self._handoffs_waiting:
            return
        now = self._clock()
        due = [h for h in self._handoffs_waiting if h.due is not None and h.due <= now]
        if not due:
            return
        self._handoffs_waiting = [h for h in self._handoffs_waiting if h not in due]
        for handoff in due:
            handoff.due = None
            self._publish_handoff(handoff)

    def _give_up(self, handoff: _Handoff, why: str) -> None:
        """The fleet cannot take it: answer the refusal we bounced it for; a leaving member's
        request (nothing to answer) stays unacknowledged in our session for our next start."""
        pending = handoff.pending
        if handoff.fallback is None:
            self.counters.left_for_redelivery += 1
            log.warning(
                "mqtt.handoff_failed", id=pending.request_id, reason=why,
                action="kept unacknowledged in our session for our next start",
            )
            return
        log.warning("mqtt.fleet_saturated", id=pending.request_id, reason=why, code=handoff.fallback.get("code"))
        payload = event_payload(handoff.fallback)
        pending.final_payload = payload
        # Acknowledged when every publish is PUBACKed (`_on_published`); if none could be
        # published (offline buffer full) it stays unacked and comes back after a reconnect.
        for route in pending.routes:
            self._publish_final(pending, route, payload)

    def _acknowledge(self, pending: _Pending) -> None:
        for mid, qos in pending.acks.items():
            self._ack(mid, qos)
        pending.acks.clear()

    def _hand_back_unfinished(self) -> None:
        """Stop, after the drain: a fleet request still generating (the worker did not end it in
        time) goes back to the fleet now; whatever it emits later is ignored (it is finalized)."""
        for pending in list(self._pending.values()):
            if pending.finalized or not pending.fleet or pending.source is None:
                continue
            pending.finalized = True
            log.info("mqtt.handing_back_unfinished", id=pending.request_id)
            self._hand_off(pending, pending.source, hops=pending.source.hops, fallback=None)

    def _give_up_handoffs(self) -> None:
        """Stop, time is up: hand-offs still waiting for a member stay in our session, unacked."""
        waiting, self._handoffs_waiting = self._handoffs_waiting, []
        for handoff in waiting:
            handoff.fallback = None
            self._give_up(handoff, "stopping: no fleet member had room in time")

    def _on_backend_state(self, status: dict[str, Any]) -> None:
        """State listener (inference or event-loop thread): hand it to the dispatcher."""
        self._post("state", status)

    def _on_state(self, status: dict[str, Any]) -> None:
        self._status_dirty = True
        if status.get("state") == "draining" and self._accepting:
            self._stop_accepting()
        model = status.get("model") or {}
        if self.cfg.homeassistant.enabled and self._connected and model.get("name") != self._discovered_model:
            self._publish_discovery()
        self._sync_fleet()

    def _sync_fleet(self) -> None:
        if not self.cfg.fleet.enabled and not any(f.startswith("$share/") for f in self._subscribed):
            return
        member = shared_filter(self.cfg.fleet.group, self.cfg.fleet.topic) in self._subscribed
        should = self.cfg.fleet.enabled and self._accepting and self.backend.can_accept()
        if member != should:
            log.info("mqtt.fleet_" + ("join" if should else "leave"), group=self.cfg.fleet.group)
            self._sync_subscriptions()

    def _stop_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        log.info("mqtt.stop_accepting", inflight=len(self._pending))
        self._sync_subscriptions()

    def _begin_stop(self) -> None:
        self._stop_accepting()
        self._stopping = True

    def _publish_offline(self) -> None:
        client = self._client
        if client is None or not self._connected:
            self._offline_published.set()
            return
        info = client.publish(self.topics.availability, b"offline", qos=1, retain=True)
        self._offline_mid = info.mid

    # --- status and discovery ------------------------------------------------------------------

    def _maybe_publish_status(self) -> None:
        if not self._connected or self._client is None:
            return
        now = self._clock()
        since = now - self._last_status_at
        if self._status_dirty and since >= STATUS_MIN_INTERVAL_S:
            status = self.backend.status()
            comparable = {k: v for k, v in status.items() if k != "uptime_s"}
            self._status_dirty = False
            if comparable == self._last_status and since < self.cfg.status_interval_s:
                return
            self._send_status(status, comparable, now)
        elif since >= self.cfg.status_interval_s:
            status = self.backend.status()
            self._send_status(status, {k: v for k, v in status.items() if k != "uptime_s"}, now)

    def _send_status(self, status: dict[str, Any], comparable: dict[str, Any], now: float) -> None:
        self._last_status = comparable
        self._last_status_at = now
        self._publish_raw(self.topics.status, event_payload(status), retain=True)

    def _publish_discovery(self) -> None:
        status = self.backend.status()
        model = (status.get("model") or {}).get("name")
        self._discovered_model = model
        for message in homeassistant.discovery_messages(
            self.cfg.homeassistant.prefix, self.topics, model, self.version
        ):
            self._publish_raw(message.topic, message.payload, retain=True)

    def _publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, correlation: bytes | None = None
    ) -> None:
        if self._client is None:
            return
        self._client.publish(topic, payload, qos=1, retain=retain, properties=self._publish_props(correlation))

    def _publish_props(self, correlation: bytes | None) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = _properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if correlation is not None:
            props.CorrelationData = correlation
        return props

    # --- reload --------------------------------------------------------------------------------

    def _reconfigure(self, cfg: MqttConfig) -> None:
        old = self.cfg
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(old, f.name)}
        if not changed:
            return
        self.cfg = cfg
        self._backoff.min_s, self._backoff.max_s = cfg.reconnect_min_s, max(cfg.reconnect_min_s, cfg.reconnect_max_s)
        if self._journal is not None:
            self._journal.set_limits(cfg.journal_max_entries, cfg.journal_max_age_s)
        log.info("mqtt.reconfigured", changed=sorted(changed))
        if changed - _LIVE_KEYS or self._client is None:
            self._reconnect_with(cfg, old)
            return
        if "homeassistant" in changed and self._connected:
            if old.homeassistant.enabled and (
                not cfg.homeassistant.enabled or old.homeassistant.prefix != cfg.homeassistant.prefix
            ):
                for message in homeassistant.removal_messages(old.homeassistant.prefix, self.topics):
                    self._publish_raw(message.topic, message.payload, retain=True)
            if cfg.homeassistant.enabled:
                self._publish_discovery()
        self._sync_subscriptions()
        self._status_dirty = True

    def _reconnect_with(self, cfg: MqttConfig, old: MqttConfig) -> None:
        """Connection settings changed: say `offline` on the old connection, open a new one, and
        re-publish the answers the old one had not got PUBACKs for."""
        old_client = self._client
        old_topics = self.topics
        if old_client is not None:
            if self._connected:
                old_client.publish(old_topics.availability, b"offline", qos=1, retain=True)
            old_client.disconnect()
            old_client.loop_stop()
        self._connected = False
        self.topics = make_topics(cfg.node_id, cfg.prefix, self._hostname)
        self.client_id = cfg.client_id or default_client_id(self.topics.node_id)
        self._subscribed.clear()
        unanswered = {id(p): p for p in self._publish_mids.values()}
        self._publish_mids.clear()
        self._buffered_mids.clear()
        # Hand-offs the old connection had not got PUBACKs for go out again on the new one.
        now = self._clock()
        for handoff in self._handoff_mids.values():
            handoff.due = now
            self._handoffs_waiting.append(handoff)
        self._handoff_mids.clear()
        self._start_client(cfg)
        for pending in unanswered.values():
            pending.outstanding.clear()
            if pending.final_payload is not None:
                for route in pending.routes:
                    self._publish_final(pending, route, pending.final_payload)
            if not pending.outstanding:
                self._forget(pending)


def _disable_nagle(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Small packets (a token, a PUBACK) must leave at once: with Nagle's algorithm each one can
    wait for the peer's delayed ACK, about 40 ms a hop on Linux."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


def _prop(props: Properties | None, name: str) -> Any:
    return None if props is None else getattr(props, name, None)


def _read_password(path: str) -> str | None:
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")


def _set_next_reconnect_delay(client: paho.Client, delay_s: float) -> None:
    """paho doubles its own delay without jitter; we compute each wait ourselves (`Backoff`)
    and hand it over as both bounds, so paho's next wait is exactly ours. paho types the
    bounds as int but only does float arithmetic with them."""
    with contextlib.suppress(Exception):
        client.reconnect_delay_set(min_delay=delay_s, max_delay=delay_s)  # type: ignore[arg-type]
