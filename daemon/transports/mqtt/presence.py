"""What the daemon tells the broker about itself: availability, status, Home Assistant discovery.

Pure: the transport passes the status and the clock in, and publishes the `Message`s that come
out (all retained, QoS 1, in order). The rules:

- On connect the fresh status goes out *before* `online`, so a subscriber that sees `online` never
  reads the previous run's retained status (`stopped`) with it.
- `stopped` is published only after `offline` (`stopping`): a retained state never contradicts
  availability. A crash leaves the last state with the Last Will's `offline`.
- Status on change (at most once a second, only if something other than the uptime changed) and
  every `status_interval_s`.
- Discovery once per connection, with the configured model's name (known before it loads); again
  only when the device really changed (another model), when Home Assistant says `online`, or on a
  reload of the `homeassistant` keys. Each task's `text` and `sensor` entities go with the
  device's; a reload that removes a task removes them (empty retained configs), one that adds a
  task announces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon import task_topics
from daemon.protocol import to_json_line
from daemon.transports.mqtt import homeassistant
from daemon.transports.mqtt.topics import Topics

# Change-triggered status publishes are coalesced to at most one per this many seconds.
STATUS_MIN_INTERVAL_S = 1.0
STOPPED = "stopped"


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = True


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "uptime_s"}


class Presence:
    def __init__(
        self,
        topics: Topics,
        *,
        version: str,
        model_name: str | None,
        status_interval_s: float,
        ha_enabled: bool,
        ha_prefix: str,
    ) -> None:
        self.topics = topics
        self.version = version
        self.model_name = model_name
        self.status_interval_s = status_interval_s
        self.ha_enabled = ha_enabled
        self.ha_prefix = ha_prefix
        self.connected = False
        self._dirty = True
        self._last: dict[str, Any] | None = None
        self._last_at = -1e9
        self._discovered: str | None = None
        # (name, description) of every task: each has entities on the device.
        self.tasks: tuple[tuple[str, str], ...] = ()

    def _device_model(self, status: dict[str, Any]) -> str | None:
        return (status.get("model") or {}).get("name") or self.model_name

    def _status(self, status: dict[str, Any], now: float) -> Message:
        self._last = _comparable(status)
        self._last_at = now
        self._dirty = False
        return Message(self.topics.status, to_json_line(status)[:-1])

    def discovery(self, status: dict[str, Any]) -> list[Message]:
        if not self.ha_enabled:
            return []
        model = self._device_model(status)
        self._discovered = model
        return [
            Message(m.topic, m.payload)
            for m in homeassistant.discovery_messages(self.ha_prefix, self.topics, model, self.version)
        ] + self._task_discovery(self.tasks, model)

    def _task_discovery(self, tasks: tuple[tuple[str, str], ...], model: str | None) -> list[Message]:
        messages = task_topics.task_discovery_messages(self.ha_prefix, self.topics, tasks, model, self.version)
        return [Message(m.topic, m.payload) for m in messages]

    def _task_removal(self, names: list[str]) -> list[Message]:
        return [Message(m.topic, m.payload) for m in task_topics.task_removal_messages(self.ha_prefix, self.topics,
                                                                                        names)]

    def set_tasks(self, tasks: tuple[tuple[str, str], ...], status: dict[str, Any]) -> list[Message]:
        """A reload changed the tasks: remove the entities of those gone, announce new or changed ones."""
        old, self.tasks = dict(self.tasks), tasks
        if not (self.ha_enabled and self.connected):
            return []
        new = dict(tasks)
        changed = tuple((n, d) for n, d in tasks if old.get(n) != d or n not in old)
        return self._task_removal([n for n in old if n not in new]) + self._task_discovery(
            changed, self._discovered or self._device_model(status)
        )

    def on_connected(self, status: dict[str, Any], now: float) -> list[Message]:
        self.connected = True
        self._discovered = None
        messages = []
        if status.get("state") != STOPPED:
            messages.append(self._status(status, now))
        messages.append(Message(self.topics.availability, b"online"))
        return messages + self.discovery(status)

    def on_disconnected(self) -> None:
        self.connected = False

    def on_state(self, status: dict[str, Any]) -> list[Message]:
        """The backend's state changed: status soon; discovery only if the device changed."""
        self._dirty = True
        if self.connected and self.ha_enabled and self._device_model(status) != self._discovered:
            return self.discovery(status)
        return []

    def mark_dirty(self) -> None:
        """Publish the status soon (a reload changed what it shows)."""
        self._dirty = True

    def due(self, status: dict[str, Any], now: float) -> list[Message]:
        """The status, if a change or the period calls for it (never `stopped` while online)."""
        if not self.connected:
            return []
        if status.get("state") == STOPPED:
            # Said after `offline` (`stopping`), never while `online`.
            self._dirty, self._last_at = False, now
            return []
        since = now - self._last_at
        if self._dirty and since >= STATUS_MIN_INTERVAL_S:
            if _comparable(status) == self._last and since < self.status_interval_s:
                self._dirty = False
                return []
            return [self._status(status, now)]
        if since >= self.status_interval_s:
            return [self._status(status, now)]
        return []

    def next_due_in(self, now: float) -> float:
        due = self._last_at + (STATUS_MIN_INTERVAL_S if self._dirty else self.status_interval_s)
        return due - now

    def stopping(self, status: dict[str, Any], now: float) -> list[Message]:
        """The last words: `offline`, then the final status (`stopped` on a daemon stop; any state
        is consistent with `offline`)."""
        return [Message(self.topics.availability, b"offline"), self._status(status, now)]

    def reconfigure_ha(self, enabled: bool, prefix: str, status: dict[str, Any]) -> list[Message]:
        """A reload changed `homeassistant.*`: remove the old entities if they moved or went away."""
        messages: list[Message] = []
        if self.ha_enabled and (not enabled or prefix != self.ha_prefix):
            removal = homeassistant.removal_messages(self.ha_prefix, self.topics)
            messages += [Message(m.topic, m.payload) for m in removal]
            messages += self._task_removal([n for n, _ in self.tasks])
        self.ha_enabled, self.ha_prefix = enabled, prefix
        if self.connected:
            messages += self.discovery(status)
        return messages
