"""Boot from an encrypted repository: a private decrypting ``qemu-nbd`` as each overlay's backing.

QEMU under the embedded libvirt driver cannot be given the key of a LUKS layer (a libvirt
secret crashes libvirt 9.0's embedded driver; docs/repository.md, "Encryption"). Instead each
disk's stored chain is opened, with the key and read-only, by a ``qemu-nbd`` of ours that
serves the decrypted data as a raw NBD export on a UNIX socket in ``<overlay_dir>/nbd/``
(0700); the disk's overlay is a new qcow2 whose backing is that export, and the domain XML
names the chain explicitly (``<backingStore type='network'>``).

The server daemonises (``--fork``: the call returns once it listens, and it outlives this
process like the domain does) and is not ``--persistent``: it ends by itself when its one
client, the domain's QEMU, disconnects — the domain stops, or a block pull has copied
everything and QEMU drops the backing node (:func:`release` then makes sure). The key
reaches it through a pipe (:func:`~.crypto.key_pipe`): it is never in a file nor on a
command line, and afterwards lives only in that process's memory. A process is signalled
only after ``/proc/PID/cmdline`` shows it is ``qemu-nbd`` serving our socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from .._qemuimg import qemu_img
from ..errors import (
    OperationTimeoutError,
    RepositoryError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from .common import _safe

if TYPE_CHECKING:
    from .repository import Repository

__all__ = [
    "SOCKET_DIR",
    "NbdBacking",
    "plan",
    "plan_again",
    "release",
    "serve",
    "serve_again",
    "servers_of",
    "stop",
]

SOCKET_DIR: Final = "nbd"
"""The directory inside ``overlay_dir`` that holds the sockets and pid files."""
SUN_PATH_MAX: Final = 107
"""Longest UNIX socket path (bytes; ``sun_path`` is 108 with its NUL)."""
_START_WAIT: Final = 60.0
_EXIT_WAIT: Final = 10.0


@attrs.frozen
class NbdBacking:
    """One disk's decrypting server: export name and socket (its pid file sits beside)."""

    disk: str
    export: str
    socket: Path

    @property
    def pid_file(self) -> Path:
        """Where ``qemu-nbd --pid-file`` writes its pid."""
        return self.socket.with_suffix(".pid")

    @property
    def uri(self) -> str:
        """The export's NBD URI (the overlay's recorded backing name)."""
        return f"nbd+unix:///{self.export}?socket={self.socket}"


def plan(dest: Path, disks: Iterable[str]) -> dict[str, NbdBacking]:
    """The servers of a boot into ``dest``; :class:`UsageError` when a socket path would be
    longer than a UNIX socket allows (nothing is made)."""
    out: dict[str, NbdBacking] = {}
    for d in disks:
        name = _safe(d)
        sock = dest / SOCKET_DIR / f"{name}.sock"
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise UsageError(
                f"the NBD socket {sock} would be {len(os.fsencode(sock))} bytes long, more than "
                f"a UNIX socket allows ({SUN_PATH_MAX}): choose a shorter overlay_dir"
            )
        out[d] = NbdBacking(d, name, sock)
    return out


def serve(
    repo: Repository,
    dest: Path,
    tops: Mapping[str, Path],
    sizes: Mapping[str, int],
    backings: Mapping[str, NbdBacking],
    undo: contextlib.ExitStack,
    *,
    start_servers: bool = True,
) -> dict[str, Path]:
    """Start one decrypting server per disk and make its overlay in ``dest`` (which exists,
    ours); each server's stop (by its pid file, verified) is registered on ``undo`` before
    it starts, so a start that breaks off half-way is stopped too. Disk → overlay.
    ``start_servers=False``: only the socket directory and the overlays (a domain defined,
    not started: :func:`serve_again` starts the servers with it)."""
    os.mkdir(dest / SOCKET_DIR, 0o700)
    overlays: dict[str, Path] = {}
    for d, top in tops.items():
        b = backings[d]
        if start_servers:
            undo.callback(_stop_listed, b)  # by its pid file: also a start that broke off
            _start(repo, top, b)
        ov = dest / f"{_safe(d)}.qcow2"
        # -u: nothing connects to the export now (the server ends after its first client)
        qemu_img(
            "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", b.uri, str(ov), str(sizes[d])
        )
        os.chmod(ov, 0o600)
        overlays[d] = ov
    return overlays


def plan_again(overlay_dir: Path, backings: Sequence[NbdBacking]) -> list[Path]:
    """Check, changing nothing, that the servers of a shut-off booted domain can be started
    again in ``overlay_dir/nbd``; the stale files of the ended servers to remove first.

    The socket directory may be gone (it is made again) or must be ours, a real directory,
    owner-only; a socket or pid file left there must be a socket (a regular file) of ours
    that no live ``qemu-nbd`` serves. :class:`TargetExistsError` for something else in the
    way, :class:`RepositoryError` when a server of that socket still runs."""
    sockdir = overlay_dir / SOCKET_DIR
    stale: list[Path] = []
    if not backings:
        return stale
    if any(b.socket.parent != sockdir for b in backings):
        raise UsageError(f"the domain's NBD sockets are not in {sockdir}: its definition changed")
    st = _lstat(sockdir)
    if st is not None and not (
        stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0
    ):
        raise TargetExistsError(
            f"{sockdir} is not an owner-only directory of ours: left untouched", path=str(sockdir)
        )
    for b in backings:
        pid = _server_of(b)
        if pid is not None:
            raise RepositoryError(
                f"qemu-nbd {pid} still serves {b.socket} although the domain is shut off: "
                "stop it first",
                path=str(b.socket),
            )
        for f, is_kind in ((b.socket, stat.S_ISSOCK), (b.pid_file, stat.S_ISREG)):
            fst = _lstat(f)
            if fst is None:
                continue
            if not is_kind(fst.st_mode) or fst.st_uid != os.getuid():
                raise TargetExistsError(
                    f"{f} is not a file an ended qemu-nbd of ours left: left untouched",
                    path=str(f),
                )
            stale.append(f)
    return stale


def serve_again(
    repo: Repository,
    tops: Mapping[str, Path],
    backings: Sequence[NbdBacking],
    stale: Iterable[Path],
    undo: contextlib.ExitStack,
) -> None:
    """Start the servers :func:`plan_again` checked (each disk's chain top in ``tops``):
    make the socket directory if it is gone, remove the stale files, start each server with
    its stop registered on ``undo`` first (and the directory's removal, when made here)."""
    if not backings:
        return
    sockdir = backings[0].socket.parent
    if _lstat(sockdir) is None:
        os.mkdir(sockdir, 0o700)
        undo.callback(_rmdir_quietly, sockdir)
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
    for b in backings:
        undo.callback(_stop_and_clean, b)
        _start(repo, tops[b.disk], b)


def _stop_and_clean(b: NbdBacking) -> None:
    """Stop the server of ``b`` (by its pid file) and remove its socket and pid file."""
    _stop_listed(b)
    for f, is_kind in ((b.socket, stat.S_ISSOCK), (b.pid_file, stat.S_ISREG)):
        st = _lstat(f)
        if st is not None and is_kind(st.st_mode) and st.st_uid == os.getuid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: a server's files are left, keep it
        os.rmdir(path)


def _server_of(b: NbdBacking) -> int | None:
    """The pid of a live ``qemu-nbd`` serving ``b.socket`` (by its pid file, else any)."""
    pid = _read_pid(b.pid_file)
    if pid is not None and _serves(pid, b.socket):
        return pid
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _serves(int(entry.name), b.socket):
            return int(entry.name)
    return None


def _start(repo: Repository, top: Path, b: NbdBacking) -> int:
    """``qemu-nbd --fork`` serving the decrypted chain at ``top``; its pid (also in
    ``b.pid_file``, written before the forking parent returns)."""
    from .crypto import chain_opts, key_pipe
    from .digests import chain_files

    exe = shutil.which("qemu-nbd")
    if exe is None:
        raise UnsupportedError("qemu-nbd is not installed (Debian package qemu-utils)")
    assert repo.key is not None
    opts = chain_opts(top.absolute(), len(chain_files(top)))
    with key_pipe(repo.key, repo.info.id) as (fd, secret):
        argv = [exe, "--fork", f"--pid-file={b.pid_file}", "--read-only", "--shared=1"]
        argv += ["--cache=none", "--aio=native", f"--export-name={b.export}"]
        argv += [f"--socket={b.socket}", "--object", secret, "--image-opts", opts]
        try:
            res = subprocess.run(
                argv,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=_START_WAIT,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise OperationTimeoutError(
                f"qemu-nbd did not start serving {b.socket} within {_START_WAIT:g} s",
                operation="repository boot",
            ) from None
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise RepositoryError(
            f"qemu-nbd could not serve the chain of disk {b.disk} ({top.name}): {err}",
            path=str(top),
        )
    pid = _read_pid(b.pid_file)
    if pid is None or not _serves(pid, b.socket):
        raise RepositoryError(f"qemu-nbd for disk {b.disk} started but is not running")
    return pid


def _stop_listed(b: NbdBacking) -> None:
    pid = _read_pid(b.pid_file)
    if pid is not None:
        stop(pid, b.socket)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _serves(pid: int, sock: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) ``qemu-nbd`` serving ``sock``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return (
        state not in (b"Z", b"X")
        and os.path.basename(args[0]) == b"qemu-nbd"
        and os.fsencode(f"--socket={sock}") in args
    )


def wait_gone(pid: int, sock: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the server ``pid`` of ``sock`` to end; whether it did."""
    deadline = time.monotonic() + timeout
    while _serves(pid, sock):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(pid: int, sock: Path) -> None:
    """End the ``qemu-nbd`` ``pid`` serving ``sock`` (SIGTERM, SIGKILL after 10 s); nothing
    when that pid is not (any more) that server."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _serves(pid, sock):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, sock, _EXIT_WAIT):
            return
    raise RepositoryError(f"qemu-nbd {pid} serving {sock} does not end")


def servers_of(domain_xml: str) -> list[NbdBacking]:
    """The decrypting servers a domain made by boot uses (from its live XML): a disk whose
    backing is an NBD export on a UNIX socket in ``nbd/`` beside the disk's overlay."""
    from lxml import etree

    out = []
    for disk in etree.fromstring(domain_xml.encode()).iterfind("devices/disk"):
        src, target = disk.find("source"), disk.find("target")
        host = disk.find("backingStore/source[@protocol='nbd']/host[@transport='unix']")
        if src is None or target is None or host is None:
            continue
        sock = Path(host.get("socket", ""))
        overlay = Path(src.get("file", ""))
        if sock.parent.name == SOCKET_DIR and sock.parent.parent == overlay.parent:
            name = host.getparent().get("name", "")  # type: ignore[union-attr]
            out.append(NbdBacking(target.get("dev", ""), name, sock))
    return out


def release(backings: Iterable[NbdBacking], *, grace: float = 5.0) -> None:
    """After a detach: make sure each server has ended (it does by itself once QEMU drops
    the backing; stopped by pid after ``grace`` s otherwise), then remove the socket dir."""
    dirs = set()
    for b in backings:
        pid = _read_pid(b.pid_file)
        if pid is not None:
            wait_gone(pid, b.socket, grace)
        _stop_and_clean(b)  # stops a server still running, removes its socket and pid file
        dirs.add(b.socket.parent)
    for d in dirs:
        _rmdir_quietly(d)
