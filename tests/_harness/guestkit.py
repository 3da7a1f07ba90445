"""Tiny real Linux test guest for the libvirt-backed tests.

The kit is a Debian cloud kernel plus a busybox initramfs that

* loads the virtio modules (PCI, block, console) and the ACPI power button,
* mounts every virtio disk that holds ext4: ``/dev/vda`` at ``/data``,
  ``/dev/vdb`` at ``/data1``, ``/dev/vdc`` at ``/data2`` ... (absent or
  non-ext4 disks are skipped; disks hot-plugged later are mounted within ~1 s,
  see :data:`GUEST_MOUNT_HELPER`),
* appends a line ``"<counter> <epoch> <uptime>"`` (e.g. ``"17 1795649375
  4.72"``) to ``/data/ticks``, then ``sync``, then sleeps 0.1 s, forever.
  Under TCG a line takes 0.15-0.4 s (more on a busy host).  The counter lives
  only in guest memory, starts at 1 and grows by one per written line, so a
  managed-save/restore continues it while a fresh boot restarts it at 1
  (appending to an existing file).  ``<epoch>`` is ``date +%s`` (busybox has
  no ``%N``), ``<uptime>`` is the first field of ``/proc/uptime`` (0.01 s
  resolution).  Both are guest clocks and under TCG both stop while the
  domain is paused or saved (no jump after resume/restore), so use the counter
  for continuity and uptime gaps for stalls.  While the filesystem is frozen
  the writer blocks, so no line is written (the freeze shows as an uptime gap),
* runs ``qemu-ga`` on ``/dev/virtio-ports/org.qemu.guest_agent.0`` (fsfreeze,
  guest-exec, guest-file-*, guest-shutdown all work).  It starts only after
  the disks are mounted and the first tick is written, so "agent answers"
  implies "``/data/ticks`` exists",
* powers off on ``/sbin/poweroff``, ``/sbin/shutdown`` (what qemu-ga's
  guest-shutdown runs) and on an ACPI power-button press.

Everything is built from Debian packages fetched with ``apt-get download``
(never installed on the host) and cached, see :func:`ensure_kit`.

Typical use::

    kit = ensure_kit()
    root = make_embed_root()                # short dir under /tmp + qemu.conf
    conn = open_embed(root)                 # event loop + qemu:///embed?root=
    disk = make_data_disk(tmp / "data.qcow2")
    dom = conn.defineXML(domain_xml("t1", kit, [disk], log_path=tmp / "console.log"))
    dom.create()

Only the standard library is used at import time; libvirt is imported lazily
by :func:`start_event_loop` / :func:`open_embed`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import quoteattr

if TYPE_CHECKING:  # pragma: no cover
    import libvirt

__all__ = [
    "AGENT_CHANNEL",
    "DATA_MOUNTS",
    "GUEST_MOUNT_HELPER",
    "KERNEL_CMDLINE",
    "MAX_EMBED_ROOT_LEN",
    "RECIPE_VERSION",
    "Kit",
    "KitBuildError",
    "default_cache_dir",
    "domain_xml",
    "ensure_kit",
    "guest_mountpoint",
    "make_data_disk",
    "make_embed_root",
    "open_embed",
    "prepare_embed_root",
    "recipe_key",
    "start_event_loop",
]

#: Bump when the build procedure changes in a way the hash below cannot see.
#: The cache key is ``v<RECIPE_VERSION>-<hash of the recipe inputs>``, so
#: editing the init script, the module list or the package list also rebuilds.
RECIPE_VERSION = "1"

#: Name of the virtio-serial channel qemu-ga listens on.
AGENT_CHANNEL = "org.qemu.guest_agent.0"

#: Kernel command line used by :func:`domain_xml`.
KERNEL_CMDLINE = "console=ttyS0 loglevel=4 tsc=reliable no_timer_check"

#: Guest mount points for the first few virtio disks (vda, vdb, ...).
DATA_MOUNTS = ("/data", "/data1", "/data2", "/data3")

#: Guest helper that mounts every not yet mounted ext4 virtio disk (and
#: lazily unmounts vanished ones).  It runs at boot and whenever the set of
#: ``/sys/block/vd*`` changes (polled every second), so tests normally need not
#: call it; ``guest_exec(dom, [GUEST_MOUNT_HELPER])`` forces a rescan.
#: The mount point follows the *guest kernel's* disk name, which is assigned
#: in probe order, not libvirt's ``<target dev>``: at boot they agree (the
#: i-th disk of :func:`domain_xml` is vd<a+i>), but a hot-plugged disk gets the
#: first free guest name whatever its libvirt target says.
GUEST_MOUNT_HELPER = "/sbin/sc-mount-disks"

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


# ---------------------------------------------------------------------------
# Public API: kit
# ---------------------------------------------------------------------------


class KitBuildError(RuntimeError):
    """Building the guest kit failed (missing tool, apt failure, ...)."""


@dataclass(frozen=True)
class Kit:
    """A built guest: boot it with direct kernel boot (see :func:`domain_xml`)."""

    kernel: Path
    initrd: Path


def recipe_key() -> str:
    """Cache key of the current recipe: ``v<RECIPE_VERSION>-<12 hex digits>``."""
    h = hashlib.sha256()
    for part in (
        RECIPE_VERSION,
        _INIT,
        _MOUNT_DISKS,
        _POWER,
        json.dumps(_ETC_FILES, sort_keys=True),
        _KERNEL_META,
        ",".join(_PACKAGES),
        ",".join(_MODULES),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return f"v{RECIPE_VERSION}-{h.hexdigest()[:12]}"


def default_cache_dir() -> Path:
    """``$STATECAPTURE_KIT_DIR`` or ``~/.cache/statecapture/guestkit``."""
    env = os.environ.get("STATECAPTURE_KIT_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "statecapture" / "guestkit"


def ensure_kit(cache_dir: Path | None = None) -> Kit:
    """Return the guest kit, building it first if the cache lacks it.

    The kit lives in ``<cache_dir>/<recipe_key()>/`` (``vmlinuz``,
    ``initrd.img``, ``kit.json``); ``kit.json`` is written last, so its
    presence marks a complete build.  Builds are serialised with an exclusive
    ``flock`` on ``<cache_dir>/.lock``, so concurrent callers (e.g. two pytest
    processes) build once and the other waits.  A cold build downloads ~28 MB
    of Debian packages and takes 5-10 s.  Old recipe directories are kept
    (a process of another checkout may still boot from them); delete them by
    hand when the cache grows (~18 MB each).

    Needs ``apt-get`` with package lists (``apt-get update``), ``dpkg-deb``
    and ``ldd``; raises :class:`KitBuildError` on failure.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / recipe_key()
    kit = _load_kit(final)
    if kit is not None:
        return kit
    cache.mkdir(parents=True, exist_ok=True)
    with _flock(cache / ".lock"):
        kit = _load_kit(final)
        if kit is not None:
            return kit
        # We hold the lock, so any .build-* dir is left over from a killed build.
        for stale in cache.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build(tmp / "work", tmp / "out")
            if final.exists():  # incomplete leftover from a killed build
                shutil.rmtree(final)
            os.rename(tmp / "out", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kit = _load_kit(final)
        if kit is None:  # pragma: no cover - _build always writes kit.json
            raise KitBuildError(f"build finished but {final} is incomplete")
        return kit


# ---------------------------------------------------------------------------
# Public API: disks, XML, embed root
# ---------------------------------------------------------------------------


def make_data_disk(
    path: Path,
    *,
    size_mib: int = 64,
    fmt: str = "qcow2",
    files: dict[str, bytes] | None = None,
) -> Path:
    """Create an ext4 data disk image at *path* (mode 0600) and return it.

    The filesystem is made with ``mkfs.ext4 -d`` on a raw file (inode tables
    and journal fully initialised, so the guest does no lazy-init I/O), then
    converted with ``qemu-img convert`` when *fmt* is ``"qcow2"``.  *files*
    maps relative paths (``"a/b.txt"``) to contents, written into the
    filesystem root.  An existing *path* is replaced.
    """
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"fmt must be 'qcow2' or 'raw', not {fmt!r}")
    if size_mib < 8:
        raise ValueError("size_mib must be at least 8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mkdisk-", dir=path.parent) as td:
        tdp = Path(td)
        content = tdp / "content"
        content.mkdir()
        for rel, data in (files or {}).items():
            rp = Path(rel)
            if rp.is_absolute() or ".." in rp.parts or not rp.parts:
                raise ValueError(f"bad file name for data disk: {rel!r}")
            dest = content / rp
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        raw = tdp / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        _run(
            [
                _tool("mkfs.ext4"),
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-L",
                "scdata",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                "-d",
                str(content),
                str(raw),
            ]
        )
        if fmt == "qcow2":
            out = tdp / "disk.qcow2"
            _run(
                [_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)]
            )
        else:
            out = raw
        os.chmod(out, 0o600)
        os.replace(out, path)
    return path


def guest_mountpoint(index: int) -> str:
    """Guest mount point of the *index*-th virtio disk (0 -> ``/data``, 1 -> ``/data1``)."""
    return "/data" if index == 0 else f"/data{index}"


def domain_xml(
    name: str,
    kit: Kit,
    disks: list[Path],
    *,
    agent: bool = True,
    memory_mib: int = 256,
    log_path: Path | None = None,
    disk_formats: list[str] | None = None,
) -> str:
    """Libvirt domain XML for the test guest.

    * ``type='qemu'`` (TCG; KVM hangs on these machines), machine ``pc``,
      1 vCPU, ACPI, direct kernel boot of *kit* with :data:`KERNEL_CMDLINE`.
    * ``disks[i]`` becomes virtio disk ``vd<a+i>`` (first one is ``vda``);
      its format is ``disk_formats[i]`` or, when *disk_formats* is None,
      detected from the file header (qcow2 magic, else raw).
    * Serial console (ttyS0) goes to *log_path* (libvirt opens it in append
      mode, so restarts of the same domain accumulate in one file; must be
      absolute) or to a pty when None.
    * With *agent*, a virtio-serial ``org.qemu.guest_agent.0`` unix channel
      whose socket path libvirt generates.
    * No network, no graphics/video, no USB, no balloon;
      ``on_poweroff=destroy``, ``on_reboot=restart``, ``on_crash=destroy``.

    Validates against libvirt's ``domain.rng``.
    """
    if len(disks) > 26:
        raise ValueError("at most 26 disks")
    if disk_formats is not None and len(disk_formats) != len(disks):
        raise ValueError("disk_formats must have one entry per disk")
    lines = [
        "<domain type='qemu'>",
        f"  <name>{_xml_text(name)}</name>",
        f"  <memory unit='MiB'>{int(memory_mib)}</memory>",
        "  <vcpu>1</vcpu>",
        "  <os>",
        "    <type arch='x86_64' machine='pc'>hvm</type>",
        f"    <kernel>{_xml_text(str(Path(kit.kernel).absolute()))}</kernel>",
        f"    <initrd>{_xml_text(str(Path(kit.initrd).absolute()))}</initrd>",
        f"    <cmdline>{_xml_text(KERNEL_CMDLINE)}</cmdline>",
        "  </os>",
        "  <features>",
        "    <acpi/>",
        "  </features>",
        "  <clock offset='utc'/>",
        "  <on_poweroff>destroy</on_poweroff>",
        "  <on_reboot>restart</on_reboot>",
        "  <on_crash>destroy</on_crash>",
        "  <devices>",
    ]
    for i, disk in enumerate(disks):
        disk = Path(disk).absolute()
        fmt = disk_formats[i] if disk_formats is not None else _detect_format(disk)
        lines += [
            "    <disk type='file' device='disk'>",
            f"      <driver name='qemu' type={quoteattr(fmt)}/>",
            f"      <source file={quoteattr(str(disk))}/>",
            f"      <target dev='vd{chr(ord('a') + i)}' bus='virtio'/>",
            "    </disk>",
        ]
    lines.append("    <controller type='usb' model='none'/>")
    if log_path is not None:
        lp = quoteattr(str(Path(log_path).absolute()))
        lines += [
            "    <serial type='file'>",
            f"      <source path={lp}/>",
            "      <target port='0'/>",
            "    </serial>",
        ]
    else:
        lines += [
            "    <serial type='pty'>",
            "      <target port='0'/>",
            "    </serial>",
        ]
    if agent:
        lines += [
            "    <channel type='unix'>",
            f"      <target type='virtio' name='{AGENT_CHANNEL}'/>",
            "    </channel>",
        ]
    lines += [
        "    <memballoon model='none'/>",
        "  </devices>",
        "</domain>",
    ]
    return "\n".join(lines) + "\n"


#: Longest embed root accepted by :func:`prepare_embed_root`.  libvirt puts
#: the agent socket at ``<root>/lib/qemu/channel/target/domain-<id>-<first 20
#: chars of name>/org.qemu.guest_agent.0`` and a UNIX socket path must be
#: < 108 bytes, else ``virDomainCreate`` fails with "UNIX socket path ... too
#: long".  pytest's ``tmp_path`` is far too long: use :func:`make_embed_root`.
MAX_EMBED_ROOT_LEN = 28


def make_embed_root(prefix: str = "sce-") -> Path:
    """Create a fresh, short embed root under ``/tmp`` and prepare it.

    Returns e.g. ``/tmp/sce-k2j4x9_a``; the caller removes it (after the
    domains are gone).
    """
    from . import isolation

    root = isolation.track(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    prepare_embed_root(root)
    return root


def prepare_embed_root(root: Path) -> None:
    """Create *root* and write ``root/etc/qemu.conf`` for the embedded driver.

    QEMU runs as root:root and writes its own log file (``stdio_handler =
    "file"``: the embedded driver has no virtlogd); ``remember_owner = 0``
    avoids ownership xattrs on images.  Raises :class:`ValueError` when the
    absolute *root* is longer than :data:`MAX_EMBED_ROOT_LEN` characters
    (socket paths below it would get too long).
    """
    if len(str(Path(root).absolute())) > MAX_EMBED_ROOT_LEN:
        raise ValueError(
            f"embed root {root} is longer than {MAX_EMBED_ROOT_LEN} chars: libvirt's "
            "UNIX socket paths below it would exceed 107 bytes; use make_embed_root()"
        )
    etc = Path(root) / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "qemu.conf").write_text(
        "# written by tests/_harness/guestkit.py\n"
        'user = "root"\n'
        'group = "root"\n'
        "# no virtlogd in embed mode: QEMU's stdout/stderr go straight to a file\n"
        'stdio_handler = "file"\n'
        "# no ownership-remembering xattrs (they only cause warnings here)\n"
        "remember_owner = 0\n"
    )


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread.

    Idempotent.  Note the in-process driver logs to the process's stderr
    (e.g. ``tainted: high-privileges`` warnings); that is harmless.  Must happen before opening ``qemu:///embed`` (and before
    registering domain event callbacks).
    """
    global _event_loop_started
    import libvirt

    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def _loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=_loop, name="libvirt-event-loop", daemon=True).start()
        _event_loop_started = True


def open_embed(root: Path) -> libvirt.virConnect:
    """Start the event loop, write qemu.conf and open ``qemu:///embed?root=<root>``.

    libvirt allows only one embed root per process.  Domains outlive the
    connection and the process: destroy and undefine what you start.
    """
    import libvirt

    start_event_loop()
    root = Path(root).absolute()
    prepare_embed_root(root)
    conn = libvirt.open(f"qemu:///embed?root={root}")
    if conn is None:  # pragma: no cover - older bindings
        raise RuntimeError(f"cannot open embed root {root}")
    return conn


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------


def _load_kit(d: Path) -> Kit | None:
    if not (d / "kit.json").is_file():
        return None
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return Kit(kernel=kernel, initrd=initrd)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _tool(name: str) -> str:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise KitBuildError(f"{name} not found; run scripts/install-deps.sh")


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except OSError as e:
        raise KitBuildError(f"cannot run {argv[0]}: {e}") from e
    if p.returncode != 0:
        raise KitBuildError(f"{' '.join(argv)} failed (rc={p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


def _apt_download(pkgs: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` *pkgs* into *dest*; return package name -> .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    try:
        _run([_tool("apt-get"), "-q", "-o", "APT::Sandbox::User=root", "download", *pkgs], cwd=dest)
    except KitBuildError as e:
        raise KitBuildError(
            f"{e}\n(are the apt package lists present? `apt-get update` or scripts/install-deps.sh)"
        ) from e
    got: dict[str, Path] = {}
    for deb in set(dest.glob("*.deb")) - before:
        got[deb.name.split("_", 1)[0]] = deb
    missing = [p for p in pkgs if p not in got]
    if missing:
        raise KitBuildError(f"apt-get download did not produce {missing}")
    return got


def _deb_field(deb: Path, field: str) -> str:
    return _run([_tool("dpkg-deb"), "-f", str(deb), field]).strip()


def _dep_names(depends: str) -> list[str]:
    """Package names of a Depends field (first alternative, no versions/arch)."""
    out = []
    for item in depends.split(","):
        first = item.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            out.append(name)
    return out


def _kernel_image_package() -> str:
    """Resolve ``linux-image-cloud-amd64`` to its versioned image package."""
    out = _run([_tool("apt-cache"), "depends", "--important", _KERNEL_META])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise KitBuildError(
        f"cannot resolve {_KERNEL_META} (no apt lists? run `apt-get update`):\n{out}"
    )


def _build(work: Path, out: Path) -> None:
    t0 = time.monotonic()
    work.mkdir(parents=True)
    out.mkdir(parents=True)
    debs_dir, ext = work / "debs", work / "root"
    image_pkg = _kernel_image_package()
    debs = _apt_download([image_pkg, *_PACKAGES], debs_dir)
    for deb in debs.values():
        _run([_tool("dpkg-deb"), "-x", str(deb), str(ext)])
    versions = {name: _deb_field(deb, "Version") for name, deb in debs.items()}

    # --- kernel --------------------------------------------------------
    vmlinuz = sorted((ext / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise KitBuildError(f"expected one vmlinuz in {image_pkg}, got {vmlinuz}")
    kver = vmlinuz[0].name[len("vmlinuz-") :]
    moddir = ext / "lib" / "modules" / kver

    files: dict[str, bytes] = {}  # initramfs path -> content (mode decided below)
    modes: dict[str, int] = {}
    symlinks: dict[str, str] = {}

    # --- modules -------------------------------------------------------
    order = _resolve_modules(moddir, _MODULES)
    modlist = []
    for name, path in order:
        dest = f"lib/modules/{name}.ko"
        files[dest] = _read_module(path)
        modes[dest] = 0o644
        modlist.append("/" + dest)

    # --- busybox -------------------------------------------------------
    busybox = ext / "bin" / "busybox"
    files["bin/busybox"] = busybox.read_bytes()
    modes["bin/busybox"] = 0o755
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet.rsplit("/", 1)[-1] in _POWER_NAMES:
            continue
        symlinks[applet] = "/bin/busybox"
    symlinks["bin/sh"] = "/bin/busybox"

    # --- qemu-ga + shared libraries --------------------------------------
    qga = ext / "usr" / "sbin" / "qemu-ga"
    files["usr/sbin/qemu-ga"] = qga.read_bytes()
    modes["usr/sbin/qemu-ga"] = 0o755
    qga_deb = debs["qemu-guest-agent"]
    libs, interp = _resolve_libs(qga, ext, _dep_names(_deb_field(qga_deb, "Depends")), debs_dir)
    for soname, real in libs.items():
        dest = f"{_LIBDIR.lstrip('/')}/{soname}"
        files[dest] = real.read_bytes()
        modes[dest] = 0o755
    files[interp.lstrip("/")] = Path(os.path.realpath(_host_or_ext(interp, ext))).read_bytes()
    modes[interp.lstrip("/")] = 0o755

    # --- scripts and config ----------------------------------------------
    files["init"] = _INIT.encode()
    modes["init"] = 0o755
    files["sbin/sc-mount-disks"] = _MOUNT_DISKS.encode()
    modes["sbin/sc-mount-disks"] = 0o755
    files["sbin/sc-power"] = _POWER.encode()
    modes["sbin/sc-power"] = 0o755
    for n in _POWER_NAMES:
        symlinks[f"sbin/{n}"] = "sc-power"
    files["etc/sc/modules"] = ("\n".join(modlist) + "\n").encode()
    modes["etc/sc/modules"] = 0o644
    for rel, text in _ETC_FILES.items():
        files[rel] = text.encode()
        modes[rel] = 0o644
    symlinks["var/run"] = "/run"

    dirs = {"dev", "proc", "sys", "run", "tmp", "root", "var", "data", "etc/sc", "lib64"}
    cpio = _newc_archive(files, modes, symlinks, dirs)
    (out / "initrd.img").write_bytes(cpio)
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    manifest = {
        "recipe": recipe_key(),
        "kernel_version": kver,
        "packages": versions,
        "modules": [n for n, _ in order],
        "libraries": sorted(libs),
        "interpreter": interp,
        "initrd_bytes": len(cpio),
        "cmdline": KERNEL_CMDLINE,
        "build_seconds": round(time.monotonic() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _host_or_ext(path: str, ext: Path) -> Path:
    cand = ext / path.lstrip("/")
    return cand if cand.exists() else Path(path)


# --- kernel modules ----------------------------------------------------------


def _modname(p: Path) -> str:
    n = p.name
    for suf in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if n.endswith(suf):
            n = n[: -len(suf)]
            break
    return n.replace("-", "_")


def _read_module(p: Path) -> bytes:
    data = p.read_bytes()
    if p.name.endswith(".xz"):
        import lzma

        return lzma.decompress(data)
    if p.name.endswith(".gz"):
        return gzip.decompress(data)
    if p.name.endswith(".zst"):
        return _run_bytes([_tool("zstd"), "-d", "-c", str(p)])
    return data


def _run_bytes(argv: list[str]) -> bytes:
    p = subprocess.run(argv, capture_output=True, check=False)
    if p.returncode != 0:
        raise KitBuildError(f"{' '.join(argv)} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


def _modinfo_depends(ko: bytes) -> list[str]:
    """``depends=`` of a module, read from its ELF ``.modinfo`` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise KitBuildError("not an ELF64 kernel module")
    e_shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name = struct.unpack_from("<I", ko, off)[0]
        offset, size = struct.unpack_from("<QQ", ko, off + 0x18)
        return name, offset, size

    _, stroff, _ = sh(e_shstrndx)
    for i in range(e_shnum):
        name, off, size = sh(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name : end] == b".modinfo":
            for entry in ko[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    return []


def _resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Topologically ordered (name, path) for *wanted* plus dependencies.

    Uses ``modules.dep`` when the package ships it (Debian's does not: depmod
    runs in postinst), else each module's ``.modinfo``.  Built-in modules
    (``modules.builtin``) are skipped.
    """
    index: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index[_modname(p)] = p
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        builtin = {
            _modname(Path(line.strip())) for line in bfile.read_text().splitlines() if line.strip()
        }
    depfile = moddir / "modules.dep"
    deps: dict[str, list[str]] = {}
    if depfile.exists():
        for line in depfile.read_text().splitlines():
            if ":" in line:
                mod, rest = line.split(":", 1)
                deps[_modname(Path(mod))] = [_modname(Path(d)) for d in rest.split()]

    def depends(name: str) -> list[str]:
        if name not in deps:
            deps[name] = [d.replace("-", "_") for d in _modinfo_depends(_read_module(index[name]))]
        return deps[name]

    order: list[tuple[str, Path]] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in stack:
            raise KitBuildError(f"module dependency cycle: {(*stack, name)}")
        if name not in index:
            raise KitBuildError(f"kernel module {name} not found in {moddir}")
        for d in depends(name):
            visit(d, (*stack, name))
        done.add(name)
        order.append((name, index[name]))

    for w in wanted:
        visit(w.replace("-", "_"), ())
    return order


# --- shared libraries --------------------------------------------------------

_LDD_RE = re.compile(r"^\s*(\S+)\s*=>\s*(not found|\S+)")
_INTERP_RE = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(")


def _resolve_libs(
    binary: Path, ext: Path, depends: list[str], debs_dir: Path
) -> tuple[dict[str, Path], str]:
    """Shared libraries of *binary* (soname -> real file) and its interpreter.

    Runs ``ldd`` with the extracted package roots first on the library path.
    A library the host lacks is fetched by downloading the binary's Depends
    (then their Depends, ...) into *ext* and trying again.
    """
    fetched: set[str] = set()
    pending = [d for d in depends if d not in ("init-system-helpers",)]
    for _ in range(5):
        libdirs = [
            str(ext / d)
            for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")
            if (ext / d).is_dir()
        ]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(libdirs)
        out = _run([_tool("ldd"), str(binary)], env=env)
        libs: dict[str, Path] = {}
        missing: list[str] = []
        interp = ""
        for line in out.splitlines():
            m = _LDD_RE.match(line)
            if m:
                if m.group(2) == "not found":
                    missing.append(m.group(1))
                else:
                    libs[m.group(1)] = Path(os.path.realpath(m.group(2)))
                continue
            m2 = _INTERP_RE.match(line)
            if m2:
                interp = m2.group(1)
        if not missing:
            if not interp:
                raise KitBuildError(f"ldd did not report an interpreter:\n{out}")
            return libs, interp
        todo = [p for p in pending if p not in fetched]
        if not todo:
            break
        got = _apt_download(todo, debs_dir)
        fetched.update(todo)
        pending = []
        for deb in got.values():
            _run([_tool("dpkg-deb"), "-x", str(deb), str(ext)])
            pending += _dep_names(_deb_field(deb, "Depends"))
            pending += _dep_names(_deb_field(deb, "Pre-Depends"))
    raise KitBuildError(f"shared libraries of {binary} not resolvable: {missing}")


# --- initramfs (cpio "newc", gzip) -------------------------------------------


def _newc_archive(
    files: dict[str, bytes], modes: dict[str, int], symlinks: dict[str, str], dirs: set[str]
) -> bytes:
    """A gzip-compressed newc cpio archive (what the kernel unpacks as initramfs)."""
    entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)
    all_dirs = set(dirs)
    for p in list(files) + list(symlinks):
        parent = os.path.dirname(p)
        while parent:
            all_dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in all_dirs:
        entries[d] = (stat.S_IFDIR | 0o755, b"", 0)
    for p, data in files.items():
        entries[p] = (stat.S_IFREG | modes.get(p, 0o644), data, 0)
    for p, target in symlinks.items():
        if p not in files:
            entries[p] = (stat.S_IFLNK | 0o777, target.encode(), 0)
    entries["dev/console"] = (stat.S_IFCHR | 0o600, b"", os.makedev(5, 1))
    buf = io.BytesIO()

    def pad() -> None:
        buf.write(b"\0" * (-buf.tell() % 4))

    def add(name: str, mode: int, data: bytes, rdev: int, ino: int) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                ino,
                mode,
                0,
                0,
                2 if stat.S_ISDIR(mode) else 1,
                0,
                len(data),
                0,
                0,
                os.major(rdev),
                os.minor(rdev),
                len(nb),
                0,
            )
        )
        buf.write(hdr.encode() + nb)
        pad()
        buf.write(data)
        pad()

    # Sorting puts every directory before its contents.
    for ino, name in enumerate(sorted(entries), start=1):
        mode, data, rdev = entries[name]
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", 0, 0)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


# --- misc --------------------------------------------------------------------


def _detect_format(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "qcow2" if p.suffix == ".qcow2" else "raw"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
