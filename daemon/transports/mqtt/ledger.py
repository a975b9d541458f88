"""The delivery ledger: when an MQTT request may be acknowledged. Pure: no I/O, no clock, no threads.

The promise (docs/mqtt.md, "Delivery"): a QoS 1 request is PUBACKed only once its final event has
been PUBACKed by the broker, and a `done` answer is journalled before it is published:

    journal write → publish the answer → broker PUBACK → PUBACK the request.

Events in: a request arrived (with what the journal holds for its id), a message that starts no
generation arrived (an error, a replay), an event from the backend, the result of a journal write,
a PUBACK of one of our publishes, connect / disconnect, the client replaced by a reload.
Commands out: `Submit`, `WriteJournal`, `Publish`, `Ack`; the transport carries them out in order
and reports back. A crash-restart is a fresh ledger: what survives it is the journal (answers) and
the broker's session (every delivery we never acknowledged, which the broker sends again).

So: a delivery is acknowledged only after an answer reached the broker (nothing accepted is lost),
and a `done` answer is published only after it is in the journal (a redelivery replays it, never
generates a second, different one). A `done` that cannot be journalled (disk full, read-only) is
held, unpublished and unacknowledged, and `retry_journal()` tries again; if the daemon dies
meanwhile the broker still has the request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union

from daemon.protocol import DoneEvent, Event, Request
from daemon.transports.mqtt.topics import Route, event_payload


@dataclass(frozen=True)
class Delivery:
    """One received message we may owe a PUBACK (QoS 0: nothing is owed)."""

    mid: int
    qos: int


@dataclass(frozen=True)
class Submit:
    """Start generating `request`; its events come back through `Ledger.event(entry, …)`."""

    request: Request
    entry: Entry


@dataclass(frozen=True)
class WriteJournal:
    """Record a `done` answer durably; report the outcome with `Ledger.journal_written`."""

    entry: Entry
    request_id: str
    event: dict[str, Any]


@dataclass(frozen=True)
class Publish:
    """Publish. `ref` is None for a stream event (`queued`, `token`): published at QoS 0, nothing
    waits for it. Otherwise QoS 1, and the transport reports its PUBACK with `Ledger.published(ref, …)`."""

    ref: int | None
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None


@dataclass(frozen=True)
class Ack:
    mid: int
    qos: int


Command = Union[Submit, WriteJournal, Publish, Ack]


class Phase(enum.Enum):
    GENERATING = "generating"
    JOURNALLING = "journalling"
    HELD = "held"  # a `done` the journal could not take: not published, not acknowledged
    PUBLISHING = "publishing"  # final event published, waiting for PUBACKs
    HANDED_OFF = "handed_off"  # the fleet machine has it (see fleet.py)
    DONE = "done"


@dataclass(eq=False)
class Entry:
    """One request id being answered, or one message answered without a generation.

    `deliveries` are the received copies we owe a PUBACK (mid → qos): the first, and every
    duplicate that arrived while it was in progress. All are acknowledged together."""

    request_id: str | None
    routes: list[Route]
    generates: bool
    stream: bool = False
    retain: bool = False
    deliveries: dict[int, int] = field(default_factory=dict)
    phase: Phase = Phase.GENERATING
    seq: int = 0
    final: dict[str, Any] | None = None
    final_payload: bytes | None = None
    outstanding: set[int] = field(default_factory=set)

    @property
    def finalized(self) -> bool:
        return self.phase is not Phase.GENERATING

    @property
    def client_saw_events(self) -> bool:
        return self.seq > 0

    @property
    def owes_broker(self) -> bool:
        return any(qos > 0 for qos in self.deliveries.values())


@dataclass
class LedgerCounters:
    answered: int = 0
    replayed: int = 0
    duplicates: int = 0
    tokens_dropped: int = 0
    answers_dropped: int = 0
    left_for_redelivery: int = 0
    journal_failures: int = 0


class Ledger:
    """`offline_buffer`: how many final publishes may wait for the broker while disconnected."""

    def __init__(self, offline_buffer: int) -> None:
        self.offline_buffer = offline_buffer
        self.counters = LedgerCounters()
        self.connected = False
        self._by_id: dict[str, Entry] = {}
        self._entries: set[Entry] = set()
        self._ever_held: set[Entry] = set()  # a superset of the held entries (see `held`)
        self._refs: dict[int, Entry] = {}
        self._owed: dict[int, Entry] = {}  # packet id → the entry that will acknowledge it
        self._buffered: set[int] = set()
        self._next_ref = 0

    # --- what the transport asks --------------------------------------------------------------

    def in_progress(self, request_id: str) -> Entry | None:
        return self._by_id.get(request_id)

    @property
    def inflight(self) -> int:
        return len(self._by_id)

    @property
    def buffered(self) -> int:
        return len(self._buffered)

    @property
    def held(self) -> int:
        # Asked after every message: look only at entries that were ever held (a flood holds
        # thousands of entries, and scanning them all for every message made it quadratic).
        self._ever_held = {e for e in self._ever_held if e.phase is Phase.HELD and e in self._entries}
        return len(self._ever_held)

    def idle(self) -> bool:
        """No answer waiting for the backend, the journal or a PUBACK."""
        return not any(e.phase is not Phase.HANDED_OFF for e in self._entries)

    def unfinished(self) -> list[Entry]:
        return [e for e in self._entries if e.phase is Phase.GENERATING]

    # --- messages in ------------------------------------------------------------------------

    def arrived(
        self, delivery: Delivery, request: Request, route: Route, *, stored: dict[str, Any] | None, retain: bool = False
    ) -> list[Command]:
        """A request with a usable id and route. `stored`: the journal's answer for its id.

        A copy we are still answering (the same id in progress, or the same delivery sent again
        after a reconnect) joins that answer: one PUBACK per packet id, never two."""
        if self._already_owed(delivery):
            return []
        existing = self._by_id.get(request.id)
        if existing is not None:
            return self._attach_duplicate(existing, delivery, route)
        if stored is not None:
            self.counters.replayed += 1
            return self.answer_once(delivery, [route], stored, retain=retain)
        entry = Entry(request.id, [route], generates=True, stream=request.stream, retain=retain)
        self._owe(entry, delivery)
        self._by_id[request.id] = entry
        self._entries.add(entry)
        return [Submit(request, entry)]

    def answer_once(
        self, delivery: Delivery | None, routes: list[Route], event: dict[str, Any], *, retain: bool = False
    ) -> list[Command]:
        """A message that starts no generation (an error, a replay): publish, then acknowledge."""
        if delivery is not None and self._already_owed(delivery):
            return []
        entry = Entry(None, list(routes), generates=False, retain=retain)
        if delivery is not None:
            self._owe(entry, delivery)
        self._entries.add(entry)
        return self._publish_final(entry, event)

    def _attach_duplicate(self, entry: Entry, delivery: Delivery, route: Route) -> list[Command]:
        """Same id while in progress: no second generation; its PUBACK waits for the first answer."""
        self.counters.duplicates += 1
        self._owe(entry, delivery)
        commands: list[Command] = []
        if route not in entry.routes:
            entry.routes.append(route)
            if entry.phase is Phase.PUBLISHING and entry.final_payload is not None:
                commands += self._publish_to(entry, route, entry.final_payload)
        if entry.phase is Phase.PUBLISHING and not entry.outstanding:
            commands += self._complete(entry)
        return commands

    def _owe(self, entry: Entry, delivery: Delivery) -> None:
        if delivery.qos > 0:
            entry.deliveries[delivery.mid] = delivery.qos
            self._owed[delivery.mid] = entry

    def _already_owed(self, delivery: Delivery) -> bool:
        """The broker sent this packet again (a reconnect) while we still answer the first copy."""
        if delivery.qos == 0:
            return False
        entry = self._owed.get(delivery.mid)
        if entry is None or entry not in self._entries or delivery.mid not in entry.deliveries:
            return False
        self.counters.duplicates += 1
        return True

    def _release_deliveries(self, entry: Entry) -> None:
        for mid in entry.deliveries:
            if self._owed.get(mid) is entry:
                del self._owed[mid]
        entry.deliveries.clear()

    # --- events from the backend -------------------------------------------------------------

    def event(self, entry: Entry, event: Event) -> list[Command]:
        if entry.finalized or entry not in self._entries:
            return []  # a late event of something answered, handed off or left for redelivery
        if not event.final:
            if not entry.stream:
                return []
            entry.seq += 1
            if not self.connected:
                # Tokens are not buffered: the final answer has the whole text and `seq` shows gaps.
                self.counters.tokens_dropped += 1
                return []
            payload = event_payload(event.to_dict(), entry.seq)
            return [Publish(None, r.topic, payload, entry.retain, r.correlation) for r in entry.routes]
        final = self.take_final(entry, event)
        if isinstance(event, DoneEvent) and entry.request_id is not None:
            entry.phase = Phase.JOURNALLING
            return [WriteJournal(entry, entry.request_id, final)]
        return self._publish_final(entry, final)

    def take_final(self, entry: Entry, event: Event) -> dict[str, Any]:
        """Mark the entry finalized and return its final event as published (with `seq`)."""
        entry.seq += 1
        entry.phase = Phase.PUBLISHING
        final = event.to_dict()
        if entry.stream or not entry.retain:
            final["seq"] = entry.seq
        entry.final = final
        return final

    def journal_written(self, entry: Entry, ok: bool) -> list[Command]:
        if entry.phase not in (Phase.JOURNALLING, Phase.HELD) or entry.final is None:
            return []
        if ok:
            return self._publish_final(entry, entry.final)
        self.counters.journal_failures += 1
        if entry.owes_broker:
            entry.phase = Phase.HELD
            self._ever_held.add(entry)
            return []
        # QoS 0 only: the broker has no copy to send again, so holding it would only lose it.
        return self._publish_final(entry, entry.final)

    def retry_journal(self) -> list[Command]:
        """Held answers: try the journal again (the transport calls this on a timer)."""
        commands: list[Command] = []
        for entry in self._entries:
            if entry.phase is Phase.HELD and entry.request_id is not None and entry.final is not None:
                entry.phase = Phase.JOURNALLING
                commands.append(WriteJournal(entry, entry.request_id, entry.final))
        return commands

    # --- the fleet and shutdown take an entry over --------------------------------------------

    def received_for_handoff(self, delivery: Delivery) -> Entry:
        """A fleet request that goes straight back to the fleet (we are leaving)."""
        entry = Entry(None, [], generates=False, phase=Phase.HANDED_OFF)
        self._owe(entry, delivery)
        self._entries.add(entry)
        return entry

    def hand_off(self, entry: Entry) -> None:
        """The fleet machine takes it; its id is free again (a copy may come back to us)."""
        entry.phase = Phase.HANDED_OFF
        self._unindex(entry)

    def release(self, entry: Entry) -> list[Command]:
        """The fleet has taken it: acknowledge our copies."""
        return self._complete(entry, answered=False)

    def answer(self, entry: Entry, final: dict[str, Any]) -> list[Command]:
        """Publish `final` (no journal: an error) for a handed-off entry the fleet could not take."""
        entry.phase = Phase.PUBLISHING
        self._entries.add(entry)
        return self._publish_final(entry, final)

    def leave(self, entry: Entry) -> None:
        """Not answered here (shutting down): forget it unacknowledged; the broker sends it again."""
        if entry.deliveries:
            self.counters.left_for_redelivery += 1
        self._release_deliveries(entry)
        entry.phase = Phase.DONE
        self._forget(entry)

    # --- publishing and PUBACKs --------------------------------------------------------------

    def _publish_final(self, entry: Entry, final: dict[str, Any]) -> list[Command]:
        entry.phase = Phase.PUBLISHING
        entry.final = final
        entry.final_payload = event_payload(final)
        commands: list[Command] = []
        for route in entry.routes:
            commands += self._publish_to(entry, route, entry.final_payload)
        if not entry.outstanding:
            if commands or not entry.routes:
                commands += self._complete(entry)
            else:
                # Nothing could be published (offline buffer full): unacknowledged, so the broker
                # sends it again after the reconnect and the journal replays a `done`.
                self._forget(entry)
        return commands

    def _publish_to(self, entry: Entry, route: Route, payload: bytes) -> list[Command]:
        if not self.connected and len(self._buffered) >= self.offline_buffer:
            self.counters.answers_dropped += 1
            return []
        ref = self._next_ref = self._next_ref + 1
        self._refs[ref] = entry
        entry.outstanding.add(ref)
        if not self.connected:
            self._buffered.add(ref)
        return [Publish(ref, route.topic, payload, entry.retain, route.correlation)]

    def stream_event_lost(self) -> None:
        """A stream event went out at QoS 0 while the connection was gone before we knew: the
        client keeps nothing for the reconnect. Counted as the tokens dropped while disconnected."""
        self.counters.tokens_dropped += 1

    def queued_offline(self, ref: int) -> None:
        """The client holds this publish for the reconnect (the connection went before we knew)."""
        if ref in self._refs:
            self._buffered.add(ref)

    def publish_failed(self, ref: int) -> list[Command]:
        """The client refused the publish outright (not queued): nothing reached the broker."""
        entry = self._refs.pop(ref, None)
        self._buffered.discard(ref)
        if entry is None:
            return []
        entry.outstanding.discard(ref)
        self.counters.answers_dropped += 1
        if entry.phase is Phase.PUBLISHING and not entry.outstanding:
            self._forget(entry)  # unacknowledged: the broker sends it again after a reconnect
        return []

    def published(self, ref: int) -> list[Command]:
        """The broker PUBACKed one of our publishes (a refusal by its ACL counts: retrying won't help)."""
        self._buffered.discard(ref)
        entry = self._refs.pop(ref, None)
        if entry is None:
            return []
        entry.outstanding.discard(ref)
        if entry.phase is Phase.PUBLISHING and not entry.outstanding:
            return self._complete(entry)
        return []

    def _complete(self, entry: Entry, *, answered: bool = True) -> list[Command]:
        commands: list[Command] = [Ack(mid, qos) for mid, qos in entry.deliveries.items()]
        self._release_deliveries(entry)
        if answered and entry.generates:
            self.counters.answered += 1
        entry.phase = Phase.DONE
        self._forget(entry)
        return commands

    def _forget(self, entry: Entry) -> None:
        """Drop the entry; deliveries it still owes stay unacknowledged (the broker sends them again)."""
        self._release_deliveries(entry)
        self._unindex(entry)
        self._entries.discard(entry)
        for ref in entry.outstanding:
            self._refs.pop(ref, None)
            self._buffered.discard(ref)
        entry.outstanding.clear()

    def _unindex(self, entry: Entry) -> None:
        if entry.request_id is not None and self._by_id.get(entry.request_id) is entry:
            del self._by_id[entry.request_id]

    # --- the connection ----------------------------------------------------------------------

    def on_connected(self, session_present: bool) -> None:
        self.connected = True
        if not session_present:
            # A new session: PUBACKs owed to the old one would acknowledge unrelated messages.
            for entry in self._entries:
                self._release_deliveries(entry)

    def on_disconnected(self) -> None:
        """The client keeps our unPUBACKed publishes and sends them again on the reconnect."""
        self.connected = False

    def client_replaced(self) -> list[Command]:
        """A reload opened a new client: what the old one had not got PUBACKs for goes out again."""
        self.connected = False
        self._buffered.clear()
        self._refs.clear()
        commands: list[Command] = []
        for entry in list(self._entries):
            if entry.phase is not Phase.PUBLISHING or not entry.outstanding:
                continue
            entry.outstanding.clear()
            assert entry.final_payload is not None
            for route in entry.routes:
                commands += self._publish_to(entry, route, entry.final_payload)
            if not entry.outstanding:
                self._forget(entry)
        return commands
