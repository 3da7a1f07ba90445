"""Instant recovery: boot a domain straight from a restore point, read a point over NBD.

Nothing here writes into the repository. :func:`boot` puts a new qcow2 overlay (in a
directory the caller names) on top of each disk's chain; QEMU opens the repository's
images read-only as backing files, so the guest runs within seconds whatever the disk
size (from an encrypted repository the backing is a private decrypting ``qemu-nbd`` per
disk instead: :mod:`.nbdboot`). :func:`detach` then pulls the backing data into the
overlays while the guest runs (libvirt block pull), after which the domain no longer needs
the repository.
:func:`export` serves one disk's chain read-only over NBD on a private UNIX socket
(``qemu-nbd``, our child process, always stopped and its directory removed on exit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._qemuimg import qemu_img
from ..errors import (
    InvalidStateError,
    NotFoundError,
    OperationTimeoutError,
    RepositoryError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from . import chain as _chain
from .common import _not_found, _safe
from .store import fsync_dir, read_bytes

if TYPE_CHECKING:
    from .._connection import Connection
    from .._domain import Domain
    from .manifest import RestorePoint
    from .nbdboot import NbdBacking
    from .repository import Repository

__all__ = [
    "DetachProgress",
    "boot",
    "detach",
    "export",
    "guest_reader",
    "serve_image",
    "start_booted",
]

_SOCKET_WAIT: Final = 30.0


@attrs.frozen
class DetachProgress:
    """How far :meth:`Repository.detach` (or ``boot(..., detach=True)``) has got."""

    disk: str
    """The disk being pulled (its target, ``vda``)."""
    cur: int
    """Work done on this disk (QEMU's units, about bytes)."""
    end: int
    """Work known for this disk."""
    disks_done: int
    """Disks already independent of the repository."""
    disks_total: int
    """Disks to pull in all."""

    @property
    def fraction(self) -> float:
        """Overall progress in ``[0, 1]``, for display."""
        if self.disks_total <= 0:
            return 1.0
        part = 0.0 if self.end <= 0 else min(1.0, self.cur / self.end)
        return min(1.0, (self.disks_done + part) / self.disks_total)


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def export(repo: Repository, point: RestorePoint | str, disk: str) -> Iterator[str]:
    """Implementation of :meth:`Repository.export`."""
    if not isinstance(disk, str) or not disk:
        raise UsageError(f"disk must be a disk target such as 'vda', not {disk!r}")
    p, ddir, points = repo._resolve(point)
    if disk not in p.disks:
        raise _not_found(f"point {p.id} has no disk {disk!r}")
    top = _chain.validate_chain(ddir / "images", p, disk, _chain.file_index(points))[0]
    name = _safe(disk)
    from .crypto import opened

    with opened(repo, top) as args, serve_image(top, name, **_serve_args(args)) as sock:
        yield f"nbd+unix:///{name}?socket={sock}"


@contextlib.contextmanager
def serve_image(
    top: Path, name: str, *, image_opts: str | None = None, objects: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Serve the qcow2 chain at ``top`` read-only with ``qemu-nbd`` (our child) on a socket in
    a new owner-only directory; yields the socket. Stopped and removed on exit, always.

    ``image_opts`` replaces the plain file name (``--image-opts``), e.g. for an encrypted
    chain; ``objects`` are ``--object`` arguments (secrets are passed by file, never inline).
    """
    exe = shutil.which("qemu-nbd")
    if exe is None:
        raise UnsupportedError("qemu-nbd is not installed (Debian package qemu-utils)")
    with contextlib.ExitStack() as stack:
        sockdir = Path(tempfile.mkdtemp(prefix="sc-export-"))  # 0700, ours
        stack.callback(shutil.rmtree, sockdir, True)
        sock = sockdir / "nbd.sock"
        argv = [exe, "--read-only", "--persistent", "--shared=16", "--cache=none"]
        argv += ["--aio=native", f"--export-name={name}", f"--socket={sock}"]
        for obj in objects:
            argv += ["--object", obj]
        if image_opts is not None:
            argv += ["--image-opts", image_opts]
        else:
            argv += ["--format=qcow2", str(top)]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a ^C in the terminal reaches us, not the server
        )
        stack.callback(_stop, proc)
        _wait_socket(proc, sock)
        yield sock


@contextlib.contextmanager
def guest_reader(
    top: Path, opened: tuple[str, ...] | None = None
) -> Iterator[Callable[[int, int], bytes]]:
    """``read(offset, length)`` of the guest-visible data of the chain at ``top``, through
    QEMU (for compressed or encrypted images, whose host offsets hold no plain data)."""
    from .._nbd import load_nbd

    mod = load_nbd()
    if mod is None:
        raise UnsupportedError(
            "reading compressed or encrypted images needs libnbd's Python binding "
            "(Debian package python3-libnbd)"
        )
    with serve_image(top, "disk", **_serve_args(opened)) as sock:
        h = mod.NBD()
        h.set_export_name("disk")
        h.connect_unix(str(sock))
        try:

            def read(offset: int, length: int) -> bytes:
                data: bytes = h.pread(length, offset)
                return data

            yield read
        finally:
            with contextlib.suppress(Exception):
                h.shutdown()


def _serve_args(opened: tuple[str, ...] | None) -> dict[str, Any]:
    """``serve_image`` keywords from :func:`crypto.opened`'s arguments."""
    if opened is None:
        return {}
    # ("--object", OBJ, "--image-opts", OPTS)
    return {"objects": (opened[1],), "image_opts": opened[3]}


def _wait_socket(proc: subprocess.Popen[bytes], sock: Path) -> None:
    deadline = time.monotonic() + _SOCKET_WAIT
    while not _listening(sock):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise StateCaptureError(f"qemu-nbd exited with {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise OperationTimeoutError(
                f"qemu-nbd did not open {sock} within {_SOCKET_WAIT:g} s",
                operation="repository export",
            )
        time.sleep(0.02)


def _listening(sock: Path) -> bool:
    """Whether the server accepts connections (the socket file appears before listen())."""
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


# --------------------------------------------------------------------------- boot


def boot(
    repo: Repository,
    point: RestorePoint | str,
    conn: Connection,
    *,
    name: str,
    overlay_dir: str | os.PathLike[str],
    start: bool,
    detach: bool,
    progress: Callable[[DetachProgress], None] | None,
    timeout: float | None,
) -> Domain:
    """Implementation of :meth:`Repository.boot`."""
    from . import nbdboot
    from .crypto import check_key
    from .custody import BootRecord
    from .domainxml import _rewrite_domain

    if not isinstance(name, str) or not name:
        raise UsageError("boot() needs a new domain name")
    if detach and not start:
        raise UsageError("detach=True pulls the data while the domain runs: it needs start=True")
    check_key(repo.info, repo.key, str(repo.path))  # missing or wrong: RepositoryKeyError
    encrypted = repo.key is not None
    p, ddir, points = repo._resolve(point)
    if "inactive.xml" not in p.config:
        raise RepositoryError(f"point {p.id} holds no domain configuration")
    try:
        conn.domain(name)
    except NotFoundError:
        pass
    else:
        raise TargetExistsError(f"a domain named {name!r} exists already", path=name)
    dest = Path(overlay_dir).absolute()
    if os.path.lexists(dest):
        raise TargetExistsError(
            f"{dest} exists; boot() makes a new overlay directory", path=str(dest)
        )
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory")
    index = _chain.file_index(points)
    tops = {d: _chain.validate_chain(ddir / "images", p, d, index)[0] for d in sorted(p.disks)}
    nbd = nbdboot.plan(dest, tops) if encrypted else None  # socket paths checked first
    xml = read_bytes(ddir / "config" / p.id / "inactive.xml")
    with contextlib.ExitStack() as undo:
        os.mkdir(dest, 0o700)
        undo.callback(shutil.rmtree, dest, True)
        if nbd is None:
            overlays = _file_overlays(dest, tops)
        else:
            sizes = {d: p.disks[d].size for d in tops}
            # start=False: no server yet (it would wait for a client that may never come);
            # repo.start_booted(dom) starts the servers with the domain
            overlays = nbdboot.serve(repo, dest, tops, sizes, nbd, undo, start_servers=start)
        nv: Path | None = None
        if "nvram" in p.config:
            nv = dest / "nvram.fd"
            shutil.copyfile(ddir / "config" / p.id / "nvram", nv)
            os.chmod(nv, 0o600)
        fsync_dir(dest)
        record = BootRecord(
            repository=str(repo.path.absolute()),
            repository_id=repo.info.id,
            point=p.id,
            source=p.domain,
            source_uuid=p.domain_uuid,
            overlay_dir=str(dest),
            encrypted=encrypted,
            disks={d: str(f) for d, f in overlays.items()},
        )
        text = _rewrite_domain(
            xml, name=name, files=overlays, fmt="qcow2", nvram=nv, nbd=nbd, record=record
        )
        dom = conn.define(text)
        undo.callback(_undefine_quietly, dom)
        if start:
            dom.start()
            undo.callback(_destroy_quietly, dom)
            if detach:
                _detach(dom, progress=progress, timeout=timeout)
        undo.pop_all()
    return dom


def start_booted(repo: Repository, dom: Domain) -> None:
    """Implementation of :meth:`Repository.start_booted`."""
    from . import nbdboot

    tops, servers, stale = _plan_start(repo, dom)
    with contextlib.ExitStack() as undo:
        nbdboot.serve_again(repo, tops, servers, stale, undo)
        dom.start()
        undo.pop_all()


def _plan_start(
    repo: Repository, dom: Domain
) -> tuple[dict[str, Path], list[NbdBacking], list[Path]]:
    """Everything :func:`start_booted` checks first (reads only): each disk still resting on
    the repository → its chain's top; the decrypting servers to start; stale files."""
    from .._domain import Domain
    from . import nbdboot
    from .crypto import check_key
    from .custody import _backing_of, record_of

    if not isinstance(dom, Domain):
        raise UsageError(f"start_booted() needs a statecapture Domain, got {type(dom).__name__}")
    rec = record_of(dom)  # a damaged record: XMLError
    if rec is None:
        raise UsageError(
            f"domain {dom.name!r} was not booted from a repository (or detached already)"
        )
    if rec.repository_id != repo.info.id:
        raise UsageError(
            f"domain {dom.name!r} was booted from another repository ({rec.repository}, id "
            f"{rec.repository_id}), not from {repo.path} (id {repo.info.id})"
        )
    if dom.is_active:
        raise InvalidStateError(
            f"domain {dom.name!r} is running; start_booted() starts a shut-off one",
            operation="repository start_booted",
            domain_name=dom.name,
        )
    check_key(repo.info, repo.key, str(repo.path))  # missing or wrong: RepositoryKeyError
    missing = sorted(f for f in rec.disks.values() if not os.path.isfile(f))
    if missing:
        raise _not_found(
            f"overlay file(s) of {dom.name!r} missing: {', '.join(missing)}; undefine it and "
            f"remove {rec.overlay_dir}"
        )
    backing = {d: _backing_of(Path(f)) for d, f in sorted(rec.disks.items())}
    depends = [d for d, b in backing.items() if b is not None]
    if not depends:
        return {}, [], []
    p, ddir, points = repo._resolve(rec.point)  # gone: NotFoundError
    index = _chain.file_index(points)
    tops = {d: _chain.validate_chain(ddir / "images", p, d, index)[0] for d in depends}
    if not rec.encrypted:
        for d, top in tops.items():
            if backing[d] != str(top.absolute()):
                raise RepositoryError(
                    f"the overlay of {d} rests on {backing[d]}, but the chain of point "
                    f"{p.id} is now at {top.absolute()} (was the repository moved?)",
                    path=str(top),
                )
        return tops, [], []
    servers = {b.disk: b for b in nbdboot.servers_of(dom.inactive_definition.raw)}
    for d in depends:
        if d not in servers or servers[d].uri != backing[d]:
            raise RepositoryError(
                f"the overlay of {d} rests on {backing[d]}, not on the decrypting server the "
                f"definition of {dom.name!r} names"
            )
    chosen = [servers[d] for d in depends]
    return tops, chosen, nbdboot.plan_again(Path(rec.overlay_dir), chosen)


def _file_overlays(dest: Path, tops: dict[str, Path]) -> dict[str, Path]:
    """One qcow2 overlay per disk in ``dest`` whose backing file is the stored chain's top."""
    overlays: dict[str, Path] = {}
    for d, top in tops.items():
        ov = dest / f"{_safe(d)}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(top.absolute()), str(ov))
        os.chmod(ov, 0o600)
        overlays[d] = ov
    return overlays


def _undefine_quietly(dom: Domain) -> None:
    with contextlib.suppress(StateCaptureError):
        dom.undefine()


def _destroy_quietly(dom: Domain) -> None:
    with contextlib.suppress(StateCaptureError):
        if dom.is_active:
            dom.destroy()


def detach(
    dom: Domain,
    *,
    progress: Callable[[DetachProgress], None] | None = None,
    timeout: float | None = None,
) -> None:
    """Implementation of :meth:`Repository.detach`."""
    from .._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"detach() needs a statecapture Domain, got {type(dom).__name__}")
    _detach(dom, progress=progress, timeout=timeout)


def _backed_disks(domain_xml: str) -> list[str]:
    from lxml import etree

    root = etree.fromstring(domain_xml.encode())
    out = []
    for el in root.iterfind("devices/disk"):
        target = el.find("target")
        backing = el.find("backingStore")
        if target is not None and backing is not None and backing.get("type") is not None:
            out.append(target.get("dev", ""))
    return [d for d in out if d]


def _detach(
    dom: Domain,
    *,
    progress: Callable[[DetachProgress], None] | None,
    timeout: float | None,
) -> None:
    from . import nbdboot
    from .custody import forget

    xml = dom.definition.raw
    disks = _backed_disks(xml)
    servers = nbdboot.servers_of(xml)
    deadline = None if timeout is None else time.monotonic() + timeout
    for i, d in enumerate(disks):
        with dom.block_pull(d) as job:
            while not job.ended:
                if progress is not None:
                    with contextlib.suppress(StateCaptureError):
                        pr = job.progress()
                        progress(DetachProgress(d, pr.cur, pr.end, i, len(disks)))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise OperationTimeoutError(
                        f"pulling {d} of {dom.name!r} did not finish within {timeout} s "
                        "(the pull was aborted; the domain still uses the repository)",
                        operation="repository detach",
                        domain_name=dom.name,
                    )
                with contextlib.suppress(OperationTimeoutError):
                    job.wait(timeout=0.5 if left is None else min(0.5, left))
        if progress is not None:
            progress(DetachProgress(d, 1, 1, i + 1, len(disks)))
    nbdboot.release(servers)  # a boot from an encrypted repository: its servers end
    forget(dom)  # independent now: Repository.booted() no longer lists it
