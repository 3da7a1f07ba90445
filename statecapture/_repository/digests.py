"""Content digests of stored images: one SHA-256 per fixed-size block of guest-visible data.

The data is read straight from the stored qcow2 files, without QEMU or an NBD server:
``qemu-img map --output=json`` of a layer says, for every extent of the guest-visible disk,
which layer of the chain holds it (``depth``) and where in that file (``offset``), or that it
reads as zeros. Reading those host ranges with ``pread`` gives exactly the bytes a restore
would produce, each stored byte read once.

A pull download of a running domain takes the digests from the NBD export while it copies
(``statecapture._nbd_digest``: a second connection, hashed on the other core); the stored
layer's map is then checked against them (every block the layer holds must have been
digested) and :meth:`Repository.verify` later proves that what is *stored* matches what was
*read*. Where the data does not pass an NBD export we read (push mode, a shut-off domain's
full copy, the ``qemu-img`` fallback client), or the check fails, the digests are read from
the stored files right after the copy, as below. A full point records every non-zero block;
an incremental records only the blocks its layer touches (recomputed through the chain),
and the rest is inherited from its parent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from .._qemuimg import qemu_img
from ..errors import RepositoryError, StateCaptureError

__all__ = [
    "BLOCK_SIZE",
    "DigestMap",
    "Extent",
    "chain_files",
    "digest_blocks",
    "hasher",
    "layer_blocks",
    "read_map",
    "zero_digest",
]

BLOCK_SIZE: Final = 1 << 20
"""Bytes per digest block (1 MiB)."""
ALGORITHM: Final = "sha256"
KEYED_ALGORITHM: Final = "hmac-sha256"
DIGEST_FORMAT: Final = "statecapture-digests"

_ZERO: Final = bytes(BLOCK_SIZE)


@attrs.frozen
class Extent:
    """One entry of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    data: bool
    offset: int | None


def read_map(top: Path, *, opened: tuple[str, ...] | None = None) -> list[Extent]:
    """The guest-visible layout of the chain whose top layer is ``top``.

    ``opened``: the ``qemu-img`` arguments that open the chain instead of ``-f qcow2 TOP``
    (``--object ... --image-opts ...`` for an encrypted chain).
    """
    args = ("-f", "qcow2", str(top)) if opened is None else opened
    try:
        raw = json.loads(qemu_img("map", "--output=json", *args))
    except StateCaptureError as exc:
        raise RepositoryError(f"cannot read the layout of {top}: {exc}", path=str(top)) from exc
    out = []
    for e in raw:
        data = bool(e.get("data")) and bool(e.get("present", True))
        out.append(
            Extent(
                start=int(e["start"]),
                length=int(e["length"]),
                depth=int(e.get("depth", 0)),
                data=data,
                offset=int(e["offset"]) if data and "offset" in e else None,
            )
        )
    return out


def chain_files(top: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``top``: one dict per layer, top first."""
    try:
        info = json.loads(qemu_img("info", "--output=json", "--backing-chain", str(top)))
    except StateCaptureError as exc:
        raise RepositoryError(f"cannot read the chain of {top}: {exc}", path=str(top)) from exc
    return list(info) if isinstance(info, list) else [info]


def layer_blocks(extents: Iterable[Extent], block: int = BLOCK_SIZE) -> set[int]:
    """Blocks touched by the top layer's own extents (depth 0): what an incremental changed."""
    out: set[int] = set()
    for e in extents:
        if e.depth == 0 and e.length > 0:
            out.update(range(e.start // block, (e.start + e.length - 1) // block + 1))
    return out


def hasher(key: bytes | None) -> Any:
    """SHA-256, or HMAC-SHA256 under ``key`` (an encrypted repository's digests)."""
    if key is None:
        return hashlib.sha256()
    return hmac.new(key, digestmod="sha256")


def zero_digest(size: int, index: int, block: int = BLOCK_SIZE, *, key: bytes | None = None) -> str:
    """The digest of block ``index`` of a disk of ``size`` bytes reading as zeros."""
    n = min(block, size - index * block)
    h = hasher(key)
    h.update(_ZERO[:n])
    return str(h.hexdigest())


def digest_blocks(
    top: Path,
    size: int,
    wanted: Callable[[int], bool] | None = None,
    *,
    extents: list[Extent] | None = None,
    files: list[Path] | None = None,
    read: Callable[[int, int], bytes] | None = None,
    key: bytes | None = None,
) -> dict[int, str]:
    """SHA-256 of each wanted block (all when ``wanted`` is ``None``) of the chain at ``top``.

    Memory: one block's hash state plus the extent list; the data is streamed.
    """
    if extents is None:
        extents = read_map(top)
    if files is None:
        files = [Path(layer["filename"]) for layer in chain_files(top)]
    fds: dict[int, int] = {}
    out: dict[int, str] = {}
    cur: Any = None
    cur_idx = -1
    covered = 0
    try:
        for e in extents:
            pos, end = e.start, e.start + e.length
            while pos < end:
                b = pos // BLOCK_SIZE
                n = min(end, (b + 1) * BLOCK_SIZE) - pos
                if wanted is None or wanted(b):
                    if b != cur_idx:
                        if cur is not None:
                            out[cur_idx] = cur.hexdigest()
                        cur, cur_idx = hasher(key), b
                    if e.data and read is not None:  # through QEMU (compressed, encrypted)
                        cur.update(read(pos, n))
                    elif e.data:
                        if e.offset is None:
                            raise RepositoryError(
                                f"{top}: compressed or unmappable clusters at {pos} are not "
                                "supported in a repository",
                                path=str(top),
                            )
                        fd = fds.get(e.depth)
                        if fd is None:
                            fd = os.open(files[e.depth], os.O_RDONLY | os.O_CLOEXEC)
                            fds[e.depth] = fd
                        chunk = os.pread(fd, n, e.offset + (pos - e.start))
                        if len(chunk) != n:
                            raise RepositoryError(
                                f"{files[e.depth]} is truncated (offset {e.offset})",
                                path=str(files[e.depth]),
                            )
                        cur.update(chunk)
                    else:
                        cur.update(memoryview(_ZERO)[:n])
                pos += n
            covered = max(covered, end)
        if cur is not None:
            out[cur_idx] = cur.hexdigest()
    finally:
        for fd in fds.values():
            os.close(fd)
    if covered < size:
        raise RepositoryError(f"{top}: the layout covers {covered} of {size} bytes", path=str(top))
    return out


@attrs.frozen
class DigestMap:
    """The digests recorded for one disk of one point (a full map or an incremental delta)."""

    size: int
    """The disk's virtual size."""
    blocks: Mapping[int, str]
    """Block index → hex digest (full: non-zero blocks only; delta: every recomputed block)."""
    complete: bool
    """``True``: a full map (missing blocks read zero); ``False``: a delta over the parent."""
    block_size: int = BLOCK_SIZE
    keyed: bool = False
    """Whether the digests are HMAC-SHA256 under the repository key (encrypted repository)."""

    def to_json(self) -> bytes:
        """The digest file's JSON."""
        return (
            json.dumps(
                {
                    "format": DIGEST_FORMAT,
                    "version": 1,
                    "algorithm": KEYED_ALGORITHM if self.keyed else ALGORITHM,
                    "block_size": self.block_size,
                    "size": self.size,
                    "complete": self.complete,
                    "blocks": {str(k): v for k, v in sorted(self.blocks.items())},
                },
                separators=(",", ":"),
            )
            + "\n"
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> DigestMap:
        """Parse a digest file."""
        try:
            data = json.loads(raw)
            if data.get("format") != DIGEST_FORMAT or data.get("algorithm") not in (
                ALGORITHM,
                KEYED_ALGORITHM,
            ):
                raise ValueError("not a digest file")
            return cls(
                size=int(data["size"]),
                blocks={int(k): str(v) for k, v in data["blocks"].items()},
                complete=bool(data["complete"]),
                block_size=int(data.get("block_size", BLOCK_SIZE)),
                keyed=data["algorithm"] == KEYED_ALGORITHM,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{where}: damaged digest file ({exc})", path=where) from exc


def merge(lower: DigestMap, upper: DigestMap) -> DigestMap:
    """``upper`` applied on ``lower`` (for prune): complete if ``lower`` was."""
    blocks = dict(lower.blocks)
    blocks.update(upper.blocks)
    if lower.complete:
        blocks = {
            k: v for k, v in blocks.items() if v != zero_digest(upper.size, k, upper.block_size)
        }
    return DigestMap(upper.size, blocks, lower.complete, upper.block_size, upper.keyed)
