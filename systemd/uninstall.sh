#!/usr/bin/env bash
# Remove what systemd/install.sh installed (run as root; safe to run again).
#   systemd/uninstall.sh          keeps /etc/lancelotd (your config)
#   systemd/uninstall.sh --purge  removes it too
set -euo pipefail
PREFIX=${PREFIX-/opt/lancelotd}  # set but empty: refused below
# rm -rf "$PREFIX" below: refuse an empty, relative, '/'-like or unexpected PREFIX.
case "$PREFIX" in
    /*/*lancelotd|/*lancelotd) ;;
    *) echo "uninstall.sh: refusing PREFIX='$PREFIX': it must be an absolute path ending in 'lancelotd'" >&2
       exit 1 ;;
esac
case "$PREFIX" in
    *//*|*/./*|*/../*|*/.|*/..) echo "uninstall.sh: refusing PREFIX='$PREFIX': not a plain path" >&2; exit 1 ;;
esac
[ "$(realpath -m "$PREFIX")" != / ] || { echo "uninstall.sh: refusing PREFIX='$PREFIX'" >&2; exit 1; }
if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/bin/lancelotd" ]; then
    echo "uninstall.sh: refusing PREFIX='$PREFIX': it holds no bin/lancelotd, so install.sh did not make it" >&2
    exit 1
fi
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root" >&2; exit 1; }
if [ -d /run/systemd/system ]; then
    systemctl disable --now lancelotd.socket lancelotd.service 2>/dev/null || true
fi
rm -f /etc/systemd/system/lancelotd.service /etc/systemd/system/lancelotd.socket /etc/logrotate.d/lancelotd
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
rm -rf "$PREFIX"
if [ "${1:-}" = "--purge" ]; then
    rm -rf /etc/lancelotd
fi
echo "uninstall.sh: removed"
