"""The configuration: a TOML file read into frozen dataclasses, validated before anything starts.

The dataclasses below are the schema. The loader walks them generically: a field's annotation gives
its TOML type, `dataclasses.field(metadata=...)` gives its constraints:

    min, max   inclusive numeric bounds
    choices    the allowed values (a tuple)
    path       a path: relative values resolve against the config file's folder (empty stays empty)
    check      a function value -> error message or None, for rules a bound cannot express
    internal   not a TOML key (e.g. `Config.source`)
    json       a str holding JSON: a TOML table or a JSON text, stored as canonical JSON text
    names      for dict[str, <dataclass>]: a regex every table name must match in full

Supported annotations: bool, int, float (an integer is accepted), str, Path, list[str],
tuple[str, ...], tuple[int, ...], nested dataclasses (TOML sub-tables such as `[mqtt.tls]`) and dict[str, <dataclass>]
(named sub-tables such as `[tasks.<name>]`). The one union is `X | None` in a named sub-table (a task's
overrides): absent means None, "take the daemon's". Elsewhere TOML has no null, so "unset" is an empty
string or 0, documented per key. Adding a key = adding a field here and documenting it in the repo's
`config.toml` (a test enforces that).

Every problem is collected, not just the first, into one `ConfigError`; each message names the file
and the dotted key, e.g. `/etc/edgellm/config.toml: queue.max_depth: must be >= 1 (got 0)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.protocol import Limits
from daemon.templates import TEMPLATE_SETTINGS

ENV_VAR = "EDGELLM_CONFIG"
DEFAULTS_SOURCE = "<defaults>"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
KV_TYPES = ("f16", "q8_0", "q4_0")
PRIORITIES = ("high", "normal", "low")
COALESCE = ("latest", "drop")
TASK_NAME = r"[a-z0-9_-]{1,64}"
MQTT_PROTOCOLS = ("5", "3.1.1")
MQTT_TRANSPORTS = ("tcp", "unix")

MAX_UINT32 = 2**32 - 1
# A value is quoted in a config error up to this many characters.
MAX_QUOTED_CHARS = 60


class ConfigError(Exception):
    """The config cannot be used; `errors` holds every problem found, one message each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _check_octal_mode(value: Any) -> str | None:
    text = value[2:] if value.lower().startswith("0o") else value
    if not text or len(text) > 4 or any(c not in "01234567" for c in text):
        return f'must be an octal permission string like "0660" (got {_show(value)})'
    if int(text, 8) > 0o777:
        return f'must be at most "0777": no setuid/setgid/sticky bits on a socket (got {_show(value)})'
    return None


def _check_topic_prefix(value: Any) -> str | None:
    # The prefix becomes part of every topic name we publish to: wildcards would make them invalid.
    bad = [c for c in ("+", "#", "\0") if c in value]
    if bad:
        return f"must not contain MQTT wildcards or NUL (got {_show(value)})"
    return None


def _check_topic_filter(value: str) -> str | None:
    # A destination pattern: an MQTT topic filter, never one for the broker's `$` topics.
    levels = value.split("/")
    if not value or "\0" in value or value.startswith("$"):
        return f"must be a non-empty MQTT topic filter not starting with '$' (got {_show(value)})"
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            return f"'+' must be a whole level and '#' the whole last level (got {_show(value)})"
    return None


def _meta(
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    check: Callable[[Any], str | None] | None = None,
    json: bool = False,
    names: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if choices is not None:
        meta["choices"] = choices
    if path:
        meta["path"] = True
    if check is not None:
        meta["check"] = check
    if json:
        meta["json"] = True
    if names is not None:
        meta["names"] = names
    return meta


@dataclass(frozen=True)
class ModelConfig:
    # Empty path: the model named by `name`, or the bundled Gemma 3 270M, under <state_dir>/models.
    path: str = field(default="", metadata=_meta(path=True))
    name: str = ""
    n_ctx: int = field(default=2048, metadata=_meta(min=128, max=131072))
    template: str = field(default="auto", metadata=_meta(choices=TEMPLATE_SETTINGS))
    chat_template_file: str = field(default="", metadata=_meta(path=True))
    # Accepting a model's license terms (Gemma) lets `edgellm models fetch` download it unattended.
    accept_license: bool = False


@dataclass(frozen=True)
class EngineConfig:
    n_threads: int = field(default=0, metadata=_meta(min=0, max=256))  # 0 = physical cores
    n_batch: int = field(default=256, metadata=_meta(min=1, max=8192))
    use_mmap: bool = True
    use_mlock: bool = False
    prefix_cache: bool = True
    # Engine v2: parallel streams, prompt chunking, KV cache type, prefix cache, keep-alive.
    parallel: int = field(default=4, metadata=_meta(min=1, max=16))
    prompt_chunk: int = field(default=128, metadata=_meta(min=16, max=8192))
    adaptive_batch: bool = True
    kv_type: str = field(default="f16", metadata=_meta(choices=KV_TYPES))
    prefix_cache_mb: int = field(default=128, metadata=_meta(min=0, max=65536))
    prefix_cache_persist: bool = True
    prefix_cache_disk_mb: int = field(default=512, metadata=_meta(min=0, max=1048576))
    keep_alive_s: float = field(default=-1.0, metadata=_meta(min=-1.0, max=31_536_000.0))

    @property
    def step_tokens(self) -> int:
        """The most tokens one decode step holds (the context's n_batch): a token per stream plus
        a prompt chunk; n_batch bounds a prompt step on its own."""
        return max(self.n_batch, min(self.prompt_chunk, self.n_batch) + self.parallel)


@dataclass(frozen=True)
class SocketConfig:
    path: str = field(default="/run/edgellm/edgellm.sock", metadata=_meta(path=True))
    mode: str = field(default="0660", metadata=_meta(check=_check_octal_mode))
    group: str = ""
    max_request_bytes: int = field(default=262144, metadata=_meta(min=1024, max=64 * 1024 * 1024))
    max_connections: int = field(default=256, metadata=_meta(min=1, max=65536))
    max_write_buffer_bytes: int = field(default=1048576, metadata=_meta(min=4096, max=1024 * 1024 * 1024))
    # Who may talk to the daemon, by SO_PEERCRED: () = anyone who can open the socket file. Root
    # and the daemon's own user are always let in (they can read its memory anyway).
    allowed_uids: tuple[int, ...] = field(default=(), metadata=_meta(min=0, max=MAX_UINT32))
    allowed_gids: tuple[int, ...] = field(default=(), metadata=_meta(min=0, max=MAX_UINT32))

    @property
    def mode_int(self) -> int:
        """`mode` as the integer chmod wants ("0660" -> 0o660)."""
        text = self.mode[2:] if self.mode.lower().startswith("0o") else self.mode
        return int(text, 8)


@dataclass(frozen=True)
class QueueConfig:
    max_depth: int = field(default=16, metadata=_meta(min=1, max=10000))
    # A waiting request of higher priority suspends the lowest-priority running stream.
    preempt: bool = True


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = field(default=256, metadata=_meta(min=1, max=131072))
    temperature: float = field(default=0.8, metadata=_meta(min=0.0, max=5.0))
    top_p: float = field(default=0.95, metadata=_meta(min=0.0, max=1.0))
    top_k: int = field(default=40, metadata=_meta(min=0, max=1000))
    min_p: float = field(default=0.05, metadata=_meta(min=0.0, max=1.0))
    repeat_penalty: float = field(default=1.0, metadata=_meta(min=0.5, max=3.0))
    seed: int = field(default=-1, metadata=_meta(min=-1, max=MAX_UINT32))  # -1 = random


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="info", metadata=_meta(choices=LOG_LEVELS))
    format: str = field(default="auto", metadata=_meta(choices=LOG_FORMATS))
    log_prompts: bool = False


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = field(default=10.0, metadata=_meta(min=0.0, max=3600.0))


@dataclass(frozen=True)
class ServiceConfig:
    watchdog_stall_s: float = field(default=60.0, metadata=_meta(min=0.1, max=3600.0))


@dataclass(frozen=True)
class MqttTlsConfig:
    enabled: bool = False
    ca_file: str = field(default="", metadata=_meta(path=True))
    cert_file: str = field(default="", metadata=_meta(path=True))
    key_file: str = field(default="", metadata=_meta(path=True))
    verify: bool = True


@dataclass(frozen=True)
class MqttFleetConfig:
    enabled: bool = False
    group: str = "edgellm"
    topic: str = "edgellm/fleet/request"


@dataclass(frozen=True)
class MqttHomeAssistantConfig:
    enabled: bool = True
    prefix: str = field(default="homeassistant", metadata=_meta(check=_check_topic_prefix))


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = True
    host: str = "localhost"  # with transport = "unix": the broker's socket path (resolved like a path)
    port: int = field(default=1883, metadata=_meta(min=1, max=65535))
    transport: str = field(default="tcp", metadata=_meta(choices=MQTT_TRANSPORTS))
    protocol: str = field(default="5", metadata=_meta(choices=MQTT_PROTOCOLS))
    client_id: str = ""
    node_id: str = ""
    prefix: str = field(default="", metadata=_meta(check=_check_topic_prefix))
    username: str = ""
    password_file: str = field(default="", metadata=_meta(path=True))
    keepalive_s: int = field(default=30, metadata=_meta(min=1, max=65535))
    session_expiry_s: int = field(default=86400, metadata=_meta(min=0, max=MAX_UINT32))
    status_interval_s: float = field(default=60.0, metadata=_meta(min=1.0, max=86400.0))
    # Streaming: at most one `token` event per request this often, each with the text since the last.
    token_interval_ms: int = field(default=0, metadata=_meta(min=0, max=1000))
    max_payload_bytes: int = field(default=262144, metadata=_meta(min=1024, max=268435455))
    offline_buffer: int = field(default=1000, metadata=_meta(min=0, max=1_000_000))
    journal_max_entries: int = field(default=10000, metadata=_meta(min=1, max=10_000_000))
    journal_max_age_s: float = field(default=86400.0, metadata=_meta(min=1.0, max=365 * 86400.0))
    reconnect_min_s: float = field(default=1.0, metadata=_meta(min=0.1, max=3600.0))
    reconnect_max_s: float = field(default=60.0, metadata=_meta(min=0.1, max=86400.0))
    # MQTT topic filters a client may name as its answer's destination although they are protected
    # (the edgellm/ tree, this node's prefix, the fleet topic, the Home Assistant prefix).
    allow_reply_to: tuple[str, ...] = ()
    tls: MqttTlsConfig = field(default_factory=MqttTlsConfig)
    fleet: MqttFleetConfig = field(default_factory=MqttFleetConfig)
    homeassistant: MqttHomeAssistantConfig = field(default_factory=MqttHomeAssistantConfig)


@dataclass(frozen=True)
class HttpConfig:
    # The HTTP door (daemon/transports/http/): the Ollama and OpenAI APIs on one port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=11434, metadata=_meta(min=1, max=65535))
    api_key_file: str = field(default="", metadata=_meta(path=True))
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class WyomingConfig:
    # The Wyoming conversation service (daemon/transports/wyoming.py) for Home Assistant's Assist.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=10700, metadata=_meta(min=1, max=65535))
    zeroconf: bool = False


@dataclass(frozen=True)
class GovernorConfig:
    # Owned by the governor (daemon/governor.py, daemon/sensors.py): its keys are added here.
    # Rules between these keys are in validate_governor_config below; docs/governor.md explains them.
    enabled: bool = True
    interval_s: float = field(default=1.0, metadata=_meta(min=0.05, max=60.0))
    # sensors
    read_timeout_s: float = field(default=1.0, metadata=_meta(min=0.01, max=30.0))
    temperature_files: tuple[str, ...] = field(default=(), metadata=_meta(path=True))  # () = auto-detect
    vcgencmd_command: str = "vcgencmd get_throttled"  # "" = do not ask the firmware
    meminfo_file: str = field(default="", metadata=_meta(path=True))  # "" = psutil (/proc/meminfo)
    psi_file: str = field(default="/proc/pressure/memory", metadata=_meta(path=True))  # "" = ignore PSI
    # thermal states (°C) and the duty-cycle controller
    warm_c: float = field(default=70.0, metadata=_meta(min=20.0, max=120.0))
    hot_c: float = field(default=78.0, metadata=_meta(min=20.0, max=120.0))
    critical_c: float = field(default=83.0, metadata=_meta(min=20.0, max=120.0))
    hysteresis_c: float = field(default=3.0, metadata=_meta(min=0.5, max=20.0))
    target_c: float = field(default=75.0, metadata=_meta(min=20.0, max=120.0))
    kp: float = field(default=0.08, metadata=_meta(min=0.0, max=1.0))
    ki: float = field(default=0.001, metadata=_meta(min=0.0, max=0.1))
    min_duty: float = field(default=0.1, metadata=_meta(min=0.01, max=1.0))
    warm_n_threads: int = field(default=0, metadata=_meta(min=0, max=256))  # 0 = unchanged
    max_tokens_normal: int = field(default=0, metadata=_meta(min=0, max=131072))  # 0 = no cap
    max_tokens_warm: int = field(default=0, metadata=_meta(min=0, max=131072))  # 0 = no cap
    max_pause_s: float = field(default=60.0, metadata=_meta(min=1.0, max=3600.0))
    # a silent temperature sensor
    sensor_grace_s: float = field(default=10.0, metadata=_meta(min=0.0, max=3600.0))
    blind_duty: float = field(default=0.5, metadata=_meta(min=0.01, max=1.0))
    blind_cooldown_s: float = field(default=60.0, metadata=_meta(min=0.0, max=3600.0))
    # memory (MiB) and pressure (PSI some avg10, percent)
    min_available_mb: int = field(default=200, metadata=_meta(min=0, max=1048576))
    critical_available_mb: int = field(default=100, metadata=_meta(min=0, max=1048576))
    memory_hysteresis_mb: int = field(default=50, metadata=_meta(min=0, max=65536))
    psi_some_limit: float = field(default=10.0, metadata=_meta(min=0.1, max=100.0))  # 100 = ignore PSI
    psi_hysteresis: float = field(default=5.0, metadata=_meta(min=0.0, max=100.0))
    reload_delay_s: float = field(default=30.0, metadata=_meta(min=0.0, max=3600.0))
    memory_reserve_mb: int = field(default=300, metadata=_meta(min=0, max=1048576))
    retry_after_s: float = field(default=10.0, metadata=_meta(min=1.0, max=600.0))


@dataclass(frozen=True)
class ConstraintsConfig:
    # Constrained output (daemon/constraints.py): limits on what a request or task may ask for.
    max_schema_bytes: int = field(default=16384, metadata=_meta(min=64, max=1048576))
    max_schema_depth: int = field(default=16, metadata=_meta(min=1, max=64))
    cache_entries: int = field(default=64, metadata=_meta(min=0, max=100000))


@dataclass(frozen=True)
class TaskConfig:
    # One `[tasks.<name>]` table; daemon/tasks.py checks templates, constraints and trigger loops.
    description: str = ""
    system: str = ""
    prompt: str = "{input}"
    raw: bool = False
    format: str = field(default="", metadata=_meta(choices=("", "json")))
    json_schema: str = field(default="", metadata=_meta(json=True))
    grammar: str = ""
    max_tokens: int | None = field(default=None, metadata=_meta(min=1, max=131072))
    temperature: float | None = field(default=None, metadata=_meta(min=0.0, max=5.0))
    top_p: float | None = field(default=None, metadata=_meta(min=0.0, max=1.0))
    top_k: int | None = field(default=None, metadata=_meta(min=0, max=1000))
    min_p: float | None = field(default=None, metadata=_meta(min=0.0, max=1.0))
    repeat_penalty: float | None = field(default=None, metadata=_meta(min=0.5, max=3.0))
    seed: int | None = field(default=None, metadata=_meta(min=-1, max=MAX_UINT32))
    stop: tuple[str, ...] = ()
    priority: str = field(default="", metadata=_meta(choices=("", *PRIORITIES)))
    deadline_ms: int | None = field(default=None, metadata=_meta(min=1, max=86_400_000))
    # Triggers (run by the MQTT door).
    subscribe: tuple[str, ...] = ()
    publish: str = ""
    retain: bool = False
    min_interval_s: float = field(default=0.0, metadata=_meta(min=0.0, max=86400.0))
    coalesce: str = field(default="latest", metadata=_meta(choices=COALESCE))
    max_queue: int = field(default=4, metadata=_meta(min=1, max=1000))


@dataclass(frozen=True)
class Config:
    state_dir: Path = field(default=Path("/var/lib/edgellm"), metadata=_meta(path=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    # Per-request resource limits; the class (with its bounds) lives in daemon.protocol, which enforces them.
    limits: Limits = field(default_factory=Limits)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict, metadata=_meta(names=TASK_NAME))
    source: str = field(default=DEFAULTS_SOURCE, metadata={"internal": True})  # file path or "<defaults>"


# --- loading -------------------------------------------------------------------------------------


def config_path_from_env_or(path: str | Path | None) -> Path | None:
    """The file to read: `path` if given, else $EDGELLM_CONFIG if set, else None (built-in defaults)."""
    if path is not None and str(path) != "":
        return Path(path)
    env = os.environ.get(ENV_VAR, "")
    return Path(env) if env else None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file (None: $EDGELLM_CONFIG, else the built-in defaults)."""
    chosen = config_path_from_env_or(path)
    if chosen is None:
        return parse_config({}, DEFAULTS_SOURCE, Path.cwd())
    source = str(chosen)
    try:
        raw = chosen.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{source}: line {line}: not valid UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {_describe_toml_error(exc)}"]) from None
    return parse_config(data, source, chosen.absolute().parent)


def _describe_toml_error(exc: Exception) -> str:
    # tomllib (< 3.14) and tomli put the position only into the message: "... (at line 3, column 7)".
    message = str(exc)
    found = re.match(r"^(.*) \(at line (\d+), column (\d+)\)$", message, re.DOTALL)
    if found:
        return f"line {found.group(2)}, column {found.group(3)}: TOML syntax error: {found.group(1)}"
    found = re.match(r"^(.*) \(at end of document\)$", message, re.DOTALL)
    if found:
        return f"end of file: TOML syntax error: {found.group(1)}"
    return f"TOML syntax error: {message}"


def parse_config(data: dict[str, Any], source: str, base_dir: Path) -> Config:
    """Validate parsed TOML (`data`) into a Config; relative paths resolve against `base_dir`."""
    ctx = _Context(source, base_dir)
    cfg = _parse_table(Config, data, "", ctx)
    cfg = _cross_checks(dataclasses.replace(cfg, source=source), ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return cfg


class _Context:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.source}: {key}: {message}")

    def resolve(self, value: str) -> str:
        if value == "":
            return value
        expanded = Path(value).expanduser()
        return str(expanded if expanded.is_absolute() else self.base_dir / expanded)


def _parse_table(cls: type[Any], data: dict[str, Any], prefix: str, ctx: _Context) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():  # file order, so errors read top to bottom
        dotted = prefix + key
        spec = known.get(key)
        if spec is None:
            shown = dotted if len(dotted) <= MAX_QUOTED_CHARS else dotted[:MAX_QUOTED_CHARS] + "…"
            ctx.error(shown, _unknown_key(key, list(known)))
            continue
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if isinstance(value, dict):
                kwargs[key] = _parse_table(hint, value, dotted + ".", ctx)
            else:
                ctx.error(dotted, f"must be a table (got {_describe(value)})")
            continue
        if typing.get_origin(hint) is dict:
            if isinstance(value, dict):
                kwargs[key] = _parse_named_tables(typing.get_args(hint)[1], value, dotted, spec.metadata, ctx)
            else:
                ctx.error(dotted, f"must be a table of named tables (got {_describe(value)})")
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        ok, converted = _convert(hint, value, spec.metadata, dotted, ctx)
        if ok:
            kwargs[key] = converted
    return cls(**kwargs)


def _parse_named_tables(
    cls: type[Any], data: dict[str, Any], prefix: str, meta: Any, ctx: _Context
) -> dict[str, Any]:
    """`[prefix.<name>]` tables, each one `cls`; names must match `meta["names"]`."""
    out: dict[str, Any] = {}
    pattern = meta.get("names")
    for name, value in data.items():
        dotted = f"{prefix}.{name}"
        if pattern is not None and not re.fullmatch(pattern, name):
            ctx.error(dotted, f"the name must match {pattern}")
        elif not isinstance(value, dict):
            ctx.error(dotted, f"must be a table (got {_describe(value)})")
        else:
            out[name] = _parse_table(cls, value, dotted + ".", ctx)
    return out


def _json_text(value: Any, key: str, ctx: _Context) -> tuple[bool, Any]:
    """A TOML table, or a string holding a JSON object, as canonical JSON text ("" stays "")."""
    if isinstance(value, str):
        if value == "":
            return True, ""
        try:
            value = json.loads(value)
        except ValueError as exc:
            ctx.error(key, f"is not valid JSON: {exc}")
            return False, None
    if not isinstance(value, dict):
        ctx.error(key, f"must be a table or a string holding a JSON object (got {_describe(value)})")
        return False, None
    try:
        return True, json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # order matters
    except TypeError:  # a TOML date or time
        ctx.error(key, "must hold only JSON values (strings, numbers, booleans, arrays, tables)")
        return False, None


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (known keys: {', '.join(known)})"


def _convert(hint: Any, value: Any, meta: Any, key: str, ctx: _Context) -> tuple[bool, Any]:
    """(True, the typed value) or (False, None) after recording why not."""
    choices = meta.get("choices")
    if meta.get("json"):
        return _json_text(value, key, ctx)
    if hint is bool:
        if not isinstance(value, bool):
            ctx.error(key, f"must be true or false (got {_describe(value)})")
            return False, None
        return True, value
    if hint is int or hint is float:
        return _convert_number(hint, value, meta, key, ctx)
    if hint is str or hint is Path:
        if not isinstance(value, str):
            allowed = f"; one of {_choices(choices)}" if choices else ""
            ctx.error(key, f"must be a string (got {_describe(value)}{allowed})")
            return False, None
        if choices is not None and value not in choices:
            ctx.error(key, f"must be one of {_choices(choices)} (got {_show(value)})")
            return False, None
        if hint is Path and value == "":
            ctx.error(key, "must not be empty")
            return False, None
        if meta.get("path") and "\0" in value:
            ctx.error(key, f"must not contain a NUL character (got {_show(value)})")
            return False, None
        check = meta.get("check")
        problem = check(value) if check is not None else None
        if problem:
            ctx.error(key, problem)
            return False, None
        text = ctx.resolve(value) if meta.get("path") else value
        return True, Path(text) if hint is Path else text
    origin = typing.get_origin(hint)
    if origin in (list, tuple) and typing.get_args(hint) in ((str,), (str, ...)):
        if not isinstance(value, list):
            ctx.error(key, f"must be an array of strings (got {_describe(value)})")
            return False, None
        items: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                ctx.error(f"{key}[{index}]", f"must be a string (got {_describe(item)})")
                return False, None
            items.append(ctx.resolve(item) if meta.get("path") else item)
        return True, tuple(items) if origin is tuple else items
    if origin is tuple and typing.get_args(hint) == (int, ...):
        if not isinstance(value, list):
            ctx.error(key, f"must be an array of integers (got {_describe(value)})")
            return False, None
        numbers: list[int] = []
        for index, item in enumerate(value):
            ok, number = _convert_number(int, item, meta, f"{key}[{index}]", ctx)
            if not ok:
                return False, None
            numbers.append(number)
        return True, tuple(numbers)
    raise TypeError(f"config key {key}: unsupported annotation {hint!r}")


def _convert_number(hint: Any, value: Any, meta: Any, key: str, ctx: _Context) -> tuple[bool, Any]:
    # bool is a subclass of int: `true` is not a number.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not (is_int or (hint is float and isinstance(value, float))):
        kind = "an integer" if hint is int else "a number"
        ctx.error(key, f"must be {kind} (got {_describe(value)})")
        return False, None
    if isinstance(value, float) and not math.isfinite(value):
        ctx.error(key, f"must be a finite number (got {value})")
        return False, None
    # Bounds first, on the value as written: an integer of 400 digits has no float (OverflowError).
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        ctx.error(key, f"must be >= {_num(low)} (got {_num(value)})")
        return False, None
    if high is not None and value > high:
        ctx.error(key, f"must be <= {_num(high)} (got {_num(value)})")
        return False, None
    try:
        return True, float(value) if hint is float else value
    except OverflowError:  # unbounded float key
        ctx.error(key, f"must be a finite number (got {_num(value)})")
        return False, None


def _cross_checks(cfg: Config, ctx: _Context) -> Config:
    """Rules between keys. Values that failed on their own were left at their defaults here."""
    if cfg.generation.max_tokens > cfg.limits.max_tokens:
        ctx.error(
            "generation.max_tokens",
            f"must be <= limits.max_tokens, or requests that leave it out are refused "
            f"(got {cfg.generation.max_tokens} > {cfg.limits.max_tokens})",
        )
    if cfg.generation.max_tokens >= cfg.model.n_ctx:
        ctx.error(
            "generation.max_tokens",
            f"must be less than model.n_ctx, or no prompt fits (got {cfg.generation.max_tokens} "
            f">= {cfg.model.n_ctx})",
        )
    keep_alive = cfg.engine.keep_alive_s
    if keep_alive < 0 and keep_alive != -1:
        ctx.error("engine.keep_alive_s", f"must be -1 (keep loaded) or >= 0 seconds (got {_num(keep_alive)})")
    if cfg.model.path and cfg.model.name:
        ctx.error("model.name", "set either model.path (a file) or model.name (a catalog model), not both")
    mqtt = cfg.mqtt
    if mqtt.reconnect_min_s > mqtt.reconnect_max_s:
        ctx.error(
            "mqtt.reconnect_min_s",
            f"must be <= mqtt.reconnect_max_s (got {_num(mqtt.reconnect_min_s)} > {_num(mqtt.reconnect_max_s)})",
        )
    for index, pattern in enumerate(mqtt.allow_reply_to):
        problem = _check_topic_filter(pattern)
        if problem:
            ctx.error(f"mqtt.allow_reply_to[{index}]", problem)
    if mqtt.tls.key_file and not mqtt.tls.cert_file:
        ctx.error("mqtt.tls.key_file", "needs mqtt.tls.cert_file (the certificate the key belongs to)")
    if mqtt.transport == "unix":
        if not mqtt.host:
            ctx.error("mqtt.host", 'must be the broker\'s socket path when mqtt.transport = "unix"')
        else:
            cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(mqtt, host=ctx.resolve(mqtt.host)))
    elif not mqtt.host:
        ctx.error("mqtt.host", "must not be empty")
    for key, message in _door_rules(cfg):
        ctx.error(key, message)
    for key, message in validate_governor_config(cfg.governor):
        ctx.error(key, message)
    if cfg.tasks:
        from daemon.tasks import validate_tasks

        for key, message in validate_tasks(cfg.tasks, cfg.constraints):
            ctx.error(key, message)
    return cfg


def validate_governor_config(cfg: GovernorConfig) -> list[tuple[str, str]]:
    """Rules between [governor] keys that per-key ranges cannot express, as (dotted key, message)
    pairs. Here, not in daemon.governor, so that both this loader and the governor (which refuses a
    config that breaks them) use them without importing each other."""
    errors: list[tuple[str, str]] = []

    def fail(key: str, message: str) -> None:
        errors.append((f"governor.{key}", message))

    if not cfg.warm_c < cfg.hot_c < cfg.critical_c:
        fail("warm_c", f"must hold warm_c < hot_c < critical_c (got {cfg.warm_c:g}, {cfg.hot_c:g}, {cfg.critical_c:g})")
    if not cfg.warm_c <= cfg.target_c < cfg.hot_c:
        fail(
            "target_c",
            f"must be >= governor.warm_c and < governor.hot_c "
            f"(got {cfg.target_c:g}; warm {cfg.warm_c:g}, hot {cfg.hot_c:g})",
        )
    if cfg.critical_available_mb >= cfg.min_available_mb:
        fail(
            "critical_available_mb",
            f"must be < governor.min_available_mb (got {cfg.critical_available_mb} >= {cfg.min_available_mb})",
        )
    if cfg.memory_reserve_mb < cfg.min_available_mb:
        fail(
            "memory_reserve_mb",
            "must be >= governor.min_available_mb, or a freshly loaded model leaves memory low at once "
            f"(got {cfg.memory_reserve_mb} < {cfg.min_available_mb})",
        )
    if cfg.psi_hysteresis >= cfg.psi_some_limit:
        fail(
            "psi_hysteresis",
            f"must be < governor.psi_some_limit (got {cfg.psi_hysteresis:g} >= {cfg.psi_some_limit:g})",
        )
    if cfg.blind_duty < cfg.min_duty:
        fail("blind_duty", f"must be >= governor.min_duty (got {cfg.blind_duty:g} < {cfg.min_duty:g})")
    return errors


def is_loopback_host(host: str) -> bool:
    """Does binding to `host` keep a listener on this machine only?"""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _door_rules(cfg: Config) -> list[tuple[str, str]]:
    """Secure by default: a network door reachable from other machines needs a key."""
    out: list[tuple[str, str]] = []
    http = cfg.http
    if not http.host:
        out.append(("http.host", "must not be empty"))
    elif http.enabled and not is_loopback_host(http.host) and not http.api_key_file and not http.allow_unauthenticated:
        out.append((
            "http.api_key_file",
            f"must be set when http.host ({_show(http.host)}) is not a loopback address, or anyone on the "
            "network can use the model; set http.allow_unauthenticated = true to allow that on purpose",
        ))
    if not cfg.wyoming.host:
        out.append(("wyoming.host", "must not be empty"))
    if http.enabled and cfg.wyoming.enabled and http.port == cfg.wyoming.port:
        out.append(("wyoming.port", f"must differ from http.port (both {http.port})"))
    return out


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {_num(value)}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value}"  # TOML dates and times


def _show(value: str) -> str:
    if len(value) > MAX_QUOTED_CHARS:
        return json.dumps(value[:MAX_QUOTED_CHARS], ensure_ascii=False)[:-1] + f'…" ({len(value)} characters)'
    return json.dumps(value, ensure_ascii=False)


def _choices(choices: tuple[str, ...]) -> str:
    return ", ".join(_show(c) for c in choices)


def _num(value: float) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return str(value)


# --- output --------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tables as dicts, paths as strings, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
