"""The guest kit: a tiny real Linux guest built from Debian packages, and its disks and XML.

The kit is a Debian cloud kernel plus a busybox initramfs that

* loads the virtio modules (PCI, block, console) and the ACPI power button,
* mounts every virtio disk that holds ext4: ``/dev/vda`` at ``/data``,
  ``/dev/vdb`` at ``/data1``, ``/dev/vdc`` at ``/data2`` ... (absent or
  non-ext4 disks are skipped; disks hot-plugged later are mounted within ~1 s,
  see :data:`GUEST_MOUNT_HELPER`),
* appends a line ``"<counter> <epoch> <uptime>"`` to ``/data/ticks``, then
  ``sync``, then sleeps 0.1 s, forever.  The counter lives only in guest
  memory, starts at 1 and grows by one per line, so a managed-save/restore
  continues it while a fresh boot restarts it at 1.  Both clocks stop while
  the domain is paused or saved; while the filesystem is frozen no line is
  written (the freeze shows as an uptime gap),
* runs ``qemu-ga`` on ``/dev/virtio-ports/org.qemu.guest_agent.0`` (fsfreeze,
  guest-exec, guest-file-*, guest-shutdown all work).  It starts only after
  the disks are mounted and the first tick is written, so "agent answers"
  implies "``/data/ticks`` exists",
* powers off on ``/sbin/poweroff``, ``/sbin/shutdown`` (what qemu-ga's
  guest-shutdown runs) and on an ACPI power-button press.

Everything is built from Debian packages fetched with ``apt-get download``
(never installed on the host) and cached under the user's cache directory,
see :meth:`GuestKit.ensure`.  Only the standard library and attrs are used.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import attrs

from ..errors import TestEnvironmentError
from ._recipe import (
    _ETC_FILES,
    _INIT,
    _KERNEL_META,
    _MODULES,
    _MOUNT_DISKS,
    _PACKAGES,
    _POWER,
)

__all__ = [
    "AGENT_CHANNEL",
    "DATA_MOUNTS",
    "GUEST_MOUNT_HELPER",
    "KERNEL_CMDLINE",
    "MAX_EMBED_ROOT_LEN",
    "RECIPE_VERSION",
    "GuestKit",
    "KitBuildError",
    "TOOL_PACKAGES",
    "default_cache_dir",
    "domain_xml",
    "ensure_kit",
    "environment_problem",
    "guest_mountpoint",
    "make_data_disk",
    "make_embed_root",
    "prepare_embed_root",
    "recipe_key",
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


# ---------------------------------------------------------------------------
# Public API: kit
# ---------------------------------------------------------------------------


#: Debian package that provides each host program the kit needs.
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "ldd": "libc-bin",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "zstd": "zstd",
}


class KitBuildError(TestEnvironmentError):
    """Building the guest kit or a data disk failed (missing tool, apt failure, ...)."""

    def __init__(
        self,
        message: str,
        *,
        remedy: str = "apt-get update && apt-get install qemu-utils e2fsprogs dpkg apt",
        missing: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, remedy=remedy, missing=missing)


@attrs.frozen
class GuestKit:
    """A built guest kit: a kernel and an initramfs, booted by direct kernel boot.

    Build (or find in the cache) with :meth:`GuestKit.ensure`; write a domain for it with
    :meth:`domain_xml` and its data disks with :func:`make_data_disk`.
    """

    kernel: Path
    initrd: Path

    @classmethod
    def ensure(cls, cache_dir: Path | None = None) -> GuestKit:
        """The kit of the current recipe, built first when the cache lacks it.

        See :func:`ensure_kit` (cache location, locking, what the build needs).
        """
        return ensure_kit(cache_dir)

    def domain_xml(
        self,
        name: str,
        disks: list[Path],
        *,
        agent: bool = True,
        memory_mib: int = 256,
        log_path: Path | None = None,
        disk_formats: list[str] | None = None,
    ) -> str:
        """Libvirt domain XML that boots this kit with ``disks`` (see :func:`domain_xml`)."""
        return domain_xml(
            name,
            self,
            disks,
            agent=agent,
            memory_mib=memory_mib,
            log_path=log_path,
            disk_formats=disk_formats,
        )


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
    """``$STATECAPTURE_KIT_DIR``, else ``$XDG_CACHE_HOME/statecapture/guestkit``, else
    ``~/.cache/statecapture/guestkit``."""
    env = os.environ.get("STATECAPTURE_KIT_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "statecapture" / "guestkit"


def ensure_kit(cache_dir: Path | None = None) -> GuestKit:
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
    # Imported here: _build imports this module (KitBuildError, _run, _tool, recipe_key).
    from ._build import _build

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
    kit: GuestKit,
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
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    prepare_embed_root(root)
    return root


def prepare_embed_root(root: Path) -> None:
    """Create *root* and write ``root/etc/qemu.conf`` for the embedded driver.

    QEMU runs as root:root and writes its own log file (``stdio_handler =
    "file"``: the embedded driver has no virtlogd); ``remember_owner = 0``
    avoids ownership xattrs on images (``user``/``group`` are written only
    when this process runs as root).  Raises
    :class:`~statecapture.TestEnvironmentError` when the absolute *root* is
    longer than :data:`MAX_EMBED_ROOT_LEN` characters (socket paths below it
    would get too long).
    """
    if len(str(Path(root).absolute())) > MAX_EMBED_ROOT_LEN:
        raise TestEnvironmentError(
            f"embed root {root} is longer than {MAX_EMBED_ROOT_LEN} chars: libvirt's "
            "UNIX socket paths below it would exceed 107 bytes",
            remedy=f"use a root of at most {MAX_EMBED_ROOT_LEN} characters, e.g. under /tmp "
            "(or let EmbeddedHypervisor() choose one)",
        )
    etc = Path(root) / "etc"
    etc.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = etc / "qemu.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_qemu_conf())


def _qemu_conf() -> str:
    owner = 'user = "root"\ngroup = "root"\n' if os.geteuid() == 0 else ""
    return (
        "# written by statecapture.testing\n"
        + owner
        + "# no virtlogd in embed mode: QEMU's stdout/stderr go straight to a file\n"
        'stdio_handler = "file"\n'
        "# no ownership-remembering xattrs (they only cause warnings here)\n"
        "remember_owner = 0\n"
    )


# ---------------------------------------------------------------------------
# Environment check
# ---------------------------------------------------------------------------

_QEMU_DRIVER_GLOBS = (
    "/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so",
    "/usr/lib64/libvirt/connection-driver/libvirt_driver_qemu.so",
    "/usr/lib/libvirt/connection-driver/libvirt_driver_qemu.so",
)


def _which(name: str) -> str | None:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def environment_problem(cache_dir: Path | None = None) -> TestEnvironmentError | None:
    """Why this machine cannot boot the test guest, or ``None`` when it can.

    Cheap (no guest is booted, nothing is written): checks the platform, the programs of
    the Debian packages ``qemu-system-x86``, ``qemu-utils``, ``e2fsprogs`` and
    ``libvirt-daemon-driver-qemu``, the ``libvirt-qemu`` user Debian's libvirt resolves
    when run as root, and — when the kit is not cached yet — what building it needs
    (``apt``, ``dpkg``, package lists). The returned error names everything missing and
    its ``remedy`` is the command that fixes it.
    """
    import platform

    if os.environ.get("STATECAPTURE_SKIP_QEMU") == "1":
        return TestEnvironmentError(
            "STATECAPTURE_SKIP_QEMU=1", remedy="unset STATECAPTURE_SKIP_QEMU"
        )
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return TestEnvironmentError(
            f"the test guest needs Linux on x86_64, not {platform.system()} {platform.machine()}",
            remedy="run the real-hypervisor tests on an x86_64 Linux host",
        )
    tools = ["qemu-system-x86_64", "qemu-img", "mkfs.ext4"]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _load_kit(cache / recipe_key()) is None:
        tools += ["apt-get", "apt-cache", "dpkg-deb", "ldd"]
    missing = sorted({TOOL_PACKAGES[t] for t in tools if _which(t) is None})
    if not any(glob.glob(g) for g in _QEMU_DRIVER_GLOBS):
        missing.append("libvirt-daemon-driver-qemu")
    if missing:
        return TestEnvironmentError(
            "the real-hypervisor test kit needs the Debian packages " + ", ".join(missing),
            remedy="apt-get install --no-install-recommends " + " ".join(missing),
            missing=tuple(missing),
        )
    if _load_kit(cache / recipe_key()) is None and not glob.glob("/var/lib/apt/lists/*_Packages*"):
        return TestEnvironmentError(
            "the guest kit is not built yet and apt has no package lists to download it from",
            remedy="apt-get update",
        )
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            return TestEnvironmentError(
                "user libvirt-qemu does not exist (Debian's libvirt resolves it as QEMU's "
                "default user even when qemu.conf overrides it)",
                remedy="apt-get install libvirt-daemon-system, or run "
                "`groupadd --system kvm; groupadd --system libvirt-qemu; useradd --system "
                "--gid kvm --groups libvirt-qemu --no-create-home libvirt-qemu`",
                missing=("libvirt-qemu user",),
            )
    return None


# ---------------------------------------------------------------------------
# Build helpers: the cache, host tools (the build itself is in _build.py)
# ---------------------------------------------------------------------------


def _load_kit(d: Path) -> GuestKit | None:
    if not (d / "kit.json").is_file():
        return None
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return GuestKit(kernel=kernel, initrd=initrd)


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
    package = TOOL_PACKAGES.get(name, name)
    raise KitBuildError(
        f"{name} not found (Debian package {package})",
        remedy=f"apt-get install {package}",
        missing=(package,),
    )


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except OSError as e:
        raise KitBuildError(f"cannot run {argv[0]}: {e}") from e
    if p.returncode != 0:
        raise KitBuildError(f"{' '.join(argv)} failed (rc={p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


# --- misc --------------------------------------------------------------------


def _detect_format(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "qcow2" if p.suffix == ".qcow2" else "raw"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
