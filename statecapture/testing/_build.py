"""How the guest kit is built (:func:`statecapture.testing.kit.ensure_kit` calls :func:`_build`):
Debian packages downloaded and unpacked, kernel modules and shared libraries resolved, and
the initramfs written as a cpio archive.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

from ._recipe import (
    _ETC_FILES,
    _INIT,
    _KERNEL_META,
    _LIBDIR,
    _MODULES,
    _MOUNT_DISKS,
    _PACKAGES,
    _POWER,
    _POWER_NAMES,
)
from .kit import KERNEL_CMDLINE, KitBuildError, _run, _tool, recipe_key


def _apt_download(pkgs: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` *pkgs* into *dest*; return package name -> .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    try:
        _run([_tool("apt-get"), "-q", "-o", "APT::Sandbox::User=root", "download", *pkgs], cwd=dest)
    except KitBuildError as e:
        raise KitBuildError(
            str(e), remedy="apt-get update (the kit downloads its Debian packages with apt)"
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
        f"cannot resolve {_KERNEL_META}:\n{out}",
        remedy="apt-get update (the package lists are missing or stale)",
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
