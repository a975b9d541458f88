"""systemd's service-manager protocols without a dependency: sd_notify(3) and sd_listen_fds(3).

sd_notify is one datagram of newline-separated `KEY=VALUE` lines sent to the AF_UNIX socket named by
`$NOTIFY_SOCKET` (a filesystem path, or `@name` for the abstract namespace). When the variable is
unset the process is not run by systemd with `Type=notify`, and every call here is a no-op that
returns False, so the daemon calls these helpers unconditionally.

Socket activation hands listening sockets over as file descriptors starting at 3, described by
`$LISTEN_FDS` (how many), `$LISTEN_PID` (for whom) and `$LISTEN_FDNAMES` (colon-separated names).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


def _notify_address(raw: str) -> str | bytes | None:
    """The sockaddr for `$NOTIFY_SOCKET`: a path, or an abstract name (leading NUL) for `@name`."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    return None  # e.g. systemd 254+'s "vsock:CID:PORT", which a Pi service never gets


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=loading") to the service manager.

    True when the datagram was handed to the socket; False when there is no manager to tell or the
    send failed (logged, never raised: a lost status line must not take the daemon down).
    """
    environ = os.environ if env is None else env
    raw = environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _notify_address(raw)
    if address is None:
        log.warning("sdnotify.unsupported_socket", notify_socket=raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sdnotify.send_failed", notify_socket=raw, error=str(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The service is up: systemd starts ordering dependents and leaves the `activating` state."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={_one_line(status_text)}")


def reloading(now_monotonic_usec: int | None = None) -> bool:
    """A reload began. `MONOTONIC_USEC` lets `Type=notify-reload` (systemd 253+) match it to the
    SIGHUP it sent; older managers ignore the extra field. Send `ready()` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if now_monotonic_usec is None else now_monotonic_usec
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Shutdown began: systemd shows `deactivating` and stops expecting watchdog pings."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """The one-line summary `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """A liveness ping; call only after checking the process really is alive (not from a bare timer)."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before start/stop times out (a slow model load on a Pi 4, a long drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """The `WatchdogSec=` systemd enforces for this process, in seconds; None when there is none.

    `$WATCHDOG_PID`, when set, names the process the watchdog is meant for: a child that inherited
    the environment must not ping on its parent's behalf. Ping at about half the interval.
    """
    environ = os.environ if env is None else env
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("sdnotify.bad_watchdog_usec", value=raw)
        return None
    return usec / 1_000_000 if usec > 0 else None


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd socket activation, with their `FileDescriptorName=` (or "unknown").

    Empty when this process was not socket-activated or the fds were meant for another process
    (`$LISTEN_PID` differs). The fds get close-on-exec so a child process never inherits them. With
    `unset_environment` the variables are removed, as sd_listen_fds(1) does, so a second call (or a
    child) does not take the same descriptors again.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count_raw = os.environ.get("LISTEN_FDS", "")
    names_raw = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid or not count_raw:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        count = int(count_raw)
    except ValueError:
        log.warning("sdnotify.bad_listen_env", listen_pid=pid, listen_fds=count_raw)
        return []
    names = names_raw.split(":") if names_raw else []
    result: list[tuple[str, socket.socket]] = []
    for index in range(max(0, count)):
        fd = SD_LISTEN_FDS_START + index
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        name = names[index] if index < len(names) and names[index] else "unknown"
        result.append((name, socket.socket(fileno=fd)))  # family/type are read from the fd itself
    return result


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The socket-activated sockets in the order of the `.socket` unit's `Listen*=` lines."""
    return [sock for _, sock in listen_fds_with_names(unset_environment)]


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split("\n")).strip()
