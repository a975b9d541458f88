"""Test helpers: write configs, run a real `edgellm serve` process, talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.client import Client, ClientError

REPO = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for test configs: scalars, lists and nested tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            body = toml_dumps(value, name + ".")
            lines.append(f"\n[{name}]\n{body}")
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(tmp: Path, model_path: Path) -> dict[str, Any]:
    """A config for a test daemon: private socket and state, no MQTT, no governor unless asked."""
    return {
        "state_dir": str(tmp / "state"),
        "model": {"path": str(model_path), "n_ctx": 1024},
        # One stream and no preemption unless a test asks: most tests check the queue's own order.
        "engine": {"n_threads": 2, "n_batch": 64, "parallel": 1},
        "socket": {"path": str(tmp / "edgellm.sock")},
        "queue": {"max_depth": 8, "preempt": False},
        "generation": {"max_tokens": 32, "temperature": 0.0},
        "logging": {"level": "debug", "format": "json"},
        "shutdown": {"drain_seconds": 10.0},
        "mqtt": {"enabled": False},
        "governor": {"enabled": False},
    }


def write_config(tmp: Path, model_path: Path, overrides: dict[str, Any] | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.toml"
    path.write_text(toml_dumps(merge(base_config(tmp, model_path), overrides or {})))
    return path


class DaemonProcess:
    """A real `python -m daemon serve` child process. Its log goes to a file the test can read."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.dir = config_path.parent
        self.log_path = self.dir / f"daemon-{time.monotonic_ns()}.log"
        self.socket_path = self._socket_path()
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(REPO),
        )

    def _socket_path(self) -> Path:
        import tomllib

        data = tomllib.loads(self.config_path.read_text())
        return Path(data["socket"]["path"])

    def wait_ready(self, timeout: float = 60.0) -> DaemonProcess:
        """Until the socket answers `health` with a settled state (ready or unavailable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.socket_path, timeout=5) as client:
                    health = client.health()
                if health.get("state") in ("ready", "unavailable", "idle"):
                    return self
            except (ClientError, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def collect(client: Client, request: dict[str, Any]) -> list[dict[str, Any]]:
    return list(client.request(request))


def read_until_final(client: Client, request_id: str) -> Iterator[dict[str, Any]]:
    while True:
        event = client.read_event()
        if event.get("id") != request_id:
            continue
        yield event
        if event.get("event") in ("done", "error"):
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_status(client: Client, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll the status op until `predicate(status)` holds; fail with the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"condition not reached; last status: {status}"
        time.sleep(0.05)


def rewrite_prefix_header(path: Path, changes: dict[str, Any], drop: str | None = None) -> None:
    """Edit a persisted prefix-cache file's JSON header in place (MAGIC, u32 length, JSON, body),
    as damage or another model's daemon would have left it."""
    from daemon.engine.prefix_cache import MAGIC

    data = path.read_bytes()
    start = len(MAGIC) + 4
    head_len = int.from_bytes(data[len(MAGIC):start], "little")
    header = json.loads(data[start:start + head_len])
    if drop is not None:
        del header[drop]
    header.update(changes)
    head = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(head).to_bytes(4, "little") + head + data[start + head_len:])
