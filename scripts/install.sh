#!/usr/bin/env bash
# Install edgellm as a systemd service. Idempotent: run it again to upgrade or repair.
#
#   sudo ./scripts/install.sh                  # the real thing, on a Pi
#   ./scripts/install.sh --prefix /tmp/root    # the same tree under /tmp/root, touching nothing else
#
# What it does, in order (each step says "done", "unchanged" or "skipped: why"):
#   1. the system user and group `edgellm` (member of `video` for vcgencmd)
#   2. a virtualenv in /opt/edgellm/venv with edgellm installed from this repository
#   3. the units edgellm.service and edgellm.socket in /etc/systemd/system
#   4. /etc/edgellm/config.toml from the repository's config.toml; an edited one is never
#      overwritten (the new default goes to config.toml.new)
#   5. `edgellm models fetch` for the configured model (the bundled one needs no network)
#   6. systemctl daemon-reload and enable --now, when systemd runs this box
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/install.sh [OPTIONS]

  --prefix DIR        install under DIR instead of / (also: DESTDIR=DIR). Creates no user and runs no
                      systemctl; for inspecting the tree and for tests (a venv is not relocatable).
  --python PY         Python (>= 3.11) that creates the venv (default: python3)
  --deps-from VENV    reuse the dependencies already built in another venv (a .pth link to its
                      site-packages) and install only edgellm itself: no rebuild of llama-cpp-python.
                      For CI and reinstalls on the same box; VENV is only read, never changed.
  --model NAME        fetch this catalog model instead of the configured one
  --accept-license    accept the model's license (Gemma Terms of Use) for the fetch
  --no-fetch          do not fetch/assemble the model
  --no-enable         do not enable/start the service
  --unit-dir DIR      where units go (default: /etc/systemd/system)
  -h, --help          this text
EOF
}

ROOT="${DESTDIR:-}"
PYTHON="python3"
DEPS_FROM=""
MODEL=""
ACCEPT_LICENSE=0
FETCH=1
ENABLE=1
UNIT_DIR="/etc/systemd/system"

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) ROOT="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) ROOT="${1#*=}"; shift ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --deps-from) DEPS_FROM="${2:?--deps-from needs a venv}"; shift 2 ;;
        --model) MODEL="${2:?--model needs a name}"; shift 2 ;;
        --accept-license) ACCEPT_LICENSE=1; shift ;;
        --no-fetch) FETCH=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --unit-dir) UNIT_DIR="${2:?--unit-dir needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${ROOT%/}"
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
fi
OPT="$ROOT/opt/edgellm"
VENV="$OPT/venv"
ETC="$ROOT/etc/edgellm"
STATE="$ROOT/var/lib/edgellm"
UNITS="$ROOT$UNIT_DIR"
SERVICE_USER="edgellm"

step() { printf '%-8s %s\n' "$1" "$2"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# --- 0. sanity -------------------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "install.sh: $PYTHON is not Python >= 3.11 (Raspberry Pi OS: sudo apt install python3 python3-venv)" >&2
    exit 1
fi
if [ -z "$ROOT" ] && ! is_root; then
    echo "install.sh: installing into / needs root: sudo $0 $*  (or --prefix DIR)" >&2
    exit 1
fi
for file in pyproject.toml config.toml systemd/edgellm.service systemd/edgellm.socket; do
    [ -f "$REPO/$file" ] || { echo "install.sh: $REPO/$file missing: run me from a full checkout" >&2; exit 1; }
done
mkdir -p "$OPT"
STATE_FILE="$OPT/install-state"
touch "$STATE_FILE"
state_get() { sed -n "s/^$1=//p" "$STATE_FILE" | tail -n 1; }
state_set() {
    local tmp="$STATE_FILE.tmp"
    { grep -v "^$1=" "$STATE_FILE" || true; echo "$1=$2"; } > "$tmp"
    mv "$tmp" "$STATE_FILE"
}

# --- 1. user -----------------------------------------------------------------------------------------
if [ -n "$ROOT" ]; then
    step skipped "user $SERVICE_USER: --prefix install"
    state_set user skipped-prefix
elif ! is_root; then
    step skipped "user $SERVICE_USER: not root"
elif getent passwd "$SERVICE_USER" >/dev/null; then
    step unchanged "user $SERVICE_USER exists"
    [ -n "$(state_get user)" ] || state_set user existing
else
    useradd --system --user-group --home-dir /var/lib/edgellm --no-create-home \
        --shell /usr/sbin/nologin --comment "edgellm daemon" "$SERVICE_USER"
    state_set user created
    step done "user $SERVICE_USER created"
fi
if [ -z "$ROOT" ] && is_root && getent group video >/dev/null && ! id -nG "$SERVICE_USER" | grep -qw video; then
    usermod -aG video "$SERVICE_USER"
    step done "user $SERVICE_USER added to group video (vcgencmd)"
fi

# --- 2. venv and package -----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    step done "venv $VENV"
else
    step unchanged "venv $VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -n "$DEPS_FROM" ]; then
    # C extensions (llama.cpp, numpy) only load into the Python version they were built for.
    PYVER='import sys; print("%d.%d" % sys.version_info[:2])'
    if [ "$("$DEPS_FROM/bin/python" -c "$PYVER")" != "$("$VENV/bin/python" -c "$PYVER")" ]; then
        echo "install.sh: --deps-from $DEPS_FROM is another Python version than $PYTHON" >&2
        exit 1
    fi
    DEPS_SITE="$("$DEPS_FROM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [ "$(cat "$SITE/_edgellm_deps.pth" 2>/dev/null)" = "$DEPS_SITE" ]; then
        step unchanged "dependencies linked from $DEPS_FROM"
    else
        echo "$DEPS_SITE" > "$SITE/_edgellm_deps.pth"
        step done "dependencies linked from $DEPS_FROM"
    fi
else
    rm -f "$SITE/_edgellm_deps.pth"
fi
# The source that gets installed: hash it, so a rerun with nothing changed skips pip entirely.
SOURCE_HASH="$(cd "$REPO" && find daemon pyproject.toml README.md -type f ! -path '*/__pycache__/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(state_get source)" = "$SOURCE_HASH" ] && [ -x "$VENV/bin/edgellm" ] \
        && [ "$(state_get deps_from)" = "$DEPS_FROM" ] && "$VENV/bin/edgellm" --version >/dev/null 2>&1; then
    step unchanged "edgellm $("$VENV/bin/edgellm" --version | cut -d' ' -f2) in $VENV"
else
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    cp -r "$REPO/daemon" "$REPO/pyproject.toml" "$REPO/README.md" "$BUILD/"
    find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
    PIP_ARGS=(--quiet --disable-pip-version-check)
    [ -n "$DEPS_FROM" ] && PIP_ARGS+=(--no-deps)
    # On a Pi without a prebuilt llama-cpp-python wheel this compiles llama.cpp (20-40 min on a Pi 4).
    "$VENV/bin/pip" install "${PIP_ARGS[@]}" --upgrade "$BUILD"
    state_set source "$SOURCE_HASH"
    state_set deps_from "$DEPS_FROM"
    step done "edgellm $("$VENV/bin/edgellm" --version | cut -d' ' -f2) installed in $VENV"
fi
install -d "$OPT/docs" "$OPT/share"
[ -f "$REPO/docs/install.md" ] && install -m 0644 "$REPO/docs/install.md" "$OPT/docs/install.md"

# --- 3. units ----------------------------------------------------------------------------------------
UNITS_CHANGED=0
install -d "$UNITS"
for unit in edgellm.service edgellm.socket; do
    if cmp -s "$REPO/systemd/$unit" "$UNITS/$unit"; then
        step unchanged "$UNITS/$unit"
    else
        install -m 0644 "$REPO/systemd/$unit" "$UNITS/$unit"
        UNITS_CHANGED=1
        step done "$UNITS/$unit"
    fi
done

# --- 4. config -----------------------------------------------------------------------------------------
# $OPT/share/config.toml.dist is the default installed last time: a config.toml still equal to it was
# never edited and may follow the new default; one that differs belongs to the admin.
install -d -m 0755 "$ETC"
CONFIG="$ETC/config.toml"
DIST="$OPT/share/config.toml.dist"
if [ ! -e "$CONFIG" ]; then
    install -m 0644 "$REPO/config.toml" "$CONFIG"
    step done "$CONFIG"
elif cmp -s "$CONFIG" "$REPO/config.toml"; then
    step unchanged "$CONFIG"
    rm -f "$CONFIG.new"
elif [ -f "$DIST" ] && cmp -s "$CONFIG" "$DIST"; then
    install -m 0644 "$REPO/config.toml" "$CONFIG"
    step done "$CONFIG (unedited: updated to the new default)"
else
    install -m 0644 "$REPO/config.toml" "$CONFIG.new"
    step kept "$CONFIG (edited by you; the new default is in $CONFIG.new: compare with diff)"
fi
install -m 0644 "$REPO/config.toml" "$DIST"

# --- 5. model ------------------------------------------------------------------------------------------
install -d -m 0750 "$STATE" "$STATE/models"
if [ "$FETCH" -eq 0 ]; then
    step skipped "model fetch: --no-fetch"
else
    FETCH_ARGS=(models fetch --config "$CONFIG")
    [ -n "$MODEL" ] && FETCH_ARGS+=("$MODEL")
    # Under --prefix the config's state_dir (/var/lib/edgellm) is outside the tree: aim at the tree.
    [ -n "$ROOT" ] && FETCH_ARGS+=(--dir "$STATE/models")
    [ "$ACCEPT_LICENSE" -eq 1 ] && FETCH_ARGS+=(--accept-license)
    if "$VENV/bin/edgellm" "${FETCH_ARGS[@]}"; then
        step done "model fetch (the path is printed above)"
    else
        echo "install.sh: the model fetch failed (see above); rerun, or: $VENV/bin/edgellm ${FETCH_ARGS[*]}" >&2
        exit 1
    fi
fi
if [ -z "$ROOT" ] && is_root && getent passwd "$SERVICE_USER" >/dev/null; then
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"
fi

# --- 6. systemd ----------------------------------------------------------------------------------------
if ! systemd_running; then
    step skipped "systemctl: $([ -n "$ROOT" ] && echo "--prefix install" || echo "systemd is not running")"
else
    systemctl daemon-reload
    step done "systemctl daemon-reload"
    if [ "$ENABLE" -eq 0 ]; then
        step skipped "systemctl enable: --no-enable"
    elif systemctl is-active --quiet edgellm.service; then
        systemctl enable edgellm.service >/dev/null
        systemctl restart edgellm.service
        step done "edgellm.service restarted on the new version"
    else
        systemctl enable --now edgellm.service
        step done "edgellm.service enabled and started"
    fi
fi
state_set version "$("$VENV/bin/edgellm" --version | cut -d' ' -f2)"
[ "$UNITS_CHANGED" -eq 1 ] && [ -n "$ROOT" ] && step note "units changed: on the target run systemctl daemon-reload"

cat <<EOF

edgellm is installed.
  status:   systemctl status edgellm      logs: journalctl -u edgellm -f
  check:    $VENV/bin/edgellm doctor --config $CONFIG
  clients:  sudo usermod -aG $SERVICE_USER \$USER   (then log in again) to use $ROOT/run/edgellm/edgellm.sock
EOF
