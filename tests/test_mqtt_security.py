"""Credentials, the ACL from docs/mqtt.md, TLS with verification and client certificates, a
broker on a Unix socket, and a daemon that speaks MQTT 3.1.1 — each against its own Mosquitto."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, DaemonProcess, merge, write_config
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.test_mqtt_daemon import ONCE, mqtt_overrides, start_daemon, wait_online
from tests.test_mqtt_recovery import finals_by_id, generated, status, wait_until

NOT_AUTHORIZED = 0x87


def documented_acl() -> str:
    text = (REPO / "docs" / "mqtt.md").read_text()
    block = text[text.index("<!-- acl:start -->") : text.index("<!-- acl:end -->")]
    return block.split("```text\n", 1)[1].split("```", 1)[0]


def test_documented_acl_lets_a_device_ask_and_read_only_its_own_answers(tmp_path: Path, gemma_path: Path) -> None:
    users = {"edgellm-pi": "daemon secret", "kitchen": "kitchen-pw", "garage": "garage-pw"}
    broker = MosquittoBroker(
        tmp_path / "broker", users=users, acl=documented_acl(), client_auth=("edgellm-pi", users["edgellm-pi"])
    )
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(users["edgellm-pi"] + "\n")
    with broker:
        daemon = start_daemon(
            tmp_path / "d", gemma_path, broker, "pi",
            {"mqtt": {"username": "edgellm-pi", "password_file": str(password_file), "fleet": {"enabled": True}}},
        )
        try:
            # The device asks through its own topic and through the fleet, answers in its subtree.
            for topic, rid in (("edgellm/pi/request", "acl1"), ("edgellm/fleet/request", "acl2")):
                result = subprocess.run(
                    [
                        "mosquitto_rr", "-h", broker.host, "-p", str(broker.port), "-u", "kitchen", "-P", "kitchen-pw",
                        "-q", "1", "-W", "60", "-t", topic, "-e", "devices/kitchen/inbox",
                        "-m", json.dumps({"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 4}),
                    ],
                    capture_output=True, text=True, timeout=90, check=False,
                )
                assert result.returncode == 0, result.stderr
                assert json.loads(result.stdout)["event"] == "done"

            with Probe(broker, ["devices/#"], username="kitchen", password="kitchen-pw") as kitchen:
                # ... but may not ask another daemon, nor read another device's answers (Mosquitto
                # grants the subscription and filters what it delivers).
                refused = kitchen.publish("edgellm/attic/request", {"prompt": "x"})
                assert refused.value == NOT_AUTHORIZED
                with Probe(broker) as as_daemon:
                    as_daemon.publish("devices/garage/inbox", b"for the garage")
                    as_daemon.publish("devices/kitchen/inbox", b"for the kitchen")
                kitchen.wait_for(lambda m: m.payload == b"for the kitchen")
                assert [m.topic for m in kitchen.messages] == ["devices/kitchen/inbox"]
            with Probe(broker, username="garage", password="garage-pw") as garage:
                # A user the ACL does not list may do nothing.
                assert garage.publish("edgellm/pi/request", {"prompt": "x"}).value == NOT_AUTHORIZED
            assert status(daemon)["mqtt"]["connected"] is True
        finally:
            daemon.stop()


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extra = ["-extfile", "san.ext"] if name == "server" else []
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", *extra,
        )
    return {p.stem + p.suffix: p for p in directory.iterdir()}


def test_tls_with_client_certificate_verifies_the_broker(tmp_path: Path, gemma_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_listener = (
        f"cafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n"
        "require_certificate true\n"
    )
    client_tls = {"ca_certs": str(pki["ca.crt"]), "certfile": str(pki["client.crt"]), "keyfile": str(pki["client.key"])}
    tls = {"enabled": True, "ca_file": str(pki["ca.crt"]), "cert_file": str(pki["client.crt"]),
           "key_file": str(pki["client.key"])}
    with MosquittoBroker(tmp_path / "broker", extra_config=tls_listener, client_tls=client_tls) as broker:
        daemon = start_daemon(tmp_path / "d", gemma_path, broker, "tls", {"mqtt": {"tls": tls}})
        try:
            with Probe(broker, ["client/tls"]) as probe:
                probe.publish(
                    "edgellm/tls/request", {"id": "t1", "prompt": ONCE, "raw": True, "max_tokens": 4},
                    response_topic="client/tls",
                )
                assert probe.wait_final("t1")["event"] == "done"

            # Verification is on: with a CA that did not sign the broker's certificate, no connection.
            bad = merge(mqtt_overrides(broker, "tls"), {"mqtt": {"tls": {**tls, "ca_file": str(pki["other-ca.crt"])}}})
            write_config(tmp_path / "d", gemma_path, bad)
            daemon.signal(signal.SIGHUP)
            wait_until(lambda: status(daemon)["mqtt"]["connected"] is False, what="disconnect on reload")
            time.sleep(1.5)
            assert status(daemon)["mqtt"]["connected"] is False
            assert any(e.get("event") == "mqtt.connect_failed" for e in daemon.log_events())

            write_config(tmp_path / "d", gemma_path, merge(mqtt_overrides(broker, "tls"), {"mqtt": {"tls": tls}}))
            daemon.signal(signal.SIGHUP)
            wait_until(lambda: status(daemon)["mqtt"]["connected"] is True, what="reconnect on reload")
        finally:
            daemon.stop()


def test_broker_on_a_unix_socket(tmp_path: Path, gemma_path: Path) -> None:
    socket_path = tmp_path / "mosquitto.sock"
    with MosquittoBroker(tmp_path / "broker", extra_config=f"listener 0 {socket_path}\n") as broker:
        daemon = start_daemon(
            tmp_path / "d", gemma_path, broker, "ux", {"mqtt": {"transport": "unix", "host": str(socket_path)}}
        )
        try:
            with Probe(broker, ["client/ux"]) as probe:  # the probe uses the TCP listener of the same broker
                probe.publish(
                    "edgellm/ux/request", {"id": "u1", "prompt": ONCE, "raw": True, "max_tokens": 4},
                    response_topic="client/ux",
                )
                assert probe.wait_final("u1")["event"] == "done"
            assert status(daemon)["mqtt"]["broker"] == f"unix:{socket_path}"
        finally:
            daemon.stop()


@pytest.mark.slow
def test_daemon_speaking_mqtt_311_keeps_its_session_across_a_kill(tmp_path: Path, gemma_path: Path) -> None:
    node = "old"
    with MosquittoBroker(tmp_path / "broker") as broker:
        config = write_config(tmp_path / "d", gemma_path, mqtt_overrides(broker, node, protocol="3.1.1"))
        first = DaemonProcess(config)
        first.wait_ready()
        wait_online(broker, f"edgellm/{node}")
        ids = ["o0", "o1", "o2", "o3"]
        with Probe(broker, ["dev/old"], protocol="3.1.1") as probe:
            probe.publish(
                f"edgellm/{node}/request",
                {"id": "o0", "prompt": ONCE, "raw": True, "max_tokens": 120, "stream": True, "reply_to": "dev/old"},
            )
            probe.wait_for(lambda m: m.json.get("event") == "token")
            for rid in ids[1:]:
                probe.publish(
                    f"edgellm/{node}/request",
                    {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 4, "reply_to": "dev/old"},
                )
            wait_until(lambda: status(first)["mqtt"]["received"] >= len(ids))
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            with DaemonProcess(config) as second:
                second.wait_ready()
                for rid in ids:
                    probe.wait_final(rid, timeout=120)
                time.sleep(0.5)
                finals = finals_by_id(probe, "dev/old")
        first.stop()
    for rid in ids:
        assert [f["event"] for f in finals[rid]] == ["done"], finals[rid]
        assert generated(second, rid) == 1
