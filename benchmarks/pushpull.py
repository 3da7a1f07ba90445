"""Item 6 — push against pull for the same data (the guest's ``vda``).

* push: ``dom.backup(mode="push", disks=["vda"], target_dir=…)`` then ``job.wait()`` — QEMU
  writes the qcow2 target itself;
* pull: ``dom.backup(mode="pull", disks=["vda"])``, ``job.download(…)``, end of the job —
  QEMU serves NBD, statecapture's client writes the qcow2 image.

Both are timed from the start of the job to the moment the image is complete and usable
(the job has ended). The two alternate; the best time of each counts. Informational: the
ratio is push / pull (lower: push is faster); no target.
"""

from __future__ import annotations

import shutil
import time

from ._common import Context, Row, fmt_bytes, fmt_seconds

NAME = "pushpull"
ITEM = 6
TITLE = "push vs pull"
NEEDS_GUEST = True


def run(ctx: Context) -> list[Row]:
    """Time a push and a pull backup of the same disk, alternating."""
    g = ctx.guest()
    dom = g.dom
    reps = ctx.repetitions(2, quick=1)
    times: dict[str, list[float]] = {"push": [], "pull": []}
    written: dict[str, int] = {}
    for r in range(reps):
        for mode in ("push", "pull") if r % 2 == 0 else ("pull", "push"):
            out = g.scratch(f"pp-{mode}")
            t0 = time.perf_counter()
            if mode == "push":
                with dom.backup(mode="push", disks=["vda"], target_dir=out) as job:
                    result = job.wait()
            else:
                with dom.backup(mode="pull", disks=["vda"]) as job:
                    result = job.download(out)
            times[mode].append(time.perf_counter() - t0)
            written[mode] = result.disk("vda").bytes_written
            shutil.rmtree(out, ignore_errors=True)
            ctx.log(f"  pushpull: {mode} {fmt_seconds(times[mode][-1])}")
    push, pull = min(times["push"]), min(times["pull"])
    return [
        Row(
            ITEM,
            "push vs pull backup of vda (job start → image complete)",
            library=f"push {fmt_seconds(push)}",
            reference=f"pull {fmt_seconds(pull)}",
            ratio=push / pull,
            note=(
                f"data written: push {fmt_bytes(written['push'])}, pull "
                f"{fmt_bytes(written['pull'])}; best of {reps}; ratio = push / pull"
            ),
            values={"times_s": times, "bytes_written": written},
        )
    ]
