"""Pure MQTT rules: names, routing, payload validation, expiry, backoff. No broker, no model."""

from __future__ import annotations

import json

import pytest

from daemon.config import GenerationConfig
from daemon.protocol import EdgeError, Request
from daemon.transports.mqtt.topics import (
    Accepted,
    Backoff,
    Rejected,
    Route,
    apply_message_expiry,
    default_client_id,
    event_payload,
    ha_prompt_request,
    interpret_request,
    is_topic_name,
    make_destinations,
    make_topics,
    parse_cancel,
    route_for,
    sanitize_node_id,
    shared_filter,
    topic_matches,
)

TOPICS = make_topics("", "", "pi")
DEFAULTS = GenerationConfig()
LIMIT = 1024


def interpret(payload: bytes, **kw: object) -> Accepted | Rejected:
    return interpret_request(payload, TOPICS, DEFAULTS, max_payload_bytes=LIMIT, **kw)  # type: ignore[arg-type]


def rejected(decision: Accepted | Rejected) -> Rejected:
    assert isinstance(decision, Rejected), decision
    return decision


def accepted(decision: Accepted | Rejected) -> Accepted:
    assert isinstance(decision, Accepted), decision
    return decision


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pi", "pi"),
        ("kitchen-pi_2", "kitchen-pi_2"),
        ("pi.local", "pi_local"),
        ("living room/pi", "living_room_pi"),
        ("küche+#", "k_che__"),
        ("  ", "edgellm"),
        ("", "edgellm"),
    ],
)
def test_node_id_is_sanitised_to_topic_and_unique_id_safe_characters(name: str, expected: str) -> None:
    assert sanitize_node_id(name) == expected


def test_topics_default_to_edgellm_slash_hostname() -> None:
    topics = make_topics("", "", "garden.pi")
    assert topics.node_id == "garden_pi"
    assert topics.prefix == "edgellm/garden_pi"
    assert topics.request == "edgellm/garden_pi/request"
    assert topics.cancel == "edgellm/garden_pi/cancel"
    assert topics.availability == "edgellm/garden_pi/availability"
    assert topics.status == "edgellm/garden_pi/status"
    assert topics.error == "edgellm/garden_pi/error"
    assert topics.response("abc") == "edgellm/garden_pi/response/abc"
    assert default_client_id(topics.node_id) == "edgellm-garden_pi"


def test_configured_node_id_and_prefix_win_over_the_hostname() -> None:
    topics = make_topics("attic", "home/llm/", "ignored")
    assert topics.node_id == "attic"
    assert topics.prefix == "home/llm"
    assert make_topics("attic", "", "ignored").prefix == "edgellm/attic"


def test_shared_filter() -> None:
    assert shared_filter("edgellm", "edgellm/fleet/request") == "$share/edgellm/edgellm/fleet/request"


@pytest.mark.parametrize(
    ("topic", "ok"),
    [("a/b", True), ("a/+", False), ("a/#", False), ("", False), ("a\x00b", False), ("x" * 70000, False)],
)
def test_is_topic_name(topic: str, ok: bool) -> None:
    assert is_topic_name(topic) is ok


def test_route_precedence_response_topic_then_reply_to_then_default() -> None:
    both = route_for(TOPICS, response_topic="rt", correlation=b"c1", reply_to="rep", request_id="7")
    assert both == Route("rt", b"c1")
    assert route_for(TOPICS, response_topic=None, correlation=None, reply_to="rep", request_id="7") == Route("rep")
    assert route_for(TOPICS, response_topic=None, correlation=None, reply_to=None, request_id="7") == Route(
        "edgellm/pi/response/7"
    )
    # A Response Topic with a wildcard cannot be published to: fall through to the next rule.
    assert route_for(TOPICS, response_topic="x/#", correlation=None, reply_to=None, request_id="7") == Route(
        "edgellm/pi/response/7"
    )
    assert route_for(TOPICS, response_topic=None, correlation=None, reply_to=None, request_id=None) is None


def test_valid_request_is_accepted_with_the_socket_protocol_defaults() -> None:
    decision = accepted(interpret(b'{"id":"r1","prompt":"hi","max_tokens":4}'))
    assert decision.request.id == "r1"
    assert decision.request.prompt == "hi"
    assert decision.request.max_tokens == 4
    assert decision.request.temperature == DEFAULTS.temperature
    assert decision.route == Route("edgellm/pi/response/r1")


def test_response_topic_and_correlation_data_route_the_answer() -> None:
    decision = accepted(interpret(b'{"id":"r1","prompt":"hi"}', response_topic="me/inbox", correlation=b"\x00\x01"))
    assert decision.route == Route("me/inbox", b"\x00\x01")


def test_reply_to_routes_the_answer_for_mqtt_311_clients() -> None:
    decision = accepted(interpret(b'{"id":"r1","prompt":"hi","reply_to":"dev/42/answer"}'))
    assert decision.route == Route("dev/42/answer")
    assert decision.request.reply_to == "dev/42/answer"


def test_request_without_id_gets_one_and_a_default_route() -> None:
    decision = accepted(interpret(b'{"prompt":"hi"}'))
    assert decision.request.id
    assert decision.route.topic == f"edgellm/pi/response/{decision.request.id}"


def test_not_json_is_invalid_json_at_the_response_topic() -> None:
    decision = rejected(interpret(b"{nope", response_topic="me/inbox", correlation=b"k"))
    assert decision.error.code == "invalid_json"
    assert decision.error.id is None
    assert decision.route == Route("me/inbox", b"k")


def test_not_json_without_response_topic_goes_to_the_error_topic() -> None:
    decision = rejected(interpret(b"hello"))
    assert decision.error.code == "invalid_json"
    assert decision.route == Route("edgellm/pi/error")


def test_non_utf8_is_invalid_json() -> None:
    decision = rejected(interpret(b'{"prompt":"\xff\xfe"}'))
    assert decision.error.code == "invalid_json"
    assert "UTF-8" in decision.error.message


def test_too_large_is_refused_before_parsing() -> None:
    decision = rejected(interpret(b"\xff" * (LIMIT + 1), response_topic="me/inbox"))
    assert decision.error.code == "payload_too_large"
    assert str(LIMIT) in decision.error.message
    assert decision.route == Route("me/inbox")
    # Exactly at the limit is fine.
    body = b'{"prompt":"' + b"a" * (LIMIT - 13) + b'"}'
    assert len(body) == LIMIT
    accepted(interpret(body))


def test_a_payload_dropped_on_arrival_is_refused_with_its_size() -> None:
    # The client drops a payload over the limit as it arrives (it keeps only the size): the
    # answer is still `payload_too_large`, on the client's route, quoting the size it had.
    decision = rejected(interpret(b"", response_topic="me/inbox", dropped_size=10_000_000))
    assert decision.error.code == "payload_too_large"
    assert "10000000 bytes" in decision.error.message and str(LIMIT) in decision.error.message
    assert decision.route == Route("me/inbox")
    with pytest.raises(EdgeError) as info:
        ha_prompt_request(b"", "ha-3", DEFAULTS, LIMIT, dropped_size=LIMIT + 1)
    assert info.value.code == "payload_too_large" and f"{LIMIT + 1} bytes" in info.value.message


def test_wrong_type_names_the_field_and_keeps_the_id_for_routing() -> None:
    decision = rejected(interpret(b'{"id":"r9","prompt":5}'))
    assert decision.error.code == "invalid_request"
    assert "prompt" in decision.error.message
    assert decision.error.id == "r9"
    assert decision.route == Route("edgellm/pi/response/r9")


def test_unknown_field_is_named() -> None:
    decision = rejected(interpret(b'{"id":"r9","prompt":"x","max_token":3}'))
    assert decision.error.code == "invalid_request"
    assert "max_token" in decision.error.message


def test_invalid_request_with_valid_reply_to_is_answered_there() -> None:
    decision = rejected(interpret(b'{"id":"r9","prompt":"x","temperature":"hot","reply_to":"dev/1"}'))
    assert decision.error.code == "invalid_request"
    assert decision.route == Route("dev/1")


def test_wildcard_reply_to_is_invalid() -> None:
    decision = rejected(interpret(b'{"id":"r9","prompt":"x","reply_to":"dev/+"}'))
    assert decision.error.code == "invalid_request"
    assert "reply_to" in decision.error.message
    assert decision.route == Route("edgellm/pi/response/r9")


def test_json_array_is_invalid_request() -> None:
    decision = rejected(interpret(b"[1,2]"))
    assert decision.error.code == "invalid_request"


def test_id_that_cannot_name_a_topic_needs_another_route() -> None:
    decision = rejected(interpret(b'{"id":"a+b","prompt":"x"}'))
    assert decision.error.code == "invalid_request"
    assert decision.error.id == "a+b"
    assert decision.route == Route("edgellm/pi/error")
    # With a Response Topic the same id is fine.
    assert accepted(interpret(b'{"id":"a+b","prompt":"x"}', response_topic="me")).request.id == "a+b"


def _req(deadline_ms: int | None = None) -> Request:
    return Request(id="x", prompt="p", deadline_ms=deadline_ms)


def test_message_expiry_becomes_the_deadline_unless_the_deadline_is_shorter() -> None:
    assert apply_message_expiry(_req(), None).deadline_ms is None
    assert apply_message_expiry(_req(), 5).deadline_ms == 5000
    assert apply_message_expiry(_req(2000), 5).deadline_ms == 2000
    assert apply_message_expiry(_req(9000), 5).deadline_ms == 5000


def test_message_delivered_with_no_expiry_left_is_deadline_exceeded() -> None:
    with pytest.raises(EdgeError) as info:
        apply_message_expiry(_req(), 0)
    assert info.value.code == "deadline_exceeded"
    decision = rejected(interpret(b'{"id":"e1","prompt":"x"}', expiry_s=0))
    assert decision.error.code == "deadline_exceeded"
    assert decision.error.id == "e1"
    assert decision.route == Route("edgellm/pi/response/e1")


def test_cancel_payload() -> None:
    assert parse_cancel(b'{"id":"abc"}') == "abc"
    bad_payloads = [(b"x", "invalid_json"), (b'{"id":3}', "invalid_request"), (b'{"id":"a","x":1}', "invalid_request")]
    for bad, code in bad_payloads:
        with pytest.raises(EdgeError) as info:
            parse_cancel(bad)
        assert info.value.code == code


def test_home_assistant_prompt_is_plain_text() -> None:
    request = ha_prompt_request(b"  What is MQTT?\n", "ha-1", DEFAULTS, LIMIT)
    assert request.prompt == "What is MQTT?"
    assert request.id == "ha-1"
    bad_prompts = [(b"   ", "invalid_request"), (b"\xff", "invalid_json"), (b"a" * (LIMIT + 1), "payload_too_large")]
    for bad, code in bad_prompts:
        with pytest.raises(EdgeError) as info:
            ha_prompt_request(bad, "ha-2", DEFAULTS, LIMIT)
        assert info.value.code == code


def test_event_payload_is_compact_json_with_seq() -> None:
    raw = event_payload({"id": "a", "event": "token", "text": "é"}, 3)
    assert json.loads(raw) == {"id": "a", "event": "token", "text": "é", "seq": 3}
    assert b" " not in raw
    assert json.loads(event_payload({"event": "x"})) == {"event": "x"}


def test_backoff_doubles_to_the_cap_with_jitter_between_half_and_full() -> None:
    low = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rand=lambda: 0.999999)
    assert [round(high.next_delay(), 3) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    high.reset()
    assert round(high.next_delay(), 3) == 1.0


def test_backoff_jitter_spreads_a_fleet() -> None:
    import random

    rng = random.Random(7)
    delays = [Backoff(1.0, 60.0, rand=rng.random).next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.4
    many = Backoff(0.1, 60.0, rand=rng.random)
    for _ in range(100):
        assert many.next_delay() <= 60.0


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a/#", "a/b/c", True), ("a/#", "a", True), ("a/+/c", "a/b/c", True), ("a/+", "a/b/c", False),
        ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("a/b", "a/b", True), ("a/b", "a/b/c", False),
    ],
)
def test_topic_matches_follows_mqtt_filter_rules(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


def test_destinations_protect_sys_other_nodes_own_control_topics_and_home_assistant() -> None:
    policy = make_destinations(TOPICS, fleet_topic="fleet/req", ha_prefix="homeassistant",
                               allow_reply_to=["edgellm/hub/inbox/#"])
    refused = ["$SYS/x", "edgellm/other/response/1", "edgellm/pi/request", "edgellm/pi/status", "fleet/req",
               "homeassistant/switch/x/config", "a/+/b", "a/#"]
    allowed = ["edgellm/pi/response/1", "edgellm/hub/inbox/7", "devices/kitchen/answer", "my/inbox"]
    assert [t for t in refused if policy.refusal(t) is None] == []
    assert [t for t in allowed if policy.refusal(t) is not None] == []


def test_a_refused_reply_to_is_invalid_request_answered_on_the_default_topic() -> None:
    payload = json.dumps({"id": "r1", "prompt": "hi", "reply_to": "$SYS/broker/x"}).encode()
    decision = interpret_request(payload, TOPICS, DEFAULTS, max_payload_bytes=LIMIT,
                                 destinations=make_destinations(TOPICS))
    assert isinstance(decision, Rejected)
    assert decision.error.code == "invalid_request" and decision.error.message.startswith("reply_to: '$SYS")
    assert decision.route.topic == "edgellm/pi/response/r1"
