"""A small blocking client for the Unix socket protocol (used by `edgellm ask/status` and tests)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.protocol import to_json_line


class ClientError(Exception):
    """The daemon could not be reached or closed the connection early."""


class Client:
    """One connection. `with Client(path) as c: for event in c.request({...}): ...`"""

    def __init__(self, path: str | Path, timeout: float | None = None) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ClientError(f"cannot connect to edgellm at {self.path}: {exc.strerror or exc}") from exc
        self._file = self._sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def send(self, obj: dict[str, Any]) -> None:
        self.send_raw(to_json_line(obj))

    def send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise ClientError(f"the daemon took no data within {self._timeout_text()}") from None
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed the connection: what it said before (e.g. `forbidden`) is still to be
            # read, and the next read reports it, or the close.
            pass
        except OSError as exc:
            raise ClientError(f"connection to the daemon failed: {exc.strerror or exc}") from exc

    def _readline(self) -> bytes:
        try:
            return self._file.readline()
        except TimeoutError:
            raise ClientError(f"no answer from the daemon within {self._timeout_text()}") from None
        except OSError as exc:
            raise ClientError(f"connection to the daemon failed: {exc.strerror or exc}") from exc

    def _timeout_text(self) -> str:
        return f"{self._sock.gettimeout() or 0:g} s"

    def read_event(self) -> dict[str, Any]:
        line = self._readline()
        if not line:
            raise ClientError("connection closed by the daemon")
        return self._decode(line)

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise ClientError(f"the daemon sent something that is not JSON: {line[:80]!r}") from exc
        if not isinstance(event, dict):
            raise ClientError(f"the daemon sent something that is not an event: {line[:80]!r}")
        return event

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event until the daemon closes the connection."""
        while True:
            line = self._readline()
            if not line:
                return
            yield self._decode(line)

    def request(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send one request and yield its events up to and including the final one."""
        self.send(obj)
        request_id = obj.get("id")
        while True:
            event = self.read_event()
            if request_id is not None and event.get("id") not in (request_id, None):
                continue
            yield event
            if event.get("event") in ("done", "error"):
                return

    def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one request or op and return its final (or only) reply."""
        if "op" in obj:
            self.send(obj)
            return self.read_event()
        events = list(self.request(obj))
        return events[-1]

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"})

    def health(self) -> dict[str, Any]:
        return self.call({"op": "health"})
