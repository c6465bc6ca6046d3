#!/bin/bash
# The shell half of tests/sdsandbox.py: the steps that must run as PID 1 of
# the new namespaces, before systemd takes over.  sdsandbox.py starts
#
#   unshare --pid --fork --kill-child --mount --uts --ipc [--net] --propagation private \
#       -- /bin/bash sdsandbox.sh stage1
#
# with a pty as stdio (it becomes /dev/console) and this environment:
#   SDSB_STATE_DIR    host directory for the pid file and the overlay's tmpfs
#   SDSB_CGROUP       name of the sandbox's cgroup at the root of the cgroup2 hierarchy
#   SDSB_PRIVATE_NET  1 when the sandbox has its own network namespace
#   SDSB_SYSTEMD      the systemd binary (/lib/systemd/systemd)
#   SDSB_LOWER        the root's read-only lower layer (default /, the host's own; another
#                     directory holding a whole OS tree boots that OS's systemd)
#
# Subcommands:
#   stage1          PID 1 of the new pid namespace: give the sandbox its own cgroup, then stage2
#   stage2          build the throw-away root, pivot into it, exec systemd
#   rmcgroup        after poweroff: remove the sandbox's cgroup (run in a private mount namespace)
#   sweep PREFIX    remove empty cgroups PREFIX* older than a minute, left by killed sessions
set -euo pipefail
S=${SDSB_STATE_DIR:?}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mount_cgroup2() {  # the whole cgroup2 hierarchy (as our cgroup namespace sees it) at $S/cg2
    mkdir -p "$S/cg2"
    mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$S/cg2"
}

remove_tree() {  # depth-first rmdir of a cgroup, retried while its last processes are reaped
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$1" ] || return 0
        sleep 0.1
    done
    echo "sdsandbox.sh: could not remove cgroup $1" >&2
    return 1
}

stage1() {
    # Moving ourselves into the sandbox's cgroup here, after the pid unshare,
    # keeps the `unshare` parent out of it (systemd cannot see that process);
    # only then the cgroup namespace, so that systemd sees this cgroup as "/".
    stty -onlcr 2>/dev/null || true
    mount_cgroup2
    mkdir -p "$S/cg2/${SDSB_CGROUP:?}"
    echo 0 > "$S/cg2/$SDSB_CGROUP/cgroup.procs"
    umount -n "$S/cg2"
    exec unshare --cgroup -- /bin/bash "$HERE/sdsandbox.sh" stage2
}

stage2() {
    # /proc is still the host's: this is our PID as the host sees it (`read`
    # is a builtin, so /proc/self is this shell, which execs systemd below).
    local hostpid _ T R n tty drop
    read -r hostpid _ < /proc/self/stat
    echo "$hostpid" > "$S/pid"
    T=$S/t
    mkdir -p "$T"
    # The root: the host's / (or SDSB_LOWER) as the read-only lower layer, every write in a tmpfs.
    mount -n -t tmpfs -o mode=755 sdsb-upper "$T"
    mkdir -p "$T/upper" "$T/work" "$T/root"
    mount -n -t overlay overlay -o "lowerdir=${SDSB_LOWER:-/},upperdir=$T/upper,workdir=$T/work" "$T/root"
    R=$T/root

    mkdir -p "$R/etc/systemd/system"
    cat > "$R/etc/systemd/system/sandbox.target" <<'UNIT'
[Unit]
Description=lancelotd test sandbox (sysinit.target and the bus; nothing from multi-user.target)
Requires=sysinit.target
After=sysinit.target
Wants=dbus.socket
AllowIsolate=yes
UNIT
    # Units that make no sense here, or would reach out of the sandbox.
    for n in apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
             dpkg-db-backup.timer dpkg-db-backup.service man-db.timer man-db.service \
             e2scrub_all.timer e2scrub_all.service e2scrub_reap.service fstrim.timer fstrim.service \
             systemd-timesyncd.service sys-kernel-debug.mount sys-kernel-tracing.mount \
             sys-kernel-config.mount sys-fs-fuse-connections.mount proc-sys-fs-binfmt_misc.automount \
             systemd-binfmt.service systemd-sysctl.service systemd-modules-load.service \
             kmod-static-nodes.service getty@tty1.service; do
        ln -sfn /dev/null "$R/etc/systemd/system/$n"
    done

    # API file systems: fresh /proc (kernel knobs read-only), read-only /sys,
    # cgroup2 rooted at our cgroup namespace, a minimal /dev, tmpfs /run and /tmp.
    mount -n -t tmpfs -o mode=755,nosuid,nodev sdsb-run "$R/run"
    mount -n -t tmpfs -o mode=1777,nosuid,nodev sdsb-tmp "$R/tmp"
    mount -n -t proc -o nosuid,nodev,noexec proc "$R/proc"
    mount -n --bind "$R/proc/sys" "$R/proc/sys"
    mount -n -o remount,bind,ro "$R/proc/sys"
    if [ -e "$R/proc/sysrq-trigger" ]; then
        mount -n --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
        mount -n -o remount,bind,ro "$R/proc/sysrq-trigger"
    fi
    mount -n -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
    mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
    mount -n -t tmpfs -o mode=755,nosuid sdsb-dev "$R/dev"
    for n in null zero full random urandom tty; do
        touch "$R/dev/$n"
        mount -n --bind "/dev/$n" "$R/dev/$n"
    done
    mkdir -p "$R/dev/pts" "$R/dev/shm"
    mount -n -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    mount -n -t tmpfs -o mode=1777,nosuid,nodev sdsb-shm "$R/dev/shm"
    ln -s /proc/self/fd "$R/dev/fd"
    ln -s /proc/self/fd/0 "$R/dev/stdin"
    ln -s /proc/self/fd/1 "$R/dev/stdout"
    ln -s /proc/self/fd/2 "$R/dev/stderr"
    # /dev/console: our pty (systemd writes only to a real tty); sdsandbox.py logs it.
    touch "$R/dev/console"
    tty=$(readlink /proc/self/fd/2 || true)
    case "$tty" in
        /dev/pts/*) mount -n --bind "$tty" "$R/dev/console" ;;
        *)          mount -n --bind /dev/null "$R/dev/console" ;;
    esac

    cd "$R"
    pivot_root . .
    umount -n -l .
    cd /
    # Capabilities no unit gets: no kernel modules, clock, raw I/O, ...; and no
    # net_admin when the network is the host's.
    drop="sys_module,sys_rawio,sys_time,syslog,mac_admin,mac_override,wake_alarm,block_suspend"
    drop="$drop,audit_control,sys_pacct,perfmon,bpf"
    if [ "${SDSB_PRIVATE_NET:-0}" != 1 ]; then drop="$drop,net_admin"; fi
    exec </dev/null >/dev/console 2>&1
    exec setpriv --bounding-set "-${drop//,/,-}" -- /usr/bin/env -i container=lxc \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "${SDSB_SYSTEMD:-/lib/systemd/systemd}" --unit=sandbox.target
}

rmcgroup() {
    mount_cgroup2
    local rc=0
    if [ -d "$S/cg2/${SDSB_CGROUP:?}" ]; then remove_tree "$S/cg2/$SDSB_CGROUP" || rc=1; fi
    umount -n "$S/cg2"
    return $rc
}

sweep() {
    local prefix=${1:?} d
    mount_cgroup2
    for d in "$S/cg2/$prefix"*; do
        [ -d "$d" ] || continue
        # Only a dead sandbox: no process left anywhere in it, and not one just being set up.
        grep -qx 'populated 0' "$d/cgroup.events" 2>/dev/null || continue
        [ -n "$(find "$d" -maxdepth 0 -mmin +1)" ] || continue
        remove_tree "$d" || true
    done
    umount -n "$S/cg2"
}

case "${1:-}" in
    stage1|stage2|rmcgroup) "$1" ;;
    sweep) sweep "${2:-}" ;;
    *) echo "usage: sdsandbox.sh stage1|stage2|rmcgroup|sweep PREFIX" >&2; exit 2 ;;
esac
