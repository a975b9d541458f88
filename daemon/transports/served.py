"""Which model the network doors announce, and under which names (HTTP's model lists, Wyoming's
info): the loaded file when there is one, else the configured file; `ServedModel` describes it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daemon.transports.http.common import ServedModel, served_model

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import Config


def current_model(cfg: Config, backend: Backend) -> ServedModel:
    from daemon.models import entry_for_file, model_file_path, read_recorded_sha256

    status = backend.status()
    loaded_path = (status.get("model") or {}).get("path")
    path = Path(loaded_path) if loaded_path else model_file_path(cfg.model, cfg.state_dir)
    try:
        st = path.stat()
        file_stat: tuple[int, float] | None = (st.st_size, st.st_mtime)
    except OSError:
        file_stat = None
    entry = entry_for_file(path)
    catalog = cfg.model.name or (entry.name if entry is not None else None)
    return served_model(status, path, catalog, read_recorded_sha256(path), file_stat)
