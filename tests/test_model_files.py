"""Model files that go bad under a daemon: truncated, corrupt, replaced — at start, on SIGHUP, and
`edgellm models fetch` replacing the file a running daemon has loaded. Real model, real daemon."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, DaemonProcess, wait_status, write_config
from tests.test_service_lifecycle import wait_log


def truncated_copy(source: Path, target: Path, fraction: float = 0.5) -> Path:
    with source.open("rb") as f:
        target.write_bytes(f.read(int(source.stat().st_size * fraction)))
    return target


def test_a_truncated_model_is_a_clear_error_at_start(tmp_path: Path, gemma_path: Path) -> None:
    model = truncated_copy(gemma_path, tmp_path / "model.gguf")
    with DaemonProcess(write_config(tmp_path, model)) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
            reply = c.call({"id": "r", "prompt": "hi"})
    assert status["state"] == "unavailable"
    assert status["reason"].startswith(f"model file {model}: truncated: the file has {model.stat().st_size} bytes")
    assert reply["code"] == "model_unavailable" and "truncated" in reply["message"]


def test_a_corrupt_header_is_a_clear_error_at_start(tmp_path: Path, gemma_path: Path) -> None:
    model = tmp_path / "model.gguf"
    with gemma_path.open("rb") as f:
        data = bytearray(f.read(1 << 20))
    data[16:24] = (2**62).to_bytes(8, "little")  # the metadata key count
    model.write_bytes(bytes(data))
    with DaemonProcess(write_config(tmp_path, model)) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
    assert status["state"] == "unavailable" and "corrupt GGUF header" in status["reason"]


def test_a_replaced_model_on_sighup_is_refused_and_the_old_one_serves(tmp_path: Path, gemma_path: Path) -> None:
    model = tmp_path / "model.gguf"
    shutil.copyfile(gemma_path, model)
    cfg = write_config(tmp_path, model)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        # Replaced the safe way (new file, rename): the running daemon keeps its mapped inode.
        truncated_copy(gemma_path, tmp_path / "new.gguf", 0.7)
        os.replace(tmp_path / "new.gguf", model)
        cfg.write_text(cfg.read_text().replace("n_ctx = 1024", "n_ctx = 768"))
        d.signal(signal.SIGHUP)
        failed = wait_log(d, "config.reload_model_failed", timeout=60.0)
        assert f"model file {model}: truncated" in str(failed["error"])
        with d.client() as c:
            done = c.call({"id": "still", "prompt": "Once upon a time", "raw": True, "max_tokens": 4})
            status = c.status()
    assert done["event"] == "done" and done["usage"]["completion_tokens"] == 4
    assert status["state"] == "ready" and status["model"]["n_ctx"] == 1024  # the old engine, kept


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _Files(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def sha256_of_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, 1 << 20):
        digest.update(block)
    return digest.hexdigest()


def test_models_fetch_replacing_a_running_daemons_file(
    tmp_path: Path, gemma_path: Path, tiny_olmo_path: Path, file_server: tuple[str, Path]
) -> None:
    """The daemon runs the tiny OLMo from the file name the catalog gives Gemma 3 270M; `models fetch`
    finds that file is not Gemma (wrong size), moves it aside, downloads Gemma next to it and renames
    it into place. The daemon never notices (its inode is untouched) and a SIGHUP loads the new file."""
    base_url, www = file_server
    shutil.copyfile(gemma_path, www / "gemma.gguf")
    models = tmp_path / "models"
    models.mkdir()
    dest = models / "gemma-3-270m-q4_k_m.gguf"
    shutil.copyfile(tiny_olmo_path, dest)
    cfg = write_config(tmp_path, dest, {"model": {"template": "olmo2"}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        old_fd = os.open(dest, os.O_RDONLY)
        try:
            old_inode, old_sha = os.fstat(old_fd).st_ino, sha256_of_fd(old_fd)
            stop = threading.Event()
            answers: list[dict[str, object]] = []

            def keep_asking() -> None:  # the daemon serves all through the fetch
                with d.client() as c:
                    while not stop.is_set():
                        answers.append(c.call({"prompt": "hello", "max_tokens": 2}))

            asker = threading.Thread(target=keep_asking)
            asker.start()
            try:
                fetched = subprocess.run(
                    [sys.executable, "-m", "daemon", "models", "fetch", "gemma-3-270m", "--dir", str(models),
                     "--url", f"{base_url}/gemma.gguf", "--accept-license"],
                    capture_output=True, text=True, timeout=300, cwd=str(REPO),
                    env={**os.environ, "EDGELLM_CONFIG": ""},
                )
            finally:
                stop.set()
                asker.join(60)
            assert fetched.returncode == 0, fetched.stderr
            assert os.stat(dest).st_ino != old_inode  # a new file took the name
            assert sha256_of_fd(old_fd) == old_sha  # the old one was never rewritten in place
            assert (models / "gemma-3-270m-q4_k_m.gguf.rejected").stat().st_ino == old_inode
        finally:
            os.close(old_fd)
        with d.client() as c:
            after = c.call({"id": "after", "prompt": "hello", "max_tokens": 2})
            assert c.status()["model"]["arch"] == "olmo2"
        assert d.proc.poll() is None
        assert answers and all(a["event"] == "done" for a in answers), answers[-3:]
        assert after["event"] == "done"
        # The new file is picked up when the model settings change.
        cfg.write_text(cfg.read_text().replace('template = "olmo2"', 'template = "auto"'))
        d.signal(signal.SIGHUP)
        with d.client() as c:
            status = wait_status(c, lambda s: (s.get("model") or {}).get("arch") == "gemma3", timeout=120)
            assert status["state"] == "ready"
            done = c.call({"id": "new", "prompt": "Once upon a time", "raw": True, "max_tokens": 3})
            assert done["event"] == "done"
