"""The pull-mode data path without libnbd's Python binding: ``qemu-img`` alone.

A full copy is one ``qemu-img convert`` (like the libnbd path's); an incremental one reads
the dirty extents with ``qemu-img map`` (``x-dirty-bitmap``, which reports dirty areas as
``"data": false``), copies each piece with ``qemu-img dd`` into a chunk file of a private
directory and writes the chunks with batched ``qemu-io`` commands — slow for scattered
extents (one ``dd`` each), but it needs nothing beyond qemu-utils.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ._nbd import (
    CHUNK,
    CopyStats,
    ExportSource,
    Progress,
    Target,
    _intersect,
    key_objects,
    nbd_image_opts,
)
from ._qemuimg import qemu_img, qemu_io
from .errors import StateCaptureError

__all__ = ["copy_qemu_img", "export_size"]


def export_size(source: ExportSource) -> int:
    """The export's virtual size, asked with ``qemu-img info``."""
    info = json.loads(
        qemu_img("info", "--output=json", "--image-opts", nbd_image_opts(source, bitmap=False))
    )
    return int(info["virtual-size"])


def _map(source: ExportSource, *, bitmap: bool) -> list[dict[str, Any]]:
    out = qemu_img("map", "--output=json", "--image-opts", nbd_image_opts(source, bitmap=bitmap))
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


def copy_qemu_img(source: ExportSource, dest: Target, progress: Progress | None) -> CopyStats:
    started = time.monotonic()
    size = export_size(source)
    alloc = _map(source, bitmap=False)
    if source.bitmap_context is None:
        planned = sum(int(e["length"]) for e in alloc if e.get("data"))
        if progress is not None:
            progress(0, planned)
        qemu_img("convert", *dest.convert_args(source))
        if progress is not None:
            progress(planned, planned)
        return CopyStats(size, planned, 0, planned, time.monotonic() - started, "qemu-img")
    # qemu-img map with x-dirty-bitmap reports dirty areas inverted: "data": false = dirty.
    dirty = [
        (int(e["start"]), int(e["length"])) for e in _map(source, bitmap=True) if not e.get("data")
    ]
    pieces = list(_intersect(dirty, alloc))
    planned = sum(length for _o, length, _d in pieces)
    written = zeroed = 0
    if progress is not None:
        progress(0, planned)
    # Chunks go to a private 0700 directory of our own (``dest`` may be a descriptor path).
    with tempfile.TemporaryDirectory(prefix="sc-copy-") as td:
        commands: list[str] = []
        batch_bytes = 0

        def flush_batch() -> None:
            nonlocal batch_bytes
            if commands:
                args: list[str] = []
                for c in commands:
                    args += ["-c", c]
                qemu_io(*key_objects(), "--image-opts", *args, dest.image_opts())
                for f in Path(td).iterdir():
                    f.unlink()
                commands.clear()
                batch_bytes = 0

        for off, length, is_data in pieces:
            if not is_data:
                commands.append(f"write -q -z {off} {length}")
                zeroed += length
                continue
            pos = off
            while pos < off + length:
                n = min(CHUNK, off + length - pos)
                chunk = Path(td) / f"{pos}.raw"
                _dd(source, chunk, pos, n)
                commands.append(f"write -q -s {chunk} {pos} {n}")
                pos += n
                written += n
                batch_bytes += n
                if batch_bytes >= 16 * CHUNK:
                    flush_batch()
                    if progress is not None:
                        progress(written + zeroed, planned)
        flush_batch()
    if progress is not None:
        progress(written + zeroed, planned)
    return CopyStats(size, written, zeroed, planned, time.monotonic() - started, "qemu-img")


def _dd(source: ExportSource, out: Path, offset: int, length: int) -> None:
    """Copy ``[offset, offset+length)`` of the export to the raw file ``out``."""
    bs = 65536 if offset % 65536 == 0 and length % 65536 == 0 else 512
    qemu_img(
        "dd",
        "-O",
        "raw",
        "--image-opts",
        f"bs={bs}",
        f"skip={offset // bs}",
        # qemu-img dd counts `count` from the start of the input, skipped blocks included
        f"count={offset // bs + length // bs}",
        f"if={nbd_image_opts(source, bitmap=False)}",
        f"of={out}",
    )
    got = out.stat().st_size
    if got != length:
        raise StateCaptureError(f"qemu-img dd read {got} bytes at {offset}, wanted {length}")
