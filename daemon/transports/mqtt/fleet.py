"""Fleet hand-offs: giving a fleet request back to the fleet. Pure: the clock is an argument.

A member hands a fleet request back when it will not answer it: it is leaving (drain, stop) or it
refused it for lack of room (`queue_full`, `throttled`, `memory_low`; see `topics.should_bounce`).
It re-publishes the message to the fleet topic and acknowledges its own copy only when the broker
PUBACKs the re-published one with a member to give it to. PUBACK reason 16 (no matching
subscribers: every member is full or leaving, so none is subscribed) means the broker dropped it:
publish again after a jittered backoff. Every hand-off ends in exactly one outcome:

- `Release`: a member has it; acknowledge our copy.
- `Fallback`: the fleet had no room for `HANDOFF_GIVE_UP_S` (or the broker refused the publish):
  answer the refusal we bounced it for.
- `Keep`: a leaving member's request no one took (or nothing to answer): leave our copy
  unacknowledged in our persistent session, for our next start.

Commands out: `PublishHandoff` (the transport reports the PUBACK with `published`), `Waiting`
(for the log), and the three outcomes. Keyed by an opaque `key` (the transport uses the ledger's entry).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Callable, Union

from daemon.transports.mqtt.topics import Backoff, handoff_user_properties

# PUBACK reason 16: the broker took the message but no one subscribes to the topic.
NO_MATCHING_SUBSCRIBERS = 16
# A hand-off that reached no member is published again after a jittered backoff in these bounds.
HANDOFF_RETRY_MIN_S = 0.25
HANDOFF_RETRY_MAX_S = 2.0
# A member that refused a fleet request gives the fleet this long to take it, then answers its refusal.
HANDOFF_GIVE_UP_S = 30.0


@dataclass(frozen=True)
class Source:
    """What we need to hand a fleet request back to the fleet: the message as it came."""

    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    expiry_s: int | None
    received_at: float
    user_properties: tuple[tuple[str, str], ...] = ()
    hops: int = 0


@dataclass(frozen=True)
class PublishHandoff:
    ref: int
    key: Hashable
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    expiry_s: int | None  # what is left of the client's Message Expiry Interval
    user_properties: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Release:
    key: Hashable


@dataclass(frozen=True)
class Fallback:
    key: Hashable
    final: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class Keep:
    key: Hashable
    reason: str


@dataclass(frozen=True)
class Waiting:
    """No member took it: published again in `retry_in_s` (said once per hand-off, for the log)."""

    key: Hashable
    retry_in_s: float


FleetCommand = Union[PublishHandoff, Release, Fallback, Keep, Waiting]


@dataclass(eq=False)
class _Handoff:
    key: Hashable
    source: Source
    hops: int
    fallback: dict[str, Any] | None
    started_at: float
    backoff: Backoff
    due: float | None = None
    ref: int | None = None


@dataclass
class FleetCounters:
    handed_off: int = 0
    bounced: int = 0
    retries: int = 0
    saturated: int = 0


class Fleet:
    """The hand-offs in progress. `rand` feeds the retry jitter (injected for tests)."""

    def __init__(self, rand: Callable[[], float] | None = None) -> None:
        self.rand = rand
        self.counters = FleetCounters()
        # Stopping: a bounced request is no longer answered with its refusal after the give-up time.
        self.stopping = False
        self._waiting: list[_Handoff] = []
        self._in_flight: dict[int, _Handoff] = {}
        self._next_ref = 0

    def busy(self) -> bool:
        return bool(self._waiting or self._in_flight)

    def next_due(self) -> float | None:
        dues = [h.due for h in self._waiting if h.due is not None]
        return min(dues) if dues else None

    def hand_off(
        self, key: Hashable, source: Source, *, hops: int, fallback: dict[str, Any] | None, now: float
    ) -> list[FleetCommand]:
        """Start handing `key` back. `fallback`: what to answer if the fleet cannot take it (a
        bounce); None for a leaving member's request."""
        if fallback is not None:
            self.counters.bounced += 1
        args = (HANDOFF_RETRY_MIN_S, HANDOFF_RETRY_MAX_S)
        backoff = Backoff(*args) if self.rand is None else Backoff(*args, rand=self.rand)
        return self._publish(_Handoff(key, source, hops, fallback, now, backoff), now)

    def _publish(self, handoff: _Handoff, now: float) -> list[FleetCommand]:
        source = handoff.source
        expiry = None
        if source.expiry_s is not None:
            expiry = source.expiry_s - int(now - source.received_at)
            if expiry <= 0:
                # Expired on its way back: the broker would discard it unanswered too.
                return [Release(handoff.key)]
        self._next_ref += 1
        handoff.ref = self._next_ref
        handoff.due = None
        self._in_flight[handoff.ref] = handoff
        return [
            PublishHandoff(
                handoff.ref, handoff.key, source.payload, source.response_topic, source.correlation, expiry,
                tuple(handoff_user_properties(source.user_properties, handoff.hops)),
            )
        ]

    def published(self, ref: int, *, reason: int, failure: bool, now: float) -> list[FleetCommand]:
        """The broker's PUBACK for a hand-off: `reason` its code, `failure` whether it is a refusal."""
        handoff = self._in_flight.pop(ref, None)
        if handoff is None:
            return []
        if reason == NO_MATCHING_SUBSCRIBERS:
            return self._retry_later(handoff, now)
        if failure:
            # Usually the broker's ACL: publishing it again will not help.
            return [self._give_up(handoff, f"the broker refused the hand-off (reason {reason})")]
        self.counters.handed_off += 1
        return [Release(handoff.key)]

    def publish_failed(self, ref: int, now: float) -> list[FleetCommand]:
        """The client could not queue the publish: try again later."""
        handoff = self._in_flight.pop(ref, None)
        return [] if handoff is None else self._retry_later(handoff, now)

    def _retry_later(self, handoff: _Handoff, now: float) -> list[FleetCommand]:
        if handoff.fallback is not None and not self.stopping and now - handoff.started_at >= HANDOFF_GIVE_UP_S:
            return [self._give_up(handoff, f"no fleet member had room for {HANDOFF_GIVE_UP_S:.0f} s")]
        self.counters.retries += 1
        delay = handoff.backoff.next_delay()
        handoff.due = now + delay
        self._waiting.append(handoff)
        return [Waiting(handoff.key, delay)] if handoff.backoff.attempt == 1 else []

    def tick(self, now: float) -> list[FleetCommand]:
        due = [h for h in self._waiting if h.due is not None and h.due <= now]
        if not due:
            return []
        self._waiting = [h for h in self._waiting if h not in due]
        commands: list[FleetCommand] = []
        for handoff in due:
            commands += self._publish(handoff, now)
        return commands

    def client_replaced(self, now: float) -> None:
        """Hand-offs the old client had not got PUBACKs for go out again on the new one."""
        for handoff in self._in_flight.values():
            handoff.due = now
            self._waiting.append(handoff)
        self._in_flight.clear()

    def give_up_waiting(self) -> list[FleetCommand]:
        """Stopping, time is up: hand-offs still waiting for a member stay in our session."""
        waiting, self._waiting = self._waiting, []
        return [Keep(h.key, "stopping: no fleet member had room in time") for h in waiting]

    def abandon(self, reason: str) -> list[FleetCommand]:
        """No client at all (setup failed): every hand-off ends now."""
        handoffs = [*self._waiting, *self._in_flight.values()]
        self._waiting, self._in_flight = [], {}
        return [self._give_up(h, reason) for h in handoffs]

    def _give_up(self, handoff: _Handoff, reason: str) -> FleetCommand:
        if handoff.fallback is None:
            return Keep(handoff.key, reason)
        self.counters.saturated += 1
        return Fallback(handoff.key, handoff.fallback, reason)
