"""Stored-image transforms: qcow2 compression of a freshly written layer.

A layer is first written by the ordinary data path (uncompressed), then rewritten once with
``qemu-img convert -c`` into a temporary file in the same private directory, fsynced and
renamed over the original: a reader sees the old or the new complete file, and the chain
(backing name, virtual size) is unchanged. Compressed (and encrypted) clusters have no plain
host offset, so their digests are taken through QEMU (:func:`reader`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .._nbd import qemu_img
from .store import fsync_dir

if TYPE_CHECKING:
    from .repository import Repository

__all__ = ["compress_layer", "reader"]


def compress_layer(path: Path, backing: str | None, method: str) -> None:
    """Rewrite the stored layer ``path`` with qcow2 compressed clusters (``method``)."""
    tmp = path.with_name(f".{path.name}.z-{secrets.token_hex(4)}")
    argv = ["convert", "-q", "-f", "qcow2", "-O", "qcow2", "-c"]
    argv += ["-o", f"cluster_size=65536,compression_type={method}"]
    if backing is not None:
        argv += ["-B", backing, "-F", "qcow2"]
    try:
        qemu_img(*argv, str(path), str(tmp))
        os.chmod(tmp, 0o600)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def reader(repo: Repository, top: Path) -> Iterator[Callable[[int, int], bytes] | None]:
    """``None`` for plain images (digests read the files directly), else a reader of the
    chain at ``top`` through QEMU."""
    if repo.info.compression is None:
        yield None
        return
    from .instant import guest_reader

    with guest_reader(top) as read:
        yield read
