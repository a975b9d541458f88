#!/usr/bin/env bash
# Set up (if needed) and run the daemon in the foreground on the documented default config
# (config.toml) with the bundled Gemma 3 270M test model. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/edgellm serve --config config.toml "$@"
