"""Item 7 — peak memory of a pull download, for two disk sizes.

One pull-mode job exports both guest disks: ``vda`` (``data_mib`` MiB of data) and ``vdb``
(a quarter of that). Each export is copied by a child process running the library's pull
data path (``statecapture._nbd.copy_export``, what ``BackupJob.download`` runs per disk; see
``_memchild.py``), which reports its peak resident set size and that of the largest helper
process it starts (``qemu-img convert`` or ``qemu-nbd``, whichever writes the image).

The peaks are the kernel's ``VmHWM`` high-water marks. ``ru_maxrss`` from ``getrusage``
would be wrong here: Linux carries a process's high-water mark across ``fork`` + ``execve``,
so a child of the (large) benchmark process reports the parent's size (both figures are in
the JSON file).

The data path moves data in bounded requests and streams the extent list, so the peak must
not depend on the disk's size. Target: peak for ``vda`` ≤ 1.10 x peak for ``vdb`` (the sum
of the Python process and its helper).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import Context, Row, fmt_bytes

NAME = "memory"
ITEM = 7
TITLE = "peak memory of a pull download"
NEEDS_GUEST = True
TARGET = "≤ 1.10x"
_REPO = Path(__file__).resolve().parent.parent


def _child(socket: str, export: str, dest: Path) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks._memchild", socket, export, str(dest)],
        cwd=_REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"memory child failed ({p.returncode}): {p.stderr[-800:]}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def run(ctx: Context) -> list[Row]:
    """Peak RSS of the download for the large and the small disk."""
    g = ctx.guest()
    out = g.scratch("mem")
    got: dict[str, dict[str, Any]] = {}
    try:
        with g.dom.backup(mode="pull", disks=["vda", "vdb"]) as job:
            for export in job.exports:
                got[export.disk] = _child(
                    export.socket, export.export_name, out / f"{export.disk}.qcow2"
                )
                ctx.log(f"  memory: {export.disk}: {got[export.disk]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    big, small = got["vda"], got["vdb"]

    def total(d: dict[str, Any]) -> int:
        return int(d["peak_kib"]) + int(d["children_peak_kib"])

    def desc(d: dict[str, Any]) -> str:
        return (
            f"{fmt_bytes(total(d) * 1024)} (python {fmt_bytes(d['peak_kib'] * 1024)}, "
            f"helper {fmt_bytes(d['children_peak_kib'] * 1024)})"
        )

    ratio = total(big) / total(small)
    growth = (big["peak_kib"] - big["baseline_kib"]) * 1024
    return [
        Row(
            ITEM,
            f"peak RSS: vda {fmt_bytes(big['bytes'])} vs vdb {fmt_bytes(small['bytes'])} data",
            library=desc(big),
            reference=desc(small),
            ratio=ratio,
            target=TARGET,
            passed=ratio <= 1.10,
            note=(
                f"the Python process grew {fmt_bytes(growth)} over its "
                f"{fmt_bytes(big['baseline_kib'] * 1024)} after imports while copying vda; "
                "ratio = vda / vdb"
            ),
            values={"vda": big, "vdb": small},
        )
    ]
