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

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from . import _files
from ._qemuimg import qemu_img
from .errors import NotFoundError, StateCaptureError, ToolError, UsageError

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
    only appears once complete: it is written as the hidden ``.<name>.partial`` next to it
    (created exclusively, never through a symlink), then linked into place. An existing
    ``destination`` — even a dangling symlink — raises :class:`TargetExistsError` unless
    ``overwrite=True`` (which replaces the name itself, never writing through a link); so
    does anything already at the partial name, which is left untouched. The backup files are
    only read, never changed. Returns the destination path.
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"format must be 'qcow2' or 'raw', not {format!r}")
    dest = Path(destination).absolute()
    name = dest.name
    partial = _partial_name(name)
    with _files.Directory.open(dest.parent, what="restore destination directory") as ddir:
        # One rule (a dangling symlink exists too), checked before anything is written.
        if not overwrite:
            ddir.check_free(name, what="restore destination")
        ddir.check_free(partial, what="restore partial file")
        paths = check_chain(chain)  # before anything is written: a refusal leaves nothing
        spec = chain_spec(paths)
        # O_EXCL | O_NOFOLLOW relative to the directory opened once; qemu-img gets the
        # descriptor path, so a name swapped meanwhile redirects nothing.
        fd = ddir.create(partial)
        try:
            qemu_img("convert", "-U", "-O", format, spec, _files.fd_path(fd))
            os.fchmod(fd, _files.FILE_MODE)
            os.fsync(fd)
            if overwrite:
                if not ddir.same_file(partial, fd):
                    raise StateCaptureError(
                        f"{ddir.join(partial)} was replaced while the image was written; "
                        f"{dest} was left as it was"
                    )
                # rename(2) replaces the name itself: a symlink there is replaced, never
                # written through.
                os.replace(partial, name, src_dir_fd=ddir.fd, dst_dir_fd=ddir.fd)
            else:
                ddir.link_fd(fd, name)  # the file we wrote; never replaces a name
                ddir.remove_if_same(partial, fd)
            ddir.fsync()
        except BaseException:
            ddir.remove_if_same(partial, fd)  # only our file; a swapped-in name stays
            raise
        finally:
            os.close(fd)
    return dest


def _partial_name(name: str) -> str:
    """The hidden name a restored image is written under before it is linked into place."""
    return f".{name}.partial"


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
    except ToolError as exc:
        if exc.exit_code != 1:  # 1: the images differ; 2: compare could not tell where
            return None
        match = re.search(r"offset (\d+)", exc.stdout)
        return int(match.group(1)) if match else None
    return None
