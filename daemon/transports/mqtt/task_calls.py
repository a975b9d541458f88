"""The MQTT face of tasks, decided without I/O: task calls, result payloads, the trigger book.

Pure, clock injected. `tasks.py` (the wiring) feeds it messages and publishes what comes out.

- A message on `<prefix>/task/<name>` is a task call: `interpret_task_call` turns it into a
  request and a route (MQTT 5 Response Topic, else a JSON object's `reply_to`, else the task's
  retained `<prefix>/task/<name>/result`), or a structured error with the best route for it.
- The result topic carries one shape, the result object (`daemon.triggers.result_payload`):
  `result_shape` turns a final event bound there into it, whoever published it.
- `TriggerBook` keeps one `TriggerGate` per trigger task across reloads and says what the
  trigger status topics should hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# A module, not names: daemon.triggers imports this package's topics (an import cycle at start-up).
from daemon import triggers
from daemon.protocol import Code, EdgeError, Request, to_json_line
from daemon.task_topics import result_topic, status_topic, task_name_of
from daemon.transports.mqtt.topics import (
    Destinations,
    Rejected,
    Route,
    Topics,
    apply_message_expiry,
    error_event,
    is_topic_name,
    oversize,
)

if TYPE_CHECKING:
    from daemon.config import GenerationConfig
    from daemon.tasks import Task, TaskRegistry

# The one field of a JSON object payload on a task topic that is not input: where the answer goes.
REPLY_TO = "reply_to"
# Trigger status topics are published on change at most once per this many seconds.
STATUS_MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class TaskCall:
    """An accepted call: the request to submit and where its events go (`retain`: the result topic)."""

    task: str
    request: Request
    route: Route
    retain: bool


def interpret_task_call(
    topic_name: str,
    payload: bytes,
    tasks: TaskRegistry,
    topics: Topics,
    defaults: GenerationConfig,
    *,
    request_id: str,
    max_payload_bytes: int,
    destinations: Destinations,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry_s: int | None = None,
    dropped_size: int | None = None,
) -> TaskCall | Rejected:
    """One message on a task topic → a `TaskCall`, or the error and its route. `dropped_size`: the
    size of a payload the client dropped on arrival for being over the limit (refused as too large).

    The payload is the task's input (`payload_input`: its JSON value, else its UTF-8 text); a JSON
    object may also carry `reply_to`, which is taken out of the input. A destination the policy
    refuses is never used, not even for the error that says so. An error for a known task with no
    reply route goes to its result topic (Home Assistant's sensor shows it); for an unknown task,
    to `<prefix>/error`."""
    name = task_name_of(topics, topic_name) or ""
    task = tasks.get(name)
    refused: str | None = None
    if response_topic is not None and (why := destinations.refusal(response_topic)) is not None:
        refused, response_topic = f"Response Topic: {_short(response_topic)} {why}", None
    reply_to: str | None = None

    def reject(exc: EdgeError) -> Rejected:
        if response_topic is not None:
            route = Route(response_topic, correlation)
        elif reply_to is not None:
            route = Route(reply_to, correlation)
        elif task is not None:
            route = Route(result_topic(topics, name))
        else:
            route = Route(topics.error, correlation)
        return Rejected(error_event(exc, request_id), route)

    if (too_large := oversize(payload, dropped_size, max_payload_bytes)) is not None:
        return reject(too_large)
    try:
        value = triggers.payload_input(payload)
    except EdgeError as exc:
        return reject(exc)
    if isinstance(value, dict) and REPLY_TO in value:
        value = dict(value)
        given = value.pop(REPLY_TO)
        if not isinstance(given, str) or not is_topic_name(given):
            return reject(EdgeError(Code.INVALID_REQUEST, f"{REPLY_TO}: must be an MQTT topic name without "
                                                          "wildcards or NUL"))
        if (why := destinations.refusal(given)) is not None:
            refused = refused or f"{REPLY_TO}: {_short(given)} {why}"
        else:
            reply_to = given
    if refused is not None:
        return reject(EdgeError(Code.INVALID_REQUEST, refused))
    if task is None:
        known = ", ".join(tasks.names()) or "none are configured"
        return reject(EdgeError(Code.INVALID_REQUEST, f"task: unknown task {json.dumps(name)[:80]}; known: {known}"))
    try:
        request = task.request(value, defaults, request_id=request_id, topic=topic_name)
        request = apply_message_expiry(request, expiry_s)
    except EdgeError as exc:
        return reject(exc)
    if response_topic is not None:
        return TaskCall(name, request, Route(response_topic, correlation), retain=False)
    if reply_to is not None:
        return TaskCall(name, request, Route(reply_to, correlation), retain=False)
    return TaskCall(name, request, Route(result_topic(topics, name)), retain=True)


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def result_task_of(topics: Topics, topic: str) -> str | None:
    """The task whose result topic this is, or None."""
    head, tail = f"{topics.prefix}/task/", "/result"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    name = topic[len(head):-len(tail)]
    return name if name and "/" not in name else None


def result_shape(topics: Topics, topic: str, payload: bytes) -> bytes:
    """What goes out on `topic`: a final event bound for a task's result topic becomes the result
    object `{"task", "source_topic", "text", "json", "timings"}` (or `error` instead of the last
    three); anything else goes out as it is."""
    name = result_task_of(topics, topic)
    if name is None:
        return payload
    try:
        event = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(event, dict) or event.get("event") not in ("done", "error"):
        return payload
    return encode(triggers.result_payload(name, f"{topics.prefix}/task/{name}", event))


def encode(obj: Mapping[str, Any]) -> bytes:
    return to_json_line(dict(obj))[:-1]


# --- the trigger book ---------------------------------------------------------------------------


def trigger_settings(task: Task) -> tuple[float, str, int]:
    spec = task.spec
    return spec.min_interval_s, spec.coalesce, spec.max_queue


@dataclass(frozen=True)
class Reconciled:
    """What a reload changed: tasks added and removed (all tasks), and triggers removed."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    triggers_removed: tuple[str, ...]


class TriggerBook:
    """Every task's gate (trigger tasks only) and what the status topics last said.

    A reload keeps a trigger's gate (counters, waiting messages, intervals) and updates its
    settings in place; a removed trigger's waiting messages are counted `dropped` before it goes."""

    def __init__(self) -> None:
        self.gates: dict[str, triggers.TriggerGate] = {}
        self.filters: dict[str, tuple[str, ...]] = {}
        self.names: tuple[str, ...] = ()
        self._published: dict[str, dict[str, int]] = {}
        self._dirty: set[str] = set()
        self._last_at = -1e9

    def reconcile(self, tasks: Iterable[Task]) -> Reconciled:
        current = {t.name: t for t in tasks}
        before, before_triggers = set(self.names), set(self.gates)
        for name, task in current.items():
            if not task.spec.subscribe:
                continue
            min_interval_s, coalesce, max_queue = trigger_settings(task)
            gate = self.gates.get(name)
            if gate is None:
                self.gates[name] = triggers.TriggerGate(min_interval_s, coalesce, max_queue)
            else:
                gate.min_interval_s, gate.coalesce, gate.max_queue = min_interval_s, coalesce, max_queue
            self.filters[name] = tuple(dict.fromkeys(task.spec.subscribe))
            self._dirty.add(name)
        gone = sorted(before_triggers - {n for n, t in current.items() if t.spec.subscribe})
        for name in gone:
            gate = self.gates.pop(name)
            gate.counters.dropped += gate.pending
            self.filters.pop(name, None)
            self._published.pop(name, None)
            self._dirty.discard(name)
        self.names = tuple(sorted(current))
        return Reconciled(tuple(sorted(set(current) - before)), tuple(sorted(before - set(current))), tuple(gone))

    def subscriptions(self) -> set[str]:
        return {f for filters in self.filters.values() for f in filters}

    def matching(self, topic: str) -> list[str]:
        """Trigger tasks one of whose filters matches `topic` (each once, however many match)."""
        return [name for name, filters in sorted(self.filters.items())
                if any(triggers.topic_matches(f, topic) for f in filters)]

    def status(self) -> dict[str, dict[str, int]]:
        return {name: gate.status() for name, gate in sorted(self.gates.items())}

    def mark(self, name: str) -> None:
        self._dirty.add(name)

    def next_due(self, *, status: bool = True) -> float | None:
        """When a waiting message may start or (`status`: we can publish) a status topic is due. A
        full gate is left out: its next start comes with a run's end, not with the clock."""
        gates = [g for g in self.gates.values() if g.in_flight < g.max_queue]
        times = [t for t in (g.next_due() for g in gates) if t is not None]
        if status and self._dirty:
            times.append(self._last_at + STATUS_MIN_INTERVAL_S)
        return min(times, default=None)

    def status_due(self, topics: Topics, now: float, *, force: bool = False) -> list[tuple[str, bytes]]:
        """(topic, retained payload) for the trigger status topics that changed (at most once a
        second; `force`: now, all of them, e.g. after a connect)."""
        if not force and (not self._dirty or now - self._last_at < STATUS_MIN_INTERVAL_S):
            return []
        names = sorted(self.gates) if force else sorted(self._dirty & set(self.gates))
        self._dirty.clear()
        self._last_at = now
        out = []
        for name in names:
            status = self.gates[name].status()
            if not force and self._published.get(name) == status:
                continue
            self._published[name] = status
            out.append((status_topic(topics, name), encode({"task": name, **status})))
        return out
