"""The real daemon, the real Gemma 3 270M model, a real Unix socket."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from daemon.client import Client
from tests.helpers import DaemonProcess, collect, read_until_final, write_config

ONCE = "Once upon a time, there was a little"


def final(events: list[dict[str, object]]) -> dict[str, object]:
    assert events, "no events"
    assert events[-1]["event"] in ("done", "error")
    return events[-1]


def test_raw_completion_is_sensible(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        done = c.call({"id": "c1", "prompt": ONCE, "raw": True, "max_tokens": 16, "temperature": 0})
    assert done["event"] == "done", done
    assert done["id"] == "c1"
    # Issue 8's "same answers": the text the high-level generate() gave before engine v2.
    assert done["text"] == " girl named Lily. She was a very smart girl, and she loved to play"
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 10, "completion_tokens": 16}
    timings = done["timings"]
    assert isinstance(timings, dict)
    assert set(timings) == {"queued_ms", "prompt_ms", "ttft_ms", "generation_ms", "tokens_per_second",
                            "cached_tokens"}
    assert timings["tokens_per_second"] > 0


def test_a_stop_string_ends_the_answer_before_it(shared_daemon: DaemonProcess) -> None:
    """`stop` on the real model: the answer ends before the first stop string, which here starts
    inside one token and ends inside another (" named", " Lily"); the streamed tokens hold exactly
    the text before it (what might start a stop string is held back, then released or dropped)."""
    with shared_daemon.client() as c:
        events = collect(c, {"id": "stop1", "prompt": ONCE, "raw": True, "max_tokens": 32, "stream": True,
                             "temperature": 0, "stop": ["named Li"]})
    done = final(events)
    assert done["event"] == "done" and done["finish_reason"] == "stop", done
    assert done["text"] == " girl "
    assert "".join(str(e["text"]) for e in events if e["event"] == "token") == done["text"]
    assert done["usage"]["completion_tokens"] == 3  # " girl", " named", " Lily"


def test_characters_split_over_byte_tokens_stream_whole(shared_daemon: DaemonProcess) -> None:
    """Gemma 3's vocabulary has no token for 🦩, 𠜎 or ꙮ: they come as 4, 4 and 3 byte tokens (its
    byte fallback). A grammar makes the real model write them; every streamed `token` holds whole
    characters only (the bytes of one are held until it is complete), and they add up to the text."""
    text = "Birds: 🦩🦩, rare: 𠜎ꙮ!"
    with shared_daemon.client() as c:
        events = collect(c, {"id": "utf8", "prompt": ONCE, "raw": True, "max_tokens": 40, "stream": True,
                             "temperature": 0, "grammar": f'root ::= "{text}"'})
    done = final(events)
    tokens = [str(e["text"]) for e in events if e["event"] == "token"]
    assert done["event"] == "done" and done["text"] == text, done
    assert "".join(tokens) == text and not any("\ufffd" in t for t in tokens), tokens
    # The four rare characters alone took 4 + 4 + 4 + 3 byte tokens; fewer streamed events than tokens.
    assert done["usage"]["completion_tokens"] >= 15 + 1 and len(tokens) < done["usage"]["completion_tokens"]


def test_chat_uses_gemma_template(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        status = c.status()
        done = c.call({"messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 12})
    assert status["model"]["arch"] == "gemma3"
    assert status["model"]["template"] == "gemma3"  # the GGUF has none: never llama-2
    assert done["event"] == "done"
    # 10 tokens of template + question + system text: far more than the bare question
    assert done["usage"]["prompt_tokens"] > 15


def test_stream_order_tokens_then_done(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        events = collect(c, {"id": "s1", "prompt": ONCE, "raw": True, "max_tokens": 12, "stream": True})
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done"
    assert set(kinds[:-1]) <= {"queued", "token"}
    assert kinds.count("token") >= 1
    tokens = "".join(str(e["text"]) for e in events if e["event"] == "token")
    assert tokens == events[-1]["text"]
    assert all(e["id"] == "s1" for e in events)


def test_deterministic_with_temperature_zero_and_with_seed(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        greedy = [c.call({"prompt": ONCE, "raw": True, "max_tokens": 12, "temperature": 0})["text"] for _ in range(2)]
        seeded = [
            c.call({"prompt": ONCE, "raw": True, "max_tokens": 12, "temperature": 1.0, "seed": 42})["text"]
            for _ in range(2)
        ]
        other = c.call({"prompt": ONCE, "raw": True, "max_tokens": 12, "temperature": 1.0, "seed": 7})["text"]
    assert greedy[0] == greedy[1]
    assert seeded[0] == seeded[1]
    assert other != seeded[0] or other != greedy[0]


def test_two_concurrent_clients(shared_daemon: DaemonProcess) -> None:
    results: dict[str, dict[str, object]] = {}

    def ask(name: str) -> None:
        with shared_daemon.client() as c:
            results[name] = c.call({"id": name, "prompt": ONCE, "raw": True, "max_tokens": 8})

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {k: v["event"] for k, v in results.items()} == {"a": "done", "b": "done"}
    assert results["a"]["text"] == results["b"]["text"]


def test_cancel_mid_stream_stops_within_a_token(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c, shared_daemon.client() as other:
        c.send({"id": "long", "prompt": ONCE, "raw": True, "max_tokens": 400, "stream": True})
        got = []
        for event in read_until_final(c, "long"):
            if event["event"] == "token":
                got.append(event)
                if len(got) == 3:
                    assert other.call({"op": "cancel", "id": "long"}) == {
                        "event": "cancel", "id": "long", "cancelled": True,
                    }
                    after_cancel = 0
                elif len(got) > 3:
                    after_cancel += 1
            last = event
    assert last["event"] == "done"
    assert last["finish_reason"] == "cancelled"
    # The engine checks before every decode step: at most the token in flight slips through.
    assert after_cancel <= 1
    assert last["usage"]["completion_tokens"] <= 5


def test_cancel_unknown_id(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        assert c.call({"op": "cancel", "id": "nope"}) == {"event": "cancel", "id": "nope", "cancelled": False}


def test_status_and_health_ops(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        health = c.health()
        status = c.status()
    assert health == {"event": "health", "ok": True, "state": "ready"}
    assert status["state"] == "ready"
    assert status["queue"]["max_depth"] == 8
    assert status["version"]
    assert status["uptime_s"] >= 0
    assert status["model"]["quant"] == "Q4_K_M"


def test_priorities_high_served_first(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send({"id": "blocker", "prompt": ONCE, "raw": True, "max_tokens": 60, "stream": True})
        assert c.read_event()["event"] == "token"  # it is running
        for rid, prio in [("low", "low"), ("normal", "normal"), ("high", "high")]:
            c.send({"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 2, "priority": prio})
        order = []
        while len(order) < 4:
            event = c.read_event()
            if event["event"] in ("done", "error"):
                order.append(event["id"])
    assert order == ["blocker", "high", "normal", "low"]


def test_queued_event_reports_position(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send({"id": "first", "prompt": ONCE, "raw": True, "max_tokens": 40, "stream": True})
        assert c.read_event()["event"] == "token"
        c.send({"id": "second", "prompt": ONCE, "raw": True, "max_tokens": 2, "stream": True})
        events = []
        while not (events and events[-1].get("id") == "second" and events[-1]["event"] == "done"):
            events.append(c.read_event())
    queued = [e for e in events if e["id"] == "second" and e["event"] == "queued"]
    assert queued == [{"id": "second", "event": "queued", "position": 1}]


def test_deadline_in_queue_and_during_generation(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send({"id": "busy", "prompt": ONCE, "raw": True, "max_tokens": 80, "stream": True})
        assert c.read_event()["event"] == "token"
        c.send({"id": "late", "prompt": ONCE, "raw": True, "max_tokens": 2, "deadline_ms": 50})
        late = next(e for e in c.events() if e["id"] == "late")
        assert late["event"] == "error" and late["code"] == "deadline_exceeded"
        assert "queued" in late["message"]
        for _ in read_until_final(c, "busy"):
            pass
        done = c.call({"id": "slow", "prompt": ONCE, "raw": True, "max_tokens": 900, "deadline_ms": 300})
    assert done["event"] == "error" and done["code"] == "deadline_exceeded"
    assert "generation" in done["message"]


def test_duplicate_id_while_running(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send({"id": "dup", "prompt": ONCE, "raw": True, "max_tokens": 30, "stream": True})
        assert c.read_event()["event"] == "token"
        c.send({"id": "dup", "prompt": ONCE, "raw": True, "max_tokens": 2})
        refused = next(e for e in c.events() if e["event"] == "error")
        for _ in read_until_final(c, "dup"):
            pass
    assert refused["code"] == "duplicate_id"


def test_cancel_while_queued_is_an_error_cancelled(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c, shared_daemon.client() as other:
        c.send({"id": "run", "prompt": ONCE, "raw": True, "max_tokens": 40, "stream": True})
        assert c.read_event()["event"] == "token"
        c.send({"id": "waiting", "prompt": ONCE, "raw": True, "max_tokens": 2})
        time.sleep(0.05)
        assert other.call({"op": "cancel", "id": "waiting"})["cancelled"] is True
        waiting = next(e for e in c.events() if e["id"] == "waiting")
        for _ in read_until_final(c, "run"):
            pass
    assert waiting["event"] == "error" and waiting["code"] == "cancelled"


@pytest.mark.parametrize(
    ("payload", "code", "needle"),
    [
        (b"\xff\xfe\x00garbage\n", "invalid_json", "UTF-8"),
        (b"{this is not json}\n", "invalid_json", "JSON"),
        (b'{"prompt": "x", "max_token": 5}\n', "invalid_request", "max_token"),
        (b'{"op": "reboot"}\n', "invalid_request", "op"),
        (b'[1,2,3]\n', "invalid_request", "object"),
    ],
)
def test_bad_input_gets_error_and_connection_keeps_working(
    shared_daemon: DaemonProcess, payload: bytes, code: str, needle: str
) -> None:
    with shared_daemon.client() as c:
        c.send_raw(payload)
        err = c.read_event()
        assert err["event"] == "error" and err["code"] == code and needle in str(err["message"])
        done = c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})
    assert done["event"] == "done"


def test_prompt_too_long_names_the_counts(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        err = c.call({"id": "big", "prompt": "word " * 1100, "raw": True, "max_tokens": 8})
    assert err["event"] == "error" and err["code"] == "prompt_too_long"
    assert "1024" in str(err["message"]) and "max_tokens is 8" in str(err["message"])


def test_oversized_line_closes_connection_daemon_keeps_serving(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send_raw(b'{"prompt": "' + b"a" * (300 * 1024) + b'"}\n')
        err = c.read_event()
        assert err["code"] == "payload_too_large"
        assert list(c.events()) == []  # closed
    with shared_daemon.client() as c:
        assert c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})["event"] == "done"


def test_client_disconnect_cancels_its_requests(shared_daemon: DaemonProcess) -> None:
    c = shared_daemon.client()
    c.send({"id": "gone", "prompt": ONCE, "raw": True, "max_tokens": 900, "stream": True})
    assert c.read_event()["event"] == "token"
    c.close()
    deadline = time.monotonic() + 5
    with shared_daemon.client() as watcher:
        while watcher.status()["queue"]["running"] == "gone":
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.02)
    summary = [e for e in shared_daemon.log_events() if e.get("event") == "request.finished" and e.get("id") == "gone"]
    assert summary and summary[0]["finish_reason"] == "cancelled"
    assert summary[0]["completion_tokens"] < 900


def test_half_closed_client_still_gets_its_answer(shared_daemon: DaemonProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(shared_daemon.socket_path))
    sock.sendall(b'{"id": "half", "prompt": "Once upon a time", "raw": true, "max_tokens": 4}\n')
    sock.shutdown(socket.SHUT_WR)  # what `socat` and `nc -N` do at end of input
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert b'"event":"done"' in data and b'"id":"half"' in data


def test_64_idle_connections_and_a_working_one(shared_daemon: DaemonProcess) -> None:
    idle = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(shared_daemon.socket_path))
            idle.append(s)
        idle[0].sendall(b'{"prompt": "x"')  # a half-written request must not block anyone
        with shared_daemon.client(timeout=30) as c:
            done = c.call({"prompt": ONCE, "raw": True, "max_tokens": 4})
        assert done["event"] == "done"
    finally:
        for s in idle:
            s.close()


def test_summary_log_event_per_request_without_prompt_text(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.call({"id": "logged", "prompt": "secret words here", "raw": True, "max_tokens": 2})
    events = [e for e in shared_daemon.log_events() if e.get("id") == "logged" and e.get("event") == "request.finished"]
    assert len(events) == 1
    e = events[0]
    assert e["transport"] == "socket" and "uid=" in e["peer"] and "pid=" in e["peer"]
    assert e["prompt_tokens"] > 0 and e["completion_tokens"] == 2
    assert "secret" not in shared_daemon.log()


def test_prefix_cache_reuses_shared_system_prompt(shared_daemon: DaemonProcess) -> None:
    system = "You are a helpful assistant for a smart home. " * 8
    with shared_daemon.client() as c:
        first = c.call({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Lights?"}],
                        "max_tokens": 2})
        second = c.call({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Heat?"}],
                         "max_tokens": 2})
    assert second["timings"]["cached_tokens"] >= 60
    assert second["timings"]["cached_tokens"] < second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] - second["usage"]["prompt_tokens"] in range(-3, 4)


def test_a_prompt_sharing_only_a_few_tokens_with_a_saved_one_is_evaluated_whole(shared_daemon: DaemonProcess) -> None:
    """Every raw prompt shares its BOS token (here also "The") with the saved prefixes: restoring a
    saved state for so few tokens costs more than evaluating them, so nothing is reused."""
    with shared_daemon.client() as c:
        c.call({"prompt": "The kitchen light is on and the front door is open. " * 4, "raw": True, "max_tokens": 2})
        other = c.call({"prompt": "The garden hose is", "raw": True, "max_tokens": 2})
    assert other["event"] == "done" and other["timings"]["cached_tokens"] == 0, other


# --- daemons of their own ------------------------------------------------------------------


def test_queue_full_with_retry_after(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path, {"queue": {"max_depth": 2}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "run", "prompt": ONCE, "raw": True, "max_tokens": 60, "stream": True})
            assert c.read_event()["event"] == "token"
            c.send({"id": "q1", "prompt": ONCE, "raw": True, "max_tokens": 1})
            c.send({"id": "q2", "prompt": ONCE, "raw": True, "max_tokens": 1})
            c.send({"id": "q3", "prompt": ONCE, "raw": True, "max_tokens": 1})
            refused = next(e for e in c.events() if e["id"] == "q3")
            assert c.call({"op": "cancel", "id": "run"})["cancelled"]
    assert refused["event"] == "error" and refused["code"] == "queue_full"
    assert refused["retry_after_ms"] > 0


def test_model_unavailable_when_the_model_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with DaemonProcess(write_config(tmp_path, broken)) as d:
        d.wait_ready()
        with d.client() as c:
            health = c.health()
            err = c.call({"prompt": "hi"})
    assert health == {"event": "health", "ok": False, "state": "unavailable"}
    assert err["code"] == "model_unavailable"
    assert "broken.gguf" in str(err["message"])


def test_internal_error_is_reported_and_daemon_keeps_serving(tmp_path: Path, gemma_path: Path) -> None:
    template = tmp_path / "boom.jinja"
    # A template bug that raises a non-template exception for one input: the daemon maps it once.
    template.write_text(
        "{% for m in messages %}{% if m.content == 'boom' %}{{ 1 // 0 }}{% endif %}"
        "<start_of_turn>user\n{{ m.content }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    )
    cfg = write_config(tmp_path, gemma_path, {"model": {"chat_template_file": str(template)}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            err = c.call({"prompt": "boom"})
            ok = c.call({"prompt": "fine", "max_tokens": 2})
    assert err["event"] == "error" and err["code"] == "internal_error"
    assert ok["event"] == "done"


def test_sigterm_drains_running_request_and_removes_socket(tmp_path: Path, gemma_path: Path) -> None:
    with DaemonProcess(write_config(tmp_path, gemma_path)) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "drain", "prompt": ONCE, "raw": True, "max_tokens": 24, "stream": True})
            assert c.read_event()["event"] == "token"
            d.signal(__import__("signal").SIGTERM)
            events = list(read_until_final(c, "drain"))
        assert d.wait(30) == 0
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "length"
    assert not d.socket_path.exists()


def test_sigterm_past_drain_seconds_cancels_with_shutting_down(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path, {"shutdown": {"drain_seconds": 0.5}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "endless", "prompt": ONCE, "raw": True, "max_tokens": 900, "stream": True})
            c.send({"id": "queued", "prompt": ONCE, "raw": True, "max_tokens": 2})
            assert c.read_event()["event"] == "token"
            d.signal(__import__("signal").SIGTERM)
            finals = {}
            for event in c.events():
                if event["event"] in ("done", "error"):
                    finals[event["id"]] = event
                if len(finals) == 2:
                    break
        assert d.wait(30) == 0
    assert finals["endless"]["code"] == "shutting_down"
    assert finals["queued"]["code"] == "shutting_down"


def test_new_requests_during_drain_get_shutting_down(tmp_path: Path, gemma_path: Path) -> None:
    with DaemonProcess(write_config(tmp_path, gemma_path)) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "busy", "prompt": ONCE, "raw": True, "max_tokens": 60, "stream": True})
            assert c.read_event()["event"] == "token"
            d.signal(__import__("signal").SIGTERM)
            time.sleep(0.2)
            c.send({"id": "new", "prompt": ONCE, "raw": True, "max_tokens": 2})
            new = next(e for e in c.events() if e["id"] == "new" and e["event"] == "error")
        d.wait(30)
    assert new["code"] == "shutting_down"


def test_stale_socket_is_replaced_live_one_is_refused(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path)
    sock_path = tmp_path / "edgellm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # a crashed daemon leaves its socket file behind
    stale.close()
    assert sock_path.exists()
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        second = DaemonProcess(cfg)
        code = second.wait(60)
        second.stop()
        assert code != 0
        assert "already listening" in second.log()
        with d.client() as c:
            assert c.health()["ok"] is True


def test_socket_mode_is_applied(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path, {"socket": {"mode": "0600"}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        assert (d.socket_path.stat().st_mode & 0o777) == 0o600


def test_tiny_olmo2_loads_and_generates_through_its_template(tmp_path: Path, tiny_olmo_path: Path) -> None:
    with DaemonProcess(write_config(tmp_path, tiny_olmo_path, {"model": {"n_ctx": 256}})) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
            events = collect(c, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                                 "max_tokens": 6, "stream": True})
    assert status["model"]["arch"] == "olmo2"
    assert status["model"]["template"] == "olmo2"
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] <= 6
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]


def test_gguf_template_setting_without_template_is_refused_at_load(tmp_path: Path, tiny_olmo_path: Path) -> None:
    with DaemonProcess(write_config(tmp_path, tiny_olmo_path, {"model": {"template": "gguf", "n_ctx": 256}})) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
    assert status["state"] == "unavailable"
    assert "model.template" in status["reason"]


def test_client_module_reports_unreachable_daemon(tmp_path: Path) -> None:
    from daemon.client import ClientError

    with pytest.raises(ClientError):
        Client(tmp_path / "nothing.sock")


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000 + b"\n",  # deeper than any JSON parser should recurse
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}\n",  # past Python's int-digits limit
        b'{"id": "\\ud800", "prompt": 5}\n',  # a lone surrogate escape cannot be echoed as UTF-8
        b'{"id": "\\ud800x", "prompt": "hi"}\n',
        b'{"prompt": "hi \\ud83d"}\n',
    ],
    ids=["deep-nesting", "huge-integer", "surrogate-id-invalid", "surrogate-id-valid", "surrogate-prompt"],
)
def test_pathological_json_gets_invalid_json_and_the_connection_lives(
    shared_daemon: DaemonProcess, payload: bytes
) -> None:
    with shared_daemon.client(timeout=30) as c:
        c.send_raw(payload)
        err = c.read_event()
        assert err["event"] == "error" and err["code"] == "invalid_json", err
        assert err["id"] is None
        assert c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})["event"] == "done"


def test_line_limit_is_exact(shared_daemon: DaemonProcess) -> None:
    limit = 256 * 1024
    head, tail = b'{"prompt": "', b'", "raw": true, "max_tokens": 1}'
    fits = head + b"a " * ((limit - len(head) - len(tail)) // 2) + tail
    fits += b" " * (limit - len(fits))
    assert len(fits) == limit
    with shared_daemon.client() as c:
        c.send_raw(fits + b"\n")
        # Accepted and parsed: refused only for what the prompt is (over limits.max_prompt_bytes).
        refused = c.read_event()
        assert refused["code"] == "invalid_request" and "limits.max_prompt_bytes" in refused["message"]
        c.send_raw(fits + b" \n")
        assert c.read_event()["code"] == "payload_too_large"


def test_duplicate_id_on_the_same_connection_keeps_disconnect_cancelling_the_original(
    shared_daemon: DaemonProcess,
) -> None:
    c = shared_daemon.client()
    c.send({"id": "dup2", "prompt": ONCE, "raw": True, "max_tokens": 900, "stream": True})
    assert c.read_event()["event"] == "token"
    c.send({"id": "dup2", "prompt": ONCE, "raw": True, "max_tokens": 2})
    refused = next(e for e in c.events() if e["event"] == "error")
    assert refused["code"] == "duplicate_id"
    c.close()
    with shared_daemon.client() as watcher:
        deadline = time.monotonic() + 5
        while watcher.status()["queue"]["running"] == "dup2":
            assert time.monotonic() < deadline, "the original kept running after its client left"
            time.sleep(0.02)


def test_errors_about_ops_do_not_carry_a_request_id(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send({"id": "mine", "prompt": ONCE, "raw": True, "max_tokens": 20, "stream": True})
        c.send({"op": "cancel", "id": "mine", "force": True})
        c.send({"op": "status", "id": "mine"})
        op_errors, events = [], []
        while not events or events[-1]["event"] not in ("done", "error") or events[-1]["id"] != "mine":
            event = c.read_event()
            (op_errors if event["id"] is None else events).append(event)
    assert [e["code"] for e in op_errors] == ["invalid_request", "invalid_request"]
    assert events[-1]["event"] == "done" and events[-1]["usage"]["completion_tokens"] == 20


def test_tokens_per_second_is_the_decode_rate_even_for_short_answers(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        one = c.call({"prompt": ONCE, "raw": True, "max_tokens": 1})
        short = c.call({"prompt": ONCE, "raw": True, "max_tokens": 3})
        longer = c.call({"prompt": ONCE, "raw": True, "max_tokens": 32})
    assert one["timings"]["tokens_per_second"] is None  # one token: no decode step to time
    ratio = short["timings"]["tokens_per_second"] / longer["timings"]["tokens_per_second"]
    assert 0.33 < ratio < 3, (short["timings"], longer["timings"])  # was 1.5x-100x off before


def test_sigterm_is_not_held_up_by_a_client_that_never_reads(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path, {"shutdown": {"drain_seconds": 1.0}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(str(d.socket_path))
        hog.sendall(b'{"op": "status"}\n' * 800)  # ~0.5 MB of answers it never reads: under the 1 MiB cap
        time.sleep(1.0)
        started = time.monotonic()
        d.signal(__import__("signal").SIGTERM)
        code = d.wait(20)
        took = time.monotonic() - started
        hog.close()
    assert code == 0
    assert took < 10, f"shutdown took {took:.1f} s"


def test_every_log_line_is_one_json_event(shared_daemon: DaemonProcess) -> None:
    """journald and log shippers get one JSON object per line, llama.cpp's own output included."""
    import json

    lines = [line for line in shared_daemon.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        event = json.loads(line)
        assert {"event", "level", "timestamp"} <= set(event), line


def test_status_counts_cancelled_requests_apart_and_the_cli_shows_them(shared_daemon: DaemonProcess) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    with shared_daemon.client() as c, shared_daemon.client() as other:
        before = c.status()["requests"]
        c.send({"id": "count-me", "prompt": ONCE, "raw": True, "max_tokens": 400, "stream": True})
        assert c.read_event()["event"] == "token"
        other.call({"op": "cancel", "id": "count-me"})
        assert list(read_until_final(c, "count-me"))[-1]["finish_reason"] == "cancelled"
        after = c.status()["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["done"] == before["done"]
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--socket", str(shared_daemon.socket_path)],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
    ).stdout
    assert f"{after['cancelled']} cancelled" in out
    assert "state" in out and "ready" in out and "Gemma 3 270m" in out
    assert re.search(r"engine +0/1 streams running, 0 suspended, \d+ threads", out), out
    assert re.search(r"kv cache +f16, \d+ MB, 0/\d+ cells reserved", out), out
