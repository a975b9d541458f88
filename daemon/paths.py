"""Where the socket and the state live when the configured defaults are out of reach.

The defaults (`/run/edgellm/edgellm.sock`, `/var/lib/edgellm`) are what systemd gives the service.
A person running `edgellm serve` from a shell as an ordinary user cannot write there; rather than
failing, the daemon then uses per-user places, and `edgellm ask` looks in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SOCKET = Path("/run/edgellm/edgellm.sock")
DEFAULT_STATE_DIR = Path("/var/lib/edgellm")


def user_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "edgellm"
    return Path(f"/tmp/edgellm-{os.getuid()}")


def user_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "edgellm"


def writable_or_creatable(directory: Path) -> bool:
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def serve_socket_path(configured: str) -> Path:
    """The socket path the daemon binds."""
    path = Path(configured)
    if path == DEFAULT_SOCKET and not writable_or_creatable(path.parent):
        return user_runtime_dir() / "edgellm.sock"
    return path


def client_socket_candidates(configured: str) -> list[Path]:
    """Where `edgellm ask` looks, in order (the same fallback the daemon applies)."""
    path = Path(configured)
    if path == DEFAULT_SOCKET:
        return [path, user_runtime_dir() / "edgellm.sock"]
    return [path]


def state_dir(configured: Path) -> Path:
    if configured == DEFAULT_STATE_DIR and not writable_or_creatable(configured):
        return user_state_dir()
    return configured
