#!/usr/bin/env bash
# Install lancelotd as a systemd service (run as root; safe to run again).
#   systemd/install.sh            install or upgrade
# Environment: PREFIX (default /opt/lancelotd), PYTHON (default python3),
# PIP_ARGS (extra pip arguments, e.g. "--no-index --find-links DIR").
set -euo pipefail
PREFIX=${PREFIX:-/opt/lancelotd}
PYTHON=${PYTHON:-python3}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

# The package in its own venv, with the system's Python.
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
# shellcheck disable=SC2086
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check ${PIP_ARGS:-} --upgrade "$SRC"

# The config: never overwrite the operator's.
install -d -m 0755 /etc/lancelotd
if [ -e /etc/lancelotd/lancelotd.toml ]; then
    echo "install.sh: keeping existing /etc/lancelotd/lancelotd.toml"
else
    install -m 0644 "$SRC/etc/lancelotd.toml" /etc/lancelotd/lancelotd.toml
fi
"$PREFIX/bin/lancelotd" check-config -c /etc/lancelotd/lancelotd.toml

install -m 0644 "$SRC/systemd/lancelotd.service" "$SRC/systemd/lancelotd.socket" /etc/systemd/system/
if [ -d /etc/logrotate.d ]; then
    install -m 0644 "$SRC/etc/logrotate/lancelotd" /etc/logrotate.d/lancelotd
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "install.sh: installed in $PREFIX; start with: systemctl enable --now lancelotd"
