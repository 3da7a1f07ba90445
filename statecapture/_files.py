"""Creating files safely: the one place statecapture (and QEMU/libvirtd for it) makes files.

statecapture runs as root in directories other users may be able to write. A file created
*by name* — ``open(path, O_CREAT)`` by us, or by ``qemu-img``, QEMU or libvirtd — follows a
symbolic link someone planted (or swapped in) at that name, and root then writes guest data
anywhere (HAZARDS 20). Every writer therefore goes through this module:

* :class:`Directory` opens the caller's directory **once** (``O_DIRECTORY``); every later
  step is relative to that descriptor, so renaming or replacing the directory afterwards
  changes nothing. Symbolic links in the directory path itself are followed at that one
  open (``/srv/backups -> /data/backups`` keeps working); the real path is read back from
  the descriptor.
* :meth:`Directory.create` makes a new file with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode
  0600: a name that exists in any form — a file, a directory, a dangling symlink — is a
  :class:`~statecapture.errors.TargetExistsError`, and the thing at that name is left alone.
* Tools we run get the file as :func:`fd_path` (``/proc/<our pid>/fd/N``), which reopens
  *the file we created*, whatever has happened to its name since.
* :meth:`Directory.link_fd` / :meth:`Directory.rename_from` put a finished file in place
  without ever replacing an existing name (``linkat`` / ``renameat2(RENAME_NOREPLACE)``).
* Files libvirtd or QEMU must create *by path* (push backup targets, scratch files, save
  images) are created inside a private 0700 staging directory (:meth:`Directory.staging`)
  made with ``mkdirat`` inside the caller's directory, then moved into place relative to
  the directory descriptors. That is only safe when nobody else can rename entries on the
  way to it: :func:`require_trusted` checks the directory and every ancestor (owned by root
  or by us; writable by others only when sticky). Files that keep their path for good
  (external snapshot overlays, block-copy destinations) are created by libvirt at their
  final name, so their directory must not be writable by anyone else at all
  (``staged=False``).

One rule for "does this name exist?": :func:`lexists` — a dangling symlink counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CleanupError, NotFoundError, TargetExistsError, UsageError

__all__ = [
    "FILE_MODE",
    "DIR_MODE",
    "Directory",
    "check_free",
    "fd_path",
    "lexists",
    "owner_only",
    "renameat2_noreplace",
    "require_trusted",
]

FILE_MODE = 0o600
"""Mode of every file statecapture creates."""
DIR_MODE = 0o700
"""Mode of every directory statecapture creates."""

_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def lexists(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> bool:
    """Whether anything is at ``path``: a file, a directory, or a (dangling) symlink."""
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    return True


def _exists_error(path: str, what: str = "") -> TargetExistsError:
    kind = "something"
    with contextlib.suppress(OSError):
        mode = os.lstat(path).st_mode
        kind = (
            "a symbolic link"
            if stat.S_ISLNK(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "a file"
        )
    label = f"{what} " if what else ""
    return TargetExistsError(
        f"{label}{path} exists ({kind}); statecapture never writes through or replaces an "
        "existing name — it was left untouched. Choose another name or move it away.",
        path=path,
    )


def check_free(path: str | os.PathLike[str], what: str = "") -> None:
    """Raise :class:`TargetExistsError` when anything (even a dangling symlink) is at ``path``."""
    text = os.fspath(path)
    if lexists(text):
        raise _exists_error(text, what)


def fd_path(fd: int) -> str:
    """A path that reopens descriptor ``fd`` of this process — for a tool we run.

    ``/proc/<pid>/fd/N`` (not ``/proc/self``) so a child process — ``qemu-img``, or the
    ``qemu-nbd`` libnbd starts — reaches *our* descriptor even though it is close-on-exec.
    """
    return f"/proc/{os.getpid()}/fd/{fd}"


def renameat2_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Rename without ever replacing ``dst`` (``renameat2(RENAME_NOREPLACE)``).

    Falls back to ``linkat`` + ``unlinkat`` where the file system or C library lacks
    ``renameat2``. Raises :class:`FileExistsError` when ``dst`` exists.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        rc = fn(
            ctypes.c_int(src_dir_fd),
            os.fsencode(src),
            ctypes.c_int(dst_dir_fd),
            os.fsencode(dst),
            ctypes.c_uint(_RENAME_NOREPLACE),
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir_fd)


def owner_only(paths: Iterable[str | os.PathLike[str]], *, what: str = "file") -> None:
    """Make each existing regular file (or directory) at ``paths`` owner-only (0600/0700).

    Never follows a symlink at the final name (a link is left as it is). A file that cannot
    be made owner-only raises :class:`CleanupError` naming every failure: it was created,
    and is readable by others until the caller deals with it.
    """
    failed: list[str] = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: not ours, leave it alone
                continue
            failed.append(f"{os.fspath(path)}: {exc.strerror}")
            continue
        try:
            st = os.fstat(fd)
            mode = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and stat.S_IMODE(
                st.st_mode
            ) != mode:
                os.fchmod(fd, mode)
        except OSError as exc:
            failed.append(f"{os.fspath(path)}: {exc.strerror}")
        finally:
            os.close(fd)
    if failed:
        raise CleanupError(f"could not make the {what} owner-only: {'; '.join(failed)}")


def _protected_symlinks() -> bool:
    try:
        with open("/proc/sys/fs/protected_symlinks", encoding="ascii") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def require_trusted(path: str | os.PathLike[str], *, staged: bool, what: str) -> None:
    """Refuse a directory in which someone else could redirect a by-path file creation.

    QEMU and libvirtd open the files they create by path. That path cannot be redirected
    when the directory and every ancestor are owned by root or by this process's user and
    are not writable by anyone else — or are sticky (``/tmp``-like), where others cannot
    rename what is not theirs. ``staged=True``: files are created in a private staging
    directory inside ``path``, so a sticky shared ``path`` is fine. ``staged=False``:
    libvirt creates the file at its final name in ``path`` itself, so ``path`` must not be
    writable by others at all (a sticky one only with the kernel's
    ``fs.protected_symlinks`` on). Raises :class:`UsageError` naming the culprit.
    """
    real = Path(os.path.realpath(path))
    trusted = {0, os.geteuid()}
    for i, component in enumerate((real, *real.parents)):
        try:
            st = os.stat(component)
        except OSError as exc:
            raise NotFoundError(
                f"{what}: cannot inspect {component}: {exc.strerror}", operation=what
            ) from exc
        mode = stat.S_IMODE(st.st_mode)
        shared = mode & 0o022
        sticky = mode & stat.S_ISVTX
        problem = ""
        if st.st_uid not in trusted:
            problem = f"is owned by uid {st.st_uid}, who could rename entries in it"
        elif shared and not sticky:
            problem = "is writable by other users and not sticky"
        elif shared and i == 0 and not staged and not _protected_symlinks():
            problem = (
                "is writable by other users, who could plant a symlink at the name libvirt "
                "creates (fs.protected_symlinks is off)"
            )
        if problem:
            raise UsageError(
                f"{what}: {component} {problem}; QEMU/libvirtd create files there by path, "
                "so another user could redirect root's writes. Use a directory that only "
                "root (or this user) can modify — see 'Security notes' in docs/hazards.md."
            )


class Directory:
    """A directory opened once; names are created, checked and moved relative to it.

    Use as a context manager (or call :meth:`close`). :attr:`path` is the directory's real
    path read back from the descriptor, for messages and for the paths handed to libvirt.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, what: str = "directory") -> Directory:
        """Open the directory ``path`` (symlinks in it are followed at this one open).

        Raises :class:`UsageError` when it does not exist or is not a directory.
        """
        try:
            fd = os.open(path, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            raise UsageError(f"{what} {os.fspath(path)} is not a directory") from None
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return cls(fd, real)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Directory({str(self.path)!r}, fd={self.fd})"

    def join(self, name: str) -> Path:
        """The path of ``name`` in this directory (for messages and records)."""
        return self.path / name

    def exists(self, name: str) -> bool:
        """Whether anything — even a dangling symlink — is at ``name``."""
        return lexists(name, dir_fd=self.fd)

    def check_free(self, *names: str, what: str = "") -> None:
        """Raise :class:`TargetExistsError` for the first of ``names`` that exists."""
        for name in names:
            _check_name(name)
            if self.exists(name):
                raise _exists_error(str(self.join(name)), what)

    def create(self, name: str, *, flags: int = os.O_RDWR) -> int:
        """Create the new file ``name`` (mode 0600) and return its descriptor.

        ``O_EXCL | O_NOFOLLOW``: raises :class:`TargetExistsError` when anything is at
        ``name``; the thing there is left untouched.
        """
        _check_name(name)
        try:
            fd = os.open(name, flags | _CREATE_FLAGS, FILE_MODE, dir_fd=self.fd)
        except FileExistsError:
            raise _exists_error(str(self.join(name))) from None
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask left
        except BaseException:
            os.close(fd)
            raise
        return fd

    def same_file(self, name: str, fd: int) -> bool:
        """Whether ``name`` (not followed) is the file open as ``fd``."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def remove_if_same(self, name: str, fd: int) -> bool:
        """Remove ``name`` only when it still is the file open as ``fd``; whether it did."""
        if not self.same_file(name, fd):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)
        return True

    def link_fd(self, fd: int, name: str) -> None:
        """Give the file open as ``fd`` the new name ``name`` here; never replaces a name.

        Links *the open file* (``linkat`` of ``/proc/self/fd/N`` with
        ``AT_SYMLINK_FOLLOW``), not whatever its old name points to now.
        """
        _check_name(name)
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self.fd, follow_symlinks=True)
        except FileExistsError:
            raise _exists_error(str(self.join(name))) from None

    def rename_from(self, src: Directory, src_name: str, name: str) -> None:
        """Move ``src_name`` of ``src`` to ``name`` here, never replacing an existing name."""
        _check_name(name)
        try:
            renameat2_noreplace(src.fd, src_name, self.fd, name)
        except FileExistsError:
            raise _exists_error(str(self.join(name))) from None

    def fsync(self) -> None:
        """Make this directory's entries durable."""
        os.fsync(self.fd)

    def staging(self, prefix: str) -> Directory:
        """Make and open a new private (0700) directory ``<prefix><random>`` in this one."""
        for _ in range(100):
            name = f"{prefix}{secrets.token_hex(6)}"
            try:
                os.mkdir(name, DIR_MODE, dir_fd=self.fd)
            except FileExistsError:
                continue
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
            try:
                os.fchmod(fd, DIR_MODE)
            except BaseException:
                os.close(fd)
                raise
            return Directory(fd, self.join(name))
        raise TargetExistsError(f"could not make a staging directory in {self.path}")

    def remove_tree(self, name: str) -> None:
        """Remove the directory ``name`` here and its contents, never following symlinks."""
        shutil.rmtree(name, dir_fd=self.fd)

    def names(self) -> Iterator[str]:
        """The names in this directory."""
        with os.scandir(self.fd) as it:
            for entry in it:
                yield entry.name


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"{name!r} is not a plain file name")
