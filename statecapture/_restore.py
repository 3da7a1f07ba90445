"""Restore and verify backups: :func:`restore_disk`, :func:`verify`.

A backup chain is a full image followed by incremental layers, oldest first. Every
incremental statecapture writes records what it sits on: its qcow2 header names the previous
backup (a relative file name when both sit in one directory). :func:`restore_disk` checks the
chain it is given against those records *before it writes anything* (:func:`check_chain`): a
gap, a wrong order, an incremental given alone or a layer based on another file is a
:class:`UsageError` naming the layer that does not fit. It then opens the chain with an
explicit ``backing`` for every layer (a ``json:`` image specification, so nothing outside the
given list is read) and lets ``qemu-img convert`` flatten it into one image.

What the check cannot see: a layer whose *content* was damaged (a flipped byte in a data
cluster) still names the right base and restores without complaint — detecting that needs
digests recorded at backup time (see docs/backups.md, "What restore checks").

:func:`verify` proves a backup: the SHA-256 of the restored image's content equals that of a
reference image of the guest disk taken at the backup's start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ._nbd import qemu_img
from .errors import NotFoundError, StateCaptureError, TargetExistsError, UsageError

__all__ = [
    "VerifyResult",
    "chain_spec",
    "check_chain",
    "image_digest",
    "restore_disk",
    "verify",
]

PathLike = str | os.PathLike[str]

_READ: int = 4 << 20


def _info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` alone (its backing file is not opened)."""
    info = json.loads(qemu_img("info", "-U", "--output=json", "--", str(path)))
    if not isinstance(info, dict):  # pragma: no cover - qemu-img prints an object
        raise StateCaptureError(f"qemu-img info {path} printed unexpected JSON")
    return info


def _fmt_of(path: Path) -> str:
    return str(_info(path)["format"])


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_chain(chain: Sequence[PathLike] | PathLike) -> list[Path]:
    """Check that ``chain`` (full image first, then incrementals) is one backup chain.

    Reads each file's header on its own (``qemu-img info``, the backing file is not
    opened) and refuses, with a :class:`UsageError` naming the layer that does not fit (its
    position and path) and what it sits on:

    * a first image that is an incremental (its header names a backing file): a chain
      starts with a full backup;
    * a later image that records no base, or whose recorded base is not the image before
      it in ``chain`` — a gap (``[full, inc2]``), a wrong order (``[inc1, full]``) or a layer
      of another chain. The recorded name is resolved against the layer's own directory;
      when no file exists where it points (the layer was written where its base was not,
      or the chain was moved), the base's file *name* must equal the previous image's;
    * a later image that is not qcow2, or whose virtual size differs from the full image's.

    A missing file raises :class:`NotFoundError`. Returns the absolute paths. Content is not
    checked: a damaged data cluster passes (see the module's notes).
    """
    items = [chain] if isinstance(chain, str | os.PathLike) else list(chain)
    paths = [Path(p).absolute() for p in items]
    if not paths:
        raise UsageError("a backup chain needs at least one image")
    size: int | None = None
    for i, path in enumerate(paths):
        if not path.is_file():
            raise NotFoundError(f"backup image {path} does not exist", operation="restore")
        info = _info(path)
        fmt = str(info.get("format"))
        ref = info.get("backing-filename")
        where = f"layer {i} of the chain ({path})"
        if i == 0:
            if ref:
                raise UsageError(
                    f"{where} is an incremental layer on {ref!r}, not a full backup: a "
                    "chain starts with its full image, then the incrementals, oldest first"
                )
        else:
            prev = paths[i - 1]
            if fmt != "qcow2":
                raise UsageError(
                    f"{where} is {fmt}: only qcow2 images can be incremental layers "
                    f"(on layer {i - 1}, {prev})"
                )
            if not ref:
                raise UsageError(
                    f"{where} records no base image, so nothing says it sits on layer "
                    f"{i - 1} ({prev}); it is a full image or a layer of unknown origin"
                )
            named = Path(str(ref))
            resolved = named if named.is_absolute() else path.parent / named
            if os.path.lexists(resolved):
                fits = _same_file(resolved, prev)
            else:
                fits = named.name == prev.name
            if not fits:
                raise UsageError(
                    f"{where} does not fit: it sits on {str(ref)!r} ({resolved}), not on "
                    f"layer {i - 1} ({prev}). A gap, a wrong order or a layer of another "
                    "chain; nothing was written"
                )
        vsize = int(info.get("virtual-size", -1))
        if size is None:
            size = vsize
        elif vsize != size:
            raise UsageError(
                f"{where} has a virtual size of {vsize} bytes, the full image ({paths[0]}) "
                f"{size}: they are not one disk's chain"
            )
    return paths


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

    The chain is checked first (:func:`check_chain`): a gap, a wrong order, an incremental
    without its full image or a layer that is not based on the previous one raises
    :class:`UsageError` naming the layer that does not fit, and nothing is written.
    ``destination`` is written as ``format`` (``qcow2`` or ``raw``), owner-only (0600), and
    only appears once complete (written under a temporary name, then linked). An existing
    ``destination`` raises :class:`TargetExistsError` unless ``overwrite=True``. The backup
    files are only read, never changed. Returns the destination path.
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"format must be 'qcow2' or 'raw', not {format!r}")
    dest = Path(destination).absolute()
    if os.path.lexists(dest) and not overwrite:
        raise TargetExistsError(f"{dest} exists; pass overwrite=True to replace it", path=str(dest))
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory")
    paths = check_chain(chain)  # before anything is written: a refusal leaves nothing
    spec = chain_spec(paths)
    # The partial file is created owner-only, exclusively and never through a symlink,
    # relative to the opened destination directory.
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp_name = _create_partial(dir_fd, dest.name)
        tmp = dest.parent / tmp_name
        try:
            qemu_img("convert", "-U", "-O", format, spec, str(tmp))
            fd = os.open(tmp_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp_name, dest.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.link(
                    tmp_name,
                    dest.name,
                    src_dir_fd=dir_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
                os.unlink(tmp_name, dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
    return dest


def _create_partial(dir_fd: int, name: str) -> str:
    """Create an empty hidden ``.NAME.<random>.partial`` (0600, O_EXCL|O_NOFOLLOW); its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        candidate = f".{name}.{secrets.token_hex(6)}.partial"
        try:
            os.close(os.open(candidate, flags, 0o600, dir_fd=dir_fd))
        except FileExistsError:
            continue
        return candidate
    raise TargetExistsError(f"could not create a partial file for {name}", path=name)


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
    they first differ. ``chain`` is checked like :func:`restore_disk` checks it
    (:class:`UsageError` for a chain that does not fit together).
    """
    backup = image_digest(check_chain(chain))
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
