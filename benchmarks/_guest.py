"""The one real guest the guest-based benchmarks share (items 1 and 4-7).

Built with ``statecapture.testing`` (the guest kit, the domain XML, the agent
helpers), in its own embedded QEMU root under ``/tmp``. Its disks are prepared on the host
before boot, so no slow guest-side writing is needed:

* ``vda`` (mounted at ``/data``): ``2 x data_mib`` MiB, holding ``/data/random.bin`` with
  ``data_mib`` MiB of incompressible data (see :func:`write_random`), made with
  ``mkfs.ext4 -d`` and converted to qcow2;
* ``vdb`` (``/data1``): a quarter of that (``data_mib / 4`` MiB of data on a disk of
  ``data_mib / 2`` MiB), the second size of the peak-memory measurement.

:meth:`BenchGuest.close` — called from ``finally`` and from ``atexit`` — destroys and
undefines the domain (snapshot and checkpoint metadata included), ends any job, and removes
the embed root and the work directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import statecapture
from statecapture.testing import wait_agent

__all__ = ["BenchGuest", "DiskImage", "make_random_disk", "write_random"]

_CHUNK = 4 << 20


@dataclass(frozen=True)
class DiskImage:
    """One prepared data disk."""

    target: str
    path: Path
    size: int
    """Virtual size (bytes)."""
    data: int
    """Bytes of random data in the file ``random.bin`` on its filesystem."""


def _tool(name: str) -> str:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(f"{name} not found (scripts/install-deps.sh installs it)")


def write_random(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of incompressible data to ``path``.

    AES-128-CTR keystream under a random key (``openssl enc``, several times faster than
    ``os.urandom`` here); ``os.urandom`` when openssl is missing.
    """
    with open(path, "wb") as f:
        left = nbytes
        openssl = shutil.which("openssl")
        if openssl is not None:
            argv = [openssl, "enc", "-aes-128-ctr", "-nosalt"]
            argv += ["-K", os.urandom(16).hex(), "-iv", os.urandom(16).hex()]
            with (
                open("/dev/zero", "rb") as zero,
                subprocess.Popen(argv, stdin=zero, stdout=subprocess.PIPE) as proc,
            ):
                assert proc.stdout is not None
                try:
                    while left:
                        chunk = proc.stdout.read(min(_CHUNK, left))
                        if not chunk:
                            break
                        f.write(chunk)
                        left -= len(chunk)
                finally:
                    proc.kill()
        while left:
            n = min(_CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def make_random_disk(path: Path, *, size_mib: int, data_mib: int) -> Path:
    """Create a qcow2 ext4 image at ``path`` holding ``random.bin`` of ``data_mib`` MiB.

    The data is incompressible (:func:`write_random`) and is written on the host with
    ``mkfs.ext4 -d`` into a raw image, which is then converted to qcow2 (mode 0600).
    """
    with tempfile.TemporaryDirectory(prefix=".mkdisk-", dir=path.parent) as td:
        tdp = Path(td)
        content = tdp / "content"
        content.mkdir()
        write_random(content / "random.bin", data_mib << 20)
        raw = tdp / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(
            [
                _tool("mkfs.ext4"),
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                "-d",
                str(content),
                str(raw),
            ],
            check=True,
            capture_output=True,
        )
        (content / "random.bin").unlink()
        subprocess.run(
            [_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
            check=True,
            capture_output=True,
        )
        os.chmod(path, 0o600)
    return path


@dataclass
class BenchGuest:
    """A running TCG guest with two prepared data disks and a connected agent."""

    conn: statecapture.Connection
    dom: statecapture.Domain
    root: Path
    workdir: Path
    disks: dict[str, DiskImage]
    timings: dict[str, float] = field(default_factory=dict)
    _closed: bool = False
    _scratch_counter: int = 0

    @property
    def raw(self) -> Any:
        """The libvirt ``virDomain`` (for the raw comparisons)."""
        return self.dom.port._raw

    @classmethod
    def create(cls, *, data_mib: int, log: Callable[[str], None] = print) -> BenchGuest:
        """Prepare the disks, boot the guest and wait for its agent."""
        from statecapture.testing.kit import domain_xml, ensure_kit
        from tests._isolation import make_embed_root

        timings: dict[str, float] = {}
        t0 = time.monotonic()
        kit = ensure_kit()
        timings["kit_s"] = time.monotonic() - t0
        workdir = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/var/tmp"))
        root: Path | None = None
        conn: statecapture.Connection | None = None
        guest: BenchGuest | None = None
        try:
            root = make_embed_root(prefix="scb-")
            t0 = time.monotonic()
            small = max(16, data_mib // 4)
            plan = {"vda": (2 * data_mib, data_mib), "vdb": (2 * small, small)}
            disks: dict[str, DiskImage] = {}
            for target, (size_mib, dmib) in plan.items():
                log(f"  guest: writing {dmib} MiB of random data on a {size_mib} MiB disk {target}")
                path = make_random_disk(
                    workdir / f"{target}.qcow2", size_mib=size_mib, data_mib=dmib
                )
                disks[target] = DiskImage(target, path, size_mib << 20, dmib << 20)
            timings["disk_prep_s"] = time.monotonic() - t0
            conn = statecapture.connect(f"qemu:///embed?root={root}")
            name = f"sc-bench-{os.getpid()}"
            xml = domain_xml(
                name,
                kit,
                [d.path for d in disks.values()],
                agent=True,
                log_path=workdir / "console.log",
                disk_formats=["qcow2"] * len(disks),
            )
            dom = conn.define(xml)
            guest = cls(conn, dom, root, workdir, disks, timings)
            atexit.register(guest.close)
            t0 = time.monotonic()
            dom.start()
            wait_agent(dom, timeout=300)
            timings["boot_s"] = time.monotonic() - t0
            log(f"  guest: booted, agent answering after {timings['boot_s']:.1f}s")
            return guest
        except BaseException:
            if guest is not None:
                guest.close()
            else:
                if conn is not None:
                    conn.close()
                if root is not None:
                    shutil.rmtree(root, ignore_errors=True)
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    def scratch(self, name: str) -> Path:
        """A new empty directory under the work directory (same filesystem as the disks)."""
        self._scratch_counter += 1
        path = self.workdir / f"{self._scratch_counter:03d}-{name}"
        path.mkdir(mode=0o700)
        return path

    def guest_exec(self, argv: list[str], timeout: float = 120) -> bytes:
        """Run a command in the guest; its stdout (raises on a non-zero exit)."""
        from statecapture.testing import guest_exec

        code, out, err = guest_exec(self.dom, argv, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"guest command {argv} failed ({code}): {err.decode()[-300:]}")
        return out

    def describe(self) -> dict[str, Any]:
        """The guest's setup for the JSON file."""
        return {
            "disks": {
                t: {"size": d.size, "random_data": d.data, "format": "qcow2"}
                for t, d in self.disks.items()
            },
            "vcpus": 1,
            "memory_mib": 256,
            "accel": "tcg",
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }

    def close(self) -> None:
        """Destroy and undefine the guest, remove its root and files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        raw = self.raw
        with contextlib.suppress(Exception):
            raw.fsThaw(None, 0)
        with contextlib.suppress(Exception):
            raw.abortJob()
        with contextlib.suppress(Exception):
            for disk in ("vda", "vdb"):
                with contextlib.suppress(Exception):
                    raw.blockJobAbort(disk, 0)
        with contextlib.suppress(Exception):
            raw.destroy()
        with contextlib.suppress(Exception):
            for snap in raw.listAllSnapshots(0):
                snap.delete(4)  # METADATA_ONLY
        with contextlib.suppress(Exception):
            for cp in raw.listAllCheckpoints(0):
                cp.delete(2)  # METADATA_ONLY
        with contextlib.suppress(Exception):
            self.dom.undefine(managed_save=True, snapshots_metadata=True, checkpoints_metadata=True)
        with contextlib.suppress(Exception):
            self.conn.close()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
