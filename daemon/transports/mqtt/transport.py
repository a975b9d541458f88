"""The MQTT door: wires the pure machines to paho, the journal and the backend.

Threads. paho's network thread only hands items to one bounded inbox (`client.py`); the backend's
sinks and state listeners do the same. One dispatcher thread (`mqtt-dispatch`) takes items off the
inbox and alone touches the state: the delivery ledger (`ledger.py`), the fleet hand-offs
(`fleet.py`), presence (`presence.py`), the journal and the subscriptions. Other threads read only
plain values for the status section. `start`, `stop`, `reconfigure` post calls to the dispatcher
and wait for them.

The inbox holds at most `INBOX_MAX` messages and `INBOX_MAX_BYTES` of payloads (a payload over
`mqtt.max_payload_bytes` was already dropped by the client). A message whose bytes do not fit
makes paho's network thread wait for room, up to `INBOX_WAIT_S`: paho reads no more meanwhile, so
the broker keeps the rest. (Not for the count: paho reads our answers' PUBACKs from the same
stream, behind everything the broker already sent, so waiting there stalls every answer; measured,
a 256-message bound made a flood's refusals arrive 107 s late. And the broker's in-flight window
does not hold a flood back: docs/mqtt.md, "Overload".) A message that does not fit, or still has
no room after the wait, is refused: logged, counted (`inbox_refused`),
and never acknowledged, so a QoS 1 message stays in our session at the broker; once the inbox has
drained to half, the transport drops the connection (paho reconnects at once to the same session;
at most once per `REDELIVERY_MIN_INTERVAL_S`) so the broker sends it again (docs/mqtt.md,
"Overload"). A refused QoS 0 message is gone, as QoS 0 allows. Backend events, PUBACKs and calls
always fit: they are bounded by the requests in progress, which the queue and the inbox bound.
Events the backend emits on the dispatcher itself (a refusal in `submit`) are handled right after
the message that caused them, not behind the inbox.
"""

from __future__ import annotations

import dataclasses
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import structlog

from daemon.protocol import DEFAULT_LIMITS, Code, EdgeError, ErrorEvent, Event, Limits, Origin, TokenEvent
from daemon.transports.mqtt import homeassistant
from daemon.transports.mqtt.client import (
    ClientItem,
    Connected,
    Disconnected,
    Inbound,
    MessageIn,
    PahoClient,
    PubAck,
    broker_name,
)
from daemon.transports.mqtt.fleet import (
    Fallback,
    Fleet,
    FleetCommand,
    Keep,
    PublishHandoff,
    Release,
    Source,
    Waiting,
)
from daemon.transports.mqtt.ledger import Ack, Command, Delivery, Entry, Ledger, Publish, Submit, WriteJournal
from daemon.transports.mqtt.presence import Message, Presence
from daemon.transports.mqtt.store import AnswerStore
from daemon.transports.mqtt.tasks import TaskDoor
from daemon.transports.mqtt.token_pacing import TokenPacing
from daemon.transports.mqtt.topics import (
    Accepted,
    Route,
    default_client_id,
    error_event,
    event_payload,
    fleet_hops,
    ha_prompt_request,
    interpret_request,
    make_destinations,
    make_topics,
    parse_cancel,
    payload_too_large,
    shared_filter,
    should_bounce,
)

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import MqttConfig
    from daemon.constraints import ConstraintCompiler
    from daemon.tasks import TaskRegistry

log = structlog.get_logger(__name__)

# The dispatcher's inbox: messages beyond this are refused (unacked, so the broker keeps them) ...
INBOX_MAX = 10_000
# ... and payload bytes beyond this (an empty inbox always takes one message, whatever its size).
INBOX_MAX_BYTES = 4 * 1024 * 1024
# A message whose bytes do not fit makes paho's network thread wait this long for room
# (backpressure: paho stops reading, the broker keeps the rest) before it is refused.
INBOX_WAIT_S = 2.0
# At most one reconnect-for-redelivery (of messages the full inbox refused) per this many seconds.
REDELIVERY_MIN_INTERVAL_S = 5.0
# How often answers the journal could not take are tried again.
JOURNAL_RETRY_S = 1.0
# Of `stop()`'s time, what the end needs: `offline` PUBACKed, DISCONNECT sent.
STOP_RESERVE_S = 1.0
# Of `stop()`'s time, what hand-offs get after the drain: a full peer needs a moment to make room.
STOP_HANDOFF_S = 4.0
# Keys of [mqtt] that a SIGHUP applies without a new connection.
_LIVE_KEYS = frozenset(
    {
        "enabled", "status_interval_s", "max_payload_bytes", "offline_buffer", "journal_max_entries",
        "journal_max_age_s", "reconnect_min_s", "reconnect_max_s", "fleet", "homeassistant", "allow_reply_to",
        "token_interval_ms",
    }
)


@dataclass
class _Counters:
    received: int = 0
    rejected: int = 0
    inbox_refused: int = 0
    redelivery_reconnects: int = 0
    reconnects: int = 0
    connects: int = 0


@dataclass(frozen=True)
class _Gauges:
    """The ledger's sizes for the status section, replaced whole by the dispatcher after each item
    (the ledger itself is the dispatcher's alone)."""

    inflight: int = 0
    buffered: int = 0
    held: int = 0


@dataclass(frozen=True)
class _Work:
    """An item for the dispatcher that is not from the client: a backend event, a state, a call."""

    kind: str
    args: tuple[Any, ...]


class _Sink:
    """The `Sink` the backend sees: hands every event to the dispatcher (never blocks)."""

    def __init__(self, transport: MqttTransport, entry: Entry) -> None:
        self._transport = transport
        self._entry = entry

    def emit(self, event: Event) -> None:
        transport = self._transport
        if threading.current_thread() is transport._thread:
            # Emitted by `submit`/`cancel` on the dispatcher itself (a refusal such as
            # `queue_full`, `queued`): handled as soon as the current item is, not behind the
            # whole inbox, so a flood's refusals are answered while their requests are in hand.
            transport._inline.append((self._entry, event))
            return
        transport._post(_Work("event", (self._entry, event)), must=True)


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
        model_name: str | None = None,
        limits: Callable[[], Limits] | None = None,
        constraints: ConstraintCompiler | None = None,
        tasks: TaskRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self._limits = limits or (lambda: DEFAULT_LIMITS)  # [limits], live across SIGHUP
        self._constraints = constraints  # compiles format/json_schema/grammar; None refuses them
        self.state_dir = state_dir
        self.version = version
        self._hostname = hostname or socket.gethostname()
        self._clock = clock
        self.topics = make_topics(cfg.node_id, cfg.prefix, self._hostname)
        self.client_id = cfg.client_id or default_client_id(self.topics.node_id)
        # Unbounded here (`_post` bounds it); a SimpleQueue is C code, a third of Queue's cost per item.
        self._inbox: queue.SimpleQueue[ClientItem | _Work] = queue.SimpleQueue()
        self._inbox_size = 0
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self._inbox_messages = 0  # of `_inbox_size`, messages from the broker (the bounded kind)
        self._room = threading.Condition(self._inbox_lock)  # signalled when a message leaves the inbox
        # Events the backend emitted on the dispatcher thread, handled right after the current item.
        self._inline: deque[tuple[Entry, Event]] = deque()
        self._redeliver_wanted = False  # a refused QoS 1 message waits in our session at the broker
        self._last_redelivery = -1e9
        self._thread: threading.Thread | None = None
        self._client: PahoClient | None = None
        self.store = AnswerStore(state_dir, max_entries=cfg.journal_max_entries, max_age_s=cfg.journal_max_age_s)
        self.counters = _Counters()
        # Dispatcher-owned state.
        self.ledger = Ledger(cfg.offline_buffer)
        self.tokens: TokenPacing[Entry] = TokenPacing(cfg.token_interval_ms / 1000)
        self.fleet = Fleet()
        self.presence = Presence(
            self.topics, version=version, model_name=model_name, status_interval_s=cfg.status_interval_s,
            ha_enabled=cfg.homeassistant.enabled, ha_prefix=cfg.homeassistant.prefix,
        )
        self._destinations = self._make_destinations(cfg)
        self.task_door = TaskDoor(self, tasks)  # task topics and triggers (tasks.py)
        # Entries the fleet machine holds (its keys), and where each fleet request came from.
        self._handing_off: set[Entry] = set()
        self._sources: dict[Entry, Source] = {}
        self._mids: dict[int, tuple[str, int]] = {}  # paho mid → ("ledger" | "fleet", ref)
        self._subscribed: set[str] = set()
        self._accepting = True
        self._stopping = False
        self._last_words_mid: int | None = None
        self._last_words_sent = threading.Event()
        self._journal_retry_at: float | None = None
        # Read from other threads (status section); plain values, written by the dispatcher.
        self._connected = False
        self._setup_error: str | None = None
        self._gauges = _Gauges()
        self._idle = threading.Event()
        self._idle.set()

    # --- lifecycle (called by the service) -------------------------------------------------

    def start(self) -> None:
        self.store.open()
        self.backend.add_status_section("mqtt", self.status_section)
        self.backend.add_state_listener(self._on_backend_state)
        self._thread = threading.Thread(target=self._dispatch_forever, name="mqtt-dispatch", daemon=True)
        self._thread.start()
        self._call(lambda: self._start_client(self.cfg))

    def stop(self, drain: bool = True, timeout_s: float = 10.0) -> None:
        """Leave the fleet, stop taking requests, let answers in flight reach the broker (when
        `drain`), hand every fleet request we hold and will not answer back to the fleet, publish
        `offline` and the final status, disconnect. Our own requests not answered stay at the
        broker, unacked, for the next start; so does a fleet request no member could take in time.

        The service stops the worker first, so queued and running requests have normally ended
        with `shutting_down` (and been handed off) by now. A generation that did not end in time is
        handed back here, and whatever it emits later is ignored: the fleet answers it, once."""
        if self._thread is None or self._stopping:
            return
        # Whatever happens below, this transport no longer feeds the daemon's status or listens.
        self.backend.remove_state_listener(self._on_backend_state)
        self._call(self._begin_stop)
        deadline = time.monotonic() + timeout_s
        end = deadline - min(STOP_RESERVE_S, timeout_s / 4)
        if drain:
            self._wait_idle(max(time.monotonic(), end - STOP_HANDOFF_S))
        self._call(self._hand_back_unfinished)
        if drain:
            self._wait_idle(end)
        self._call(lambda: self._fleet_run(self.fleet.give_up_waiting()))
        self._call(self._publish_last_words)
        self._last_words_sent.wait(max(0.0, min(2.0, deadline - time.monotonic())))
        client = self._client
        if client is not None:
            client.close()
        thread, self._thread = self._thread, None
        with self._room:
            self._room.notify_all()  # a message waiting for room gives up: nobody will read it
        self._inbox.put(_Work("quit", ()))
        thread.join(5.0)
        self.backend.remove_status_section("mqtt")
        self.store.close()
        log.info("mqtt.stopped", inflight_left=self.ledger.inflight)

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

    def tasks_changed(self) -> None:  # SIGHUP changed the tasks (tasks.py follows)
        self._call(self.task_door.reload)

    def post_call(self, fn: Callable[[], None]) -> None:  # run `fn` on the dispatcher soon; never blocks
        self._post(_Work("call", (fn, threading.Event())), must=True)

    def status_section(self) -> dict[str, Any]:
        """The `mqtt` section of the daemon status (any thread; reads plain values only)."""
        ledger, fleet = self.ledger.counters, self.fleet.counters
        return {
            "connected": self._connected,
            "error": self._setup_error,
            "broker": broker_name(self.cfg),
            "client_id": self.client_id,
            "prefix": self.topics.prefix,
            "fleet": {
                "enabled": self.cfg.fleet.enabled,
                "member": shared_filter(self.cfg.fleet.group, self.cfg.fleet.topic) in self._subscribed,
            },
            "inflight": self._gauges.inflight,
            "offline_buffered": self._gauges.buffered,
            "offline_buffer": self.cfg.offline_buffer,
            "journal_entries": self.store.entries,
            "journal": {"ok": self.store.error is None, "error": self.store.error, "held": self._gauges.held},
            "inbox": {
                "depth": self._inbox_size, "messages": self._inbox_messages, "max": INBOX_MAX,
                "bytes": self._inbox_bytes, "max_bytes": INBOX_MAX_BYTES,
            },
            **dataclasses.asdict(self.counters),
            **dataclasses.asdict(ledger),
            "handed_off": fleet.handed_off,
            "bounced": fleet.bounced,
        }

    # --- plumbing ----------------------------------------------------------------------------

    def _post(self, item: ClientItem | _Work, *, must: bool = False) -> bool:
        """Hand an item to the dispatcher. A client message whose bytes do not fit waits up to
        `INBOX_WAIT_S` for room (only paho's network thread posts them, so paho reads no more
        meanwhile); one that still does not fit, or finds `INBOX_MAX` messages, is refused."""
        if self._thread is None and not (isinstance(item, _Work) and item.kind == "quit"):
            return False  # stopped: nobody would read it (a removed transport's listener must not leak)
        bounded = isinstance(item, MessageIn) and not must
        size = len(item.message.payload) if isinstance(item, MessageIn) else 0
        with self._room:
            if bounded and self._inbox_messages < INBOX_MAX and not self._has_room(size):
                self._room.wait_for(
                    lambda: self._thread is None or self._has_room(size), timeout=INBOX_WAIT_S
                )
            if bounded and not self._has_room(size):
                self.counters.inbox_refused += 1
                refused = self.counters.inbox_refused
                self._redeliver_wanted = self._redeliver_wanted or item.message.qos > 0  # type: ignore[union-attr]
            else:
                self._inbox_size += 1
                if isinstance(item, MessageIn):
                    self._inbox_messages += 1
                    self._inbox_bytes += size
                refused = 0
        if refused:
            if refused == 1 or refused % 100 == 0:
                log.warning(
                    "mqtt.inbox_full", refused=refused, max=INBOX_MAX, max_bytes=INBOX_MAX_BYTES,
                    topic=item.message.topic,  # type: ignore[union-attr]
                    action="not acknowledged: the broker keeps a QoS 1 message and sends it again after a reconnect",
                )
            return False
        self._inbox.put(item)
        return True

    def _has_room(self, size: int) -> bool:
        """Under `_room`: may a message of `size` payload bytes join the inbox? (An empty inbox
        always takes one, whatever its size: `mqtt.max_payload_bytes` bounds that.)"""
        if self._inbox_messages >= INBOX_MAX:
            return False
        return self._inbox_bytes == 0 or self._inbox_bytes + size <= INBOX_MAX_BYTES

    def _deliver(self, item: ClientItem) -> None:
        """paho's network thread: every callback ends here."""
        self._post(item, must=not isinstance(item, MessageIn))

    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run `fn` on the dispatcher and wait for it (so the caller sees its effect)."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        self._post(_Work("call", (fn, done)), must=True)
        done.wait(timeout)

    def _dispatch_forever(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=self._next_tick_in())
            except queue.Empty:
                item = _Work("tick", ())
            else:
                with self._room:
                    self._inbox_size -= 1
                    if isinstance(item, MessageIn):
                        self._inbox_messages -= 1
                        self._inbox_bytes -= len(item.message.payload)
                        self._room.notify()
            if isinstance(item, _Work) and item.kind == "quit":
                return
            try:
                self._handle(item)
                while self._inline:
                    self._on_event(*self._inline.popleft())
            except Exception:
                # A bug in handling one item must not take the door down.
                log.exception("mqtt.dispatch_failed", item=type(item).__name__)
            self._redeliver_refused()
            # Before a caller wakes: `stop()` reads `_idle` right after its call returns.
            self._gauges = _Gauges(self.ledger.inflight, self.ledger.buffered, self.ledger.held)
            busy = not self.ledger.idle() or self.fleet.busy()
            (self._idle.clear if busy else self._idle.set)()
            if isinstance(item, _Work) and item.kind == "call":
                item.args[1].set()

    def _redeliver_refused(self) -> None:
        """The inbox refused QoS 1 messages and has drained to half: have the broker send them again."""
        now = self._clock()
        with self._inbox_lock:
            due = (
                self._redeliver_wanted and self._inbox_messages <= INBOX_MAX // 2
                and self._inbox_bytes <= INBOX_MAX_BYTES // 2
                and now - self._last_redelivery >= REDELIVERY_MIN_INTERVAL_S
            )
            if due:
                self._redeliver_wanted = False
                self._last_redelivery = now
        if due and self._client is not None and not self._stopping:
            self.counters.redelivery_reconnects += 1
            log.warning("mqtt.reconnect_for_redelivery", refused=self.counters.inbox_refused)
            self._client.drop_connection()

    def _handle(self, item: ClientItem | _Work) -> None:
        if isinstance(item, _Work):
            if item.kind == "event":
                self._on_event(*item.args)
            elif item.kind == "state":
                self._on_state(item.args[0])
            elif item.kind == "call":
                item.args[0]()
        elif item.client is not self._client:
            pass  # from a client replaced by a reload: its acks and mids mean nothing to the new one
        elif isinstance(item, MessageIn):
            self._on_message(item.message, dropped_size=item.size if item.oversize else None)
        elif isinstance(item, PubAck):
            self._on_puback(item)
        elif isinstance(item, Connected):
            self._on_connected(item.session_present)
        elif isinstance(item, Disconnected):
            self._on_disconnected(item.reason)
        now = self._clock()
        for entry, held in self.tokens.due(now):
            self._run(self.ledger.event(entry, held))
        self._fleet_run(self.fleet.tick(now))
        if self._journal_retry_at is not None and now >= self._journal_retry_at:
            self._journal_retry_at = None
            self._run(self.ledger.retry_journal())
        if self._connected and self.presence.next_due_in(now) <= 0:
            self._send(self.presence.due(self.backend.status(), now))
        self.task_door.tick(now)

    def _next_tick_in(self) -> float:
        now = self._clock()
        due = now + self.presence.next_due_in(now)
        tokens_due = self.tokens.next_due()
        for other in (self.fleet.next_due(), self._journal_retry_at, self.task_door.next_due(), tokens_due):
            due = due if other is None else min(due, other)
        # The floor keeps an overdue item from spinning the loop; held tokens may be due sooner.
        floor = 0.005 if tokens_due is not None else 0.05
        return max(floor, min(due - now, self.cfg.status_interval_s))

    # --- carrying out the machines' commands --------------------------------------------------

    def _run(self, commands: Iterable[Command]) -> None:
        todo = deque(commands)
        while todo:
            command = todo.popleft()
            if isinstance(command, Publish):
                self._publish_answer(command)
            elif isinstance(command, Ack):
                if self._client is not None:
                    self._client.ack(command.mid, command.qos)
            elif isinstance(command, WriteJournal):
                todo.extend(self.ledger.journal_written(command.entry, self._journal_put(command)))
            elif isinstance(command, Submit):
                self._submit(command)

    def _publish_answer(self, command: Publish) -> None:
        client = self._client
        if client is None:
            if command.ref is not None:
                self._run(self.ledger.publish_failed(command.ref))
            return
        if command.retain and command.ref is not None and command.topic == self.topics.ha_answer:
            # Home Assistant's Last answer sensor reads its attributes here (bounded; see homeassistant.py).
            attributes = homeassistant.payload_attributes(command.payload, self.topics.ha_answer)
            client.publish(self.topics.ha_answer_attributes, attributes, retain=True)
        payload = self.task_door.result_shape(command.topic, command.payload)  # a task's result topic: its shape
        sent = client.publish(command.topic, payload, retain=command.retain, correlation=command.correlation,
                              qos=0 if command.ref is None else 1)  # a stream event: see `Publish`
        if command.ref is None:
            if sent.queued_offline:
                self.ledger.stream_event_lost()
            return
        if not sent.ok:
            self._run(self.ledger.publish_failed(command.ref))
            return
        self._mids[sent.mid] = ("ledger", command.ref)
        if sent.queued_offline:
            self.ledger.queued_offline(command.ref)

    def _fleet_run(self, commands: Iterable[FleetCommand]) -> None:
        for command in commands:
            if isinstance(command, PublishHandoff):
                self._publish_handoff(command)
                continue
            entry = command.key
            if isinstance(command, Waiting):
                log.info(
                    "mqtt.handoff_waiting", id=getattr(entry, "request_id", None),
                    retry_in_s=round(command.retry_in_s, 2),
                    reason="no fleet member is subscribed (all are full or leaving)",
                )
                continue
            if not isinstance(entry, Entry) or entry not in self._handing_off:
                continue
            self._handing_off.discard(entry)
            if isinstance(command, Release):
                log.info("mqtt.handed_off", id=entry.request_id, topic=self.cfg.fleet.topic)
                self._run(self.ledger.release(entry))
            elif isinstance(command, Fallback):
                log.warning("mqtt.fleet_saturated", id=entry.request_id, reason=command.reason,
                            code=command.final.get("code"))
                self._run(self.ledger.answer(entry, command.final))
            elif isinstance(command, Keep):
                log.warning("mqtt.handoff_failed", id=entry.request_id, reason=command.reason,
                            action="kept unacknowledged in our session for our next start")
                self.ledger.leave(entry)

    def _publish_handoff(self, command: PublishHandoff) -> None:
        client = self._client
        if client is None:
            self._fleet_run(self.fleet.abandon("no MQTT client"))
            return
        sent = client.publish(
            self.cfg.fleet.topic, command.payload, json_content=False, correlation=command.correlation,
            response_topic=command.response_topic, expiry_s=command.expiry_s, user_properties=command.user_properties,
        )
        if not sent.ok:
            self._fleet_run(self.fleet.publish_failed(command.ref, self._clock()))
            return
        self._mids[sent.mid] = ("fleet", command.ref)

    def _send(self, messages: Iterable[Message]) -> int | None:
        """Publish presence messages (retained, QoS 1); the mid of the last one."""
        mid = None
        if self._client is None:
            return None
        for message in messages:
            json_content = message.topic not in (self.topics.availability,) and bool(message.payload)
            mid = self._client.publish(message.topic, message.payload, retain=message.retain,
                                       json_content=json_content).mid
        return mid

    # --- journal ------------------------------------------------------------------------------

    def _journal_put(self, command: WriteJournal) -> bool:
        ok = self.store.put(command.request_id, command.event, held=self._gauges.held)
        if not ok:
            self._journal_retry_at = self._clock() + JOURNAL_RETRY_S
        return ok

    # --- connection ---------------------------------------------------------------------------

    def _start_client(self, cfg: MqttConfig) -> None:
        """Build and connect the paho client. A broken setting (unreadable password file, bad TLS
        files) is logged and shown in status; the daemon keeps serving the socket, and a reload
        with a fixed config tries again."""
        try:
            client = PahoClient(cfg, self.client_id, self.topics.availability, self._deliver)
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
        client.connect()
        log.info(
            "mqtt.starting", broker=broker_name(cfg), client_id=self.client_id, prefix=self.topics.prefix,
            protocol=cfg.protocol, fleet=cfg.fleet.enabled, username=cfg.username or None,
        )

    def _on_connected(self, session_present: bool) -> None:
        self._connected = True
        self.counters.connects += 1
        if self.counters.connects > 1:
            self.counters.reconnects += 1
        self.ledger.on_connected(session_present)
        if not session_present:
            self._subscribed.clear()
        log.info(
            "mqtt.connected", broker=broker_name(self.cfg), session_present=session_present,
            reconnects=self.counters.reconnects, buffered=self.ledger.buffered,
        )
        self._sync_subscriptions()
        self._send(self.presence.on_connected(self.backend.status(), self._clock()))
        self.task_door.on_connected()

    def _on_disconnected(self, reason: str) -> None:
        was = self._connected
        self._connected = False
        self.ledger.on_disconnected()
        self.presence.on_disconnected()
        if was and not self._stopping:
            log.warning("mqtt.disconnected", reason=reason, inflight=self.ledger.inflight)

    def _on_puback(self, ack: PubAck) -> None:
        if ack.mid == self._last_words_mid:
            self._last_words_sent.set()
        owner = self._mids.pop(ack.mid, None)
        if owner is None:
            return
        kind, ref = owner
        if kind == "fleet":
            self._fleet_run(self.fleet.published(ref, reason=ack.reason, failure=ack.failure, now=self._clock()))
            return
        if ack.failure:
            # The broker refused our answer (usually its ACL). Retrying will not help: ack the request.
            log.error("mqtt.answer_refused_by_broker", reason=ack.reason)
        self._run(self.ledger.published(ref))

    def _wanted_subscriptions(self) -> set[str]:
        wanted = {self.topics.request, self.topics.cancel}
        if self.cfg.homeassistant.enabled:
            wanted |= {self.topics.ha_prompt, f"{self.cfg.homeassistant.prefix}/status"}
        if self.cfg.fleet.enabled and self._accepting and self.backend.can_accept():
            wanted.add(shared_filter(self.cfg.fleet.group, self.cfg.fleet.topic))
        return wanted | self.task_door.subscriptions()

    def _sync_subscriptions(self) -> None:
        """Make the (persistent) session's subscriptions what we want now, including dropping
        filters an earlier run subscribed (the broker remembers them across restarts)."""
        client = self._client
        if client is None or not self._connected:
            return
        wanted = self._wanted_subscriptions()
        remembered = self.store.subscriptions()
        stale = (remembered | self._subscribed) - wanted
        new = wanted - self._subscribed
        if stale:
            client.unsubscribe(sorted(stale))
            log.info("mqtt.unsubscribed", filters=sorted(stale))
        if new:
            client.subscribe(sorted(new))
            log.info("mqtt.subscribed", filters=sorted(new))
        self._subscribed = wanted
        if remembered != wanted:
            self.store.remember_subscriptions(wanted)

    # --- incoming messages --------------------------------------------------------------------

    def _on_message(self, msg: Inbound, dropped_size: int | None = None) -> None:
        """`dropped_size`: the client dropped the payload on arrival, it was this many bytes, over
        `mqtt.max_payload_bytes` (the message is answered `payload_too_large` where it is answered)."""
        self.counters.received += 1
        topic = msg.topic
        delivery = Delivery(msg.mid, msg.qos)
        try:
            if topic == self.topics.request:
                self._on_request(msg, fleet=False, dropped_size=dropped_size)
            elif self.cfg.fleet.enabled and topic == self.cfg.fleet.topic:
                self._on_request(msg, fleet=True, dropped_size=dropped_size)
            elif topic == self.topics.cancel:
                self._on_cancel(msg, dropped_size)
                self._ack(delivery)
            elif topic == self.topics.ha_prompt and self.cfg.homeassistant.enabled:
                self._on_ha_prompt(msg, dropped_size)
            elif topic == f"{self.cfg.homeassistant.prefix}/status":
                if msg.payload.strip() == b"online" and self.cfg.homeassistant.enabled:
                    log.info("mqtt.homeassistant_online", action="re-publishing discovery")
                    self._send(self.presence.discovery(self.backend.status()))
                self._ack(delivery)
            elif not self.task_door.handle(msg, topic, dropped_size):  # not a task call or trigger message (tasks.py)
                log.warning("mqtt.unexpected_topic", topic=topic)
                self._ack(delivery)
        except Exception as exc:
            log.exception("mqtt.message_failed", topic=topic)
            error = ErrorEvent(None, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            self._run(self.ledger.answer_once(delivery, [Route(self.topics.error)], error.to_dict()))

    def _ack(self, delivery: Delivery) -> None:
        if self._client is not None:
            self._client.ack(delivery.mid, delivery.qos)

    def _on_request(self, msg: Inbound, *, fleet: bool, dropped_size: int | None = None) -> None:
        delivery = Delivery(msg.mid, msg.qos)
        if not self._accepting and dropped_size is None:  # too large is the answer, stopping or not
            self._refuse_while_stopping(msg, fleet)
            return
        decision = interpret_request(
            msg.payload,
            self.topics,
            self.backend.defaults,
            max_payload_bytes=self.cfg.max_payload_bytes,
            response_topic=msg.response_topic,
            correlation=msg.correlation,
            expiry_s=msg.expiry_s,
            destinations=self._destinations,
            limits=self._limits(),
            constraints=self._constraints,
            dropped_size=dropped_size,
        )
        if not isinstance(decision, Accepted):
            self.counters.rejected += 1
            log.info(
                "mqtt.request_rejected", topic=msg.topic, code=decision.error.code, reason=decision.error.message,
                id=decision.error.id, to=decision.route.topic,
            )
            self._run(self.ledger.answer_once(delivery, [decision.route], decision.error.to_dict()))
            return
        request, route = decision.request, decision.route
        stored = self.store.get(request.id)
        if stored is not None:
            log.info("mqtt.request_replayed", id=request.id, dup=bool(msg.dup), to=route.topic)
        elif self.ledger.in_progress(request.id) is not None:
            log.info("mqtt.duplicate_in_progress", id=request.id, dup=bool(msg.dup))
        commands = self.ledger.arrived(delivery, request, route, stored=stored)
        if fleet:
            for command in commands:
                if isinstance(command, Submit):
                    self._sources[command.entry] = self._source_of(msg)
        self._run(commands)

    def _submit(self, command: Submit) -> None:
        entry, request = command.entry, command.request
        source = self._sources.get(entry)
        kind = "fleet" if source is not None else "topic"
        route = entry.routes[0].topic if entry.routes else ""
        origin = Origin("mqtt", "homeassistant" if entry.retain else f"{kind} reply={route}")
        try:
            self.backend.submit(request, _Sink(self, entry), origin)
        except Exception as exc:  # the contract says submit never raises; a bug must not lose the answer
            log.exception("mqtt.submit_failed", id=request.id)
            self._on_event(entry, ErrorEvent(request.id, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))

    def _refuse_while_stopping(self, msg: Inbound, fleet: bool) -> None:
        """Shutting down: a fleet request goes back to the fleet; our own stays at the broker."""
        if not fleet:
            self.ledger.counters.left_for_redelivery += 1
            return
        entry = self.ledger.received_for_handoff(Delivery(msg.mid, msg.qos))
        source = self._source_of(msg)
        self._start_handoff(entry, source, hops=source.hops, fallback=None)

    def _source_of(self, msg: Inbound) -> Source:
        return Source(
            msg.payload, msg.response_topic, msg.correlation, msg.expiry_s, self._clock(),
            msg.user_properties, fleet_hops(msg.user_properties),
        )

    def _on_cancel(self, msg: Inbound, dropped_size: int | None = None) -> None:
        response_topic, correlation = msg.response_topic, msg.correlation
        if response_topic is not None and self._destinations.refusal(response_topic) is not None:
            response_topic = None
        reply: dict[str, Any]
        try:
            if dropped_size is not None:
                raise payload_too_large(dropped_size, self.cfg.max_payload_bytes)
            request_id = parse_cancel(msg.payload)
        except EdgeError as exc:
            reply = error_event(exc, None).to_dict()
            topic = response_topic if response_topic is not None else self.topics.error
        else:
            cancelled = self.backend.cancel(request_id)
            log.info("mqtt.cancel", id=request_id, cancelled=cancelled)
            if response_topic is None:
                return
            reply = {"event": "cancel", "id": request_id, "cancelled": cancelled}
            topic = response_topic
        if self._client is not None:
            self._client.publish(topic, event_payload(reply), correlation=correlation)

    def _on_ha_prompt(self, msg: Inbound, dropped_size: int | None = None) -> None:
        delivery = Delivery(msg.mid, msg.qos)
        if dropped_size is None and not msg.payload.strip():
            # An empty text entity value is no prompt: the last answer stays as it is.
            log.info("mqtt.ha_prompt_empty", action="ignored; ha/answer unchanged")
            self._ack(delivery)
            return
        request_id = f"ha-{uuid.uuid4().hex[:16]}"
        route = Route(self.topics.ha_answer)
        try:
            request = ha_prompt_request(
                msg.payload, request_id, self.backend.defaults, self.cfg.max_payload_bytes, self._limits(),
                dropped_size=dropped_size,
            )
        except EdgeError as exc:
            self._run(self.ledger.answer_once(delivery, [route], exc.to_event(request_id).to_dict(), retain=True))
            return
        self._run(self.ledger.arrived(delivery, request, route, stored=None, retain=True))

    # --- events from the backend --------------------------------------------------------------

    def _on_event(self, entry: Entry, event: Event) -> None:
        if isinstance(event, TokenEvent):
            paced = self.tokens.token(entry, event, self._clock())
            if paced is not None:
                self._run(self.ledger.event(entry, paced))
            return
        held = self.tokens.take(entry, self._clock(), final=event.final)  # the held text goes out first
        if held is not None:
            self._run(self.ledger.event(entry, held))
        source = self._sources.pop(entry, None) if event.final else None
        if entry.finalized or not isinstance(event, ErrorEvent) or not event.final:
            self._run(self.ledger.event(entry, event))
            return
        if event.code == Code.SHUTTING_DOWN:
            # `shutting_down` is not an answer for MQTT: the prompt must survive the restart.
            if source is not None:
                self._start_handoff(entry, source, hops=source.hops, fallback=None)
            else:
                log.info("mqtt.left_for_redelivery", id=entry.request_id)
                self.ledger.leave(entry)
            return
        if source is not None and should_bounce(
            event.code, source.hops, client_saw_events=entry.client_saw_events, v5=self.cfg.protocol == "5"
        ):
            final = self.ledger.take_final(entry, event)
            log.info("mqtt.fleet_bounced", id=entry.request_id, code=event.code, hops=source.hops + 1)
            # Leave the fleet first if we are full: a refusal is handled right after its message,
            # possibly before the state change that says so, and the broker must not route the
            # hand-off straight back to us (UNSUBSCRIBE goes out before it, on the same connection).
            self._sync_fleet()
            self._start_handoff(entry, source, hops=source.hops + 1, fallback=final)
            return
        self._run(self.ledger.event(entry, event))

    def _start_handoff(self, entry: Entry, source: Source, *, hops: int, fallback: dict[str, Any] | None) -> None:
        self.ledger.hand_off(entry)
        self._handing_off.add(entry)
        self._fleet_run(self.fleet.hand_off(entry, source, hops=hops, fallback=fallback, now=self._clock()))

    def _hand_back_unfinished(self) -> None:
        """Stop, after the drain: a fleet request still generating (the worker did not end it in
        time) goes back to the fleet now; whatever it emits later is ignored (it is handed off)."""
        for entry in self.ledger.unfinished():
            source = self._sources.pop(entry, None)
            self.tokens.forget(entry)
            if source is not None:
                log.info("mqtt.handing_back_unfinished", id=entry.request_id)
                self._start_handoff(entry, source, hops=source.hops, fallback=None)

    # --- backend state, the fleet membership, stopping -----------------------------------------

    def _on_backend_state(self, status: dict[str, Any]) -> None:
        """State listener (inference or event-loop thread): hand it to the dispatcher."""
        self._post(_Work("state", (status,)), must=True)

    def _on_state(self, status: dict[str, Any]) -> None:
        if status.get("state") == "draining" and self._accepting:
            self._stop_accepting()
        self._send(self.presence.on_state(status))
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
        log.info("mqtt.stop_accepting", inflight=self.ledger.inflight)
        self._sync_subscriptions()

    def _begin_stop(self) -> None:
        self._stop_accepting()
        self._stopping = True
        self.fleet.stopping = True

    def _publish_last_words(self) -> None:
        if self._client is None or not self._connected:
            self._last_words_sent.set()
            return
        self._last_words_mid = self._send(self.presence.stopping(self.backend.status(), self._clock()))

    # --- reload --------------------------------------------------------------------------------

    def _make_destinations(self, cfg: MqttConfig) -> Any:
        return make_destinations(
            self.topics, fleet_topic=cfg.fleet.topic, ha_prefix=cfg.homeassistant.prefix,
            allow_reply_to=cfg.allow_reply_to,
        )

    def _reconfigure(self, cfg: MqttConfig) -> None:
        old = self.cfg
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(old, f.name)}
        if not changed:
            return
        self.cfg = cfg
        self.ledger.offline_buffer = cfg.offline_buffer
        self.tokens.interval_s = cfg.token_interval_ms / 1000
        self.presence.status_interval_s = cfg.status_interval_s
        if self._client is not None:
            self._client.set_backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
            self._client.max_payload_bytes = cfg.max_payload_bytes
        self.store.set_limits(cfg.journal_max_entries, cfg.journal_max_age_s)
        log.info("mqtt.reconfigured", changed=sorted(changed))
        if changed - _LIVE_KEYS or self._client is None:
            self._reconnect_with(cfg)
            return
        self._destinations = self._make_destinations(cfg)
        if "homeassistant" in changed:
            self._send(self.presence.reconfigure_ha(
                cfg.homeassistant.enabled, cfg.homeassistant.prefix, self.backend.status()
            ))
        self._sync_subscriptions()
        self.presence.mark_dirty()

    def _reconnect_with(self, cfg: MqttConfig) -> None:
        """Connection settings changed: say `offline` on the old connection, open a new one, and
        re-publish the answers and hand-offs the old one had not got PUBACKs for."""
        old_client = self._client
        if old_client is not None:
            if self._connected:
                old_client.publish(self.topics.availability, b"offline", retain=True, json_content=False)
            old_client.close()
        self._connected = False
        self.presence.on_disconnected()
        self.topics = make_topics(cfg.node_id, cfg.prefix, self._hostname)
        self.client_id = cfg.client_id or default_client_id(self.topics.node_id)
        self.presence.topics = self.topics
        self.presence.ha_enabled, self.presence.ha_prefix = cfg.homeassistant.enabled, cfg.homeassistant.prefix
        self._destinations = self._make_destinations(cfg)
        self._subscribed.clear()
        self._mids.clear()
        self.fleet.client_replaced(self._clock())
        republish = self.ledger.client_replaced()
        self._start_client(cfg)
        self._run(republish)
