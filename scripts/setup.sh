#!/usr/bin/env bash
# Set up edgellm for development in ./.venv: the Debian packages it needs (only when missing),
# then the Python dependencies and edgellm itself (editable). Safe to run again.
# llama-cpp-python compiles llama.cpp from source the first time (about 7 minutes on 2 cores);
# the built wheel is cached (see llama_key below), so later runs and fresh clones reuse it.
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

# llama.cpp is compiled for this CPU (-march=native) but without AMX: some x86 VMs advertise AMX
# and trap its first tile instruction (SIGILL in libggml-cpu at the first decode; seen on a Xeon
# VM here), and llama.cpp uses AMX only for Q4_0/Q8_0-type weights on server CPUs anyway.
if [ "$(uname -m)" = x86_64 ]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CFLAGS="${CFLAGS:+$CFLAGS }$no_amx" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$no_amx"
fi
llama_pin=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
# pip's wheel cache knows a wheel by its sdist's URL only, not by the flags it was built with:
# the built llama-cpp-python gets a cache of its own per pin and flag set.
llama_key=$(printf '%s\n' "$llama_pin" "$(uname -m)" "${CFLAGS:-}" "${CXXFLAGS:-}" "${CMAKE_ARGS:-}" \
  | sha256sum | cut -c1-16)

# Skip pip when nothing changed since the last successful setup: starts stay fast, and work offline.
stamp=.venv/.edgellm-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $llama_key"
if [ -x .venv/bin/edgellm ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if [ "$(cat .venv/.edgellm-llama-key 2>/dev/null)" != "$llama_key" ]; then
  echo "setup: $llama_pin for this CPU (compiles llama.cpp the first time: about 7 minutes on 2 cores)"
  .venv/bin/python -m pip install -q --force-reinstall --no-deps \
    --cache-dir "${XDG_CACHE_HOME:-$HOME/.cache}/edgellm/llama-cpp-python-$llama_key" "$llama_pin"
  echo "$llama_key" > .venv/.edgellm-llama-key
fi
.venv/bin/python -m pip install -q -e '.[dev]'
echo "$want" > "$stamp"
echo "setup: ready ($(.venv/bin/edgellm --version))"
