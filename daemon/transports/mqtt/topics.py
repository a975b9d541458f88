"""MQTT naming, routing and payload rules: pure functions, no I/O, no clock.

Everything the MQTT transport decides about a message before it touches the network lives here,
so it can be tested in milliseconds: topic names, where an answer goes, how a payload becomes a
`Request` or an error, how MQTT 5 message expiry folds into the request deadline, and the
reconnect backoff schedule.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

from daemon.protocol import (
    DEFAULT_LIMITS,
    Code,
    EdgeError,
    ErrorEvent,
    Limits,
    Request,
    parse_json_object,
    parse_request,
    peek_id,
    to_json_line,
)

if TYPE_CHECKING:
    from daemon.config import GenerationConfig
    from daemon.constraints import ConstraintCompiler

# MQTT topic names are UTF-8 strings of at most 65535 bytes; publishing to a name with a wildcard
# or a NUL is a protocol error that makes the broker drop the connection.
MAX_TOPIC_BYTES = 65535
_FORBIDDEN_IN_TOPIC_NAME = ("+", "#", "\x00")
_NODE_ID_INVALID = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_node_id(name: str) -> str:
    """A node id that is safe in a topic level and in a Home Assistant unique id.

    Every character outside `[A-Za-z0-9_-]` becomes `_` (so `pi.local` → `pi_local`); an empty
    result falls back to `edgellm`.
    """
    cleaned = _NODE_ID_INVALID.sub("_", name.strip())
    return cleaned or "edgellm"


def is_topic_name(topic: str) -> bool:
    """Can we publish to this? (non-empty, no wildcards, no NUL, not too long)."""
    if not topic or any(c in topic for c in _FORBIDDEN_IN_TOPIC_NAME):
        return False
    return len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES


def shared_filter(group: str, topic: str) -> str:
    """The shared-subscription filter the broker load-balances across a fleet group."""
    return f"$share/{group}/{topic}"


# --- fleet hand-offs ------------------------------------------------------------------------

# MQTT 5 user property on a fleet request a member handed back because it had no room: how many
# members have refused it so far. Absent on a request as a client published it.
FLEET_HOPS_PROPERTY = "edgellm-hops"
# After this many refusals in a row the fleet is saturated: the member that refuses it next answers
# with its error (`queue_full`, `throttled`, `memory_low` and a `retry_after_ms`) instead.
FLEET_MAX_HOPS = 3
# Refusals that say "not here, not now" about one member: a peer may well have room.
FLEET_BOUNCE_CODES = frozenset({Code.QUEUE_FULL, Code.THROTTLED, Code.MEMORY_LOW})


def fleet_hops(user_properties: Iterable[tuple[str, str]] | None) -> int:
    """The hop count a fleet request carries (0 when absent or not a small non-negative number)."""
    for key, value in user_properties or ():
        if key == FLEET_HOPS_PROPERTY:
            try:
                hops = int(value)
            except (TypeError, ValueError):
                return 0
            return min(max(hops, 0), FLEET_MAX_HOPS)
    return 0


def should_bounce(code: str, hops: int, *, client_saw_events: bool, v5: bool) -> bool:
    """Does a member hand a fleet request it refused back to the fleet (rather than answer the error)?

    Only for a refusal about this member's capacity, only while the hop count allows it, only when
    the client has seen nothing of this request yet (a stream that got `queued` or tokens is
    answered here), and only over MQTT 5 (3.1.1 has no user properties to count hops in).
    """
    return v5 and code in FLEET_BOUNCE_CODES and hops < FLEET_MAX_HOPS and not client_saw_events


def handoff_user_properties(original: Iterable[tuple[str, str]] | None, hops: int) -> list[tuple[str, str]]:
    """The user properties of a handed-off request: the client's, with our hop count (if any) set."""
    kept = [(k, v) for k, v in original or () if k != FLEET_HOPS_PROPERTY]
    if hops > 0:
        kept.append((FLEET_HOPS_PROPERTY, str(hops)))
    return kept


@dataclass(frozen=True)
class Topics:
    """Every topic one daemon uses, derived from its prefix."""

    node_id: str
    prefix: str

    @property
    def request(self) -> str:
        return f"{self.prefix}/request"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/cancel"

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def error(self) -> str:
        return f"{self.prefix}/error"

    @property
    def ha_prompt(self) -> str:
        """Where the Home Assistant `text` entity publishes what the user typed (plain text)."""
        return f"{self.prefix}/ha/prompt"

    @property
    def ha_answer(self) -> str:
        """Retained: the last answer to a Home Assistant prompt (the last-answer sensor reads it)."""
        return f"{self.prefix}/ha/answer"

    @property
    def ha_answer_attributes(self) -> str:
        """Retained: the last answer cut to fit Home Assistant's attribute limit (the sensor's attributes)."""
        return f"{self.prefix}/ha/answer/attributes"

    def response(self, request_id: str) -> str:
        return f"{self.prefix}/response/{request_id}"


def make_topics(node_id: str, prefix: str, hostname: str) -> Topics:
    """Topics from the config: node_id defaults to the hostname, prefix to `edgellm/<node_id>`."""
    node = sanitize_node_id(node_id or hostname)
    clean_prefix = prefix.strip().rstrip("/") or f"edgellm/{node}"
    return Topics(node_id=node, prefix=clean_prefix)


def default_client_id(node_id: str) -> str:
    """Stable across restarts: the broker keeps our persistent session under this id."""
    return f"edgellm-{node_id}"


# --- routing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a request's events are published, and the MQTT 5 Correlation Data to echo."""

    topic: str
    correlation: bytes | None = None


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest); a wildcard never matches a `$` topic."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    p_levels, t_levels = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(p_levels) == len(t_levels)


# Every node's topics live under `edgellm/<node_id>/` by default: no client may route answers there.
EDGELLM_ROOT = "edgellm"


@dataclass(frozen=True)
class Destinations:
    """Which topics a client may name as its answer's destination (Response Topic or `reply_to`).

    The daemon publishes with its own broker rights, so a client must not borrow them to write
    where it could not. Refused always: `$` topics (`$SYS`, `$share`), wildcards, NUL. Refused
    unless a pattern of `mqtt.allow_reply_to` matches: the `edgellm/` tree (every node's topics,
    the fleet topic), this node's own prefix, the fleet topic and the Home Assistant discovery
    prefix. Allowed always: this node's `<prefix>/response/…`. Anything else is the client's own.
    """

    own_prefix: str
    protected: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()

    def refusal(self, topic: str) -> str | None:
        """Why `topic` may not be a destination, or None if it may."""
        if not is_topic_name(topic):
            return "must be an MQTT topic name without wildcards or NUL"
        if topic.startswith("$"):
            return "must not start with '$' (broker topics such as $SYS)"
        if topic.startswith(f"{self.own_prefix}/response/"):
            return None
        if any(topic_matches(p, topic) for p in self.allowed):
            return None
        if any(topic_matches(p, topic) for p in self.protected):
            return "is inside edgellm's or Home Assistant's topics; mqtt.allow_reply_to can allow it"
        return None


def make_destinations(
    topics: Topics, *, fleet_topic: str = "", ha_prefix: str = "", allow_reply_to: Iterable[str] = ()
) -> Destinations:
    protected = [f"{EDGELLM_ROOT}/#", topics.prefix, f"{topics.prefix}/#"]
    if fleet_topic:
        protected.append(fleet_topic)
    if ha_prefix:
        protected.append(f"{ha_prefix}/#")
    return Destinations(topics.prefix, tuple(protected), tuple(allow_reply_to))


def route_for(
    topics: Topics,
    *,
    response_topic: str | None,
    correlation: bytes | None,
    reply_to: str | None,
    request_id: str | None,
) -> Route | None:
    """First match wins: MQTT 5 Response Topic, then the `reply_to` field, then
    `<prefix>/response/<id>`. None when nothing usable is known (the caller uses the error topic)."""
    if response_topic is not None and is_topic_name(response_topic):
        return Route(response_topic, correlation)
    if reply_to is not None and is_topic_name(reply_to):
        return Route(reply_to, correlation)
    if request_id is not None:
        topic = topics.response(request_id)
        if is_topic_name(topic):
            return Route(topic, correlation)
    return None


@dataclass(frozen=True)
class Accepted:
    request: Request
    route: Route


@dataclass(frozen=True)
class Rejected:
    error: ErrorEvent
    route: Route


Decision = Union[Accepted, Rejected]


def interpret_request(
    payload: bytes,
    topics: Topics,
    defaults: GenerationConfig,
    *,
    max_payload_bytes: int,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry_s: int | None = None,
    destinations: Destinations | None = None,
    limits: Limits = DEFAULT_LIMITS,
    constraints: ConstraintCompiler | None = None,
    dropped_size: int | None = None,
) -> Decision:
    """Turn one request message into an accepted `Request` with its route, or a structured error
    with the best route we can find for it. Validation is the socket's (`daemon.protocol`).

    `dropped_size`: the size of a payload dropped on arrival for being over the limit (`payload`
    is then empty); it is refused as too large. A destination `destinations` refuses is not used,
    not even for the error that says so."""
    policy = destinations or Destinations(topics.prefix)
    refused: tuple[str, str, str] | None = None
    if response_topic is not None and (why := policy.refusal(response_topic)) is not None:
        refused, response_topic = ("Response Topic", response_topic, why), None

    def reject(exc: EdgeError, request_id: str | None, reply_to: str | None) -> Rejected:
        if reply_to is not None and policy.refusal(reply_to) is not None:
            reply_to = None
        route = route_for(
            topics, response_topic=response_topic, correlation=correlation, reply_to=reply_to, request_id=request_id
        )
        return Rejected(error_event(exc, request_id), route or Route(topics.error, correlation))

    if (too_large := oversize(payload, dropped_size, max_payload_bytes)) is not None:
        return reject(too_large, None, None)
    obj: dict[str, Any] | None = None
    try:
        obj = parse_json_object(payload)
        request = parse_request(obj, defaults, allow_reply_to=True, limits=limits, constraints=constraints)
    except Exception as exc:
        # Validation's own errors, and anything else it lets escape (a bug there must still be
        # answered on the client's route, with its id): mapped here, once.
        error = exc if isinstance(exc, EdgeError) else EdgeError(
            Code.INVALID_REQUEST, f"the request could not be validated ({type(exc).__name__})"
        )
        reply_to = obj.get("reply_to") if obj is not None else None
        return reject(
            error, peek_id(obj) if obj is not None else None, reply_to if isinstance(reply_to, str) else None
        )
    if refused is None and request.reply_to is not None and (why := policy.refusal(request.reply_to)) is not None:
        refused = ("reply_to", request.reply_to, why)
    if refused is not None:
        name, value, why = refused
        return reject(EdgeError(Code.INVALID_REQUEST, f"{name}: {_short(value)} {why}"), request.id, None)
    route = route_for(
        topics, response_topic=response_topic, correlation=correlation, reply_to=request.reply_to, request_id=request.id
    )
    if route is None:
        bad_id = EdgeError(
            Code.INVALID_REQUEST,
            "id: contains '+', '#' or NUL, so it cannot name a response topic; "
            "set an MQTT 5 Response Topic or 'reply_to', or use a plain id",
        )
        return reject(bad_id, request.id, None)
    try:
        request = apply_message_expiry(request, expiry_s)
    except EdgeError as exc:
        return Rejected(error_event(exc, request.id), route)
    return Accepted(request, route)


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def apply_message_expiry(request: Request, expiry_s: int | None) -> Request:
    """Fold what is left of an MQTT 5 Message Expiry Interval into the request's deadline.

    The broker counts the interval down while the message waits, so on delivery it is the time
    the message has left. It becomes the request's deadline (relative, from receipt) unless
    `deadline_ms` is already shorter. A message delivered with nothing left is refused at once.
    """
    if expiry_s is None:
        return request
    if expiry_s <= 0:
        raise EdgeError(Code.DEADLINE_EXCEEDED, "the MQTT message expired before the request could start")
    expiry_ms = expiry_s * 1000
    if request.deadline_ms is not None and request.deadline_ms <= expiry_ms:
        return request
    return dataclasses.replace(request, deadline_ms=expiry_ms)


def error_event(exc: EdgeError, request_id: str | None) -> ErrorEvent:
    """The error event for a failure that may have no usable request id (e.g. not JSON)."""
    return ErrorEvent(request_id, exc.code, exc.message, exc.retry_after_ms)


def parse_cancel(payload: bytes) -> str:
    """`{"id": "..."}` → the id to cancel, or `EdgeError(invalid_json|invalid_request)`."""
    obj = parse_json_object(payload)
    unknown = sorted(set(obj) - {"id"})
    if unknown:
        raise EdgeError(Code.INVALID_REQUEST, f"unknown field(s) for cancel: {', '.join(unknown)}; allowed: id")
    request_id = obj.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise EdgeError(Code.INVALID_REQUEST, "id: cancel needs the id of the request to cancel")
    return request_id


def payload_too_large(size: int, max_payload_bytes: int) -> EdgeError:
    return EdgeError(Code.PAYLOAD_TOO_LARGE, f"payload is {size} bytes; mqtt.max_payload_bytes is {max_payload_bytes}")


def oversize(payload: bytes, dropped_size: int | None, max_payload_bytes: int) -> EdgeError | None:
    """The `payload_too_large` error for a payload over the limit, or for one the client dropped on
    arrival (`dropped_size`: its size as received; `payload` is then empty); None when it fits."""
    if dropped_size is not None:
        return payload_too_large(dropped_size, max_payload_bytes)
    if len(payload) > max_payload_bytes:
        return payload_too_large(len(payload), max_payload_bytes)
    return None


def ha_prompt_request(
    payload: bytes, request_id: str, defaults: GenerationConfig, max_payload_bytes: int,
    limits: Limits = DEFAULT_LIMITS, dropped_size: int | None = None,
) -> Request:
    """What the Home Assistant `text` entity sends (the typed text, not JSON) as a request.
    `dropped_size`: as for `interpret_request`."""
    if (too_large := oversize(payload, dropped_size, max_payload_bytes)) is not None:
        raise too_large
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise EdgeError(Code.INVALID_JSON, f"prompt is not valid UTF-8 (byte {exc.start})") from None
    if not text:
        raise EdgeError(Code.INVALID_REQUEST, "prompt: empty")
    return parse_request({"id": request_id, "prompt": text}, defaults, limits=limits)


def event_payload(event: dict[str, Any], seq: int | None = None) -> bytes:
    """The JSON bytes of one event; request events carry `seq` (1, 2, …) so gaps show."""
    if seq is not None:
        event = {**event, "seq": seq}
    return to_json_line(event)[:-1]


# --- reconnect backoff ----------------------------------------------------------------------


class Backoff:
    """Capped exponential backoff with jitter: the n-th wait is uniform in [b/2, b] where
    b = min(max_s, min_s * 2**n). Jitter spreads a fleet's reconnects after a broker restart;
    `reset()` after a successful connect."""

    def __init__(self, min_s: float, max_s: float, rand: Callable[[], float] = random.random) -> None:
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self._rand = rand
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.min_s * float(1 << min(self.attempt, 32)))
        self.attempt += 1
        return base / 2 + self._rand() * base / 2

    def reset(self) -> None:
        self.attempt = 0
