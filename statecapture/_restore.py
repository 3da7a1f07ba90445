"""Restore and verify backups: :func:`restore_disk`, :func:`verify`.

A backup chain is a full image followed by incremental layers, oldest first. Push and pull
jobs both leave qcow2 files, but their headers differ (a push incremental may name no
backing file, a pull incremental names the previous backup), so :func:`restore_disk` never
trusts the headers: it opens the chain with an explicit ``backing`` for every layer (a
``json:`` image specification) and lets ``qemu-img convert`` flatten it into one image.

:func:`verify` proves a backup: the SHA-256 of the restored image's content equals that of a
reference image of the guest disk taken at the backup's start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ._nbd import qemu_img
from .errors import NotFoundError, StateCaptureError, TargetExistsError, UsageError

__all__ = ["VerifyResult", "chain_spec", "image_digest", "restore_disk", "verify"]

PathLike = str | os.PathLike[str]

_READ: int = 4 << 20


def _fmt_of(path: Path) -> str:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)))
    return str(info["format"])


def chain_spec(chain: Sequence[PathLike]) -> str:
    """A ``json:`` image specification for ``chain`` (base first), backing set explicitly.

    The base layer gets ``"backing": null`` so whatever its header says is ignored; every
    upper layer gets the layer below it as backing. Raises :class:`NotFoundError` when a
    file is missing and :class:`UsageError` when an upper layer is not qcow2.
    """
    if isinstance(chain, str | os.PathLike):
        chain = [chain]
    paths = [Path(p).absolute() for p in chain]
    if not paths:
        raise UsageError("a backup chain needs at least one image")
    spec: dict[str, Any] | None = None
    for i, path in enumerate(paths):
        if not path.is_file():
            raise NotFoundError(f"backup image {path} does not exist", operation="restore")
        fmt = _fmt_of(path)
        if i > 0 and fmt != "qcow2":
            raise UsageError(f"{path} is {fmt}: only qcow2 images can be incremental layers")
        layer: dict[str, Any] = {
            "driver": fmt,
            "file": {"driver": "file", "filename": str(path)},
        }
        if fmt == "qcow2":
            layer["backing"] = spec
        spec = layer
    return "json:" + json.dumps(spec, separators=(",", ":"))


def restore_disk(
    chain: Sequence[PathLike] | PathLike,
    destination: PathLike,
    *,
    format: str = "qcow2",
    overwrite: bool = False,
) -> Path:
    """Flatten a backup chain (full image first, then incrementals) into one image.

    ``destination`` is written as ``format`` (``qcow2`` or ``raw``), owner-only (0600), and
    only appears once complete (written under a temporary name, then linked). An existing
    ``destination`` raises :class:`TargetExistsError` unless ``overwrite=True``. The backup
    files are only read, never changed. Returns the destination path.
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"format must be 'qcow2' or 'raw', not {format!r}")
    dest = Path(destination).absolute()
    if dest.exists() and not overwrite:
        raise TargetExistsError(f"{dest} exists; pass overwrite=True to replace it", path=str(dest))
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory")
    spec = chain_spec(chain if not isinstance(chain, str | os.PathLike) else [chain])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)  # mkstemp made it 0600; qemu-img keeps the mode of an existing file
    tmp = Path(tmp_name)
    try:
        qemu_img("convert", "-U", "-O", format, spec, str(tmp))
        os.chmod(tmp, 0o600)
        if overwrite:
            os.replace(tmp, dest)
        else:
            os.link(tmp, dest)
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return dest


def _hash_raw(path: Path) -> str:
    """SHA-256 of a raw file, reading data extents and hashing holes as zeros."""
    h = hashlib.sha256()
    zeros = bytes(_READ)
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole up to the end
                data = size
            while pos < data:  # a hole: zeros
                n = min(_READ, data - pos)
                h.update(zeros[:n])
                pos += n
            if pos >= size:
                break
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = size
            f.seek(pos)
            while pos < hole:
                chunk = f.read(min(_READ, hole - pos))
                if not chunk:
                    raise StateCaptureError(f"{path} ended early at {pos}")
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def image_digest(chain: Sequence[PathLike] | PathLike) -> str:
    """SHA-256 of the guest-visible content of an image or chain (any format)."""
    items = [chain] if isinstance(chain, str | os.PathLike) else list(chain)
    if len(items) == 1 and _fmt_of(Path(items[0])) == "raw":
        return _hash_raw(Path(items[0]))
    with tempfile.TemporaryDirectory(prefix="sc-verify-") as td:
        raw = Path(td) / "image.raw"
        qemu_img("convert", "-U", "-O", "raw", chain_spec(items), str(raw))
        return _hash_raw(raw)


@attrs.frozen
class VerifyResult:
    """The outcome of :func:`verify`: the two digests and whether they match."""

    backup_sha256: str
    """SHA-256 of the restored backup's content."""
    reference_sha256: str
    """SHA-256 of the reference image's content."""
    first_difference: int | None = None
    """Byte offset of the first difference (``None`` when identical)."""

    @property
    def identical(self) -> bool:
        """Whether the backup restores exactly the reference content."""
        return self.backup_sha256 == self.reference_sha256

    def __bool__(self) -> bool:
        return self.identical


def verify(
    chain: Sequence[PathLike] | PathLike,
    reference: Sequence[PathLike] | PathLike,
) -> VerifyResult:
    """Prove a backup: checksums of the restored ``chain`` equal those of ``reference``.

    ``chain`` is the backup (full image first, then incrementals); ``reference`` is an
    image (or chain) of the guest disk's content at the backup's start — for example a copy
    taken while the domain was paused for the backup to begin. The result is truthy when the
    contents are byte-identical; otherwise :attr:`VerifyResult.first_difference` says where
    they first differ.
    """
    backup = image_digest(chain)
    ref = image_digest(reference)
    first: int | None = None
    if backup != ref:
        first = _first_difference(chain, reference)
    return VerifyResult(backup, ref, first)


def _first_difference(
    chain: Sequence[PathLike] | PathLike, reference: Sequence[PathLike] | PathLike
) -> int | None:
    a = chain_spec([chain] if isinstance(chain, str | os.PathLike) else list(chain))
    b = chain_spec([reference] if isinstance(reference, str | os.PathLike) else list(reference))
    try:
        qemu_img("compare", "-U", a, b)
    except StateCaptureError as exc:
        match = re.search(r"offset (\d+)", str(exc))
        return int(match.group(1)) if match else None
    return None
