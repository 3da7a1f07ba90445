"""The external copiers the throughput benchmark compares with, in their best setups.

Each reads a pull job's NBD export (or, for ``dd``, the same bytes from a file in the page
cache) and writes a new file on the same file system as the library's download; each time
includes getting the output onto the disk (``fsync``, or the tool's own flush):

* ``qemu-img convert -O qcow2 -t none -m 16 -W`` — O_DIRECT writes, 16 coroutines,
  out-of-order writes; then ``fsync`` (metadata);
* ``nbdcopy --flush --target-is-zero`` to a raw file, with ``--connections=1`` and, when
  the export advertises multi-conn, ``--connections=4`` (nbdcopy's default there);
* ``dd bs=4M oflag=direct conv=fsync`` of a raw file holding exactly the export's data
  extents (made before the runs, read from the page cache): the machine's copy limit for
  these bytes, with no NBD and no image format.

:func:`compare` checks an output against the export (``qemu-img compare``), or ``dd``'s
output against its input (``cmp``), outside the timed part.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import statecapture

__all__ = [
    "QEMU_IMG_BEST",
    "compare",
    "copy_with",
    "data_file",
    "fsync_file",
    "multi_conn",
    "nbd_image_opts",
    "tools",
]

QEMU_IMG_BEST = "qemu-img -t none -m 16 -W"


def tools(multi: bool) -> tuple[str, ...]:
    """The external copiers to run (``nbdcopy`` with 4 connections only under multi-conn)."""
    out = [QEMU_IMG_BEST, "nbdcopy --flush -C 1"]
    if multi:
        out.append("nbdcopy --flush -C 4")
    return (*out, "dd oflag=direct")


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


def _run(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr[-500:]}")
    return p.stdout


def multi_conn(export: statecapture.BackupExport) -> bool:
    """Whether the export advertises ``NBD_FLAG_CAN_MULTI_CONN`` (``nbdinfo --json``)."""
    info = json.loads(_run(["nbdinfo", "--json", export.uri]))
    return bool(info["exports"][0].get("can_multi_conn"))


def data_file(export: statecapture.BackupExport, out: Path) -> int:
    """Write the export's data extents, back to back, into the raw file ``out``; its size."""
    from statecapture._nbd import load_nbd

    mod = load_nbd()
    if mod is None:
        raise RuntimeError("libnbd's Python binding is needed to prepare dd's input")
    extents = json.loads(
        _run(["qemu-img", "map", "--output=json", "--image-opts", nbd_image_opts(export)])
    )
    h = mod.NBD()
    h.set_export_name(export.export_name)
    h.connect_unix(export.socket)
    total = 0
    try:
        with open(out, "wb") as f:
            for e in extents:
                if not e.get("data"):
                    continue
                pos, end = int(e["start"]), int(e["start"]) + int(e["length"])
                while pos < end:
                    n = min(4 << 20, end - pos)
                    f.write(h.pread(n, pos))
                    pos += n
                    total += n
    finally:
        h.shutdown()
    return total


def copy_with(tool: str, export: statecapture.BackupExport, out: Path, dd_input: Path) -> float:
    """Copy with ``tool`` (one of :func:`tools`) into the new file ``out``; seconds taken."""
    t0 = time.perf_counter()
    if tool == QEMU_IMG_BEST:
        argv = ["qemu-img", "convert", "-O", "qcow2", "-t", "none", "-m", "16", "-W"]
        _run([*argv, "--image-opts", nbd_image_opts(export), str(out)])
        fsync_file(out)
    elif tool.startswith("nbdcopy"):
        conns = tool.rsplit(" ", 1)[1]
        out.touch(mode=0o600)
        _run(
            [
                "nbdcopy",
                "--flush",
                "--target-is-zero",
                f"--connections={conns}",
                "--",
                export.uri,
                str(out),
            ]
        )
    elif tool == "dd oflag=direct":
        _run(
            [
                "dd",
                f"if={dd_input}",
                f"of={out}",
                "bs=4M",
                "oflag=direct",
                "conv=fsync",
                "status=none",
            ]
        )
    else:
        raise ValueError(f"unknown tool {tool!r}")
    return time.perf_counter() - t0


def compare(tool: str, export: statecapture.BackupExport, out: Path, dd_input: Path) -> bool:
    """Whether ``out`` holds what ``tool`` was to copy (the export's content, or dd's input)."""
    if tool == "dd oflag=direct":
        return subprocess.run(["cmp", "-s", str(dd_input), str(out)], check=False).returncode == 0
    fmt = "raw" if tool.startswith("nbdcopy") else "qcow2"
    mine = f"driver={fmt},file.driver=file,file.filename={out}"
    p = subprocess.run(
        ["qemu-img", "compare", "--image-opts", mine, nbd_image_opts(export)],
        capture_output=True,
        text=True,
        check=False,
    )
    return p.returncode == 0
