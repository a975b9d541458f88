"""The processes a benchmark starts: `edgellm serve`, a private Mosquitto, llama.cpp's server.

Each one is started with a generated config in the run's scratch folder, waited for through its own
documented interface (the socket's `health` op, a TCP listen, HTTP `/health`), and stopped by its id.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.client import Client, ClientError


class BenchError(Exception):
    """A contender could not be started or answered with an error: the run cannot go on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML form for {value!r}")


def toml_text(config: dict[str, Any], table: str = "") -> str:
    """Scalars first, then one [table] per nested dict: all a daemon config needs."""
    out = [f"{key} = {_toml_scalar(value)}" for key, value in config.items() if not isinstance(value, dict)]
    for key, value in config.items():
        if isinstance(value, dict):
            name = f"{table}.{key}" if table else key
            out.append(f"\n[{name}]\n" + toml_text(value, name))
    return "\n".join(out) + "\n"


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Child:
    """A process this run started (and only it stops, by its id)."""

    what = "process"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.what} not started")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)


class EdgeDaemon(_Child):
    """`edgellm serve` with a generated config; `start()` returns once its socket says ready."""

    what = "edgellm serve"

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.socket_path = Path(config["socket"]["path"])
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(toml_text(config))
        self.log_path = self.dir / "daemon.log"

    def start(self, timeout: float = 180.0) -> EdgeDaemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # not under systemd here, whatever started the benchmark
        env.pop("EDGELLM_CONFIG", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"edgellm serve exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                with Client(self.socket_path, timeout=10) as client:
                    state = client.health().get("state")
                if state == "ready":
                    return self
                if state == "unavailable":
                    raise BenchError(f"the daemon could not load the model:\n{_tail(self.log_path)}")
            except (ClientError, OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"edgellm serve not ready within {timeout:.0f} s:\n{_tail(self.log_path)}")

    def status(self) -> dict[str, Any]:
        with Client(self.socket_path, timeout=30) as client:
            return client.status()


class Broker:
    """A private Mosquitto on a free loopback port, no persistence, for this run only."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false",
                 "max_queued_messages 0", f"log_dest file {self.dir / 'mosquitto.log'}"]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else it drops to `mosquitto`, who cannot write its log here
        self.config_path = self.dir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> Broker:
        if not Path(self.binary).exists():
            raise BenchError("mosquitto is not installed (apt-get install mosquitto), or pass --no-mqtt")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"mosquitto exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"mosquitto did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, 10)


class LlamaServer(_Child):
    """llama.cpp's `llama-server` on a free loopback port; `start()` returns once /health is 200."""

    what = "llama-server"

    def __init__(self, binary: Path, workdir: Path, args: list[str]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.argv = [str(binary), *args, "--host", self.host, "--port", str(self.port)]
        self.log_path = self.dir / "llama-server.log"

    def start(self, timeout: float = 180.0) -> LlamaServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"llama-server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"llama-server not healthy within {timeout:.0f} s:\n{_tail(self.log_path)}")


def run_tool(argv: list[str], timeout: float) -> str:
    """Run a native benchmark tool to its end; its stdout and stderr together."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    output = done.stdout.decode(errors="replace") + "\n" + done.stderr.decode(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BenchError(f"{Path(argv[0]).name} exited with {done.returncode}:\n{tail}")
    return output
