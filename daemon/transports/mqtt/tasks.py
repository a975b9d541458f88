"""The MQTT door's task topics and triggers, wired: `TaskDoor` runs on the dispatcher thread.

The decisions are pure (`task_calls.py`, `daemon/triggers.py`, `daemon/task_topics.py`); this
module carries them out with the transport's client, ledger and backend.

- A task call (`<prefix>/task/<name>`) goes through the delivery ledger exactly as a request on
  the request topic does: a QoS 1 call is acknowledged only after its answer is journalled and
  published, so a daemon killed mid-answer answers it after the restart.
- A trigger message is acknowledged once its task's `TriggerGate` has decided (run, wait, coalesce
  or drop: every outcome is counted). Runs are submitted at the task's priority (`low` unless it
  says otherwise) and their answers published to the task's `publish` topic and its result topic.
- A reload follows the tasks: subscriptions, Home Assistant entities (removed ones get an empty
  retained config), and the retained status and result topics of tasks that went away.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import structlog

from daemon import triggers  # a module: it imports this package (see task_calls.py)
from daemon.protocol import Code, EdgeError, ErrorEvent, Event, Origin
from daemon.task_topics import result_topic, status_topic, task_name_of, task_subscription
from daemon.transports.mqtt.client import Inbound
from daemon.transports.mqtt.ledger import Delivery
from daemon.transports.mqtt.task_calls import TaskCall, TriggerBook, encode, interpret_task_call, result_shape
from daemon.transports.mqtt.topics import oversize, topic_matches

if TYPE_CHECKING:
    from daemon.tasks import Task, TaskRegistry
    from daemon.transports.mqtt.transport import MqttTransport

log = structlog.get_logger(__name__)


class _TriggerSink:
    """A trigger run's events (inference thread) → the dispatcher; only the final one matters."""

    def __init__(self, door: TaskDoor, name: str, gate: triggers.TriggerGate, topic: str, value: Any) -> None:
        self._door, self._name, self._gate, self._topic, self._value = door, name, gate, topic, value

    def emit(self, event: Event) -> None:
        if event.final:
            door = self._door
            door.transport.post_call(lambda: door.run_finished(self._name, self._gate, self._topic, self._value,
                                                               event.to_dict()))


class TaskDoor:
    def __init__(self, transport: MqttTransport, registry: TaskRegistry | None) -> None:
        self.transport = transport
        self.registry = registry
        self.book = TriggerBook()
        # Read by other threads (the daemon's status): replaced whole, never mutated.
        self.snapshot: dict[str, dict[str, int]] = {}
        if registry is not None:
            self.book.reconcile(self._tasks())
            self.transport.presence.tasks = self._ha_tasks()
            self._snap()

    # --- what the transport asks ------------------------------------------------------------

    def subscriptions(self) -> set[str]:
        if self.registry is None:
            return set()
        return {task_subscription(self.transport.topics)} | self.book.subscriptions()

    def result_shape(self, topic: str, payload: bytes) -> bytes:
        return result_shape(self.transport.topics, topic, payload)

    def next_due(self) -> float | None:
        return self.book.next_due(status=self.transport._connected) if self.registry is not None else None

    def tick(self, now: float) -> None:
        """Waiting trigger messages whose interval is over; status topics that changed."""
        for name, gate in list(self.book.gates.items()):
            if gate.pending and (due := gate.next_due()) is not None and due <= now:
                self._start(name, gate, gate.due(now))
                self._snap()
        self._publish_status(now)

    def on_connected(self) -> None:
        self._publish_status(self.transport._clock(), force=True)

    def handle(self, msg: Inbound, topic: str, dropped_size: int | None = None) -> bool:
        """A message for a task topic or a trigger filter: handled (True), or not ours.
        `dropped_size`: the client dropped its payload on arrival, over `mqtt.max_payload_bytes`."""
        if self.registry is None:
            return False
        if task_name_of(self.transport.topics, topic) is not None:
            self._on_call(msg, topic, dropped_size)
            return True
        if topic.startswith(f"{self.transport.topics.prefix}/task/"):
            return False  # our own results and status: never a trigger
        names = self.book.matching(topic)
        if not names:
            return False
        self._on_trigger(msg, topic, names, dropped_size)
        return True

    # --- task calls -------------------------------------------------------------------------

    def _on_call(self, msg: Inbound, topic: str, dropped_size: int | None = None) -> None:
        t = self.transport
        delivery = Delivery(msg.mid, msg.qos)
        payload = msg.payload
        if dropped_size is None and not payload.strip():
            # An empty value (a cleared retained message, an emptied text entity) is no input.
            log.info("mqtt.task_call_empty", topic=topic, action="ignored")
            t._ack(delivery)
            return
        if not t._accepting:
            t.ledger.counters.left_for_redelivery += 1  # unacknowledged: the broker sends it again
            return
        assert self.registry is not None
        decision = interpret_task_call(
            topic, payload, self.registry, t.topics, t.backend.defaults,
            request_id=f"task-{uuid.uuid4().hex[:16]}",
            max_payload_bytes=t.cfg.max_payload_bytes,
            destinations=t._destinations,
            response_topic=msg.response_topic,
            correlation=msg.correlation,
            expiry_s=msg.expiry_s,
            dropped_size=dropped_size,
        )
        if not isinstance(decision, TaskCall):
            error, route = decision.error, decision.route
            t.counters.rejected += 1
            log.info("mqtt.task_call_rejected", topic=topic, code=error.code, reason=error.message, to=route.topic)
            retain = route.topic == result_topic(t.topics, task_name_of(t.topics, topic) or "")
            t._run(t.ledger.answer_once(delivery, [route], error.to_dict(), retain=retain))
            return
        log.info("mqtt.task_call", task=decision.task, id=decision.request.id, qos=msg.qos, to=decision.route.topic)
        t._run(t.ledger.arrived(delivery, decision.request, decision.route, stored=None, retain=decision.retain))

    # --- triggers ---------------------------------------------------------------------------

    def _on_trigger(
        self, msg: Inbound, topic: str, names: list[str], dropped_size: int | None = None
    ) -> None:
        t = self.transport
        payload = msg.payload
        now = t._clock()
        value: Any = None
        refusal: str | None = None
        if (too_large := oversize(payload, dropped_size, t.cfg.max_payload_bytes)) is not None:
            refusal = too_large.message
        else:
            try:
                value = triggers.payload_input(payload)
            except EdgeError as exc:
                refusal = exc.message
        if refusal is None and not t._accepting:
            refusal = "the daemon is stopping"
        for name in names:
            gate = self.book.gates[name]
            self.book.mark(name)
            if refusal is not None:
                gate.counters.received += 1
                gate.counters.dropped += 1
                log.warning("mqtt.trigger_dropped", task=name, topic=topic, reason=refusal)
                continue
            outcome, runs = gate.offer(topic, value, now)
            log.debug("mqtt.trigger_offer", task=name, topic=topic, outcome=outcome.value)
            self._start(name, gate, runs)
        # At most once: the gate has decided (and counted) what becomes of the message.
        t._ack(Delivery(msg.mid, msg.qos))
        self._snap()

    def _start(self, name: str, gate: triggers.TriggerGate, runs: list[Any]) -> None:
        t = self.transport
        task = self.registry.get(name) if self.registry is not None else None
        for run in runs:
            request_id = f"trigger-{name}-{uuid.uuid4().hex[:12]}"
            sink = _TriggerSink(self, name, gate, run.topic, run.payload)
            if task is None:
                sink.emit(ErrorEvent(request_id, Code.INVALID_REQUEST, f"task {name!r} was removed"))
                continue
            try:
                request = task.request(run.payload, t.backend.defaults, request_id=request_id, topic=run.topic,
                                       triggered=True)
            except EdgeError as exc:
                sink.emit(exc.to_event(request_id))
                continue
            log.info("mqtt.trigger_run", task=name, id=request_id, topic=run.topic, priority=request.priority)
            try:
                t.backend.submit(request, sink, Origin("mqtt", f"trigger {name} topic={run.topic}"))
            except Exception as exc:  # submit never raises by contract; a bug must still end the run
                log.exception("mqtt.trigger_submit_failed", id=request_id)
                sink.emit(ErrorEvent(request_id, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))
        self.book.mark(name)

    def run_finished(
        self, name: str, gate: triggers.TriggerGate, topic: str, value: Any, final: dict[str, Any]
    ) -> None:
        """Dispatcher: a trigger run ended. Publish its result, then start what waited for it."""
        t = self.transport
        ok = final.get("event") == "done"
        result = encode(triggers.result_payload(name, topic, final))
        task = self.registry.get(name) if self.registry is not None else None
        if task is not None and task.publish is not None:
            try:
                values = {"input": value, "topic": topic}
                target = triggers.render_publish_topic(task.publish, task.spec.subscribe, values)
                own = t._wanted_subscriptions() - self.book.subscriptions()  # another trigger's may: a chain
                if any(topic_matches(f, target) for f in own):
                    raise EdgeError(Code.INVALID_REQUEST, f"publish: {target!r} is a topic this daemon listens to")
            except EdgeError as exc:
                ok = False
                log.warning("mqtt.trigger_publish_refused", task=name, topic=topic, reason=exc.message)
            else:
                self._publish(target, result, retain=task.spec.retain)
                if target == result_topic(t.topics, name):
                    result = b""  # already there
        if result:
            self._publish(result_topic(t.topics, name), result, retain=True)
        log.info("mqtt.trigger_finished", task=name, topic=topic, id=final.get("id"), ok=ok,
                 code=final.get("code"))
        current = self.book.gates.get(name) is gate
        runs = gate.finished(topic, ok, t._clock())
        if current:
            self._start(name, gate, runs)
        self._snap()

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        client = self.transport._client
        if client is not None:
            client.publish(topic, payload, retain=retain)

    # --- status and reload ------------------------------------------------------------------

    def _snap(self) -> None:
        self.snapshot = self.book.status()

    def _publish_status(self, now: float, *, force: bool = False) -> None:
        if self.registry is None or not self.transport._connected:
            return
        for topic, payload in self.book.status_due(self.transport.topics, now, force=force):
            self._publish(topic, payload, retain=True)

    def _tasks(self) -> list[Task]:
        registry = self.registry
        if registry is None:
            return []
        return [task for name in registry.names() if (task := registry.get(name)) is not None]

    def _ha_tasks(self) -> tuple[tuple[str, str], ...]:
        return tuple((task.name, task.spec.description) for task in self._tasks())

    def reload(self) -> None:
        """The tasks changed (SIGHUP): triggers, subscriptions, Home Assistant entities follow."""
        if self.registry is None:
            return
        t = self.transport
        changes = self.book.reconcile(self._tasks())
        t._send(t.presence.set_tasks(self._ha_tasks(), t.backend.status()))
        if changes.added or changes.removed or changes.triggers_removed:
            log.info("mqtt.tasks_reloaded", added=list(changes.added), removed=list(changes.removed))
        if t._connected:
            for name in changes.triggers_removed:
                self._publish(status_topic(t.topics, name), b"", retain=True)
            for name in changes.removed:
                self._publish(result_topic(t.topics, name), b"", retain=True)
        t._sync_subscriptions()
        self._snap()

