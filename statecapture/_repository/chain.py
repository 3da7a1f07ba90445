"""A point's chains: which files make up each disk, checked before anything is restored."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import ChainError
from .digests import chain_files
from .manifest import DiskEntry, PointKind, RestorePoint

__all__ = ["expected_chain", "validate_chain"]


def file_index(points: Mapping[str, RestorePoint]) -> dict[str, DiskEntry]:
    """Image file name → the manifest entry that wrote it, over every point of a domain."""
    out: dict[str, DiskEntry] = {}
    for p in points.values():
        for e in p.disks.values():
            out[e.file] = e
    return out


def expected_chain(
    point: RestorePoint, disk: str, index: Mapping[str, DiskEntry]
) -> list[DiskEntry]:
    """The manifest's chain of ``disk`` at ``point``, top first; :class:`ChainError` when a
    layer's parent is not listed by any point (or the references loop)."""
    if disk not in point.disks:
        raise ChainError(f"point {point.id} has no disk {disk!r}")
    entry = point.disks[disk]
    out = [entry]
    seen = {entry.file}
    while entry.kind is PointKind.INCREMENTAL:
        parent = entry.parent_file
        if parent is None or parent not in index:
            raise ChainError(
                f"point {point.id}, disk {disk}: layer {entry.file} sits on {parent!r}, "
                "which no point of the repository lists"
            )
        if parent in seen:
            raise ChainError(f"point {point.id}, disk {disk}: the chain loops at {parent}")
        seen.add(parent)
        entry = index[parent]
        out.append(entry)
    return out


def validate_chain(
    images: Path, point: RestorePoint, disk: str, index: Mapping[str, DiskEntry]
) -> list[Path]:
    """Check ``disk``'s chain at ``point`` against the files; its layers' paths, top first.

    Every layer must be a regular file inside ``images`` (no symlink) in qcow2 format, name
    its backing file by a plain relative name inside ``images``, and have the recorded
    virtual size; the headers' chain must be the manifest's (or skip layers a prune already
    merged into the layer above). Raises :class:`ChainError` naming the first problem.
    """
    expected = expected_chain(point, disk, index)
    for e in expected:
        path = images / e.file
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ChainError(
                f"point {point.id}, disk {disk}: layer {e.file} is missing", path=str(path)
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise ChainError(f"{path} is not a regular file", path=str(path))
    top = images / expected[0].file
    layers = chain_files(top)
    names: list[str] = []
    for i, layer in enumerate(layers):
        filename = Path(str(layer.get("filename", "")))
        if filename.parent.resolve() != images.resolve():
            raise ChainError(
                f"point {point.id}, disk {disk}: layer {i} is {filename}, outside the repository",
                path=str(top),
            )
        if layer.get("format") != "qcow2":
            raise ChainError(f"{filename} is {layer.get('format')}, not qcow2", path=str(filename))
        backing = layer.get("backing-filename")
        if backing is not None and "/" in str(backing):
            raise ChainError(
                f"{filename} names its backing file by a path ({backing}), not a name inside "
                "the repository",
                path=str(filename),
            )
        names.append(filename.name)
    want = [e.file for e in expected]
    sizes = {e.file: e.size for e in expected}
    # A prune that died after rebasing a layer but before rewriting its manifest leaves a
    # header chain that skips the merged layer (same data): accepted, the next prune ends it.
    if names[0] != want[0] or not _subsequence(names, want):
        raise ChainError(
            f"point {point.id}, disk {disk}: the images chain {names}, the manifest {want}",
            path=str(top),
        )
    for layer, name in zip(layers, names, strict=True):
        if int(layer.get("virtual-size", -1)) != sizes[name]:
            raise ChainError(
                f"{name} has virtual size {layer.get('virtual-size')}, the manifest {sizes[name]}",
                path=str(images / name),
            )
    return [images / n for n in names]


def _subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)
