#!/usr/bin/env bash
# Remove what scripts/install.sh installed. Keeps the config (/etc/edgellm) and the state
# (/var/lib/edgellm: downloaded models, the MQTT journal) unless --purge. Idempotent.
#
#   sudo ./scripts/uninstall.sh            # service, units, /opt/edgellm
#   sudo ./scripts/uninstall.sh --purge    # ... and config, models, journal, and the user it created
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/uninstall.sh [--prefix DIR] [--purge] [--unit-dir DIR]

  --prefix DIR     the root given to install.sh --prefix (also: DESTDIR=DIR)
  --purge          also remove /etc/edgellm, /var/lib/edgellm and the edgellm user (if install.sh made it)
  --unit-dir DIR   where the units are (default: /etc/systemd/system)
EOF
}

ROOT="${DESTDIR:-}"
PURGE=0
UNIT_DIR="/etc/systemd/system"
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) ROOT="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) ROOT="${1#*=}"; shift ;;
        --purge) PURGE=1; shift ;;
        --unit-dir) UNIT_DIR="${2:?--unit-dir needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
ROOT="${ROOT%/}"
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: removing from / needs root: sudo $0 $*  (or --prefix DIR)" >&2
    exit 1
fi
OPT="$ROOT/opt/edgellm"
ETC="$ROOT/etc/edgellm"
STATE="$ROOT/var/lib/edgellm"
UNITS="$ROOT$UNIT_DIR"
SERVICE_USER="edgellm"
step() { printf '%-8s %s\n' "$1" "$2"; }
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# Read before /opt/edgellm goes: did install.sh create the user?
USER_ORIGIN=""
[ -f "$OPT/install-state" ] && USER_ORIGIN="$(sed -n 's/^user=//p' "$OPT/install-state" | tail -n 1)"

if systemd_running; then
    for unit in edgellm.socket edgellm.service; do
        if systemctl list-unit-files "$unit" >/dev/null 2>&1; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
    step done "stopped and disabled edgellm.service, edgellm.socket"
else
    step skipped "systemctl: $([ -n "$ROOT" ] && echo "--prefix" || echo "systemd is not running")"
fi

for unit in edgellm.service edgellm.socket; do
    if [ -e "$UNITS/$unit" ]; then
        rm -f "$UNITS/$unit"
        step removed "$UNITS/$unit"
    fi
done
if [ -d "$UNITS/edgellm.service.d" ]; then
    step kept "$UNITS/edgellm.service.d (your drop-in overrides)"
fi
systemd_running && systemctl daemon-reload

if [ -d "$OPT" ]; then
    rm -rf "$OPT"
    step removed "$OPT"
fi
[ -d "$ROOT/run/edgellm" ] && rm -rf "$ROOT/run/edgellm" && step removed "$ROOT/run/edgellm"

if [ "$PURGE" -eq 1 ]; then
    for dir in "$ETC" "$STATE" "$ROOT/var/lib/private/edgellm"; do
        if [ -e "$dir" ]; then
            rm -rf "$dir"
            step removed "$dir"
        fi
    done
    if [ -n "$ROOT" ]; then
        step skipped "user $SERVICE_USER: --prefix"
    elif [ "$USER_ORIGIN" = "created" ] && getent passwd "$SERVICE_USER" >/dev/null; then
        userdel "$SERVICE_USER"
        getent group "$SERVICE_USER" >/dev/null && groupdel "$SERVICE_USER" 2>/dev/null || true
        step removed "user $SERVICE_USER"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        step kept "user $SERVICE_USER (it existed before install.sh)"
    fi
else
    [ -e "$ETC" ] && step kept "$ETC (config; --purge removes it)"
    [ -e "$STATE" ] && step kept "$STATE (models and journal; --purge removes it)"
fi
exit 0
