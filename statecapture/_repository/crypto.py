"""Encryption at rest: :class:`RepositoryKey` and the QEMU plumbing for LUKS qcow2 chains.

The caller's secret never reaches the repository. Derived from it (HMAC-SHA256, fixed
labels): the LUKS passphrase of every stored image, the key of the digests (HMAC instead of
plain SHA-256, so a digest of a known-plaintext block reveals nothing), and a check value
stored in ``repository.json`` that tells a wrong key from a right one. QEMU gets the
passphrase from a 0600 file in a new 0700 directory (``--object secret,file=...``), never
on a command line; the directory is removed when the operation ends. A server that outlives
the call (boot's decrypting ``qemu-nbd``) reads it from a pipe instead (:func:`key_pipe`).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from ..errors import UsageError

if TYPE_CHECKING:
    from .manifest import RepositoryInfo
    from .repository import Repository

__all__ = ["RepositoryKey", "chain_opts", "key_file", "key_pipe"]

SECRET_ID: Final = "sck"
_MIN_SECRET: Final = 16


def _check_secret(_self: Any, _attr: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) < _MIN_SECRET:
        raise UsageError(f"a RepositoryKey needs at least {_MIN_SECRET} secret bytes")


@attrs.frozen(repr=False)
class RepositoryKey:
    """The secret of an encrypted :class:`~statecapture.Repository` (at least 16 bytes).

    Supplied by the caller on every use and never stored in the repository::

        key = statecapture.RepositoryKey.from_file("/etc/backup/repo.key")
        repo = statecapture.Repository.create("/backups/enc", key=key)
        repo = statecapture.Repository("/backups/enc", key=key)
    """

    secret: bytes = attrs.field(validator=_check_secret, repr=False)
    """The secret bytes (never printed)."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RepositoryKey:
        """The key whose secret is the whole content of the file ``path`` (not a symlink)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot read the key file {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            return cls(f.read())

    def __repr__(self) -> str:
        return "RepositoryKey(<secret>)"

    def _derive(self, label: str) -> bytes:
        return hmac.new(self.secret, f"statecapture-repository:{label}".encode(), "sha256").digest()

    def check_value(self, repository_id: str) -> str:
        """The value ``repository.json`` records to recognise this key (not the key)."""
        return self._derive(f"check:{repository_id}").hex()

    def passphrase(self, repository_id: str) -> bytes:
        """The LUKS passphrase of the repository's images (ASCII hex)."""
        return self._derive(f"luks:{repository_id}").hex().encode()

    def digest_key(self, repository_id: str) -> bytes:
        """The HMAC key of the repository's block digests."""
        return self._derive(f"digests:{repository_id}")


@contextlib.contextmanager
def key_file(key: RepositoryKey, repository_id: str) -> Iterator[Path]:
    """The LUKS passphrase in a new 0600 file inside a new 0700 directory, removed after."""
    d = Path(tempfile.mkdtemp(prefix="sc-key-"))
    try:
        path = d / "passphrase"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.passphrase(repository_id))
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def key_pipe(key: RepositoryKey, repository_id: str) -> Iterator[tuple[int, str]]:
    """The LUKS passphrase in a pipe for ONE child process, never in a file: yields the read
    end (hand it over with ``pass_fds``) and the ``--object`` value that reads it
    (``file=/dev/fd/N``); both ends are closed after. The passphrase (64 bytes) fits in the
    pipe's buffer, so the write end is closed before the child starts."""
    r, w = os.pipe()
    try:
        try:
            os.write(w, key.passphrase(repository_id))
        finally:
            os.close(w)
        yield r, secret_object(Path(f"/dev/fd/{r}"))
    finally:
        os.close(r)


def secret_object(path: Path) -> str:
    """``--object`` value of the passphrase file."""
    return f"secret,id={SECRET_ID},format=raw,file={str(path).replace(',', ',,')}"


def chain_opts(top: Path, layers: int, *, plain_top: bool = False) -> str:
    """``--image-opts`` of an encrypted chain of ``layers`` images with ``top`` on top
    (``plain_top``: only the layers below ``top`` are encrypted)."""
    opts = ["driver=qcow2", "file.driver=file", f"file.filename={top}"]
    first = 1 if plain_top else 0
    opts += [f"{'backing.' * d}encrypt.key-secret={SECRET_ID}" for d in range(first, layers)]
    return ",".join(o.replace(",", ",,") for o in opts)


def check_key(info: RepositoryInfo, key: object, where: str) -> RepositoryKey | None:
    """The key to use for the repository ``info`` describes; :class:`RepositoryKeyError`
    when it is missing, wrong, or given for a repository that is not encrypted."""
    from ..errors import RepositoryKeyError

    if key is not None and not isinstance(key, RepositoryKey):
        raise UsageError(f"key must be a RepositoryKey, not {type(key).__name__}")
    if info.encryption is None:
        if key is not None:
            raise RepositoryKeyError(f"{where} is not encrypted; open it without a key", path=where)
        return None
    if key is None:
        raise RepositoryKeyError(
            f"{where} is encrypted: open it with Repository(path, key=RepositoryKey(...))",
            path=where,
        )
    if not hmac.compare_digest(key.check_value(info.id), info.key_check or ""):
        raise RepositoryKeyError(f"the key does not open {where} (wrong key)", path=where)
    return key


@contextlib.contextmanager
def opened(repo: Repository, top: Path) -> Iterator[tuple[str, ...] | None]:
    """``qemu-img``/``qemu-nbd`` arguments that open the stored chain at ``top`` with the
    repository's key (``None`` for a plain repository: open the file as it is)."""
    if repo.key is None:
        yield None
        return
    from .digests import chain_files

    layers = len(chain_files(top))
    with key_file(repo.key, repo.info.id) as f:
        yield ("--object", secret_object(f), "--image-opts", chain_opts(top, layers))
