"""Stored-image transforms: compression of a freshly written layer; reading through QEMU.

Encryption is no transform: the writers create every image of an encrypted repository as
LUKS qcow2 and encrypt as they write (``statecapture._nbd.encrypted_layers``), so no
plaintext reaches the disk. A full layer is written compressed by its copy
(``statecapture._nbd.compressed_full_copies``, and the shut-off path's convert); for the
others compression is a second pass: a layer is first written by the
ordinary data path (plain qcow2), then rewritten once with ``qemu-img convert -c`` into a
temporary file in the same private directory, fsynced and renamed over the original: a
reader sees the old or the new complete file, and the chain (backing name, virtual size) is
unchanged. Compressed and encrypted clusters have no plain host offset, so digests that
were not taken during the copy are read through QEMU (:func:`reader`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .._qemuimg import qemu_img
from ..errors import RepositoryError
from .store import fsync_dir

if TYPE_CHECKING:
    from .repository import Repository

__all__ = ["compress_layer", "reader", "store_layer"]


def store_layer(
    repo: Repository, path: Path, backing: str | None, *, encrypted: bool, compressed: bool = False
) -> None:
    """Apply the repository's compression to the new layer ``path`` unless its copy wrote
    it compressed already (``compressed``: a full pull download); with a key, check that
    the writer encrypted it (``encrypted``, from ``qemu-img info``): layers of an
    encrypted repository are written encrypted, never rewritten."""
    if repo.key is not None:
        if not encrypted:
            raise RepositoryError(
                f"{path} was written without encryption into an encrypted repository",
                path=str(path),
            )
    elif repo.info.compression is not None and not compressed:
        compress_layer(path, backing, repo.info.compression)


def _replace(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o600)
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def compress_layer(path: Path, backing: str | None, method: str) -> None:
    """Rewrite the stored layer ``path`` with qcow2 compressed clusters (``method``)."""
    tmp = path.with_name(f".{path.name}.z-{secrets.token_hex(4)}")
    argv = ["convert", "-q", "-f", "qcow2", "-O", "qcow2", "-c"]
    argv += ["-o", f"cluster_size=65536,compression_type={method}"]
    if backing is not None:
        argv += ["-B", backing, "-F", "qcow2"]
    try:
        qemu_img(*argv, str(path), str(tmp))
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def reader(repo: Repository, top: Path) -> Iterator[Callable[[int, int], bytes] | None]:
    """``None`` for plain images (digests read the files directly), else a reader of the
    chain at ``top`` through QEMU."""
    if repo.info.compression is None and repo.key is None:
        yield None
        return
    from .crypto import opened
    from .instant import guest_reader

    with opened(repo, top) as args, guest_reader(top, args) as read:
        yield read
