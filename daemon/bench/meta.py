"""What a run's JSON says about itself: options, model, host, versions, commit, load average."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.bench.options import Options
from daemon.bench.procfs import cpu_model
from daemon.bench.results import SCHEMA


def at_start(o: Options, model: Path) -> dict[str, Any]:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
    natives = (("llama-bench", o.llama_bench), ("llama-batched-bench", o.llama_batched_bench),
               ("llama-server", o.llama_server))
    return {
        "schema": SCHEMA,
        "label": o.label,
        "edgellm_version": __version__,
        "git": git_describe(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
        "model": {"path": str(model), "name": model.name, "size_bytes": model.stat().st_size},
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "loadavg_start": list(os.getloadavg())},
        "llama_cpp_python": version("llama_cpp_python"),
        "natives": {name: str(path) for name, path in natives if path},
    }


def at_end(duration_s: float, warnings: list[str]) -> dict[str, Any]:
    return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(duration_s, 1),
            "loadavg_end": list(os.getloadavg()), "warnings": list(warnings)}


def version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return None


def git_describe() -> str | None:
    """The commit (and branch) of the checkout this package runs from, when it is one."""
    repo = Path(__file__).resolve().parent.parent.parent
    git = shutil.which("git")
    if git is None or not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run([git, "-C", str(repo), "log", "-1", "--format=%h %D"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None
