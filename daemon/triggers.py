"""Triggers: tasks that run on MQTT messages, without flooding the board. Pure, clock injected.

What the MQTT door needs and nothing it has to know about: topic filter rules (matching, whether a
task's publish topic could match its own subscription), a per-task `TriggerGate` that decides for
each message whether it runs now, waits (coalesced to the latest per source topic) or is dropped,
and the payload shapes in and out. The door wires it: `offer()` on a message, `finished()` when the
run's final event arrives, `due()` when `next_due()` comes; each returns the runs to submit.

Counts always add up: received == run + coalesced + dropped + pending (`failed` counts runs that
ended in an error, a subset of `run`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from daemon.protocol import Code, EdgeError
from daemon.transports.mqtt.topics import is_topic_name

if TYPE_CHECKING:
    from daemon.tasks import Template


# --- topic filters -----------------------------------------------------------------------------


def is_topic_filter(text: str) -> bool:
    """A valid MQTT subscription filter: `+` alone in a level, `#` alone and last."""
    if not text or "\x00" in text or len(text.encode("utf-8")) > 65535:
        return False
    levels = text.split("/")
    for index, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or index != len(levels) - 1)):
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Does a published `topic` match a subscription filter (MQTT 3.1.1 §4.7 rules)?"""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return _match(topic_filter.split("/"), topic.split("/"), literal_b=True)


def filters_overlap(a: str, b: str) -> bool:
    """Could one topic match both filters?"""
    return _match(a.split("/"), b.split("/"), literal_b=False)


def _match(a: list[str], b: list[str], *, literal_b: bool) -> bool:
    i = 0
    while True:
        a_done, b_done = i >= len(a), i >= len(b)
        if a_done and b_done:
            return True
        if not a_done and a[i] == "#":
            return True
        if not b_done and b[i] == "#" and not literal_b:
            return True
        if a_done or b_done:
            return False
        if a[i] != b[i] and a[i] != "+" and (literal_b or b[i] != "+"):
            return False
        i += 1


def publish_pattern(template: Template) -> str:
    """A filter matching every topic `template` can render to: from the first level with a
    placeholder on, anything (a placeholder may hold '/')."""
    text = ""
    for piece in template.pieces:
        if not isinstance(piece, str):
            head = text.rsplit("/", 1)[0] + "/" if "/" in text else ""
            return head + "#"
        text += piece
    return text


def render_publish_topic(template: Template, subscribe: tuple[str, ...], values: dict[str, Any]) -> str:
    """The topic a run's answer goes to; never one the task itself listens to."""
    topic = template.render(values)
    if not is_topic_name(topic):
        raise EdgeError(Code.INVALID_REQUEST, f"publish: {topic[:80]!r} is not a topic name one can publish to")
    if any(topic_matches(f, topic) for f in subscribe):
        raise EdgeError(Code.INVALID_REQUEST, f"publish: {topic!r} matches the task's own subscription")
    return topic


# --- payloads ----------------------------------------------------------------------------------


def payload_input(payload: bytes) -> Any:
    """A message as a task's input: its JSON value when it is JSON, else its UTF-8 text."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeError(Code.INVALID_JSON, f"payload is neither JSON nor UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def result_payload(task: str, source_topic: str, final: dict[str, Any]) -> dict[str, Any]:
    """What a trigger publishes: `{"task", "source_topic", "text", "json", "timings"}`, or with an
    `error` object instead when the run failed."""
    out: dict[str, Any] = {"task": task, "source_topic": source_topic}
    if final.get("event") == "done":
        out.update(text=final.get("text", ""), json=final.get("json"), timings=final.get("timings", {}))
    else:
        out["error"] = {"code": final.get("code"), "message": final.get("message")}
    return out


# --- the gate ----------------------------------------------------------------------------------


class Outcome(Enum):
    RUN = "run"  # start it now
    QUEUED = "queued"  # waits for the running one or the interval
    COALESCED = "coalesced"  # replaced a waiting one (that one is counted coalesced)
    DROPPED = "dropped"


@dataclass(frozen=True)
class Run:
    topic: str
    payload: Any


@dataclass
class _Source:
    running: int = 0
    last_start: float | None = None


@dataclass
class Counters:
    received: int = 0
    run: int = 0
    coalesced: int = 0
    dropped: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"received": self.received, "run": self.run, "coalesced": self.coalesced, "dropped": self.dropped,
                "failed": self.failed}


@dataclass
class TriggerGate:
    """One task's admission of trigger messages, per source topic.

    - A source topic runs at most once per `min_interval_s`, and one at a time.
    - A message that cannot run now: with `coalesce="latest"` it waits, replacing any message
      already waiting for that topic; with `"drop"` it is dropped.
    - At most `max_queue` runs of the task are in flight (submitted, not finished) and at most
      `max_queue` wait; beyond that, messages are dropped.
    """

    min_interval_s: float
    coalesce: str
    max_queue: int
    counters: Counters = field(default_factory=Counters)
    _sources: dict[str, _Source] = field(default_factory=dict)
    _pending: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    _in_flight: int = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def status(self) -> dict[str, int]:
        return {**self.counters.to_dict(), "pending": self.pending, "running": self._in_flight}

    def offer(self, topic: str, payload: Any, now: float) -> tuple[Outcome, list[Run]]:
        self.counters.received += 1
        source = self._sources.setdefault(topic, _Source())
        if topic not in self._pending and self._can_start(source, now):
            return Outcome.RUN, [self._start(topic, payload, source, now)]
        if self.coalesce == "drop":
            self.counters.dropped += 1
            return Outcome.DROPPED, []
        if topic in self._pending:
            self._pending[topic] = payload
            self.counters.coalesced += 1
            return Outcome.COALESCED, []
        if len(self._pending) >= self.max_queue:
            self.counters.dropped += 1
            return Outcome.DROPPED, []
        self._pending[topic] = payload
        return Outcome.QUEUED, []

    def finished(self, topic: str, ok: bool, now: float) -> list[Run]:
        """A run's final event arrived (`ok`: it was `done`)."""
        source = self._sources.get(topic)
        if source is not None and source.running:
            source.running -= 1
            self._in_flight -= 1
        if not ok:
            self.counters.failed += 1
        return self.due(now)

    def due(self, now: float) -> list[Run]:
        """Waiting messages that may start now, oldest first."""
        runs = []
        for topic in list(self._pending):
            source = self._sources[topic]
            if self._can_start(source, now):
                runs.append(self._start(topic, self._pending.pop(topic), source, now))
        self._forget_idle(now)
        return runs

    def next_due(self) -> float | None:
        """When a waiting message could start, if only the interval holds it back."""
        times = []
        for topic in self._pending:
            source = self._sources[topic]
            if not source.running and source.last_start is not None:
                times.append(source.last_start + self.min_interval_s)
        return min(times, default=None)

    def _can_start(self, source: _Source, now: float) -> bool:
        if source.running or self._in_flight >= self.max_queue:
            return False
        return source.last_start is None or now - source.last_start >= self.min_interval_s

    def _start(self, topic: str, payload: Any, source: _Source, now: float) -> Run:
        source.running += 1
        source.last_start = now
        self._in_flight += 1
        self.counters.run += 1
        return Run(topic, payload)

    def _forget_idle(self, now: float) -> None:
        """Drop what is remembered about topics that can no longer hold anything back (a `+`
        subscription may see many topics)."""
        for topic, source in list(self._sources.items()):
            idle = not source.running and topic not in self._pending
            if idle and (source.last_start is None or now - source.last_start >= self.min_interval_s):
                del self._sources[topic]
