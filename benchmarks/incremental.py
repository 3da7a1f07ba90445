"""Item 5 — incremental efficiency: bytes copied per byte dirtied, and time against a full.

1. A full pull backup of ``vda`` that creates checkpoint ``bench-c0``
   (``dom.backup(mode="pull", disks=["vda"], checkpoint="bench-c0")`` + ``download``).
2. In the guest, ``dd`` overwrites ``data_mib / 16`` MiB in the middle of ``/data/random.bin``
   (in place, ``conv=notrunc``, then ``sync``): the bytes dirtied.
3. An incremental pull backup from ``bench-c0`` into the same directory (a qcow2 layer on the
   full image).

Rows: bytes copied ÷ bytes the guest wrote (target ≤ 1.05 x + cluster rounding: two 64 KiB
clusters for the one contiguous write; the filesystem's own journal and metadata writes and
the guest's tick file count against the library here), bytes copied ÷ what libvirt's
bitmap reports dirty (``Checkpoint.dirty_bytes()``; informational), and the incremental's
time ÷ the full backup's time (informational).
"""

from __future__ import annotations

import shutil
import time

from ._common import Context, Row, fmt_bytes, fmt_seconds

NAME = "incremental"
ITEM = 5
TITLE = "incremental efficiency"
NEEDS_GUEST = True
CLUSTER = 64 << 10


def run(ctx: Context) -> list[Row]:
    """Full backup, dirty a known amount, incremental backup; compare."""
    g = ctx.guest()
    dom = g.dom
    data_mib = g.disks["vda"].data >> 20
    dirty_mib = max(4, data_mib // 16)
    out = g.scratch("inc")
    c0, c1 = "bench-c0", "bench-c1"
    try:
        t0 = time.perf_counter()
        with dom.backup(mode="pull", disks=["vda"], checkpoint=c0) as job:
            full = job.download(out)
        full_s = time.perf_counter() - t0
        ctx.log(f"  incremental: full backup {fmt_seconds(full_s)}")
        seek = data_mib // 2
        g.guest_exec(
            [
                "sh",
                "-c",
                f"dd if=/data/random.bin of=/data/random.bin bs=1M skip=0 seek={seek} "
                f"count={dirty_mib} conv=notrunc 2>/dev/null && sync",
            ],
            timeout=600,
        )
        dirtied = dirty_mib << 20
        bitmap = dom.checkpoints[c0].dirty_bytes()["vda"]
        t0 = time.perf_counter()
        with dom.backup(mode="pull", disks=["vda"], incremental_from=c0, checkpoint=c1) as job:
            inc = job.download(out)
        inc_s = time.perf_counter() - t0
        ctx.log(f"  incremental: incremental backup {fmt_seconds(inc_s)}")
    finally:
        for name in (c1, c0):
            if name in dom.checkpoints:
                dom.checkpoints[name].delete()
        shutil.rmtree(out, ignore_errors=True)
    copied = inc.disk("vda").bytes_written
    limit = 1.05 * dirtied + 2 * CLUSTER
    full_bytes = full.disk("vda").bytes_written
    values = {
        "guest_wrote": dirtied,
        "bitmap_dirty": bitmap,
        "copied": copied,
        "full_copied": full_bytes,
        "full_s": full_s,
        "incremental_s": inc_s,
    }
    return [
        Row(
            ITEM,
            f"bytes copied ÷ bytes dirtied ({fmt_bytes(dirtied)} rewritten)",
            library=fmt_bytes(copied),
            reference=f"dirtied {fmt_bytes(dirtied)}",
            ratio=copied / dirtied,
            target="≤ 1.05x + 2 clusters",
            passed=copied <= limit,
            note="guest filesystem journal/metadata and the tick file are dirtied too",
            values=values,
        ),
        Row(
            ITEM,
            "bytes copied ÷ bitmap dirty bytes",
            library=fmt_bytes(copied),
            reference=f"bitmap {fmt_bytes(bitmap)}",
            ratio=copied / bitmap if bitmap else None,
            values=values,
        ),
        Row(
            ITEM,
            "incremental time ÷ full backup time",
            library=fmt_seconds(inc_s),
            reference=f"full {fmt_seconds(full_s)} ({fmt_bytes(full_bytes)})",
            ratio=inc_s / full_s,
            values=values,
        ),
    ]
