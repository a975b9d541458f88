"""Config loading and validation (daemon/config.py): fast, no model, real files in a temp dir."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_module
from daemon.config import (
    Config,
    ConfigError,
    GovernorConfig,
    config_path_from_env_or,
    config_to_dict,
    load_config,
    parse_config,
)

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own EDGELLM_CONFIG must not leak into these tests.
    monkeypatch.delenv("EDGELLM_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def one_error(path: Path) -> str:
    errors = errors_of(path)
    assert len(errors) == 1, errors
    return errors[0]


def all_fields(cls: type[Any], prefix: str = "") -> list[str]:
    """Dotted names of every TOML key the schema defines (sub-tables included as their own keys)."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        names.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(all_fields(hints[f.name], prefix + f.name + "."))
    return names


# --- defaults and the documented config.toml ---------------------------------------------------


def test_no_path_and_no_env_gives_the_built_in_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.source == "<defaults>"
    assert cfg.state_dir == Path("/var/lib/edgellm")
    assert cfg.model.path == "" and cfg.model.n_ctx == 2048 and cfg.model.template == "auto"
    assert cfg.engine.n_threads == 0 and cfg.engine.n_batch == 256 and cfg.engine.use_mmap is True
    assert cfg.socket.path == "/run/edgellm/edgellm.sock" and cfg.socket.mode == "0660"
    assert cfg.socket.mode_int == 0o660
    assert cfg.queue.max_depth == 16
    assert cfg.generation.max_tokens == 256 and cfg.generation.seed == -1
    assert cfg.logging.level == "info" and cfg.logging.format == "auto" and cfg.logging.log_prompts is False
    assert cfg.shutdown.drain_seconds == 10.0
    assert cfg.mqtt.protocol == "5" and cfg.mqtt.tls.verify is True and cfg.mqtt.fleet.group == "edgellm"
    assert cfg.governor.enabled is True and cfg.governor.interval_s == 1.0


def test_defaults_pass_their_own_validation() -> None:
    # Every default, written back out and parsed, satisfies its own bounds, choices and checks.
    data = config_to_dict(Config())
    del data["source"]
    assert parse_config(data, "<round-trip>", Path("/")) == dataclasses.replace(Config(), source="<round-trip>")


def test_config_to_dict_is_json_able_and_complete() -> None:
    data = json.loads(json.dumps(config_to_dict(Config())))
    assert data["state_dir"] == "/var/lib/edgellm"
    assert data["mqtt"]["tls"]["verify"] is True
    assert data["source"] == "<defaults>"
    flat = {".".join(k) for k in _flatten_keys(data)}
    assert set(all_fields(Config)) <= flat


def _flatten_keys(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for key, value in data.items():
        keys.append((*prefix, key))
        if isinstance(value, dict):
            keys.extend(_flatten_keys(value, (*prefix, key)))
    return keys


def test_repo_config_toml_documents_every_key() -> None:
    # Adding a field to daemon/config.py without documenting it in config.toml fails here.
    data = tomllib.loads(REPO_CONFIG.read_text(encoding="utf-8"))
    present = {".".join(k) for k in _flatten_keys(data)}
    missing = [name for name in all_fields(Config) if name not in present]
    assert not missing, f"config.toml lacks: {missing}"


def test_repo_config_toml_loads_to_exactly_the_defaults() -> None:
    cfg = load_config(REPO_CONFIG)
    assert cfg == dataclasses.replace(Config(), source=str(REPO_CONFIG))


def test_repo_config_toml_comments_every_key() -> None:
    # Each `key = value` line has a comment directly above it (or shares the comment block of the
    # key group right above it): a bare key without an explanation is a documentation gap.
    lines = REPO_CONFIG.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")) and line.strip():
            above = number - 1
            while above >= 0 and "=" in lines[above] and not lines[above].startswith("#"):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"config.toml line {number + 1}: {line!r}"


# --- choosing the file ----------------------------------------------------------------------------


def test_edgellm_config_env_var_picks_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[queue]\nmax_depth = 3\n")
    monkeypatch.setenv("EDGELLM_CONFIG", str(path))
    cfg = load_config(None)
    assert cfg.queue.max_depth == 3
    assert cfg.source == str(path)
    assert config_path_from_env_or(None) == path


def test_explicit_path_beats_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELLM_CONFIG", str(write(tmp_path, "[queue]\nmax_depth = 3\n", "env.toml")))
    explicit = write(tmp_path, "[queue]\nmax_depth = 5\n", "explicit.toml")
    assert load_config(explicit).queue.max_depth == 5
    assert config_path_from_env_or(str(explicit)) == explicit


def test_empty_env_var_means_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELLM_CONFIG", "")
    assert config_path_from_env_or(None) is None
    assert load_config(None) == Config()


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert one_error(path) == f"{path}: no such file"


def test_env_var_naming_a_missing_file_is_an_error_not_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELLM_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml: no such file"):
        load_config(None)


def test_a_directory_is_reported_as_unreadable(tmp_path: Path) -> None:
    assert one_error(tmp_path).startswith(f"{tmp_path}: cannot read: ")


# --- syntax ---------------------------------------------------------------------------------------


def test_toml_syntax_error_gives_file_line_and_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_depth = 4\nn_ctx 2048\n")
    message = one_error(path)
    assert message.startswith(f"{path}: line 3, column ")
    assert "TOML syntax error: " in message and "=" in message  # tomllib: "Expected '=' after a key ..."


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_depth = 4\nmax_depth = 5\n")
    assert one_error(path).startswith(f"{path}: line 3, ")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[model]\nname = "ok"\npath = "\xff"\n')
    assert one_error(path) == f"{path}: line 3: not valid UTF-8"


# --- unknown keys --------------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nhots = "broker"\n')
    assert one_error(path) == f"{path}: mqtt.hots: unknown key (did you mean 'host'?)"


def test_unknown_table_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[modle]\nn_ctx = 512\n")
    assert one_error(path) == f"{path}: modle: unknown key (did you mean 'model'?)"


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nfrobnicate = 1\n")
    assert one_error(path) == f"{path}: queue.frobnicate: unknown key (known keys: max_depth, preempt)"


def test_source_is_not_a_settable_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'source = "/elsewhere"\n')
    assert "source: unknown key" in one_error(path)


# --- types ---------------------------------------------------------------------------------------


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nmax_depth = "16"\n')
    assert one_error(path) == f'{path}: queue.max_depth: must be an integer (got string "16")'


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nn_ctx = true\n")
    assert one_error(path) == f"{path}: model.n_ctx: must be an integer (got boolean true)"


def test_bool_is_not_a_float(tmp_path: Path) -> None:
    path = write(tmp_path, "[generation]\ntemperature = false\n")
    assert one_error(path) == f"{path}: generation.temperature: must be a number (got boolean false)"


def test_integer_is_not_a_bool(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nuse_mmap = 1\n")
    assert one_error(path) == f"{path}: engine.use_mmap: must be true or false (got integer 1)"


def test_float_is_not_an_integer(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nn_ctx = 2048.0\n")
    assert one_error(path) == f"{path}: model.n_ctx: must be an integer (got float 2048.0)"


def test_integer_is_accepted_as_a_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[shutdown]\ndrain_seconds = 5\n"))
    assert cfg.shutdown.drain_seconds == 5.0 and isinstance(cfg.shutdown.drain_seconds, float)


def test_nan_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[generation]\ntemperature = nan\n")
    assert one_error(path) == f"{path}: generation.temperature: must be a finite number (got nan)"


def test_string_choice_given_as_number_lists_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nprotocol = 5\n")
    assert one_error(path) == f'{path}: mqtt.protocol: must be a string (got integer 5; one of "5", "3.1.1")'


def test_toml_date_for_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nname = 2024-01-01\n")
    assert one_error(path) == f"{path}: model.name: must be a string (got date 2024-01-01)"


def test_scalar_where_a_table_belongs(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\ntls = true\n")
    assert one_error(path) == f"{path}: mqtt.tls: must be a table (got boolean true)"


def test_table_where_a_scalar_belongs(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue.max_depth]\nx = 1\n")
    assert one_error(path) == f"{path}: queue.max_depth: must be an integer (got a table)"


# --- ranges and choices ---------------------------------------------------------------------------


def test_below_minimum(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_depth = 0\n")
    assert one_error(path) == f"{path}: queue.max_depth: must be >= 1 (got 0)"


def test_above_maximum(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nport = 70000\n")
    assert one_error(path) == f"{path}: mqtt.port: must be <= 65535 (got 70000)"


def test_float_range(tmp_path: Path) -> None:
    path = write(tmp_path, "[generation]\ntop_p = 1.5\n")
    assert one_error(path) == f"{path}: generation.top_p: must be <= 1 (got 1.5)"


def test_bounds_are_inclusive(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[generation]\ntop_p = 1\ntemperature = 0\nseed = 4294967295\n"))
    assert (cfg.generation.top_p, cfg.generation.temperature, cfg.generation.seed) == (1.0, 0.0, 4294967295)


def test_bad_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, '[logging]\nlevel = "verbose"\n')
    assert one_error(path) == (
        f'{path}: logging.level: must be one of "debug", "info", "warning", "error" (got "verbose")'
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.template", "llama2"), ("logging.format", "text"), ("mqtt.transport", "ws"), ("mqtt.protocol", "3")],
)
def test_every_choice_key_rejects_unknown_values(tmp_path: Path, key: str, value: str) -> None:
    table, name = key.split(".")
    path = write(tmp_path, f'[{table}]\n{name} = "{value}"\n')
    assert one_error(path).startswith(f"{path}: {key}: must be one of ")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("parallel = 17", "engine.parallel: must be <= 16 (got 17)"),
        ("parallel = 0", "engine.parallel: must be >= 1 (got 0)"),
        ("prompt_chunk = 8", "engine.prompt_chunk: must be >= 16 (got 8)"),
        ('kv_type = "q5_1"', "engine.kv_type: must be one of "),
        ("keep_alive_s = -0.5", "engine.keep_alive_s: must be -1 (keep loaded) or >= 0 seconds (got -0.5)"),
        ("prefix_cache_mb = -1", "engine.prefix_cache_mb: must be >= 0 (got -1)"),
        ("prefix_cache_disk_mb = -1", "engine.prefix_cache_disk_mb: must be >= 0 (got -1)"),
        ('prefix_cache_persist = "yes"', 'engine.prefix_cache_persist: must be true or false (got string "yes")'),
    ],
)
def test_the_engine_v2_keys_refuse_bad_values(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, f"[engine]\n{line}\n")
    assert one_error(path).startswith(f"{path}: {message}")


def test_queue_preempt_must_be_a_boolean(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\npreempt = 1\n")
    assert one_error(path).startswith(f"{path}: queue.preempt: must be true or false (got integer 1)")


# --- socket.mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mode"), [("0600", 0o600), ("660", 0o660), ("0o640", 0o640), ("0777", 0o777)])
def test_octal_mode_accepted(tmp_path: Path, text: str, mode: int) -> None:
    cfg = load_config(write(tmp_path, f'[socket]\nmode = "{text}"\n'))
    assert cfg.socket.mode == text
    assert cfg.socket.mode_int == mode


@pytest.mark.parametrize("text", ["0999", "rw-rw----", "", "06600"])
def test_octal_mode_rejected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, f'[socket]\nmode = "{text}"\n')
    assert one_error(path) == (f'{path}: socket.mode: must be an octal permission string like "0660" (got "{text}")')


def test_octal_mode_with_special_bits_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[socket]\nmode = "4770"\n')
    assert one_error(path).startswith(f'{path}: socket.mode: must be at most "0777"')


def test_octal_mode_as_toml_integer_is_a_type_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[socket]\nmode = 0o660\n")
    assert one_error(path) == f"{path}: socket.mode: must be a string (got integer 432)"


# --- paths ----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    write(
        folder,
        'state_dir = "state"\n'
        '[model]\npath = "models/m.gguf"\nchat_template_file = "../t.jinja"\n'
        '[socket]\npath = "/abs/edgellm.sock"\n'
        '[mqtt]\npassword_file = "secret"\n[mqtt.tls]\nca_file = "ca.pem"\n',
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config("etc/config.toml")
    assert cfg.state_dir == folder / "state"
    assert cfg.model.path == str(folder / "models" / "m.gguf")
    assert cfg.model.chat_template_file == str(folder / ".." / "t.jinja")
    assert cfg.socket.path == "/abs/edgellm.sock"
    assert cfg.mqtt.password_file == str(folder / "secret")
    assert cfg.mqtt.tls.ca_file == str(folder / "ca.pem")
    assert cfg.mqtt.tls.cert_file == ""  # empty stays empty (unset), never "<folder>"
    assert cfg.source == "etc/config.toml"


def test_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(write(tmp_path, '[model]\npath = "~/m.gguf"\n'))
    assert cfg.model.path == str(tmp_path / "home" / "m.gguf")


def test_state_dir_must_not_be_empty(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = ""\n')
    assert one_error(path) == f"{path}: state_dir: must not be empty"


def test_unix_transport_host_is_a_path(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[mqtt]\ntransport = "unix"\nhost = "broker.sock"\n'))
    assert cfg.mqtt.host == str(tmp_path / "broker.sock")
    tcp = load_config(write(tmp_path, '[mqtt]\nhost = "broker.lan"\n', "tcp.toml"))
    assert tcp.mqtt.host == "broker.lan"


# --- cross-field rules ---------------------------------------------------------------------------


def test_max_tokens_must_leave_room_in_the_context(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nn_ctx = 512\n[generation]\nmax_tokens = 512\n")
    assert one_error(path) == (
        f"{path}: generation.max_tokens: must be less than model.n_ctx, or no prompt fits (got 512 >= 512)"
    )


def test_reconnect_bounds_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nreconnect_min_s = 30\nreconnect_max_s = 10\n")
    assert one_error(path) == f"{path}: mqtt.reconnect_min_s: must be <= mqtt.reconnect_max_s (got 30 > 10)"


def test_tls_key_without_certificate(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt.tls]\nkey_file = "/k.pem"\n')
    assert one_error(path).startswith(f"{path}: mqtt.tls.key_file: needs mqtt.tls.cert_file")


def test_model_path_and_name_together(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "/m.gguf"\nname = "olmo2-1b"\n')
    assert one_error(path).startswith(f"{path}: model.name: set either model.path")


def test_mqtt_prefix_without_wildcards(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nprefix = "home/#"\n')
    assert one_error(path) == f'{path}: mqtt.prefix: must not contain MQTT wildcards or NUL (got "home/#")'


# --- several problems, nested tables ---------------------------------------------------------------


def test_all_errors_are_reported_together_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "state_dir = 3\n"
        "[queue]\nmax_depth = 0\n"
        '[logging]\nlevel = "loud"\nformt = "json"\n'
        '[mqtt]\nport = 0\n[mqtt.tls]\nverify = "yes"\n',
    )
    assert errors_of(path) == [
        f"{path}: state_dir: must be a string (got integer 3)",
        f"{path}: queue.max_depth: must be >= 1 (got 0)",
        f'{path}: logging.level: must be one of "debug", "info", "warning", "error" (got "loud")',
        f"{path}: logging.formt: unknown key (did you mean 'format'?)",
        f"{path}: mqtt.port: must be >= 1 (got 0)",
        f'{path}: mqtt.tls.verify: must be true or false (got string "yes")',
    ]


def test_config_error_message_joins_all_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[queue]\nmax_depth = 0\n[model]\nn_ctx = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.errors)
    assert len(info.value.errors) == 2


def test_nested_table_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt.tls]\nverify = "yes"\n')
    assert one_error(path) == f'{path}: mqtt.tls.verify: must be true or false (got string "yes")'


def test_nested_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt.homeassistant]\nenable = false\n")
    assert one_error(path) == f"{path}: mqtt.homeassistant.enable: unknown key (did you mean 'enabled'?)"


def test_inline_tables_and_dotted_keys_work_like_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'mqtt.fleet = { enabled = true, group = "g" }\nqueue.max_depth = 2\n'))
    assert cfg.mqtt.fleet.enabled is True and cfg.mqtt.fleet.group == "g" and cfg.queue.max_depth == 2
    assert cfg.mqtt.fleet.topic == "edgellm/fleet/request"  # untouched keys keep their defaults


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[governor]\nenabled = false\n[socket]\ngroup = "edgellm"\n'))
    assert cfg.governor == GovernorConfig(enabled=False)
    assert cfg.socket.group == "edgellm" and cfg.socket.mode == "0660"
    assert cfg.model == Config().model


# --- the generic loader for keys other modules add ---------------------------------------------------


@dataclass(frozen=True)
class _ListSchema:
    files: list[str] = field(default_factory=list, metadata={"path": True})
    names: tuple[str, ...] = ()


def _parse_list_schema(data: dict[str, Any], base: Path) -> tuple[Any, list[str]]:
    ctx = config_module._Context("x.toml", base)
    return config_module._parse_table(_ListSchema, data, "t.", ctx), ctx.errors


def test_list_fields_resolve_paths_and_keep_their_container_type(tmp_path: Path) -> None:
    parsed, errors = _parse_list_schema({"files": ["a", "/b", ""], "names": ["x", "y"]}, tmp_path)
    assert errors == []
    assert parsed.files == [str(tmp_path / "a"), "/b", ""]
    assert parsed.names == ("x", "y")


def test_list_fields_reject_bad_items_by_index(tmp_path: Path) -> None:
    _, errors = _parse_list_schema({"files": ["a", 3], "names": "x"}, tmp_path)
    assert errors == [
        "x.toml: t.files[1]: must be a string (got integer 3)",
        'x.toml: t.names: must be an array of strings (got string "x")',
    ]


def test_unsupported_annotation_is_a_programming_error(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class Bad:
        d: dict = field(default_factory=dict)  # type: ignore[type-arg]

    with pytest.raises(TypeError, match="unsupported annotation"):
        config_module._parse_table(Bad, {"d": {}}, "", config_module._Context("x", tmp_path))


def test_governor_rules_between_keys_are_config_errors(tmp_path: Path) -> None:
    # daemon.governor.validate_config's rules surface like any other error: file, dotted key, values.
    path = write(tmp_path, "[governor]\nwarm_c = 80.0\nhot_c = 78.0\ncritical_c = 83.0\ntarget_c = 79.0\n")
    errors = errors_of(path)
    assert f"{path}: governor.warm_c: must hold warm_c < hot_c < critical_c (got 80, 78, 83)" in errors
    assert all(e.startswith(f"{path}: governor.") for e in errors)


# --- hardening: hostile values, limits, socket peers -----------------------------------------------


def test_a_huge_integer_in_a_float_key_is_an_error_not_a_crash(tmp_path: Path) -> None:
    huge = "1" + "0" * 400
    path = write(tmp_path, f"[generation]\ntemperature = {huge}\n[governor]\nhot_c = -{huge}\n")
    errors = errors_of(path)
    assert errors == [
        f"{path}: generation.temperature: must be <= 5 (got an integer of about 401 digits)",
        f"{path}: governor.hot_c: must be >= 20 (got an integer of about 401 digits)",
    ]


def test_long_strings_are_quoted_short(tmp_path: Path) -> None:
    path = write(tmp_path, f'[model]\ntemplate = "{"x" * 5000}"\n')
    message = one_error(path)
    assert "(5000 characters)" in message and len(message) < 300


def test_a_nul_in_a_path_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "/models/a\\u0000b.gguf"\n')
    assert "model.path: must not contain a NUL character" in one_error(path)


def test_limits_table(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[limits]\nmax_tokens = 512\nmax_stop = 0\nmax_json_depth = 5\n"))
    assert (cfg.limits.max_tokens, cfg.limits.max_stop, cfg.limits.max_json_depth) == (512, 0, 5)
    assert cfg.limits.max_messages == 64  # the rest stay at their defaults
    path = write(tmp_path, "[limits]\nmax_json_depth = 2\n")
    assert one_error(path) == f"{path}: limits.max_json_depth: must be >= 3 (got 2)"


def test_default_max_tokens_must_be_within_the_ceiling(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_tokens = 100\n[generation]\nmax_tokens = 256\n")
    assert one_error(path).startswith(f"{path}: generation.max_tokens: must be <= limits.max_tokens")


def test_socket_peer_lists(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[socket]\nallowed_uids = [1000, 1001]\nallowed_gids = [995]\n"))
    assert cfg.socket.allowed_uids == (1000, 1001) and cfg.socket.allowed_gids == (995,)
    path = write(tmp_path, '[socket]\nallowed_uids = [1000, "root"]\nallowed_gids = 5\n')
    assert errors_of(path) == [
        f'{path}: socket.allowed_uids[1]: must be an integer (got string "root")',
        f"{path}: socket.allowed_gids: must be an array of integers (got integer 5)",
    ]
    path = write(tmp_path, "[socket]\nallowed_uids = [-1]\n")
    assert one_error(path) == f"{path}: socket.allowed_uids[0]: must be >= 0 (got -1)"


def test_config_imports_neither_the_governor_nor_the_engine() -> None:
    """The config<->governor cycle is gone: loading the config pulls in no policy module."""
    import subprocess
    import sys

    code = (
        "import sys, daemon.config; "
        "bad = [m for m in ('daemon.governor', 'daemon.sensors', 'daemon.engine', 'jinja2') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_allow_reply_to_takes_topic_filters_and_refuses_dollar_topics(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nallow_reply_to = ["edgellm/hub/#", "$SYS/#", "a/b#"]\n')
    errors = errors_of(path)
    assert [e.split(": ")[1] for e in errors] == ["mqtt.allow_reply_to[1]", "mqtt.allow_reply_to[2]"], errors
