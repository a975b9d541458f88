"""`edgellm`: serve, ask, status, check-config, models, doctor."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from daemon import __version__

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered with an error, or could not be reached
EXIT_USAGE = 2  # bad arguments or an invalid config
# A daemon that does not answer `status` within this long is stuck: say so rather than hang.
STATUS_TIMEOUT_S = 10.0


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(f"edgellm: {text}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="A local language model daemon for Raspberry Pi-class boxes: "
        "serves a GGUF model over a Unix socket and MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    config_help = "config file (default: $EDGELLM_CONFIG, else built-in defaults)"

    p = sub.add_parser(
        "serve",
        help="run the daemon in the foreground until SIGTERM/SIGINT",
        description="Run the daemon in the foreground. SIGTERM/SIGINT drain: stop accepting, let running and "
        "queued requests finish for up to shutdown.drain_seconds, cancel the rest with `shutting_down`, remove "
        "the socket, exit 0 (a second signal skips the drain). SIGHUP re-reads the config and applies it live; "
        "an invalid config is rejected and the old one kept. Under systemd it speaks sd_notify (READY, STATUS, "
        "WATCHDOG, RELOADING, STOPPING) and accepts a socket-activated listener. Exit codes: 0 after a clean "
        "stop, 1 when it cannot start (socket in use), 2 for an invalid config.",
    )
    p.add_argument("--config", type=Path, help=config_help)

    p = sub.add_parser("ask", help="send one prompt to the running daemon and print the answer")
    p.add_argument("prompt", help="the prompt text (a user turn unless --raw); with --task, the task's input "
                   "(JSON if it parses as JSON, else the text)")
    p.add_argument("--task", metavar="NAME", help="call the configured task NAME with the input (see `edgellm tasks`)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--raw", action="store_true", help="send the prompt untemplated, as a plain completion")
    p.add_argument("--system", help="a system prompt (chat mode only)")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default: the daemon's)")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 = deterministic")
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    p.add_argument("--priority", choices=("high", "normal", "low"), help="queue priority")
    p.add_argument("--deadline-ms", type=int, help="give up if not done within this many milliseconds")
    p.add_argument("--json", action="store_true", help="print the final event as JSON")
    _socket_args(p, config_help)

    p = sub.add_parser("tasks", help="list the running daemon's tasks with their schemas")
    p.add_argument("--json", action="store_true", help="print the raw list as JSON")
    _socket_args(p, config_help)

    p = sub.add_parser("status", help="show the running daemon's state")
    p.add_argument("--json", action="store_true", help="print the raw status JSON")
    _socket_args(p, config_help, default_timeout=f"{STATUS_TIMEOUT_S:g}")

    p = sub.add_parser("check-config", help="validate a config file and print each error with its key")
    p.add_argument("path", type=Path, nargs="?", help="the file (default: $EDGELLM_CONFIG)")
    p.add_argument("--print", action="store_true", help="print the effective config as JSON")

    p = sub.add_parser("models", help="list, fetch and verify model files")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    m = msub.add_parser("list", help="the model catalog, and which models are present")
    m.add_argument("--config", type=Path, help=config_help)
    m.add_argument("--dir", type=Path, help="model folder (default: <state_dir>/models)")
    m = msub.add_parser("fetch", help="download a catalog model (resumes a partial download)")
    m.add_argument("name", nargs="?", help="catalog name (default: the configured model)")
    m.add_argument("--config", type=Path, help=config_help)
    m.add_argument("--dir", type=Path, help="model folder (default: <state_dir>/models)")
    m.add_argument("--url", help="download from this URL instead of the catalog's")
    m.add_argument("--accept-license", action="store_true", help="accept the model's license terms")
    m = msub.add_parser("verify", help="recheck size and sha256 of downloaded models")
    m.add_argument("name", nargs="?", help="catalog name or file path (default: all present)")
    m.add_argument("--config", type=Path, help=config_help)
    m.add_argument("--dir", type=Path, help="model folder (default: <state_dir>/models)")

    p = sub.add_parser("doctor", help="check the box for what commonly goes wrong, with fixes")
    p.add_argument("--config", type=Path, help=config_help)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")

    from daemon.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def _socket_args(p: argparse.ArgumentParser, config_help: str, default_timeout: str = "wait forever") -> None:
    p.add_argument("--socket", type=Path, help="daemon socket (default: $EDGELLM_SOCKET, else from the config)")
    p.add_argument("--config", type=Path, help=config_help)
    p.add_argument(
        "--timeout", type=float, default=None,
        help=f"give up when the daemon sends nothing for this many seconds (default: {default_timeout})",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # Log events of the client commands go to stderr; stdout carries their output.
        from daemon.logs import configure_logging

        configure_logging("warning", "console", sys.stderr)
    handler = {
        "serve": _cmd_serve,
        "ask": _cmd_ask,
        "status": _cmd_status,
        "tasks": _cmd_tasks,
        "check-config": _cmd_check_config,
        "models": _cmd_models,
        "doctor": _cmd_doctor,
        "bench": _cmd_bench,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


def _load_config_or_exit(path: Path | None) -> Any:
    from daemon.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            _err(error)
        raise SystemExit(EXIT_USAGE) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from daemon.service import serve

    return serve(args.config)


def _connect(args: argparse.Namespace) -> Any:
    from daemon.client import Client, ClientError
    from daemon.paths import client_socket_candidates

    if args.socket is not None:
        candidates = [args.socket]
    elif os.environ.get("EDGELLM_SOCKET"):
        candidates = [Path(os.environ["EDGELLM_SOCKET"])]
    else:
        candidates = client_socket_candidates(_load_config_or_exit(args.config).socket.path)
    last: Exception | None = None
    for path in candidates:
        try:
            return Client(path, timeout=args.timeout)
        except ClientError as exc:
            last = exc
    _err(f"{last} (is `edgellm serve` running? see --socket)")
    raise SystemExit(EXIT_ERROR)


def _cmd_ask(args: argparse.Namespace) -> int:
    from daemon.client import ClientError

    request: dict[str, Any] = {"stream": bool(args.stream)}
    if args.task:
        overrides = (args.max_tokens, args.temperature, args.seed)
        if args.raw or args.system or any(v is not None for v in overrides):
            _err("--task takes its prompt and sampling from the task: only --stream, --priority, --deadline-ms")
            return EXIT_USAGE
        request.update(task=args.task, input=_task_input(args.prompt))
    elif args.raw:
        if args.system:
            _err("--system cannot be combined with --raw")
            return EXIT_USAGE
        request.update(prompt=args.prompt, raw=True)
    elif args.system:
        request["messages"] = [
            {"role": "system", "content": args.system},
            {"role": "user", "content": args.prompt},
        ]
    else:
        request["prompt"] = args.prompt
    for key, value in (
        ("max_tokens", args.max_tokens),
        ("temperature", args.temperature),
        ("seed", args.seed),
        ("priority", args.priority),
        ("deadline_ms", args.deadline_ms),
    ):
        if value is not None:
            request[key] = value
    with _connect(args) as client:
        final: dict[str, Any] = {}
        try:
            for event in client.request(request):
                if event.get("event") == "token" and not args.json:
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                final = event
        except ClientError as exc:
            _err(str(exc))
            return EXIT_ERROR
    if final.get("event") == "error":
        if args.stream and not args.json:
            _out()  # end the partial answer's line before the error
        retry = f" (retry after {final['retry_after_ms']} ms)" if "retry_after_ms" in final else ""
        _err(f"error [{final.get('code')}]: {final.get('message')}{retry}")
        return EXIT_ERROR
    if args.json:
        _out(json.dumps(final, ensure_ascii=False))
    elif args.stream:
        _out()
    else:
        _out(final.get("text", ""))
    return EXIT_OK


def _task_input(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_tasks(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        reply = client.call({"op": "tasks"})
    if reply.get("event") == "error":
        _err(f"error [{reply.get('code')}]: {reply.get('message')}")
        return EXIT_ERROR
    tasks = reply.get("tasks", [])
    _out(json.dumps(tasks, indent=2, ensure_ascii=False) if args.json else format_tasks(tasks))
    return EXIT_OK


def format_tasks(tasks: list[dict[str, Any]]) -> str:
    """`edgellm tasks`: each task, its prompt, the input fields it reads and its constraint."""
    if not tasks:
        return "no tasks configured (add [tasks.<name>] tables to the config)"
    lines = []
    for task in tasks:
        lines.append(f"{task['name']}" + (f" — {task['description']}" if task.get("description") else ""))
        lines.append(f"  prompt: {task.get('prompt')}")
        if task.get("input_fields"):
            lines.append(f"  input fields: {', '.join(task['input_fields'])}")
        for key in ("json_schema", "grammar", "format"):
            if key in task:
                value = task[key]
                lines.append(f"  {key}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")
        if task.get("trigger"):
            lines.append(f"  trigger: {json.dumps(task['trigger'], ensure_ascii=False)}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from daemon.client import ClientError

    if args.timeout is None:
        args.timeout = STATUS_TIMEOUT_S
    with _connect(args) as client:
        try:
            status = client.status()
        except ClientError as exc:
            _err(str(exc))
            return EXIT_ERROR
    if status.get("event") == "error":  # e.g. `forbidden`: this user is not in socket.allowed_uids
        _err(f"error [{status.get('code')}]: {status.get('message')}")
        return EXIT_ERROR
    if status.get("event") != "status":
        _err(f"the daemon answered with something other than a status: {json.dumps(status)[:200]}")
        return EXIT_ERROR
    status.pop("event", None)
    if args.json:
        _out(json.dumps(status, indent=2, ensure_ascii=False))
    else:
        _out(format_status(status))
    return EXIT_OK


def _engine_rows(engine: dict[str, Any], *, loaded: bool) -> list[tuple[str, str]]:
    batch = engine.get("batch") or {}
    running = len(engine.get("running") or [])
    streams = f"{running}/{engine.get('parallel')} streams running"
    if running > 1 and batch.get("width"):
        streams += f", {batch['width']} per step"
    threads = engine.get("n_threads")
    rows = [("engine", f"{streams}, {len(engine.get('suspended') or [])} suspended"
             + (f", {threads} threads" if loaded and threads else ", model not loaded"))]
    if loaded and engine.get("kv_type"):
        rows.append(("kv cache", f"{engine['kv_type']}, {(engine.get('kv_bytes') or 0) / 1e6:.0f} MB, "
                     f"{engine.get('kv_cells_reserved', 0)}/{engine.get('kv_cells', 0)} cells reserved"))
    load = []
    if (cold := engine.get("last_cold_start_ms")) is not None:
        load.append(f"last cold start {cold / 1000:.1f} s")
    if (keep_alive := engine.get("keep_alive_s")) is not None and keep_alive >= 0:
        load.append(f"unloaded after {keep_alive:g} s idle")
    if load:
        rows.append(("model load", ", ".join(load)))
    cache = engine.get("prefix_cache") or {}
    if cache:
        rows.append(("prefix cache", f"{cache.get('entries', 0)} entries, {(cache.get('bytes') or 0) / 1e6:.0f} MB, "
                     f"{cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses"))
    return rows


def format_status(status: dict[str, Any]) -> str:
    """A readable table of the status snapshot."""
    rows: list[tuple[str, str]] = []
    model = status.get("model") or {}
    queue = status.get("queue") or {}
    requests = status.get("requests") or {}
    rows.append(("state", str(status.get("state")) + (f" ({status['reason']})" if status.get("reason") else "")))
    rows.append(("version", str(status.get("version"))))
    rows.append(("uptime", f"{status.get('uptime_s', 0):.0f} s"))
    if model:
        size_mb = (model.get("size_bytes") or 0) / 1e6
        rows.append(("model", f"{model.get('name')} ({model.get('arch')}, {model.get('quant')}, {size_mb:.0f} MB)"))
        rows.append(("context", f"{model.get('n_ctx')} tokens, template {model.get('template')}, "
                     f"{model.get('n_threads')} threads"))
    rows.append(("queue", f"{queue.get('depth', 0)}/{queue.get('max_depth', 0)} waiting, "
                 f"running: {queue.get('running') or '-'}"))
    rows.append(("requests", f"{requests.get('total', 0)} total, {requests.get('done', 0)} done, "
                 f"{requests.get('cancelled', 0)} cancelled, {requests.get('error', 0)} errors"))
    engine = status.get("engine")
    if isinstance(engine, dict):
        rows.extend(_engine_rows(engine, loaded=bool(model)))
    tps = status.get("last_tokens_per_second")
    rows.append(("last speed", "-" if tps is None else f"{tps:.1f} tokens/s"))
    governor = status.get("governor")
    if governor:
        readings = governor.get("readings") or {}
        temp = readings.get("temperature_c")
        rows.append(("governor", f"{governor.get('state')}, memory {governor.get('memory_state')}, "
                     f"duty {float(governor.get('duty', 1.0)) * 100:.0f}%"
                     + ("" if governor.get("admit", True) else ", not admitting")))
        rows.append(("temperature", "-" if temp is None else f"{temp:.1f} °C"))
        avail = readings.get("mem_available_mb")
        if avail is not None:
            rows.append(("memory", f"{avail:.0f} MB available"
                         + (f", PSI some {readings['psi_some_avg10']:.1f}%" if readings.get("psi_some_avg10")
                            is not None else "")))
        throttled = readings.get("throttled") or {}  # daemon.pi_firmware.decode_throttled
        for flag in throttled.get("active") or []:
            rows.append(("firmware", str(flag)))
        for error in readings.get("errors") or []:
            rows.append(("sensor error", str(error)))
    mqtt = status.get("mqtt")
    if isinstance(mqtt, dict):
        state = "connected" if mqtt.get("connected") else f"not connected ({mqtt.get('error') or 'retrying'})"
        rows.append(("mqtt", f"{state} to {mqtt.get('broker')}, prefix {mqtt.get('prefix')}"))
        fleet = mqtt.get("fleet") or {}
        if fleet.get("enabled"):
            rows.append(("fleet", "member" if fleet.get("member") else "not taking fleet work"))
        rows.append(("mqtt traffic", f"{mqtt.get('received', 0)} received, {mqtt.get('answered', 0)} answered, "
                     f"{mqtt.get('offline_buffered', 0)} waiting for the broker"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, config_to_dict, load_config

    try:
        cfg = load_config(args.path)
    except ConfigError as exc:
        for error in exc.errors:
            _err(error)
        return EXIT_USAGE
    if args.print:
        _out(json.dumps(config_to_dict(cfg), indent=2, default=str))
    else:
        _out(f"ok: {cfg.source}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from daemon import models

    cfg = _load_config_or_exit(args.config)
    return models.cli(args, cfg)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from daemon import doctor

    return doctor.cli(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from daemon.bench.cli import run

    return run(args)
