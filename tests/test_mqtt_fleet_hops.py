"""Fleet hop counting: pure, milliseconds."""

from __future__ import annotations

from daemon.protocol import Code
from daemon.transports.mqtt.topics import (
    FLEET_HOPS_PROPERTY,
    FLEET_MAX_HOPS,
    fleet_hops,
    handoff_user_properties,
    should_bounce,
)


def test_fleet_hops_reads_the_user_property_and_tolerates_junk() -> None:
    assert fleet_hops(None) == 0
    assert fleet_hops([]) == 0
    assert fleet_hops([("other", "7")]) == 0
    assert fleet_hops([(FLEET_HOPS_PROPERTY, "2")]) == 2
    assert fleet_hops([(FLEET_HOPS_PROPERTY, "two")]) == 0
    assert fleet_hops([(FLEET_HOPS_PROPERTY, "-5")]) == 0
    assert fleet_hops([(FLEET_HOPS_PROPERTY, "999999")]) == FLEET_MAX_HOPS


def test_only_capacity_refusals_bounce_and_only_until_the_hop_limit() -> None:
    for code in (Code.QUEUE_FULL, Code.THROTTLED, Code.MEMORY_LOW):
        assert should_bounce(code, 0, client_saw_events=False, v5=True)
        assert should_bounce(code, FLEET_MAX_HOPS - 1, client_saw_events=False, v5=True)
        assert not should_bounce(code, FLEET_MAX_HOPS, client_saw_events=False, v5=True)
        assert not should_bounce(code, 0, client_saw_events=True, v5=True)  # a stream already got events
        assert not should_bounce(code, 0, client_saw_events=False, v5=False)  # 3.1.1: nowhere to count hops
    for code in (Code.INVALID_REQUEST, Code.DEADLINE_EXCEEDED, Code.INTERNAL_ERROR, Code.CANCELLED):
        assert not should_bounce(code, 0, client_saw_events=False, v5=True)


def test_handoff_user_properties_keep_the_clients_and_set_ours() -> None:
    client = [("trace", "abc"), (FLEET_HOPS_PROPERTY, "1")]
    assert handoff_user_properties(client, 2) == [("trace", "abc"), (FLEET_HOPS_PROPERTY, "2")]
    assert handoff_user_properties(None, 0) == []
    assert handoff_user_properties([("trace", "abc")], 0) == [("trace", "abc")]
