"""The external tools the backup benchmarks compare with, reading a pull job's NBD export.

Each writes a qcow2 image, like :meth:`statecapture.BackupJob.download`, and its time
includes an ``fsync`` of the result (the library flushes its image before it returns; a backup
that is not on disk is not a backup):

* ``nbdcopy SRC -- [ qemu-nbd -f qcow2 OUT ]`` (libnbd's copy tool: 4 connections, many
  requests in flight; ``--target-is-zero`` as OUT is new),
* ``qemu-img convert -O qcow2 --image-opts driver=nbd,… OUT`` (its defaults).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import statecapture

__all__ = ["TOOLS", "copy_with", "fsync_file", "nbd_image_opts"]

TOOLS = ("nbdcopy", "qemu-img")


def nbd_image_opts(export: statecapture.BackupExport) -> str:
    """``--image-opts`` for QEMU's NBD client."""
    return f"driver=nbd,server.type=unix,server.path={export.socket},export={export.export_name}"


def fsync_file(path: Path) -> None:
    """Flush ``path`` to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr[-500:]}")


def copy_with(tool: str, export: statecapture.BackupExport, out: Path, size: int) -> float:
    """Copy the export into the new qcow2 image ``out`` with ``tool``; seconds taken."""
    t0 = time.perf_counter()
    if tool == "nbdcopy":
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), str(size)])
        _run(
            [
                "nbdcopy",
                "--target-is-zero",
                "--",
                export.uri,
                "[",
                "qemu-nbd",
                "-f",
                "qcow2",
                str(out),
                "]",
            ]
        )
    elif tool == "qemu-img":
        _run(
            ["qemu-img", "convert", "-O", "qcow2", "--image-opts", nbd_image_opts(export), str(out)]
        )
    else:
        raise ValueError(f"unknown tool {tool!r}")
    fsync_file(out)
    return time.perf_counter() - t0
