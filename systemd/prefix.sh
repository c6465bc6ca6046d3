# Sourced by install.sh and uninstall.sh: the PREFIX both work on, checked the same way.
# A PREFIX the shipped unit cannot run from, or that is not a directory of its own, is refused:
# ProtectHome= hides /home, /root and /run/user from the service, PrivateTmp= gives it its own
# /tmp and /var/tmp, and uninstall.sh removes the whole PREFIX.
PREFIX=${PREFIX-/opt/lancelotd}

refuse() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

check_prefix() {
    local p
    [ -n "$PREFIX" ] || refuse "PREFIX is empty"
    case "$PREFIX" in
        /*) ;;
        *) refuse "PREFIX must be an absolute path, not '$PREFIX'" ;;
    esac
    case "$PREFIX" in
        *[!A-Za-z0-9/._+-]*) refuse "PREFIX '$PREFIX' holds characters a unit's ExecStart= cannot take as they are" ;;
    esac
    case "$PREFIX" in  # said plainly: no '.', '..' or empty component to resolve elsewhere
        /) ;;  # refused below, as a system directory
        *//*|*/./*|*/../*|*/.|*/..|*/) refuse "PREFIX '$PREFIX' is not a plain path (no '.', '..' or '//')" ;;
    esac
    p=$(realpath -m -- "$PREFIX")
    case "$p" in
        /|/bin|/boot|/dev|/etc|/lib|/lib64|/media|/mnt|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/var \
        | /usr/*|/var/*|/etc/*|/home|/home/*|/root/*|/run/*|/tmp/*|/proc/*|/sys/*|/dev/*|/boot/*)
            refuse "PREFIX '$PREFIX' is not a directory of its own that the service can run from" \
                   "(not a system directory, nor under /usr, /var, /etc, /home, /root, /run or /tmp;" \
                   "for example /opt/lancelotd or /srv/lancelotd)" ;;
    esac
    PREFIX=$p
}
