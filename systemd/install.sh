#!/usr/bin/env bash
# Install lancelotd as a systemd service on a machine without the Debian package
# (run as root; safe to run again to upgrade).
#   systemd/install.sh
# Environment:
#   PREFIX    where the venv goes (default /opt/lancelotd; not under /home, /root, /run, /tmp,
#             /usr, /var or /etc: the unit could not run it, or it is not ours to remove)
#   PYTHON    the Python 3.11+ to build the venv with (default Debian's /usr/bin/python3; one
#             under /home, /root or /tmp is refused: the unit hides those from the service)
#   PIP_ARGS  extra pip arguments, e.g. "--no-index --find-links DIR"
# It puts the commands on PATH (/usr/local/bin), the config in /etc/lancelotd (never
# overwritten), the units in /etc/systemd/system; it enables nothing: the README's
# `systemctl enable --now lancelotd.socket lancelotd.service` does.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=systemd/prefix.sh
. "$SRC/systemd/prefix.sh"
PYTHON=${PYTHON:-/usr/bin/python3}
BIN=/usr/local/bin
[ "$(id -u)" = 0 ] || refuse "run as root"
check_prefix
if dpkg-query -W -f='${Status}' lancelotd 2>/dev/null | grep -q "ok installed"; then
    refuse "the Debian package lancelotd is installed; upgrade that instead (README, Install)"
fi

# The Python: one the service can run (the venv's python is a link to it).
py=$(command -v "$PYTHON") || refuse "no Python at '$PYTHON' (apt-get install python3-venv, or set PYTHON)"
py=$(realpath -- "$py")
case "$py" in
    /home/*|/root/*|/run/user/*|/tmp/*|/var/tmp/*)
        refuse "$PYTHON is $py, which the unit hides from the service (ProtectHome=, PrivateTmp=);" \
               "use Debian's /usr/bin/python3 or set PYTHON to one under /usr or /opt" ;;
esac
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || refuse "$py is older than Python 3.11"

# The package in its own venv.  A venv made with another Python is made again.
if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/pyvenv.cfg" ]; then
    refuse "$PREFIX exists and is not a venv made by install.sh"
fi
if [ -x "$PREFIX/bin/python" ] && [ "$(realpath "$PREFIX/bin/python")" != "$py" ]; then
    rm -rf "$PREFIX"
fi
[ -x "$PREFIX/bin/python" ] || "$py" -m venv "$PREFIX"
# shellcheck disable=SC2086
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check ${PIP_ARGS:-} --upgrade "$SRC"
for cmd in lancelotd lancelot; do
    ln -sfn "$PREFIX/bin/$cmd" "$BIN/$cmd"
done

# The config: never overwrite the operator's.
install -d -m 0755 /etc/lancelotd
if [ -e /etc/lancelotd/lancelotd.toml ]; then
    echo "install.sh: keeping existing /etc/lancelotd/lancelotd.toml"
else
    install -m 0644 "$SRC/etc/lancelotd.toml" /etc/lancelotd/lancelotd.toml
fi
"$PREFIX/bin/lancelotd" check-config -c /etc/lancelotd/lancelotd.toml

# The units name the package's /usr/bin/lancelotd: here it is the venv's.
for unit in lancelotd.service lancelotd.socket; do
    sed "s|/usr/bin/lancelotd|$PREFIX/bin/lancelotd|g" "$SRC/systemd/$unit" > "/etc/systemd/system/$unit.new"
    chmod 0644 "/etc/systemd/system/$unit.new"
    mv "/etc/systemd/system/$unit.new" "/etc/systemd/system/$unit"
done
# The service logs to the journal: its file system is read-only, so a log file cannot work
# under the unit, and the logrotate snippet earlier versions installed is removed.
# (etc/logrotate/lancelotd is for classic daemon mode; the README says how.)
if cmp -s "$SRC/etc/logrotate/lancelotd" /etc/logrotate.d/lancelotd; then
    rm -f /etc/logrotate.d/lancelotd
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "install.sh: installed in $PREFIX, commands in $BIN;" \
     "start with: systemctl enable --now lancelotd.socket lancelotd.service"
