"""The HTTP door in a real daemon with the bundled model, driven by the real client libraries:
`ollama` (what Home Assistant's integration uses) and `openai`."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.helpers import DaemonProcess, free_port, wait_status, write_config
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.test_governor_daemon import meminfo
from tests.test_mqtt_daemon import mqtt_overrides, wait_online

HI = [{"role": "user", "content": "Say hi"}]
ONCE = "Once upon a time, there was a little"


def http_daemon(tmp: Path, model: Path, http: dict[str, Any] | None = None, **extra: Any) -> tuple[DaemonProcess, int]:
    port = free_port()
    overrides: dict[str, Any] = {"http": {"enabled": True, "port": port, **(http or {})}, **extra}
    return DaemonProcess(write_config(tmp, model, overrides)), port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[tuple[DaemonProcess, int]]:
    daemon, port = http_daemon(tmp_path_factory.mktemp("http"), gemma_path)
    with daemon:
        daemon.wait_ready()
        yield daemon, port


@pytest.fixture
def oc(served: tuple[DaemonProcess, int]) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{served[1]}", timeout=120)


@pytest.fixture
def ai(served: tuple[DaemonProcess, int]) -> openai.OpenAI:
    # max_retries=0: a 503 must reach the test, not be retried away by the client.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="unused", max_retries=0, timeout=120)


# --- Ollama ----------------------------------------------------------------------------------


def test_ollama_list_names_the_model_by_catalog_name_file_stem_and_alias(oc: ollama.Client) -> None:
    models = oc.list().models
    names = {m.model for m in models}
    assert names == {"gemma-3-270m:latest", "gemma-3-270m-q4_k_m:latest", "edgellm:latest"}
    assert all(m.size == 253_113_024 and m.details is not None and m.details.format == "gguf" for m in models)
    assert len({m.digest for m in models}) == 1  # one model, three names


def test_ollama_ps_shows_the_loaded_model_with_no_vram_and_an_expiry(oc: ollama.Client) -> None:
    (model,) = oc.ps().models
    assert model.model == "gemma-3-270m:latest"
    assert model.size_vram == 0 and model.size == 253_113_024
    assert model.context_length == 1024
    # engine.keep_alive_s = -1 (the default): loaded for good, which Ollama shows as centuries away.
    assert model.expires_at is not None and model.expires_at.year > 2200


def test_ollama_show_has_model_info_and_capabilities(oc: ollama.Client) -> None:
    shown = oc.show("edgellm")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.capabilities is not None and {"completion", "tools"} <= set(shown.capabilities)


def test_ollama_version(served: tuple[DaemonProcess, int]) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{served[1]}/api/version", timeout=10) as response:
        body = json.loads(response.read())
    assert body["version"] and body["edgellm_version"]


def test_ollama_chat_not_streaming_carries_real_timings(oc: ollama.Client) -> None:
    started = time.monotonic()
    reply = oc.chat(model="edgellm", messages=HI, stream=False, options={"num_predict": 6, "temperature": 0})
    wall_ns = (time.monotonic() - started) * 1e9
    assert reply.done and reply.done_reason == "length"
    assert reply.model == "edgellm" and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count == 6 and reply.prompt_eval_count and reply.prompt_eval_count > 3
    assert reply.prompt_eval_duration and reply.eval_duration and reply.total_duration
    assert reply.prompt_eval_duration + reply.eval_duration <= reply.total_duration <= wall_ns
    assert reply.created_at and reply.created_at.endswith("Z")


def test_ollama_chat_streaming_lines_add_up_to_the_answer(oc: ollama.Client) -> None:
    options = {"num_predict": 6, "temperature": 0, "seed": 1}
    parts = list(oc.chat(model="gemma-3-270m:latest", messages=HI, stream=True, options=options))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert all(p.model == "gemma-3-270m:latest" and p.created_at for p in parts)
    streamed = "".join(p.message.content or "" for p in parts)
    whole = oc.chat(model="edgellm", messages=HI, stream=False, options=options)
    assert streamed == whole.message.content
    assert parts[-1].eval_count == 6 and parts[-1].done_reason == "length"


def test_ollama_chat_accepts_what_home_assistant_sends(oc: ollama.Client) -> None:
    # Home Assistant: keep_alive -1 or "300s", num_ctx 8192 (bigger than the daemon's 1024: answered
    # with the daemon's context, never a reload), think false, a tool round in the history.
    messages = [
        {"role": "system", "content": "You control a home."},
        {"role": "user", "content": "Turn on the kitchen light"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}]},
        {"role": "tool", "content": json.dumps({"data": {"success": True}, "error": None})},
    ]
    for keep_alive in (-1, "300s"):
        reply = oc.chat(model="edgellm", messages=messages, keep_alive=keep_alive, think=False,
                        options={"num_ctx": 8192, "num_predict": 4})
        assert reply.done and reply.eval_count == 4


def test_ollama_generate_streams_and_not(oc: ollama.Client) -> None:
    whole = oc.generate(model="edgellm", prompt=ONCE, raw=True, options={"num_predict": 5, "temperature": 0})
    assert whole.response == " girl named Lily. She"
    parts = list(oc.generate(model="edgellm", prompt=ONCE, raw=True, stream=True,
                             options={"num_predict": 5, "temperature": 0}))
    assert "".join(p.response or "" for p in parts) == whole.response and parts[-1].done


def test_ollama_empty_chat_is_a_load_request(oc: ollama.Client) -> None:
    reply = oc.chat(model="edgellm", messages=[], stream=False)
    assert reply.done and reply.done_reason == "load"


def test_ollama_errors_are_response_errors_with_the_right_status(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        oc.chat(model="llama3.2:latest", messages=HI)
    assert unknown.value.status_code == 404 and "gemma-3-270m" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        oc.chat(model="edgellm", messages=HI, options={"temperature": "hot"})
    assert bad.value.status_code == 400 and "options.temperature" in bad.value.error
    with pytest.raises(ollama.ResponseError) as bad_keep:
        oc.chat(model="edgellm", messages=HI, keep_alive="soon")
    assert bad_keep.value.status_code == 400 and "keep_alive" in bad_keep.value.error
    with pytest.raises(ollama.ResponseError) as too_long:
        oc.chat(model="edgellm", messages=[{"role": "user", "content": "word " * 1200}], stream=False)
    assert too_long.value.status_code == 400 and "context of 1024 tokens" in too_long.value.error


def test_prompt_too_long_carries_the_counts(served: tuple[DaemonProcess, int]) -> None:
    status, _, body = post(served[1], "/api/chat", {"model": "edgellm", "stream": False,
                                                    "messages": [{"role": "user", "content": "word " * 1200}]})
    assert status == 400 and body["code"] == "prompt_too_long"
    assert body["n_ctx"] == 1024 and body["prompt_tokens"] > 1000 and body["max_tokens"] == 32


def test_ollama_pull_succeeds_for_the_served_model_and_names_the_fetch_command_otherwise(oc: ollama.Client) -> None:
    assert oc.pull("edgellm").status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        oc.pull("llama3.2:latest")
    assert missing.value.status_code == 404 and "edgellm models fetch" in missing.value.error


def test_unknown_route_and_bad_json(served: tuple[DaemonProcess, int]) -> None:
    assert post(served[1], "/api/embed", {"model": "edgellm"})[0] == 404
    status, _, body = post(served[1], "/api/chat", b"{not json")
    assert status == 400 and body["code"] == "invalid_json"


# --- OpenAI ----------------------------------------------------------------------------------


def test_openai_models(ai: openai.OpenAI) -> None:
    assert {m.id for m in ai.models.list()} == {"gemma-3-270m", "gemma-3-270m-q4_k_m", "edgellm"}


def test_openai_chat_not_streaming_and_streaming_agree(ai: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "edgellm", "messages": HI, "temperature": 0, "seed": 3}
    whole = ai.chat.completions.create(max_tokens=6, **args)
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 6 and whole.usage.total_tokens > 6
    chunks = list(ai.chat.completions.create(max_completion_tokens=6, stream=True,
                                             stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_openai_sse_ends_with_done(served: tuple[DaemonProcess, int]) -> None:
    status, _, raw = post(served[1], "/v1/chat/completions",
                          {"model": "edgellm", "messages": HI, "max_tokens": 2, "stream": True}, parse=False)
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_openai_completions(ai: openai.OpenAI) -> None:
    done = ai.completions.create(model="edgellm", prompt=ONCE, max_tokens=5, temperature=0)
    assert done.choices[0].text == " girl named Lily. She" and done.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in ai.completions.create(
        model="edgellm", prompt=ONCE, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text


def test_openai_errors(ai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        ai.chat.completions.create(model="gpt-4o", messages=HI)
    assert "edgellm" in str(unknown.value)
    with pytest.raises(openai.BadRequestError) as bad:
        ai.chat.completions.create(model="edgellm", messages=HI, n=2)
    assert "n: only 1" in str(bad.value)


# --- auth, busy, governor --------------------------------------------------------------------


def post(port: int, path: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
         parse: bool = True, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    return status, head, (json.loads(raw) if parse and raw else raw)


def test_api_key_is_required_when_set(tmp_path: Path, gemma_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    daemon, port = http_daemon(tmp_path, gemma_path, {"api_key_file": str(key_file)})
    with daemon:
        daemon.wait_ready()
        host = f"http://127.0.0.1:{port}"
        assert ollama.Client(host=host, headers={"Authorization": "Bearer s3cret-key"}).list().models
        for headers in ({"Authorization": "Bearer wrong"}, {}):
            with pytest.raises(ollama.ResponseError) as denied:
                ollama.Client(host=host, headers=headers).list()
            assert denied.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{host}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{host}/v1", api_key="s3cret-key", max_retries=0).models.list().data
    logged = [e for e in daemon.log_events() if e.get("event") == "http.unauthorized"]
    assert logged and "s3cret" not in daemon.log()


def test_non_loopback_bind_without_a_key_is_a_config_error(tmp_path: Path, gemma_path: Path) -> None:
    daemon, _ = http_daemon(tmp_path, gemma_path, {"host": "0.0.0.0"})
    with daemon:
        assert daemon.wait(30) == 2
    assert "http.api_key_file" in daemon.log()


def test_a_flood_gets_503_with_retry_after_and_never_hangs(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    daemon, port = http_daemon(tmp_path, gemma_path, queue={"max_depth": 1}, **mqtt_overrides(broker, "flood"))
    results: list[tuple[int, dict[str, str]]] = []
    lock = threading.Lock()

    def one() -> None:
        status, head, _ = post(port, "/api/generate", {"model": "edgellm", "prompt": ONCE, "raw": True,
                                                       "stream": False, "options": {"num_predict": 24}}, timeout=300)
        with lock:
            results.append((status, head))

    with daemon:
        daemon.wait_ready()
        wait_online(broker, "edgellm/flood")
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        # While HTTP is busy, the socket keeps answering.
        with daemon.client() as client:
            assert client.health()["state"] == "ready"
            busy = wait_status(client, lambda s: s["queue"]["running"] is not None)
            assert busy["queue"]["max_depth"] == 1
            assert busy["http"]["port"] == port and busy["http"]["active"] >= 1
        # ... and so does MQTT: an answer (a short one, or queue_full while the flood holds the queue).
        with Probe(broker, ["client/flood"]) as probe:
            probe.publish("edgellm/flood/request", {"id": "mqtt-during-flood", "prompt": ONCE, "raw": True,
                                                    "max_tokens": 2}, response_topic="client/flood")
            mqtt_final = probe.wait_final("mqtt-during-flood", timeout=120)
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "an HTTP request hung"
    statuses = sorted(s for s, _ in results)
    assert len(statuses) == 8 and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    assert all(int(h["Retry-After"]) >= 1 for s, h in results if s == 503)
    assert mqtt_final["event"] == "done" or mqtt_final.get("code") == "queue_full", mqtt_final


def test_a_client_that_disconnects_cancels_its_request(tmp_path: Path, gemma_path: Path) -> None:
    daemon, port = http_daemon(tmp_path, gemma_path)
    with daemon:
        daemon.wait_ready()
        body = json.dumps({"model": "edgellm", "prompt": ONCE, "raw": True, "stream": False,
                           "options": {"num_predict": 300}}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            with daemon.client() as client:
                wait_status(client, lambda s: s["queue"]["running"] is not None)
        with daemon.client() as client:
            status = wait_status(client, lambda s: s["queue"]["running"] is None, timeout=30)
    assert status["requests"]["cancelled"] == 1
    assert any(e.get("event") == "http.client_gone" for e in daemon.log_events())


def hot_governor(tmp: Path) -> dict[str, Any]:
    """A governor whose temperature file says hot (it admits nothing), with plenty of memory."""
    temp = tmp / "temp"
    temp.write_text("79000\n")
    mem = tmp / "meminfo"
    mem.write_text(meminfo(8000))
    return {"enabled": True, "interval_s": 0.1, "temperature_files": [str(temp)], "meminfo_file": str(mem),
            "psi_file": "", "vcgencmd_command": ""}


def test_governor_throttled_is_503_with_retry_after(tmp_path: Path, gemma_path: Path) -> None:
    daemon, port = http_daemon(tmp_path, gemma_path, governor=hot_governor(tmp_path))
    with daemon:
        daemon.wait_ready()
        with daemon.client() as client:
            wait_status(client, lambda s: (s["governor"] or {}).get("state") == "hot")
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=f"http://127.0.0.1:{port}").chat(model="edgellm", messages=HI)
        status, head, body = post(port, "/v1/chat/completions", {"model": "edgellm", "messages": HI})
    assert refused.value.status_code == 503 and "governor" in refused.value.error
    assert status == 503 and int(head["Retry-After"]) >= 1 and body["error"]["code"] == "throttled"


def test_the_readme_curl_example_works(served: tuple[DaemonProcess, int]) -> None:
    import shutil
    import subprocess

    from tests.helpers import REPO

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("curl -s http://127.0.0.1:11434"))
    command = line.replace(":11434", f":{served[1]}")
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, check=True).stdout
    reply = json.loads(out)
    assert reply["done"] is True and reply["eval_count"] == 8 and reply["response"]


def test_ollama_keep_alive_drives_the_engines_keep_alive(tmp_path: Path, gemma_path: Path) -> None:
    """As Ollama: the latest request's keep_alive says how long the model stays loaded when idle —
    0 unloads it once the answer is out, -1 keeps it; the next request loads it again."""
    daemon, port = http_daemon(tmp_path, gemma_path)
    with daemon:
        daemon.wait_ready()
        oc = ollama.Client(host=f"http://127.0.0.1:{port}")
        first = oc.chat(model="edgellm", messages=HI, keep_alive=0, options={"num_predict": 4})
        with daemon.client() as c:
            idle = wait_status(c, lambda s: s["state"] == "idle", timeout=20)
            assert idle["engine"]["keep_alive_s"] == 0
            again = oc.chat(model="edgellm", messages=HI, keep_alive=-1, options={"num_predict": 4})
            time.sleep(1.5)
            status = c.status()
        (loaded,) = oc.ps()["models"]
    assert first["done"] and again["done"] and again["message"]["content"]
    assert status["state"] == "ready" and status["engine"]["keep_alive_s"] == -1
    assert loaded["expires_at"].year > 2100  # -1: kept loaded, shown as centuries away


def test_the_limits_apply_to_http_requests_too(tmp_path: Path, gemma_path: Path) -> None:
    daemon, port = http_daemon(tmp_path, gemma_path, limits={"max_tokens": 8}, generation={"max_tokens": 8})
    with daemon:
        daemon.wait_ready()
        oc = ollama.Client(host=f"http://127.0.0.1:{port}")
        with pytest.raises(ollama.ResponseError) as refused:
            oc.chat(model="edgellm", messages=HI, options={"num_predict": 50})
        ai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with pytest.raises(openai.BadRequestError) as bad:
            ai.completions.create(model="edgellm", prompt=ONCE, max_tokens=50)
        ok = oc.chat(model="edgellm", messages=HI, options={"num_predict": 8})
    assert refused.value.status_code == 400 and "limits.max_tokens" in refused.value.error
    assert "limits.max_tokens" in str(bad.value)
    assert ok["done"]
