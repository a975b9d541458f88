"""The delivery ledger's promise, checked against a model of the broker, the backend and the journal.

Hypothesis drives random interleavings of: a client publishing QoS 1 requests (fresh ids and
repeated ones), the broker delivering them (and redelivering what was never acknowledged after a
reconnect or a daemon crash), generations finishing with an answer or an error, our publishes
reaching the broker and being PUBACKed (or their PUBACK lost on a disconnect), disconnects,
crash-restarts (a fresh ledger; the journal and the broker's session survive), the journal failing
and recovering, and a small offline buffer. Whatever the order:

- a delivery is acknowledged only after the client has received a final event for its id;
- every `done` the client receives for one id is the same answer (each generation's text is unique,
  so a second generation that reached the client would show);
- once everything settles, every request the broker accepted has been answered and acknowledged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import GenerationConfig
from daemon.protocol import Code, DoneEvent, ErrorEvent, TokenEvent, parse_request
from daemon.transports.mqtt.ledger import Ack, Command, Delivery, Entry, Ledger, Publish, Submit, WriteJournal
from daemon.transports.mqtt.topics import Route

IDS = ["a", "b", "c", "d"]
DEFAULTS = GenerationConfig()


@dataclass
class World:
    offline_buffer: int
    ledger: Ledger = field(init=False)
    journal: dict[str, dict[str, Any]] = field(default_factory=dict)
    journal_ok: bool = True
    connected: bool = True
    # Broker side: messages waiting to go to the daemon (mid, id, stream), and those sent but unacked.
    queued: list[tuple[int, str, bool]] = field(default_factory=list)
    unacked: dict[int, tuple[str, bool]] = field(default_factory=dict)
    next_mid: int = 0
    # Daemon side: running generations, publishes not yet at the broker, at the broker but not PUBACKed.
    running: list[tuple[Entry, str]] = field(default_factory=list)
    outbox: list[tuple[int, bytes]] = field(default_factory=list)
    at_broker: list[tuple[int, bytes]] = field(default_factory=list)
    # What the client saw.
    finals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    published_ids: set[str] = field(default_factory=set)
    texts: int = 0

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.offline_buffer)
        self.ledger.on_connected(True)

    # --- carrying out commands, checking the promise on each ack ------------------------------

    def run(self, commands: list[Command]) -> None:
        todo = list(commands)
        while todo:
            command = todo.pop(0)
            if isinstance(command, Submit):
                self.running.append((command.entry, command.request.id))
            elif isinstance(command, WriteJournal):
                if self.journal_ok:
                    self.journal[command.request_id] = command.event
                todo += self.ledger.journal_written(command.entry, self.journal_ok)
            elif isinstance(command, Publish):
                if command.ref is not None:
                    self.outbox.append((command.ref, command.payload))
            elif isinstance(command, Ack):
                assert command.mid in self.unacked, f"ack of {command.mid}, which is not awaiting one"
                request_id, _stream = self.unacked.pop(command.mid)
                # Acknowledged: the broker will not send it again.
                self.queued = [q for q in self.queued if q[0] != command.mid]
                assert self.finals.get(request_id), f"{request_id} acknowledged before any answer reached the client"

    # --- the operations ------------------------------------------------------------------------

    def publish(self, index: int, stream: bool) -> None:
        request_id = IDS[index % len(IDS)]
        self.next_mid += 1
        self.queued.append((self.next_mid, request_id, stream))
        self.published_ids.add(request_id)

    def deliver(self, index: int) -> None:
        if not self.connected or not self.queued:
            return
        mid, request_id, stream = self.queued.pop(index % len(self.queued))
        self.unacked[mid] = (request_id, stream)
        request = parse_request({"id": request_id, "prompt": "p", "stream": stream}, DEFAULTS)
        route = Route(f"client/{request_id}")
        self.run(self.ledger.arrived(Delivery(mid, 1), request, route, stored=self.journal.get(request_id)))

    def token(self, index: int) -> None:
        if self.running:
            entry, request_id = self.running[index % len(self.running)]
            self.run(self.ledger.event(entry, TokenEvent(request_id, "x")))

    def finish(self, index: int, fail: bool) -> None:
        if not self.running:
            return
        entry, request_id = self.running.pop(index % len(self.running))
        self.texts += 1
        done = DoneEvent(request_id, f"answer {self.texts}", "stop")
        event = ErrorEvent(request_id, Code.QUEUE_FULL, "full") if fail else done
        self.run(self.ledger.event(entry, event))

    def reach_broker(self, index: int) -> None:
        if not self.connected or not self.outbox:
            return
        ref, payload = self.outbox.pop(index % len(self.outbox))
        event = json.loads(payload)
        self.finals.setdefault(event["id"], []).append(event)
        self.at_broker.append((ref, payload))

    def puback(self, index: int) -> None:
        if not self.connected or not self.at_broker:
            return
        ref, _payload = self.at_broker.pop(index % len(self.at_broker))
        self.run(self.ledger.published(ref))

    def disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.ledger.on_disconnected()
        # PUBACKs not yet received are lost with the connection: paho sends those publishes again.
        self.outbox = self.at_broker + self.outbox
        self.at_broker = []

    def reconnect(self) -> None:
        if self.connected:
            return
        self.connected = True
        self.ledger.on_connected(True)
        # Session present: the broker sends every unacknowledged message again (same packet id).
        waiting = {q[0] for q in self.queued}
        self.queued = [(m, r, s) for m, (r, s) in self.unacked.items() if m not in waiting] + self.queued

    def crash(self) -> None:
        """The daemon dies: generations, unsent publishes and the ledger are gone; journal and the
        broker's session (with every unacknowledged delivery) survive."""
        self.connected = False
        self.running = []
        self.outbox = []
        self.at_broker = []
        self.ledger = Ledger(self.offline_buffer)

    def toggle_journal(self) -> None:
        self.journal_ok = not self.journal_ok

    def retry_journal(self) -> None:
        self.run(self.ledger.retry_journal())

    # --- settling ------------------------------------------------------------------------------

    def settle(self) -> None:
        self.journal_ok = True
        self.reconnect()
        for _ in range(100):
            before = (len(self.queued), len(self.running), len(self.outbox), len(self.at_broker), len(self.unacked))
            self.retry_journal()
            while self.queued:
                self.deliver(0)
            while self.running:
                self.finish(0, fail=False)
            while self.outbox:
                self.reach_broker(0)
            while self.at_broker:
                self.puback(0)
            after = (len(self.queued), len(self.running), len(self.outbox), len(self.at_broker), len(self.unacked))
            if after == before == (0, 0, 0, 0, 0):
                return
        raise AssertionError(f"did not settle: {after}")


OPS = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 7)),
    st.tuples(st.just("token"), st.integers(0, 7)),
    st.tuples(st.just("finish"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("reach_broker"), st.integers(0, 7)),
    st.tuples(st.just("puback"), st.integers(0, 7)),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("reconnect")),
    st.tuples(st.just("crash")),
    st.tuples(st.just("toggle_journal")),
    st.tuples(st.just("retry_journal")),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=80), offline_buffer=st.integers(0, 3))
def test_random_interleavings_lose_nothing_and_never_answer_an_id_twice_differently(
    ops: list[tuple[Any, ...]], offline_buffer: int
) -> None:
    world = World(offline_buffer)
    for name, *args in ops:
        getattr(world, name)(*args)
        check_one_answer_per_id(world)
    world.settle()
    check_one_answer_per_id(world)
    assert not world.unacked and not world.queued
    for request_id in world.published_ids:
        assert world.finals.get(request_id), f"{request_id} was accepted by the broker and never answered"
    assert world.ledger.idle() and world.ledger.inflight == 0


def check_one_answer_per_id(world: World) -> None:
    for request_id, events in world.finals.items():
        texts = {e["text"] for e in events if e["event"] == "done"}
        assert len(texts) <= 1, f"{request_id} got different answers: {texts}"


def test_a_done_the_journal_cannot_take_is_held_unpublished_and_unacked_until_it_can() -> None:
    world = World(offline_buffer=10)
    world.publish(0, stream=False)
    world.deliver(0)
    world.journal_ok = False
    world.finish(0, fail=False)
    assert world.ledger.held == 1 and not world.outbox and world.unacked
    world.retry_journal()
    assert world.ledger.held == 1 and not world.outbox
    world.journal_ok = True
    world.retry_journal()
    assert world.ledger.held == 0 and len(world.outbox) == 1
    world.reach_broker(0)
    world.puback(0)
    assert not world.unacked and world.ledger.counters.journal_failures == 2


def test_a_duplicate_while_generating_waits_for_the_first_answer_and_both_are_acked() -> None:
    world = World(offline_buffer=10)
    world.publish(0, stream=False)
    world.publish(0, stream=False)
    world.deliver(0)
    world.deliver(0)
    assert len(world.running) == 1 and len(world.unacked) == 2
    world.finish(0, fail=False)
    world.reach_broker(0)
    world.puback(0)
    assert not world.unacked and world.ledger.counters.duplicates == 1


def test_a_redelivery_after_a_crash_is_replayed_from_the_journal_not_generated() -> None:
    world = World(offline_buffer=10)
    world.publish(1, stream=False)
    world.deliver(0)
    world.finish(0, fail=False)  # journalled, publish still in the daemon
    world.crash()
    world.reconnect()
    world.deliver(0)
    assert not world.running and world.ledger.counters.replayed == 1
    world.reach_broker(0)
    world.puback(0)
    assert [e["text"] for e in world.finals["b"]] == ["answer 1"] and not world.unacked
