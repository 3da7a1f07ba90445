"""What the guest kit is made of: its Debian packages, kernel modules and guest-side scripts
(the inputs :func:`statecapture.testing.kit.recipe_key` hashes).
"""

from __future__ import annotations

# Debian packages the kit is made of.  The kernel meta package is resolved to
# its versioned image package at build time.
_KERNEL_META = "linux-image-cloud-amd64"
_PACKAGES = ("busybox-static", "qemu-guest-agent")

# Modules loaded by /init, dependencies first (their own dependencies are
# resolved from modules.dep or the .ko's .modinfo and prepended).
_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "button",
    "evdev",
)

_LIBDIR = "/lib/x86_64-linux-gnu"

# ---------------------------------------------------------------------------
# Guest-side scripts
# ---------------------------------------------------------------------------

_INIT = r"""#!/bin/busybox sh
# statecapture test guest: PID 1.  It must never exit (that panics the kernel),
# so nothing here uses `set -e` and the script ends in an endless wait loop.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
log() {
    read -r _up _ </proc/uptime 2>/dev/null
    echo "sc-init: [${_up:-?}] $*" >/dev/console 2>/dev/null
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/sc /run/qemu-ga /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname sc-guest
log "kernel $(uname -r)"

while read -r mod; do
    [ -n "$mod" ] && { insmod "$mod" 2>/dev/null || log "insmod $mod failed"; }
done </etc/sc/modules

# Wait (max 5 s) until every virtio block device (virtio id 2) has a disk.
want=0
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0002 ] && want=$((want + 1))
done
i=0
while [ "$i" -lt 50 ]; do
    set -- /sys/block/vd*
    [ -e "$1" ] && have=$# || have=0
    [ "$have" -ge "$want" ] && break
    sleep 0.1
    i=$((i + 1))
done
log "modules loaded, $have/$want virtio disks"
/sbin/sc-mount-disks

sc_link_ports() {
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        name=$(cat "$p/name" 2>/dev/null)
        [ -n "$name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$name"
    done
}

sc_agent() {
    port=/dev/virtio-ports/org.qemu.guest_agent.0
    while :; do
        sc_link_ports
        if [ -e "$port" ]; then
            log "starting qemu-ga"
            LD_LIBRARY_PATH=/lib/x86_64-linux-gnu /usr/sbin/qemu-ga \
                -m virtio-serial -p "$port" -f /run/qemu-ga.pid \
                -t /run/qemu-ga -l /run/qemu-ga.log
            log "qemu-ga exited (rc=$?), restarting"
            sleep 1
        else
            sleep 0.2
        fi
    done
}

sc_ticks() {
    fmt=+%s.%N
    case "$(date +%s.%N)" in *N*) fmt=+%s ;; esac
    n=0
    while :; do
        if [ -d /data ]; then
            read -r up _ </proc/uptime
            echo "$((n + 1)) $(date $fmt) $up" >>/data/ticks && n=$((n + 1))
            sync
        fi
        sleep 0.1
    done
}

sc_hotplug() {
    last=""
    while :; do
        sleep 1
        set -- /sys/block/vd*
        if [ "$*" != "$last" ]; then
            last="$*"
            /sbin/sc-mount-disks
        fi
    done
}

sc_powerbutton() {
    for e in /sys/class/input/event*; do
        [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
        (dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null &&
            { log "ACPI power button"; /sbin/poweroff; }) &
    done
}

# Ticks first: once the agent answers, /data (if any) is mounted and
# /data/ticks has at least one line.
sc_ticks 2>/dev/null &
i=0
while [ -d /data ] && [ ! -s /data/ticks ] && [ "$i" -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
sc_agent &
sc_hotplug &
sc_powerbutton
log "ready"
while :; do
    wait
    sleep 1
done
"""

_MOUNT_DISKS = r"""#!/bin/busybox sh
# Mount every virtio disk holding ext4 that is not mounted yet:
# vda -> /data, vdb -> /data1, vdc -> /data2, ...  Vanished disks are lazily
# unmounted.  Never fails.
mkdir -p /run/sc
for m in /run/sc/seen.*; do
    [ -e "$m" ] || continue
    dev=${m##*.}
    [ -e "/sys/block/$dev" ] && continue
    mp=$(cat "$m")
    [ -n "$mp" ] && umount -l "$mp" 2>/dev/null && rmdir "$mp" 2>/dev/null
    rm -f "$m"
done
for p in /sys/block/vd?; do
    [ -e "$p" ] || continue
    dev=${p##*/}
    [ -e "/run/sc/seen.$dev" ] && continue
    [ -b "/dev/$dev" ] || continue
    idx=0
    for l in a b c d e f g h i j k l m n o p q r s t u v w x y z; do
        [ "vd$l" = "$dev" ] && break
        idx=$((idx + 1))
    done
    if [ "$idx" -eq 0 ]; then mp=/data; else mp=/data$idx; fi
    if grep -q " $mp " /proc/mounts; then
        echo "" >"/run/sc/seen.$dev"
        continue
    fi
    mkdir -p "$mp"
    if mount -t ext4 "/dev/$dev" "$mp" 2>/dev/null; then
        echo "$mp" >"/run/sc/seen.$dev"
        echo "sc-init: mounted /dev/$dev at $mp" >/dev/console 2>/dev/null
    else
        echo "" >"/run/sc/seen.$dev"
        rmdir "$mp" 2>/dev/null
        echo "sc-init: /dev/$dev is not ext4, not mounted" >/dev/console 2>/dev/null
    fi
done
exit 0
"""

_POWER = r"""#!/bin/busybox sh
# poweroff / halt / reboot / shutdown for a guest whose PID 1 is a plain shell
# (busybox's applets would signal init).  qemu-ga's guest-shutdown runs
# `/sbin/shutdown -P|-H|-r +0 "hypervisor initiated shutdown"`.
action=poweroff
case "${0##*/}" in
reboot) action=reboot ;;
halt) action=halt ;;
shutdown)
    for a in "$@"; do
        case "$a" in
        -r) action=reboot ;;
        -H) action=halt ;;
        -P) action=poweroff ;;
        esac
    done
    ;;
esac
echo "sc-init: $action" >/dev/console 2>/dev/null
mps=$(awk '$2 ~ /^\/data[0-9]*$/ {print $2}' /proc/mounts)
for mp in $mps; do fsfreeze --unfreeze "$mp" 2>/dev/null; done
sync
for mp in $mps; do umount "$mp" 2>/dev/null || mount -o remount,ro "$mp" 2>/dev/null; done
sync
exec /bin/busybox "$action" -f
"""

_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "sc-guest\n",
}

_POWER_NAMES = ("poweroff", "halt", "reboot", "shutdown")
