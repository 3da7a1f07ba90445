"""Stored-image transforms: compression or encryption of a freshly written layer.

A layer is first written by the ordinary data path (plain qcow2), then rewritten once with
``qemu-img convert`` (``-c``, or into a LUKS-encrypted qcow2) into a temporary file in the
same private directory, fsynced and renamed over the original: a reader sees the old or the
new complete file, and the chain (backing name, virtual size) is unchanged. Compressed and
encrypted clusters have no plain host offset, so their digests are taken through QEMU
(:func:`reader`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .._nbd import qemu_img
from ..errors import StateCaptureError
from .store import fsync_dir

if TYPE_CHECKING:
    from .repository import Repository

__all__ = ["compress_layer", "reader", "store_layer"]


def store_layer(repo: Repository, path: Path, backing: str | None) -> None:
    """Apply the repository's compression or encryption to the new layer ``path``."""
    if repo.key is not None:
        encrypt_layer(repo, path, backing)
    elif repo.info.compression is not None:
        compress_layer(path, backing, repo.info.compression)


def encrypt_layer(repo: Repository, path: Path, backing: str | None) -> None:
    """Rewrite the plain new layer ``path`` (over an encrypted chain) as LUKS qcow2."""
    from .crypto import SECRET_ID, chain_opts, key_file, secret_object
    from .digests import chain_files

    assert repo.key is not None
    layers = chain_files(path)
    size = str(int(layers[0]["virtual-size"]))
    tmp = path.with_name(f".{path.name}.e-{secrets.token_hex(4)}")
    with key_file(repo.key, repo.info.id) as kf:
        obj = secret_object(kf)
        create = ["create", "-q", "-u", "-f", "qcow2", "--object", obj, "-o"]
        # The passphrase is 256 random-looking bits (HMAC of the key), not a password:
        # PBKDF stretching adds nothing but seconds to every open, so keep it short.
        create += [
            f"cluster_size=65536,encrypt.format=luks,encrypt.key-secret={SECRET_ID},"
            "encrypt.iter-time=10"
        ]
        if backing is not None:
            create += ["-b", backing, "-F", "qcow2"]
        argv = ["convert", "-q", "-n", "--object", obj, "--image-opts"]
        argv += [chain_opts(path, len(layers), plain_top=True), "--target-image-opts"]
        argv += [chain_opts(tmp, len(layers))]
        if backing is not None:
            argv += ["-B", backing]
        try:
            _create_luks(create, tmp, size)
            qemu_img(*argv)
            _replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _create_luks(create: list[str], tmp: Path, size: str) -> None:
    """``qemu-img create`` of a LUKS image; retried when QEMU's PBKDF timing measured no CPU
    time ("Unable to get accurate CPU usage", a coarse thread clock on a busy host)."""
    for attempt in range(5):
        try:
            qemu_img(*create, str(tmp), size)
            return
        except StateCaptureError as exc:
            if "accurate CPU usage" not in str(exc) or attempt == 4:
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


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
