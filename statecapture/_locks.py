"""Per-domain serialization of the operations QEMU/libvirt cannot run side by side.

Seen on libvirt 9.0 / QEMU 7.2 (HAZARDS 21): checkpoint create/delete and dirty-size
queries running while another thread started or ended a pull backup crashed QEMU
(``qcow2_get_specific_info: Assertion 'false' failed``) and once libvirtd. Every such
operation statecapture performs holds the domain's lock while it talks to libvirt:

* checkpoint create, delete, redefine/validate/import, dirty-size query;
* backup begin (``backupBegin`` with its checkpoint) and backup end (``abortJob`` up to
  ``JOB_COMPLETED``, when libvirt removes the job's scratch nodes);
* statecapture's own queries of QEMU's block nodes (live dirty bitmaps) and the removal
  of a bitmap a failed checkpoint create left behind.

The lock is held for the libvirt calls only, never across a whole backup job: reads and
checkpoint operations may run while a job runs, just never during its start or end.

Two levels, one key (the domain's UUID):

* within the process, a re-entrant ``threading.RLock`` per domain (the thread that holds
  it may take it again: a failed backup begin deletes its checkpoint under the same lock);
* across processes, ``fcntl.flock`` on ``<dir>/<uuid>.lock``, taken by the outermost holder
  in this process, and unlinked by it when it lets go (no file stays behind). ``<dir>`` is
  ``/run/statecapture`` for root, else ``$XDG_RUNTIME_DIR/statecapture``, else
  ``<tmp>/statecapture-<uid>``. The directory is
  made 0700 and must be owned by us and not group/world-writable; files are opened with
  ``O_NOFOLLOW`` and made 0600 — a lock file never follows a planted link.

Taking an uncontended lock costs microseconds; a contended one waits up to ``timeout``
seconds and then raises :class:`~statecapture.OperationTimeoutError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Final

from .errors import OperationTimeoutError, UsageError

__all__ = ["DEFAULT_TIMEOUT", "domain_lock", "lock_dir"]

DEFAULT_TIMEOUT: Final = 300.0
"""Seconds to wait for a domain's lock (a backup end can wait for its job that long)."""

_POLL: Final = 0.01

_registry_lock = threading.Lock()
_locks: dict[str, _DomainLock] = {}


def lock_dir() -> str:
    """The directory holding the cross-process lock files (created on first use)."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/statecapture"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "statecapture")
    return os.path.join(tempfile.gettempdir(), f"statecapture-{uid}")


def _open_dir(path: str) -> int:
    """Open (making it 0700 if needed) the lock directory; refuse one we must not trust."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(
            f"cannot use {path} for statecapture's domain locks: {exc.strerror} (it must be "
            "a real directory, not a symlink)"
        ) from exc
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
        os.close(fd)
        raise UsageError(
            f"refusing to keep statecapture's domain locks in {path}: it must be owned by uid "
            f"{os.geteuid()} and writable by its owner only (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o})"
        )
    return fd


def _open_lock_file(dfd: int, name: str) -> int:
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        raise UsageError(
            f"cannot open the lock file {name} in {lock_dir()}: {exc.strerror}"
        ) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UsageError(f"the lock file {name} in {lock_dir()} is not ours")
    return fd


def _acquire_file(uuid: str, deadline: float, what: str) -> tuple[int, int]:
    """flock ``<uuid>.lock``; returns (dir fd, file fd). The holder unlinks the file when
    it lets go (nothing stays behind), so a waiter that locked a file already unlinked
    opens the name again."""
    if not uuid or "/" in uuid or uuid.startswith("."):
        raise UsageError(f"cannot lock a domain with UUID {uuid!r}")
    name = f"{uuid}.lock"
    dfd = _open_dir(lock_dir())
    try:
        while True:
            fd = _open_lock_file(dfd, name)
            try:
                _flock(fd, deadline, what)
                try:
                    current = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is not None and (current.st_dev, current.st_ino) == (
                    mine.st_dev,
                    mine.st_ino,
                ):
                    return dfd, fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder unlinked it: take the new file
    except BaseException:
        os.close(dfd)
        raise


def _release_file(uuid: str, dfd: int, fd: int) -> None:
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{uuid}.lock", dir_fd=dfd)
    finally:
        os.close(fd)  # releases the flock
        os.close(dfd)


def _flock(fd: int, deadline: float, what: str) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            raise OperationTimeoutError(
                f"{what}: another process held the domain's lock for too long "
                "(a checkpoint or backup operation is running there)",
                operation=what,
            )
        time.sleep(_POLL)


class _DomainLock:
    """One domain's lock: an RLock within the process, an flock across processes."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self._mutex = threading.RLock()
        self._depth = 0
        self._fds: tuple[int, int] | None = None

    @contextlib.contextmanager
    def hold(self, what: str, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        if not self._mutex.acquire(timeout=max(0.0, timeout)):
            raise OperationTimeoutError(
                f"{what}: another thread held the domain's lock for more than {timeout} s",
                operation=what,
            )
        try:
            if self._depth == 0:
                self._fds = _acquire_file(self.uuid, deadline, what)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fds is not None:
                    (dfd, fd), self._fds = self._fds, None
                    _release_file(self.uuid, dfd, fd)
        finally:
            self._mutex.release()


def _lock_for(uuid: str) -> _DomainLock:
    with _registry_lock:
        lock = _locks.get(uuid)
        if lock is None:
            lock = _locks[uuid] = _DomainLock(uuid)
        return lock


@contextlib.contextmanager
def domain_lock(uuid: str, what: str, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold the domain's lock (in-process and cross-process) for the block.

    Re-entrant within one thread. ``what`` names the operation in a timeout error.
    """
    with _lock_for(uuid).hold(what, timeout):
        yield
