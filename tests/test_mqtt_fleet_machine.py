"""The fleet hand-off machine (pure, clock injected), under random interleavings.

Hand-offs start (a bounce with a refusal to fall back on, or a leaving member's request with none),
the broker PUBACKs their publishes with success, with reason 16 (no member subscribed) or with a
refusal, the client fails to queue some, the clock advances, the client is replaced by a reload,
the member starts stopping and gives up on what still waits. Whatever the order:

- every hand-off ends at most once (Release, Fallback or Keep), and, once everything settles,
  exactly once;
- `Release` (our copy acknowledged) only after the broker took a published copy with a member to
  deliver it to (a PUBACK that is neither reason 16 nor a refusal), or its expiry ran out;
- `Fallback` only for a hand-off that has a refusal to answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.transports.mqtt.fleet import (
    HANDOFF_GIVE_UP_S,
    NO_MATCHING_SUBSCRIBERS,
    Fallback,
    Fleet,
    FleetCommand,
    Keep,
    PublishHandoff,
    Release,
    Source,
    Waiting,
)

NOT_AUTHORIZED = 135


@dataclass
class World:
    fleet: Fleet = field(default_factory=lambda: Fleet(rand=lambda: 0.5))
    now: float = 0.0
    in_flight: list[PublishHandoff] = field(default_factory=list)
    outcomes: dict[int, list[FleetCommand]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)  # keys a member got (a successful PUBACK)
    fallbacks: set[int] = field(default_factory=set)
    expires_at: dict[int, float] = field(default_factory=dict)
    keys: int = 0

    def run(self, commands: list[FleetCommand]) -> None:
        for command in commands:
            if isinstance(command, PublishHandoff):
                assert not self.outcomes.get(command.key), f"{command.key} published after it ended"  # type: ignore[call-overload]
                self.in_flight.append(command)
                continue
            if isinstance(command, Waiting):
                assert not self.outcomes.get(command.key), f"{command.key} waiting after it ended"  # type: ignore[call-overload]
                continue
            key: Any = command.key
            self.outcomes.setdefault(key, []).append(command)
            assert len(self.outcomes[key]) == 1, f"{key} ended twice: {self.outcomes[key]}"
            if isinstance(command, Release):
                expired = key in self.expires_at and self.now >= self.expires_at[key] - 1
                assert key in self.taken or expired, f"{key} released but no member took it"
            if isinstance(command, Fallback):
                assert key in self.fallbacks, f"{key} answered a refusal it never had"

    def start(self, bounce: bool, expiry: int | None) -> None:
        self.keys += 1
        key = self.keys
        if bounce:
            self.fallbacks.add(key)
        source = Source(b"{}", "client/inbox", b"c", expiry, self.now)
        fallback = {"event": "error", "code": "queue_full"} if bounce else None
        if expiry is not None:
            self.expires_at[key] = self.now + expiry  # then the broker would drop it too
        self.run(self.fleet.hand_off(key, source, hops=1, fallback=fallback, now=self.now))

    def puback(self, index: int, kind: str) -> None:
        if not self.in_flight:
            return
        command = self.in_flight.pop(index % len(self.in_flight))
        reason = {"ok": 0, "none": NO_MATCHING_SUBSCRIBERS, "refused": NOT_AUTHORIZED}[kind]
        if kind == "ok":
            self.taken.add(command.key)  # type: ignore[arg-type]
        self.run(self.fleet.published(command.ref, reason=reason, failure=kind == "refused", now=self.now))

    def queue_failed(self, index: int) -> None:
        if self.in_flight:
            command = self.in_flight.pop(index % len(self.in_flight))
            self.run(self.fleet.publish_failed(command.ref, self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.run(self.fleet.tick(self.now))

    def replace_client(self) -> None:
        # The old client's publishes are gone with it (their PUBACKs never come).
        self.in_flight = []
        self.fleet.client_replaced(self.now)
        self.run(self.fleet.tick(self.now))

    def stop(self) -> None:
        self.fleet.stopping = True

    def give_up(self) -> None:
        self.run(self.fleet.give_up_waiting())

    def settle(self) -> None:
        """A member with room appears: every copy published from now on is taken."""
        for _ in range(1000):
            while self.in_flight:
                self.puback(0, "ok")
            if not self.fleet.busy():
                return
            self.advance(1.0)
        raise AssertionError("did not settle")


OPS = st.one_of(
    st.tuples(st.just("start"), st.booleans(), st.one_of(st.none(), st.integers(0, 40))),
    st.tuples(st.just("puback"), st.integers(0, 5), st.sampled_from(["ok", "none", "none", "refused"])),
    st.tuples(st.just("queue_failed"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 2.0, 10.0, HANDOFF_GIVE_UP_S])),
    st.tuples(st.just("replace_client")),
    st.tuples(st.just("stop")),
    st.tuples(st.just("give_up")),
)


@settings(max_examples=600, deadline=None)
@given(ops=st.lists(OPS, max_size=60))
def test_every_handoff_ends_exactly_once_and_is_released_only_when_a_member_took_it(
    ops: list[tuple[Any, ...]],
) -> None:
    world = World()
    for name, *args in ops:
        getattr(world, name)(*args)
    world.settle()
    for key in range(1, world.keys + 1):
        assert len(world.outcomes.get(key, [])) == 1, f"hand-off {key} never ended"


def test_no_member_subscribed_retries_with_backoff_then_a_bounce_answers_its_refusal() -> None:
    world = World()
    world.start(bounce=True, expiry=None)
    for _ in range(200):
        if world.outcomes:
            break
        world.puback(0, "none")
        world.advance(0.5)
    assert [type(c) for c in world.outcomes[1]] == [Fallback]
    assert world.now >= HANDOFF_GIVE_UP_S
    assert world.fleet.counters.retries > 10


def test_a_leaving_members_request_is_kept_not_answered_when_time_is_up() -> None:
    world = World()
    world.start(bounce=False, expiry=None)
    world.puback(0, "none")
    world.give_up()
    assert [type(c) for c in world.outcomes[1]] == [Keep]


def test_an_expired_request_is_released_without_publishing() -> None:
    world = World()
    world.start(bounce=False, expiry=30)
    world.advance(31)
    world.puback(0, "none")
    world.advance(2.0)
    assert [type(c) for c in world.outcomes[1]] == [Release]
    assert not world.in_flight
