"""A thin adapter over one paho client, in the shape of aiomqtt's `client.py`.

Explicit lifecycle: `PahoClient(cfg, …)` builds it (raises `OSError`/`ValueError` for a broken
setting: unreadable password file, bad TLS files), `connect()` returns at once (paho's network
thread connects and reconnects), `close()` disconnects and joins that thread.

Threads. paho's callbacks run on its network thread and only hand a small item (`Connected`,
`Disconnected`, `MessageIn`, `PubAck`) to `deliver` (the dispatcher's inbox); nothing else is
touched there except the reconnect backoff, which only that thread uses (`next_delay`, `reset`)
and whose bounds the dispatcher changes under `_lock`. Every other method is called by the
dispatcher. Credentials are handed to paho and never logged. `deliver` may make the network thread
wait while the inbox is full (backpressure: paho then reads no more, and the broker holds the rest).

Memory. A payload over `max_payload_bytes` is refused anyway, so it is dropped on arrival: the
`MessageIn` carries its size and an empty payload, and a 10 MB message costs its bytes only while
paho reads it, not while it waits in the inbox. paho's `MQTTMessage` is not kept either: its
`Properties` object builds two dicts and a list per message (7.3 KB measured with one
`ResponseTopic`), so a full inbox of thousands held tens of MB that the allocator kept after the
flood. The inbox holds an `Inbound`: what the door reads, ~0.3 KB plus the payload.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.transports.mqtt.direct_writes import DirectWriteClient
from daemon.transports.mqtt.topics import Backoff

if TYPE_CHECKING:
    from daemon.config import MqttConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Connected:
    client: PahoClient
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    client: PahoClient
    reason: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message, cut down to what the door reads. `topic` is "" when it is not UTF-8;
    the MQTT 5 properties are None (or empty) when absent or of the wrong type."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, msg: paho.MQTTMessage, payload: bytes) -> Inbound:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        expiry = getattr(props, "MessageExpiryInterval", None)
        user = getattr(props, "UserProperty", None)
        return cls(
            topic, payload, msg.qos, msg.mid, bool(msg.dup),
            response_topic if isinstance(response_topic, str) else None,
            bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None,
            expiry if isinstance(expiry, int) else None,
            tuple((str(k), str(v)) for k, v in user) if isinstance(user, list) else (),
        )


@dataclass(frozen=True)
class MessageIn:
    """`size`: the payload's length as received. Over `max_payload_bytes` the payload itself was
    dropped (`message.payload` is empty): it can only be refused as `payload_too_large`."""

    client: PahoClient
    message: Inbound
    size: int = 0

    @property
    def oversize(self) -> bool:
        return self.size > len(self.message.payload)


@dataclass(frozen=True)
class PubAck:
    client: PahoClient
    mid: int
    reason: int  # MQTT 5 reason code (0 for 3.1.1)
    failure: bool


ClientItem = Union[Connected, Disconnected, MessageIn, PubAck]


@dataclass(frozen=True)
class Sent:
    """What `publish` did: `mid` to match the PUBACK; `queued_offline`: no connection now, so a
    QoS 1 message is held until the reconnect and a QoS 0 one is lost."""

    ok: bool
    mid: int
    queued_offline: bool


def broker_name(cfg: MqttConfig) -> str:
    return f"unix:{cfg.host}" if cfg.transport == "unix" else f"{cfg.host}:{cfg.port}"


class PahoClient:
    def __init__(
        self, cfg: MqttConfig, client_id: str, will_topic: str, deliver: Callable[[ClientItem], None]
    ) -> None:
        if not cfg.host:
            raise ValueError("mqtt.host is empty")
        self.cfg = cfg
        self.v5 = cfg.protocol == "5"
        self._deliver = deliver
        self._lock = threading.Lock()
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        # QoS 0 publishes (stream events): paho calls on_publish once each is written, under its mid.
        # Nothing waits for them, so those calls stop here instead of reaching the dispatcher, where
        # a mid reused after wrapping could be taken for a final's PUBACK. The lock covers publish()
        # and the set, so a write reported before publish() returned is still recognised.
        self._stream_lock = threading.Lock()
        self._stream_mids: set[int] = set()
        self._stream_properties: dict[tuple[Any, ...], Properties] = {}  # dispatcher only
        self._closing = False
        # Read on the network thread, written by the dispatcher on reload (a plain int).
        self.max_payload_bytes = cfg.max_payload_bytes
        client = DirectWriteClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self.v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            transport="unix" if cfg.transport == "unix" else "tcp",
            reconnect_on_failure=True,
            manual_ack=True,
        )
        # An exception in one of our callbacks must never end paho's network thread.
        client.suppress_exceptions = True
        if cfg.username:
            client.username_pw_set(cfg.username, _read_password(cfg.password_file))
        if cfg.tls.enabled:
            client.tls_set(
                ca_certs=cfg.tls.ca_file or None,
                certfile=cfg.tls.cert_file or None,
                keyfile=cfg.tls.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
            )
            if not cfg.tls.verify:
                client.tls_insecure_set(True)
        client.will_set(will_topic, "offline", qos=1, retain=True)
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_socket_open = _disable_nagle
        client.on_stream_written = self._stream_written
        # The dispatcher writes what it publishes and acknowledges itself (direct_writes.py), except
        # over TLS, where only paho's network thread may use the socket.
        self.direct_writes = not cfg.tls.enabled and client.supported()
        self._paho = client

    # --- lifecycle (dispatcher) --------------------------------------------------------------

    def connect(self) -> None:
        cfg = self.cfg
        port = cfg.port if cfg.transport != "unix" else 1
        if self.v5:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            self._paho.connect_async(cfg.host, port, keepalive=cfg.keepalive_s, clean_start=False, properties=props)
        else:
            self._paho.connect_async(cfg.host, port, keepalive=cfg.keepalive_s)
        self._paho.loop_start()

    def close(self) -> None:
        self._closing = True
        self._paho.disconnect()
        self._paho.loop_stop()

    def set_backoff(self, min_s: float, max_s: float) -> None:
        with self._lock:
            self._backoff.min_s, self._backoff.max_s = min_s, max(min_s, max_s)

    # --- operations (dispatcher) -------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation: bytes | None = None,
        json_content: bool = True,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
        qos: int = 1,
    ) -> Sent:
        props = None
        if self.v5 and (json_content or correlation or response_topic or expiry_s is not None or user_properties):
            key = (json_content, correlation, response_topic, expiry_s, user_properties)
            props = self._stream_properties.get(key) if qos == 0 else None
            if props is None:
                props = _publish_properties(*key, packed_once=qos == 0)
                if qos == 0:  # a stream: the same properties for each of its events
                    if len(self._stream_properties) >= STREAM_PROPERTIES_MAX:
                        self._stream_properties.clear()
                    self._stream_properties[key] = props
        if qos == 0:
            with self._stream_lock, self._deferred():
                info = self._paho.publish(topic, payload, qos=0, retain=retain, properties=props)
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._stream_mids.add(info.mid)
        else:
            # Not under `_stream_lock`: paho's thread holds its message lock while it reports a
            # PUBACK to `_cb_publish`, which takes `_stream_lock`, and `publish` takes that lock.
            with self._deferred():
                info = self._paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
            with self._stream_lock:
                # A stream mid left over (its packet dropped by a reconnect, never reported) must not
                # swallow this one's PUBACK once the counter wraps. The packet is usually not sent yet
                # (the direct write below sends it); paho's thread sends it first only if something
                # else woke it meanwhile, and then its PUBACK must also come back before this line.
                self._stream_mids.discard(info.mid)
        self._write_deferred()
        ok = info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
        offline = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN or not self._paho.is_connected()
        if not ok:
            log.error("mqtt.publish_failed", topic=topic, rc=int(info.rc))
        return Sent(ok, info.mid, offline)

    def drop_connection(self) -> None:
        """Close the connection under paho (it reconnects by itself, same persistent session), so
        the broker sends again every message we never acknowledged."""
        shutdown = getattr(self._paho.socket(), "shutdown", None)  # a TCP, TLS or Unix socket
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            with self._deferred():
                self._paho.ack(mid, qos)
            self._write_deferred()

    def _deferred(self) -> contextlib.AbstractContextManager[None]:
        return self._paho.deferring() if self.direct_writes else contextlib.nullcontext()

    def _write_deferred(self) -> None:
        # Outside `_stream_lock`: a write reports its QoS 0 mid to `_stream_written`, which takes it.
        if self.direct_writes:
            try:
                self._paho.write_queued()
            except Exception:  # paho's thread writes what is left (write_queued woke it)
                log.exception("mqtt.direct_write_failed")

    def _stream_written(self, mid: int) -> None:  # a QoS 0 PUBLISH this thread wrote itself
        with self._stream_lock:
            self._stream_mids.discard(mid)

    def subscribe(self, filters: list[str]) -> None:
        self._paho.subscribe([(f, 1) for f in filters])

    def unsubscribe(self, filters: list[str]) -> None:
        self._paho.unsubscribe(filters)

    # --- paho callbacks (network thread): hand over, nothing else ----------------------------

    def _cb_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_refused", reason=str(reason), broker=broker_name(self.cfg))
            return
        with self._lock:
            self._backoff.reset()
        self._deliver(Connected(self, bool(flags.session_present)))

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        delay = self._next_delay()
        log.info("mqtt.connect_failed", broker=broker_name(self.cfg), retry_in_s=round(delay, 2))

    def _cb_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if not self._closing:
            self._next_delay()
        self._deliver(Disconnected(self, str(reason)))

    def _next_delay(self) -> float:
        """paho doubles its own delay without jitter; we compute each wait (`Backoff`) and hand it
        over as both bounds, so paho's next wait is exactly ours (paho reads it on this thread)."""
        with self._lock:
            delay = self._backoff.next_delay()
        with contextlib.suppress(Exception):
            # paho types the bounds as int but only does float arithmetic with them.
            self._paho.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        return delay

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        size = len(msg.payload)
        # Over the limit it is refused anyway; only its size is needed for the answer.
        payload = b"" if size > self.max_payload_bytes else bytes(msg.payload)
        self._deliver(MessageIn(self, Inbound.of(msg, payload), size))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        with self._stream_lock:
            if mid in self._stream_mids:
                self._stream_mids.discard(mid)
                return
        value = int(reason.value) if reason is not None else 0
        self._deliver(PubAck(self, mid, value, bool(reason is not None and reason.is_failure)))

    def _cb_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("mqtt.subscribe_refused", reasons=refused, hint="check the broker ACL for this client")


def _disable_nagle(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Small packets (a token, a PUBACK) must leave at once: with Nagle's algorithm each one can
    wait for the peer's delayed ACK, about 40 ms a hop on Linux."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_PAHO_TABLES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
STREAM_PROPERTIES_MAX = 64  # streams whose PUBLISH properties are kept (more are built again)


class _PackedOnce(Properties):
    """Properties never changed once built (a stream's, the same for each of its events): paho
    packs them at every publish, a fifth of the dispatcher's time per streamed token; this packs
    them once."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = bytes(super().pack())  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed", packed)  # paho's __setattr__ takes property names only
        return packed


def _properties(packet_type: int, kind: type[Properties] = Properties) -> Properties:
    """paho builds its constant property tables (two dicts and a list, ~7 KB) anew in every
    `Properties`, and keeps a published message's until its PUBACK: thousands under a flood of
    answers. They are only read, so every one we make shares one set."""
    props = kind(packet_type)  # paho leaves __init__ unannotated
    props.types, props.names, props.properties = _PAHO_TABLES.types, _PAHO_TABLES.names, _PAHO_TABLES.properties
    return props


def _publish_properties(
    json_content: bool, correlation: bytes | None, response_topic: str | None, expiry_s: int | None,
    user_properties: tuple[tuple[str, str], ...], *, packed_once: bool,
) -> Properties:
    props = _properties(PacketTypes.PUBLISH, _PackedOnce if packed_once else Properties)
    if json_content:
        props.ContentType = "application/json"
    if correlation is not None:
        props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if expiry_s is not None:
        props.MessageExpiryInterval = expiry_s
    if user_properties:
        props.UserProperty = list(user_properties)
    return props


def _read_password(path: str) -> str | None:
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
