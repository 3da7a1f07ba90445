"""Item 4 — full pull backup throughput against ``nbdcopy`` and ``qemu-img convert``.

The guest's ``vda`` holds ``data_mib`` MiB of random data on a disk twice as large. Each
measurement starts its own pull-mode job of ``vda`` (``dom.backup(mode="pull",
disks=["vda"])``) and times only the copy of its NBD export into a new qcow2 image on the
same host filesystem:

* library: ``BackupJob.download(dir)`` (the default client), and
  ``BackupJob.download(dir, client="qemu-img")``, the data path it falls back to without
  libnbd's Python binding;
* ``nbdcopy`` and ``qemu-img convert`` reading the same export (see ``_tools.py``),

each including the flush of its image to disk. The copiers take turns (rotating order) and
each one's best time counts, since other processes only ever slow a run down. One untimed
read first puts the disk image into the host's page cache for everyone. Throughput is the
library's data bytes (what it copied: allocated extents) per second, for every copier.
Target: library (default client) ≥ 0.90 x the best tool.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

from ._common import Context, Row, fmt_bytes, fmt_seconds
from ._tools import TOOLS, copy_with

NAME = "throughput"
ITEM = 4
TITLE = "full pull backup throughput"
NEEDS_GUEST = True
TARGET = "≥ 0.90x"


def _mibs(nbytes: int, seconds: float) -> float:
    return nbytes / (1 << 20) / seconds


LIBRARY = {"library": None, "library (client='qemu-img')": "qemu-img"}
"""The library's copiers: label -> ``client=`` of ``BackupJob.download``."""


def measure(ctx: Context, reps: int) -> dict[str, Any]:
    """Time every copier ``reps`` times; ``{"times": {name: [s, ...]}, "bytes": n}``."""
    g = ctx.guest()
    dom = g.dom
    size = g.disks["vda"].size
    with dom.backup(mode="pull", disks=["vda"]) as job:  # warm the host page cache
        subprocess.run(
            ["nbdcopy", "--", job.exports[0].uri, "null:"], check=True, capture_output=True
        )
    names = [*LIBRARY, *TOOLS]
    times: dict[str, list[float]] = {n: [] for n in names}
    data_bytes = 0
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out_dir = g.scratch("tp")
            with dom.backup(mode="pull", disks=["vda"]) as job:
                if name in LIBRARY:
                    t0 = time.perf_counter()
                    result = job.download(out_dir, client=LIBRARY[name])
                    times[name].append(time.perf_counter() - t0)
                    if LIBRARY[name] is None:
                        data_bytes = result.disk("vda").bytes_written
                else:
                    times[name].append(copy_with(name, job.exports[0], out_dir / "vda.qcow2", size))
            shutil.rmtree(out_dir, ignore_errors=True)
            ctx.log(f"  throughput: {name} {fmt_seconds(times[name][-1])}")
    return {"times": times, "bytes": data_bytes}


def run(ctx: Context) -> list[Row]:
    """The library's download against the best external tool, same export, same run."""
    reps = ctx.repetitions(3, quick=1)
    got = measure(ctx, reps)
    times: dict[str, list[float]] = got["times"]
    nbytes: int = got["bytes"]
    best = {name: min(ts) for name, ts in times.items()}
    tool = min(TOOLS, key=lambda t: best[t])
    tool_rate = _mibs(nbytes, best[tool])
    tools = ", ".join(
        f"{t} {_mibs(nbytes, best[t]):.0f} MiB/s ({fmt_seconds(best[t])})" for t in TOOLS
    )
    rows = []
    for name, client in LIBRARY.items():
        rate = _mibs(nbytes, best[name])
        ratio = rate / tool_rate
        default = client is None
        rows.append(
            Row(
                ITEM,
                f"full pull backup, {fmt_bytes(nbytes)} data"
                + ("" if default else f" (download client={client!r})"),
                library=f"{rate:.0f} MiB/s ({fmt_seconds(best[name])})",
                reference=f"{tool} {tool_rate:.0f} MiB/s",
                ratio=ratio,
                target=TARGET if default else "",
                passed=ratio >= 0.90 if default else None,
                higher_is_better=True,
                note=f"tools: {tools}; best of {reps}" if default else "",
                values={"bytes": nbytes, "times_s": times, "best_tool": tool},
            )
        )
    return rows
