"""The socket's own defences, against a real daemon: SO_PEERCRED allow-lists (a client process
running under another uid), and socket paths someone else could swap (symlink, open folder)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, DaemonProcess, write_config

OTHER_UID = 54321  # no such user needed: the kernel takes any uid
LISTED_UID = 54322
LISTED_GID = 54323

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")

def client_as(sock: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> list[dict[str, object]]:
    """A status op and a request from a forked child that dropped to uid/gid (and extra groups)
    before connecting; its replies, parsed, come back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os/socket calls, then _exit
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                s.connect(str(sock))
                data = b""
                try:  # a refused client may find the connection closed under its writes
                    s.sendall(b'{"op": "status"}\n{"id": "r1", "prompt": "hi", "max_tokens": 1}\n')
                except (BrokenPipeError, ConnectionResetError):
                    pass
                while data.count(b"\n") < 2:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    data += chunk
            os.write(write_end, data)
        except BaseException as exc:
            os.write(write_end, b"CHILD-ERROR " + repr(exc).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, data
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
def open_socket_dir(tmp_path: Path) -> Path:
    # The other uid must be able to reach the socket file: the folders on the way and the socket
    # itself are opened up; SO_PEERCRED is then the only thing that decides.
    for folder in (tmp_path, *tmp_path.parents):
        if folder == Path("/"):
            break
        folder.chmod(folder.stat().st_mode | 0o711)
    return tmp_path


def test_peers_outside_the_allow_lists_get_forbidden(open_socket_dir: Path, gemma_path: Path) -> None:
    tmp = open_socket_dir
    cfg = write_config(tmp, gemma_path, {
        "socket": {"mode": "0666", "allowed_uids": [LISTED_UID], "allowed_gids": [LISTED_GID]},
    })
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        refused = client_as(d.socket_path, OTHER_UID, OTHER_UID)
        assert len(refused) == 1, refused  # one error, then the daemon hangs up: nothing was served
        assert refused[0]["event"] == "error" and refused[0]["code"] == "forbidden" and refused[0]["id"] is None
        message = str(refused[0]["message"])
        assert f"uid {OTHER_UID}" in message and "socket.allowed_uids" in message
        by_uid = client_as(d.socket_path, LISTED_UID, OTHER_UID)
        by_gid = client_as(d.socket_path, OTHER_UID, LISTED_GID)
        by_extra_group = client_as(d.socket_path, OTHER_UID, OTHER_UID, groups=(LISTED_GID,))
        with d.client() as c:  # root: always let in
            assert c.status()["event"] == "status"
    for replies in (by_uid, by_gid, by_extra_group):
        assert replies[0]["event"] == "status", replies
    logged = [e for e in d.log_events() if e.get("event") == "socket.peer_refused"]
    assert len(logged) == 1 and f"uid={OTHER_UID}" in logged[0]["peer"]
    refused_peer = logged[0]["peer"]
    assert not [e for e in d.log_events() if e.get("peer") == refused_peer and e.get("event") != "socket.peer_refused"]


def test_empty_allow_lists_let_anyone_who_can_open_the_socket(open_socket_dir: Path, gemma_path: Path) -> None:
    cfg = write_config(open_socket_dir, gemma_path, {"socket": {"mode": "0666"}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        replies = client_as(d.socket_path, OTHER_UID, OTHER_UID)
    assert replies[0]["event"] == "status"


def start_fails(cfg: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--config", str(cfg)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_symlinked_socket_path_is_refused(tmp_path: Path, gemma_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    target = real / "victim.sock"
    link = tmp_path / "edgellm.sock"
    link.symlink_to(target)
    out = start_fails(write_config(tmp_path, gemma_path, {"socket": {"path": str(link)}}))
    assert "is a symlink; refusing to listen through it" in out
    assert link.is_symlink() and not target.exists()  # nothing followed, nothing created


def test_a_world_writable_folder_without_the_sticky_bit_is_refused(tmp_path: Path, gemma_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    out = start_fails(write_config(tmp_path, gemma_path, {"socket": {"path": str(folder / "edgellm.sock")}}))
    assert "is world-writable without the sticky bit" in out
    assert not (folder / "edgellm.sock").exists()


def test_a_world_writable_folder_with_the_sticky_bit_is_fine(tmp_path: Path, gemma_path: Path) -> None:
    folder = tmp_path / "sticky"
    folder.mkdir()
    folder.chmod(0o1777)  # like /tmp
    cfg = write_config(tmp_path, gemma_path, {"socket": {"path": str(folder / "edgellm.sock")}})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(d.socket_path))
