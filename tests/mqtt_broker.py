"""A private Mosquitto for tests that restart, kill or reconfigure the broker.

Each broker gets its own free port, its own config file and its own persistence directory, so
a restart keeps persistent sessions and queued QoS 1 messages exactly as a real broker would.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """`start()`, `stop()` (SIGTERM: saves persistence), `kill()` (SIGKILL), `restart()`."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        users: dict[str, str] | None = None,
        acl: str | None = None,
        client_tls: dict[str, str] | None = None,
        client_auth: tuple[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        # Credentials a `Probe` uses by default (a broker without anonymous access).
        self.client_auth = client_auth
        # paho `tls_set` arguments for clients of a TLS listener (set up in `extra_config`).
        self.client_tls = client_tls
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.config_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            # Started as root, Mosquitto would switch to the `mosquitto` user, which cannot write
            # into pytest's private temp dirs (silently: no persistence). Ignored when not root.
            "user root",
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp_format %H:%M:%S",
            "max_queued_messages 10000",
        ]
        if users is not None:
            password_file = self.dir / "passwords"
            password_file.write_text("")
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password], check=True, capture_output=True
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            acl_file = self.dir / "acl"
            acl_file.write_text(acl)
            lines.append(f"acl_file {acl_file}")
        self.config_path.write_text("\n".join(lines) + "\n" + extra_config + "\n")

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Graceful: Mosquitto writes its persistence file on SIGTERM."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture()
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private, persistent Mosquitto on a free port, stopped after the test."""
    with MosquittoBroker(tmp_path / "broker") as broker:
        yield broker


# --- a test client ------------------------------------------------------------------------------


class Received:
    """One message as a subscriber saw it."""

    def __init__(self, msg: Any) -> None:
        self.topic: str = msg.topic
        self.payload: bytes = bytes(msg.payload)
        self.retain = bool(msg.retain)
        self.qos = int(msg.qos)  # as delivered: the lower of the publish's and the subscription's
        props = msg.properties
        self.correlation: bytes | None = getattr(props, "CorrelationData", None) if props is not None else None
        self.content_type: str | None = getattr(props, "ContentType", None) if props is not None else None
        self.at = time.monotonic()

    @property
    def json(self) -> Any:
        return json.loads(self.payload)

    def __repr__(self) -> str:
        return f"Received({self.topic!r}, {self.payload[:200]!r}, retain={self.retain})"


class Probe:
    """A paho client that records everything it receives; publishes wait for the broker's ack.

    `persistent=True` keeps its session (and QoS 1 messages for it) across its reconnects and
    broker restarts, as a real device would.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        subscribe: Sequence[str] = (),
        *,
        protocol: str = "5",
        client_id: str | None = None,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.v5 = protocol == "5"
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:10]}"
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else not persistent,
        )
        if username is None and broker.client_auth is not None:
            username, password = broker.client_auth
        if username is not None:
            self.client.username_pw_set(username, password)
        if broker.client_tls is not None:
            self.client.tls_set(**broker.client_tls)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.messages: list[Received] = []
        self._cv = threading.Condition()
        self._subscriptions = list(subscribe)
        self._connected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._pending_subs: set[int] = set()
        self.suback_reasons: list[Any] = []
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *a: self._connected.clear()
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
            self.client.connect(broker.host, broker.port, clean_start=not persistent, properties=props)
        else:
            self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("probe could not connect")
        self._wait_subscribed()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._subscriptions and not flags.session_present:
            _result, mid = client.subscribe([(t, 1) for t in self._subscriptions])
            with self._cv:
                self._pending_subs.add(mid)
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._cv:
            self.suback_reasons.extend(reasons)
            self._pending_subs.discard(mid)
            self._cv.notify_all()

    def _wait_subscribed(self, timeout: float = 10.0) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: not self._pending_subs, timeout):
                raise TimeoutError("no SUBACK")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cv:
            self.messages.append(Received(msg))
            self._cv.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cv:
            self._acks[mid] = reason
            self._cv.notify_all()

    def subscribe(self, *topics: str) -> None:
        self._subscriptions += topics
        with self._cv:
            result, mid = self.client.subscribe([(t, 1) for t in topics])
            assert result == 0
            self._pending_subs.add(mid)
        self._wait_subscribed()

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> Any:
        """Publish and wait for the broker's PUBACK; returns its reason code (MQTT 5) or None."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if self.v5 and (response_topic or correlation or expiry_s is not None):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos == 0:
            return None
        with self._cv:
            if not self._cv.wait_for(lambda: info.mid in self._acks, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self._acks.pop(info.mid)

    def wait_for(
        self, predicate: Callable[[Received], bool], count: int = 1, timeout: float = 60.0
    ) -> list[Received]:
        """At least `count` received messages that match, in arrival order."""
        with self._cv:
            ok = self._cv.wait_for(lambda: len([m for m in self.messages if predicate(m)]) >= count, timeout)
            found = [m for m in self.messages if predicate(m)]
        if not ok:
            raise TimeoutError(f"got {len(found)} of {count} matching messages; all: {self.messages[-20:]}")
        return found

    def events(self, request_id: str) -> list[dict[str, Any]]:
        """The JSON events received for one request id, in arrival order."""
        out = []
        with self._cv:
            messages = list(self.messages)
        for m in messages:
            try:
                obj = m.json
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("id") == request_id:
                out.append(obj)
        return out

    def wait_final(self, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        def final(m: Received) -> bool:
            try:
                obj = m.json
            except ValueError:
                return False
            return isinstance(obj, dict) and obj.get("id") == request_id and obj.get("event") in ("done", "error")

        return dict(self.wait_for(final, timeout=timeout)[0].json)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
