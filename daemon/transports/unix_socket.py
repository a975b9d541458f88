"""The Unix socket door: newline-delimited JSON both ways, many requests per connection.

An asyncio server. Events produced on the inference thread reach a connection through
`call_soon_threadsafe`; a client that stops reading gets its buffer capped and is dropped, never
waited on. Protocol rules live in `daemon.protocol`; this module only frames and routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import select
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.protocol import (
    DEFAULT_LIMITS,
    Code,
    EdgeError,
    ErrorEvent,
    Event,
    Limits,
    Origin,
    parse_json_object,
    parse_request,
    peek_id,
    quote,
    to_json_line,
)

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import SocketConfig
    from daemon.constraints import ConstraintCompiler
    from daemon.tasks import TaskRegistry

log = structlog.get_logger(__name__)


class SocketInUseError(RuntimeError):
    """Another live process answers on the socket path."""


class UnsafeSocketPathError(SocketInUseError):
    """The socket path could be swapped under us by someone else: a symlink, or a folder anyone may
    write to without the sticky bit."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end, from SO_PEERCRED (Linux)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(pid: int, primary_gid: int) -> set[int]:
    """The peer's primary and supplementary groups (from /proc; just the primary if it is gone)."""
    groups = {primary_gid}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return groups


def peer_allowed(creds: tuple[int, int, int] | None, uids: tuple[int, ...], gids: tuple[int, ...]) -> bool:
    """`socket.allowed_uids`/`allowed_gids`: both empty lets everyone in; root and the daemon's own
    user always (they can read its memory anyway); else the uid or one of the groups must be listed."""
    if not uids and not gids:
        return True
    if creds is None:
        return False
    pid, uid, gid = creds
    if uid in (0, os.getuid()) or uid in uids:
        return True
    return bool(gids) and not peer_groups(pid, gid).isdisjoint(gids)


def check_socket_location(path: Path) -> None:
    """Refuse a path someone else could swap: a symlink, or one in a folder that anyone may write to
    without the sticky bit (they could replace our socket with theirs and read every prompt)."""
    try:
        folder = path.parent.stat()
    except OSError as exc:
        raise UnsafeSocketPathError(f"{path.parent}: cannot check the socket's folder ({exc.strerror or exc})") from exc
    if not stat.S_ISDIR(folder.st_mode):
        raise UnsafeSocketPathError(f"{path.parent} is not a folder")
    if folder.st_mode & stat.S_IWOTH and not folder.st_mode & stat.S_ISVTX:
        raise UnsafeSocketPathError(
            f"{path.parent} is world-writable without the sticky bit: anyone could replace the socket; "
            f"refusing to listen there (chmod o-w or +t {path.parent}, or set socket.path elsewhere)"
        )
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSocketPathError(
            f"{path} is a symlink; refusing to listen through it (remove it, or set socket.path to the real place)"
        )


def prepare_socket_path(path: Path) -> None:
    """Make the folder; refuse a path that is not safe; replace a stale socket left by a crash;
    refuse a live one or a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_socket_location(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.warning("socket.stale_replaced", path=str(path))
            path.unlink(missing_ok=True)
            return
        raise SocketInUseError(f"{path}: cannot tell whether another daemon owns it ({exc})") from exc
    finally:
        probe.close()
    raise SocketInUseError(f"{path}: another process is already listening (is edgellm already running?)")


def bind_unix_socket(path: Path, mode: int, group: str) -> socket.socket:
    prepare_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Connection:
    """One client. Owns its writer; every method runs on the event loop thread."""

    def __init__(
        self,
        server: UnixSocketServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.active: set[str] = set()
        self.closed = False
        creds = peer_credentials(writer.get_extra_info("socket"))
        self.creds = creds
        self.peer = "unknown" if creds is None else f"pid={creds[0]} uid={creds[1]} gid={creds[2]}"
        self.origin = Origin("socket", self.peer)

    # Sink interface: may be called from any thread.
    def emit(self, event: Event) -> None:
        self.server.loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        if event.final and event.id is not None:
            self.active.discard(event.id)
        self.send(event.to_dict())

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed:
            return
        self.writer.write(to_json_line(obj))
        buffered = self.writer.transport.get_write_buffer_size()
        if buffered > self.server.cfg.max_write_buffer_bytes:
            # A client that does not read must not hold memory or the inference thread hostage.
            log.warning("socket.slow_client_dropped", peer=self.peer, buffered_bytes=buffered)
            self.abort()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.transport.abort()
        self._cancel_active()

    def _cancel_active(self) -> None:
        for request_id in list(self.active):
            self.server.backend.cancel(request_id)
        self.active.clear()

    async def serve(self) -> None:
        limit = self.server.cfg.max_request_bytes
        try:
            while not self.closed:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    self.send(
                        ErrorEvent(
                            None, Code.PAYLOAD_TOO_LARGE, f"request line longer than {limit} bytes; closing connection"
                        ).to_dict()
                    )
                    break
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        self.handle_line_safely(exc.partial)
                    await self._linger_after_eof()
                    break
                if line.strip():
                    self.handle_line_safely(line)
                    # Let a burst of events go out before reading more, without waiting on a slow reader.
                    await asyncio.sleep(0)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._cancel_active()
            with contextlib.suppress(Exception):
                self.writer.close()
            self.server.connections.discard(self)

    async def _linger_after_eof(self) -> None:
        """EOF is either a half-close (`shutdown(SHUT_WR)`, as `socat` or `nc -N` do: the client still
        wants its answers) or a full disconnect (the client is gone: cancel its work). POLLHUP tells them
        apart on a Unix socket; keep checking while answers are still due."""
        while self.active and not self.closed:
            if _peer_hung_up(self.writer.get_extra_info("socket")):
                log.info("socket.client_gone", peer=self.peer, cancelled=sorted(self.active))
                self._cancel_active()
                return
            await asyncio.sleep(0.1)
        if not self.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.drain(), timeout=5.0)

    def handle_line_safely(self, line: bytes) -> None:
        try:
            self.handle_line(line)
        except Exception as exc:  # a bug must cost one line an error, not the client its connection
            log.exception("socket.internal_error", peer=self.peer)
            self.send(ErrorEvent(None, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}").to_dict())

    def handle_line(self, line: bytes) -> None:
        backend = self.server.backend
        obj: dict[str, Any] | None = None
        try:
            obj = parse_json_object(line)
            if "op" in obj:
                self.handle_op(obj)
                return
            if "task" in obj and self.server.tasks is not None:
                request = self.server.tasks.parse_call(obj, backend.defaults)
            else:
                request = parse_request(
                    obj, backend.defaults, limits=self.server.limits(), constraints=self.server.constraints
                )
        except EdgeError as exc:
            # An error about a control op is not about the request whose id it names.
            request_id = peek_id(obj) if obj is not None and "op" not in obj else None
            log.info("request.rejected", peer=self.peer, transport="socket", id=request_id, code=exc.code,
                     reason=exc.message)
            self.send(exc.to_event(request_id).to_dict())
            return
        if request.id in self.active:
            # Refused here, so the original's id stays ours to cancel when this client leaves.
            self.send(ErrorEvent(request.id, Code.DUPLICATE_ID,
                                 f"a request with id {request.id!r} is already queued or running").to_dict())
            return
        self.active.add(request.id)
        backend.submit(request, self, self.origin)

    def handle_op(self, obj: dict[str, Any]) -> None:
        op = obj.get("op")
        backend = self.server.backend
        if op == "cancel":
            _expect_fields(obj, {"op", "id"})
            request_id = obj.get("id")
            if not isinstance(request_id, str) or not request_id:
                raise EdgeError(Code.INVALID_REQUEST, "id: cancel needs the id of the request to cancel")
            self.send({"event": "cancel", "id": request_id, "cancelled": backend.cancel(request_id)})
        elif op == "status":
            _expect_fields(obj, {"op"})
            self.send({"event": "status", **backend.status()})
        elif op == "health":
            _expect_fields(obj, {"op"})
            status = backend.status()
            self.send({"event": "health", "ok": status["state"] == "ready", "state": status["state"]})
        elif op == "tasks" and self.server.tasks is not None:
            _expect_fields(obj, {"op"})
            self.send({"event": "tasks", "tasks": self.server.tasks.describe()})
        else:
            known = "cancel, status, health" + (", tasks" if self.server.tasks is not None else "")
            raise EdgeError(Code.INVALID_REQUEST, f"op: unknown operation {quote(op)}; known: {known}")

    # How long shutdown waits for a client to take its last events before dropping it.
    FLUSH_TIMEOUT_S = 1.0


def _peer_hung_up(sock: Any) -> bool:
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in poller.poll(0))


def _expect_fields(obj: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        shown = ", ".join(quote(name) for name in unknown[:8])
        raise EdgeError(Code.INVALID_REQUEST, f"unknown field(s) for op {quote(obj.get('op'))}: {shown}")


class UnixSocketServer:
    """Lifecycle: `await start()`, then `await stop()`; the socket file is removed on stop."""

    def __init__(
        self,
        cfg: SocketConfig,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        limits: Callable[[], Limits] = lambda: DEFAULT_LIMITS,
        *,
        constraints: ConstraintCompiler | None = None,
        tasks: TaskRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.loop = loop
        self.limits = limits  # asked per request, so a SIGHUP's new [limits] apply at once
        self.constraints = constraints  # compiles format/json_schema/grammar; None refuses them
        self.tasks = tasks  # answers {"task": ...} and {"op": "tasks"}
        self.path = Path(cfg.path)
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._owns_path = False

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Listen on the configured path, or on a socket systemd handed us (socket activation)."""
        if inherited is not None:
            sock = inherited
            sock.setblocking(False)
        else:
            sock = bind_unix_socket(self.path, self.cfg.mode_int, self.cfg.group)
            self._inode = self.path.stat().st_ino
            self._owns_path = True
        self._server = await asyncio.start_unix_server(
            # readuntil() measures the limit against the line without its newline.
            self._on_connect, sock=sock, limit=self.cfg.max_request_bytes
        )
        log.info("socket.listening", path=str(self.path), mode=self.cfg.mode, activated=inherited is not None)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if not peer_allowed(conn.creds, self.cfg.allowed_uids, self.cfg.allowed_gids):
            log.warning("socket.peer_refused", peer=conn.peer, reason="not in socket.allowed_uids/allowed_gids")
            who = "an unknown peer" if conn.creds is None else f"uid {conn.creds[1]} (gid {conn.creds[2]})"
            conn.send(ErrorEvent(None, Code.FORBIDDEN,
                                 f"{who} may not use this socket (socket.allowed_uids / allowed_gids)").to_dict())
            conn.closed = True
            try:
                await asyncio.wait_for(writer.drain(), timeout=1.0)
            except Exception:  # it does not read: nothing more is owed to it
                writer.transport.abort()
            else:
                writer.close()
            return
        if len(self.connections) >= self.cfg.max_connections:
            log.warning("socket.too_many_connections", peer=conn.peer, limit=self.cfg.max_connections)
            conn.send(ErrorEvent(None, Code.QUEUE_FULL, "too many connections", retry_after_ms=1000).to_dict())
            conn.abort()
            return
        self.connections.add(conn)
        await conn.serve()

    def stop_listening(self) -> None:
        """Accept no new connections (drain starts); existing ones keep receiving their events."""
        if self._server is not None:
            self._server.close()
        self._remove_path()

    async def stop(self) -> None:
        self.stop_listening()
        for conn in list(self.connections):
            # Bounded: a client that does not read must not hold up the shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.drain(), timeout=_Connection.FLUSH_TIMEOUT_S)
            conn.closed = True
            if conn.writer.transport.get_write_buffer_size():
                conn.writer.transport.abort()
            else:
                conn.writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)

    def _remove_path(self) -> None:
        if not self._owns_path:
            return
        self._owns_path = False
        with contextlib.suppress(FileNotFoundError):
            # Only remove the file if it is still ours, not a successor daemon's.
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
