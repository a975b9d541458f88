"""paho's client, with the packets the dispatcher queues written by the dispatcher itself.

Why. With `loop_start()`, every `publish()` from another thread writes a byte to paho's socketpair
to wake its network thread, which then writes the packet: two thread wake-ups per streamed token
(the backend hands the event to the dispatcher, the dispatcher to paho). On the two cores that
decode, each wake-up preempts a decode thread. Measured in session 9 (Intel Xeon VM, 256-token
greedy answers): MQTT streaming cost 0.55 ms of CPU per token against the socket's 0.13, 59 % of
the dispatcher's in that wake-up write, and decode was 4 % slower than unstreamed.

How. `DirectWriteClient.deferring(…)` marks the calling thread: a packet it queues meanwhile is only
appended to paho's queue (no wake-up), and `write_queued()` then writes the queue on that thread.
Writes from either thread hold one lock (paho's own `_packet_write` is wrapped in it), so packets
leave whole and in queue order. Whatever cannot be written now (the socket buffer is full, the
connection is gone) stays queued and paho's network thread is woken to deal with it, as before.

Not for TLS: an `SSLSocket` must not write on one thread while another reads it. `supported()`
also checks that this is a paho whose private parts were read for this (2.1 and 2.2: `_out_packet`,
`_packet_queue`, `_packet_write`, `_sock_close`); on any other, the client behaves exactly as paho
does (every packet wakes the network thread). paho closes the socket (and, reconnecting, clears its
queue) under the same lock, so no write goes to a closed or a newer connection.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import MQTTErrorCode

_PUBLISH = 0x30
_DISCONNECT = 0xE0
_READ_VERSIONS = ("2.1.", "2.2.")  # paho releases whose client.py this was checked against
_PRIVATE_PARTS = (
    "_out_packet", "_sock", "_msgtime_mutex", "_sockpairW", "_packet_write", "_packet_queue", "_sock_close",
)


class DirectWriteClient(paho.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Reentrant: paho's `_packet_write` closes the socket after a DISCONNECT while holding it.
        self._write_lock = threading.RLock()
        self._deferring: int | None = None  # the thread whose queued packets it writes itself
        self.on_stream_written: Callable[[int], None] = lambda mid: None
        if self.supported():
            own_write = self._packet_write  # paho's network thread writes through the same lock

            def locked_write() -> MQTTErrorCode:
                with self._write_lock:
                    return own_write()

            self._packet_write = locked_write  # type: ignore[method-assign]

    def supported(self) -> bool:
        return (
            paho_version.startswith(_READ_VERSIONS)
            and all(hasattr(self, name) for name in _PRIVATE_PARTS)
            and isinstance(getattr(self, "_out_packet", None), collections.deque)
        )

    def _sock_close(self) -> None:
        with self._write_lock:  # not while the dispatcher writes: it reads `_sock` once per write
            super()._sock_close()

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        self._deferring = threading.get_ident()
        try:
            yield
        finally:
            self._deferring = None

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: paho.MQTTMessageInfo | None = None
    ) -> MQTTErrorCode:
        if self._deferring != threading.get_ident():
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet),
             "packet": packet, "info": info}
        )
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def write_queued(self) -> None:
        """Write every queued packet the socket takes now; wake paho's thread for the rest.

        Unlike paho's `_packet_write`, this never runs a paho callback: paho's network thread may
        hold its callback mutex while it waits for room in the dispatcher's inbox, and the
        dispatcher must never wait for it. A written QoS 0 PUBLISH is reported to
        `on_stream_written` instead (a QoS 1 one is answered by its PUBACK, as before)."""
        queue = self._out_packet
        written = False
        try:
            with self._write_lock:
                sock = self._sock  # None once closed (reconnecting clears the queue after that)
                while queue and sock is not None:
                    packet = queue[0]
                    if packet["command"] & 0xF0 == _DISCONNECT:
                        break  # paho's thread closes the connection after it
                    try:
                        # A view: no copy of a large packet's rest at each try (paho types `send` narrower).
                        sent = sock.send(memoryview(packet["packet"])[packet["pos"]:])  # type: ignore[arg-type]
                    except OSError:  # full (BlockingIOError) or broken: paho's thread finds out
                        break
                    written = written or sent > 0
                    packet["pos"] += sent
                    packet["to_process"] -= sent
                    if packet["to_process"] > 0:
                        break
                    queue.popleft()
                    if packet["command"] & 0xF0 == _PUBLISH and packet["qos"] == 0:
                        self.on_stream_written(packet["mid"])
                        if packet["info"] is not None:
                            packet["info"]._set_as_published()
                if written:
                    with self._msgtime_mutex:
                        self._last_msg_out = time.monotonic()
        finally:
            if queue:
                self._wake()

    def _wake(self) -> None:
        wake = self._sockpairW
        if wake is not None:
            with contextlib.suppress(OSError):  # full (BlockingIOError: a wake-up is pending) or closed
                wake.send(b"0")
