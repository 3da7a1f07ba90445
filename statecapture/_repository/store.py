"""File handling for the repository: atomic writes, private directories, per-domain locks.

Every file the repository writes itself goes through :func:`write_atomic` (a new temporary
file created ``O_EXCL | O_NOFOLLOW`` relative to the opened directory, owner-only, fsynced,
renamed into place, directory fsynced) or :func:`copy_in` (same, from a source file).
Readers never take a lock: a manifest is either the old or the new complete file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from ..errors import RepositoryError, RepositoryLockedError, TargetExistsError

__all__ = [
    "DomainLock",
    "copy_in",
    "fsync_dir",
    "private_dir",
    "read_bytes",
    "remove",
    "write_atomic",
]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    """fsync a directory (so a rename or unlink inside it is durable)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """Make ``path`` (one level) owner-only if missing; refuse a symlink or a non-directory."""
    try:
        os.mkdir(path, 0o700)
        fsync_dir(path.parent)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise RepositoryError(
                f"{path} is not a directory (a symlink?)", path=str(path)
            ) from None
    return path


def _wrap(exc: OSError, what: str, path: Path) -> RepositoryError:
    why = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror
    return RepositoryError(f"{what} {path}: {why}", path=str(path))


def write_atomic(directory: Path, name: str, data: bytes, *, replace: bool = True) -> Path:
    """Write ``directory/name`` atomically (temp + fsync + rename + directory fsync), 0600.

    ``replace=False`` refuses an existing file (:class:`TargetExistsError`). An error (also
    ENOSPC, as :class:`RepositoryError`) leaves no temporary file behind.
    """
    dfd = os.open(directory, _DIR_FLAGS)
    tmp = f".{name}.tmp-{secrets.token_hex(4)}"
    try:
        if not replace and _lexists_at(dfd, name):
            raise TargetExistsError(f"{directory / name} exists", path=str(directory / name))
        try:
            fd = os.open(tmp, _NEW_FLAGS, 0o600, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if isinstance(exc, FileExistsError):
                raise TargetExistsError(
                    f"{directory / name} exists", path=str(directory / name)
                ) from exc
            raise _wrap(exc, "cannot write", directory / name) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return directory / name


def _lexists_at(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def copy_in(source: Path, directory: Path, name: str) -> Path:
    """Copy the regular file ``source`` into ``directory/name`` atomically, owner-only."""
    with open(source, "rb") as src:
        data = src.read()
    return write_atomic(directory, name, data, replace=False)


def copy_tree_in(source: Path, directory: Path, name: str) -> Path:
    """Copy the directory ``source`` into ``directory/name`` (owner-only, no symlinks)."""
    tmp = directory / f".{name}.tmp-{secrets.token_hex(4)}"
    try:
        shutil.copytree(source, tmp, symlinks=True)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o600)
        os.chmod(tmp, 0o700)
        os.rename(tmp, directory / name)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / name


def read_bytes(path: Path) -> bytes:
    """Read a file without following a symlink at its last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def remove(path: Path) -> bool:
    """Remove a file or directory tree if present; whether something was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return True


class DomainLock:
    """An exclusive ``flock`` on ``locks/<domain uuid>.lock``: one writer per domain chain.

    A second writer polls until ``timeout`` seconds have passed, then gets
    :class:`RepositoryLockedError`. Readers never take it. The lock dies with its process
    (a SIGKILL releases it).
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (waits up to the timeout)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RepositoryLockedError(
                        f"another writer holds {self.path} (waited {self.timeout:g} s); "
                        "try again when its backup or prune has finished",
                        path=str(self.path),
                    ) from None
                time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        """Release the lock; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``with lock.held():`` acquire, then release in every case."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
