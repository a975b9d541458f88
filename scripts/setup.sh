#!/usr/bin/env bash
# Set up edgellm for development in ./.venv: the Debian packages it needs (only when missing),
# then the Python dependencies and edgellm itself (editable). Safe to run again.
# llama-cpp-python compiles llama.cpp from source the first time (about 4-6 minutes on 2 cores);
# pip keeps the built wheel in its cache, so later runs and fresh clones reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

need=()
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_rr >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Skip pip when nothing changed since the last successful setup: starts stay fast, and work offline.
stamp=.venv/.edgellm-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/edgellm ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e '.[dev]'
echo "$want" > "$stamp"
echo "setup: ready ($(.venv/bin/edgellm --version))"
