"""The network doors that run on the daemon's event loop: HTTP ([http]) and Wyoming ([wyoming]).

One owner for their lifecycle so the service only says start, reload, stop: a door is started
when enabled, stopped when disabled, restarted when its settings change on SIGHUP. A door that
fails to start at boot fails the daemon (as a busy socket does); on a reload it is logged and the
other doors keep serving.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import Config

log = structlog.get_logger(__name__)


class NetworkDoors:
    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop, constraints: Any = None) -> None:
        self.backend = backend
        self.loop = loop
        # Issue 9's constraint compiler, when the daemon has one: tool-call grammars and `format`.
        self.constraints = constraints
        self.http: Any = None
        self.wyoming: Any = None

    async def start(self, cfg: Config) -> None:
        for name, enabled in (("http", cfg.http.enabled), ("wyoming", cfg.wyoming.enabled)):
            if enabled:
                await self._open(name, cfg)

    async def _open(self, name: str, cfg: Config) -> None:
        door: Any
        if name == "http":
            from daemon.transports.http.server import HttpDoor

            door = HttpDoor(cfg, self.backend, self.loop, self.constraints)
        else:
            from daemon.transports.wyoming import WyomingDoor

            door = WyomingDoor(cfg, self.backend, self.loop)
        await door.start()
        setattr(self, name, door)

    async def reload(self, cfg: Config) -> None:
        for name, enabled in (("http", cfg.http.enabled), ("wyoming", cfg.wyoming.enabled)):
            door = getattr(self, name)
            try:
                if door is not None and not enabled:
                    setattr(self, name, None)
                    await door.stop()
                elif door is not None:
                    await door.reconfigure(cfg)
                elif enabled:
                    await self._open(name, cfg)
            except Exception as exc:  # a busy port must not take the other doors down
                log.error("door.reload_failed", door=name, error=str(exc))
                setattr(self, name, None)  # stopped by the failed restart; the next reload starts it anew

    async def stop(self) -> None:
        for name in ("http", "wyoming"):
            door = getattr(self, name)
            setattr(self, name, None)
            if door is not None:
                await door.stop()
