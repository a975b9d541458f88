"""The MQTT door, one job a module:

- `topics`: names, routing, destinations, payload rules (pure);
- `ledger`: when a delivery may be acknowledged — the no-loss, no-second-answer promise (pure);
- `fleet`: handing fleet requests back to the fleet (pure, clock injected);
- `presence`: availability, status and Home Assistant discovery (pure); `homeassistant`: its payloads;
- `client`: a thin paho adapter whose callbacks only hand over;
- `task_calls`: task topics, the result shape, the trigger book (pure); `tasks`: their wiring;
- `transport`: `MqttTransport`, the dispatcher thread that wires them to the journal and the backend.
"""

from daemon.transports.mqtt.transport import MqttTransport

__all__ = ["MqttTransport"]
