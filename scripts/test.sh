#!/usr/bin/env bash
# The test command: lint, type-check, then the whole test suite against the real model,
# real Mosquitto brokers and real daemon processes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check daemon tests scripts
.venv/bin/mypy --strict daemon
exec .venv/bin/python -m pytest -q "$@"
