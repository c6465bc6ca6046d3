#!/usr/bin/env bash
# Remove what systemd/install.sh installed (run as root; safe to run again).
#   systemd/uninstall.sh          keeps /etc/lancelotd (your config)
#   systemd/uninstall.sh --purge  removes it too
# PREFIX as for install.sh; one that is not a venv install.sh made is refused, not removed.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=systemd/prefix.sh
. "$SRC/systemd/prefix.sh"
BIN=/usr/local/bin
[ "$(id -u)" = 0 ] || refuse "run as root"
case "${1:-}" in
    ""|--purge) ;;
    *) refuse "usage: uninstall.sh [--purge]" ;;
esac
check_prefix
if [ -e "$PREFIX" ] && { [ ! -e "$PREFIX/pyvenv.cfg" ] || [ ! -e "$PREFIX/bin/lancelotd" ]; }; then
    refuse "$PREFIX is not a lancelotd venv made by install.sh: not removing it"
fi
if [ -d /run/systemd/system ]; then
    systemctl disable --now lancelotd.socket lancelotd.service 2>/dev/null || true
fi
rm -f /etc/systemd/system/lancelotd.service /etc/systemd/system/lancelotd.socket
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
for cmd in lancelotd lancelot; do  # only our links, never another program of that name
    if [ -L "$BIN/$cmd" ] && [ "$(readlink "$BIN/$cmd")" = "$PREFIX/bin/$cmd" ]; then
        rm -f "$BIN/$cmd"
    fi
done
rm -rf "$PREFIX"
if [ "${1:-}" = "--purge" ]; then
    rm -rf /etc/lancelotd
fi
echo "uninstall.sh: removed"
