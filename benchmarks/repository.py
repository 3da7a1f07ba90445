"""Item 8 — backup repository: digest overhead, verify reads, listing 10/100/1000 points.

No guest: the data is an image of ``--data-mib`` MiB of incompressible data made here.

* **digest overhead**: the time to digest a full layer (``digests.digest_blocks``, reading
  the stored qcow2 file, page cache warm as right after a copy) against the time to write
  that layer (``qemu-img convert -O qcow2`` of the same data, flushed: a stand-in for the
  copy of a full backup). Target: digesting adds ≤ 10 % of the copy time.
* **verify reads**: bytes ``Repository.verify`` reads per stored byte, over a repository of
  one full point and one incremental point. Target: ≤ 1.05 (each stored byte once).
* **points()**: ``Repository.points()`` over 10, 100, 1000 synthetic points; the growth
  exponent ``k`` of ``log(time) = k·log(n) + c``. Target: ``k ≤ 1.10``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ._common import Context, Row, fit_exponent, fmt_bytes, fmt_seconds, median

NAME = "repository"
NEEDS_GUEST = False
ITEM = 8
TITLE = "backup repository"
TARGET = "digest ≤ 10 % of copy; verify ≤ 1.05 reads/byte; points() k ≤ 1.10"

MiB = 1 << 20


def _image(tmp: Path, mib: int) -> Path:
    raw = tmp / "data.raw"
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return raw


def run(ctx: Context) -> list[Row]:
    """Measure the three repository figures."""
    from statecapture import Repository
    from statecapture._repository import digests as dg
    from statecapture._repository.manifest import (
        DiskEntry,
        PointKind,
        RestorePoint,
        dumps,
        new_point_id,
    )

    rows: list[Row] = []
    mib = min(ctx.data_mib, 256)
    reps = ctx.repetitions(3, quick=1)
    with tempfile.TemporaryDirectory(prefix="sc-bench-repo-") as t:
        tmp = Path(t)
        raw = _image(tmp, mib)
        copies, digests = [], []
        for i in range(reps):
            out = tmp / f"copy{i}.qcow2"
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            copies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dg.digest_blocks(out, mib * MiB)
            digests.append(time.perf_counter() - t0)
            out.unlink()
        ratio = median(digests) / median(copies)
        rows.append(
            Row(
                ITEM,
                f"digest a full layer ({mib} MiB)",
                library=fmt_seconds(median(digests)),
                reference=f"copy {fmt_seconds(median(copies))}",
                ratio=ratio,
                target="≤ 0.10x",
                passed=ratio <= 0.10,
                note="digest time / qemu-img convert time (flushed)",
                values={"digest": digests, "copy": copies},
            )
        )
        # verify: a full layer and an incremental layer written with qemu-io
        base = tmp / "base.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(base)], check=True)
        top = tmp / "top.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                str(top),
            ],
            check=True,
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x42 0 {max(1, mib // 8)}M", str(top)],
            check=True,
            capture_output=True,
        )
        repo = Repository.create(tmp / "repo")
        uuid = "12345678-1234-1234-1234-123456789abc"
        ddir = repo._domain_dir(uuid, create=True)
        os.rename(base, ddir / "images" / "base.qcow2")
        os.rename(top, ddir / "images" / "top.qcow2")
        size = mib * MiB
        p1, p2 = new_point_id(), new_point_id(time.time() + 1)
        full = dg.digest_blocks(ddir / "images" / "base.qcow2", size)
        ext = dg.read_map(ddir / "images" / "top.qcow2")
        touched = dg.layer_blocks(ext)
        inc = dg.digest_blocks(ddir / "images" / "top.qcow2", size, touched.__contains__)
        (ddir / "digests" / f"{p1}.vda.json").write_bytes(
            dg.DigestMap(size, full, complete=True).to_json()
        )
        (ddir / "digests" / f"{p2}.vda.json").write_bytes(
            dg.DigestMap(size, inc, complete=False).to_json()
        )
        stored = 0
        for pid, kind, f, parent, dname in (
            (p1, PointKind.FULL, "base.qcow2", None, f"{p1}.vda.json"),
            (p2, PointKind.INCREMENTAL, "top.qcow2", "base.qcow2", f"{p2}.vda.json"),
        ):
            layer = [e for e in dg.read_map(ddir / "images" / f) if e.depth == 0 and e.data]
            stored += sum(e.length for e in layer)
            point = RestorePoint(
                id=pid,
                domain="bench",
                domain_uuid=uuid,
                time=time.time(),
                kind=kind,
                reason="bench",
                checkpoint=None,
                parent=p1 if parent else None,
                disks={"vda": DiskEntry(f, kind, size, 0, parent, dname)},
            )
            (ddir / "points" / f"{pid}.json").write_bytes(dumps(point.to_json()))
        t0 = time.perf_counter()
        report = repo.verify()
        took = time.perf_counter() - t0
        per_byte = report.bytes_read / stored if stored else 0.0
        rows.append(
            Row(
                ITEM,
                "verify: bytes read per stored byte",
                library=f"{fmt_bytes(report.bytes_read)} in {fmt_seconds(took)}",
                reference=f"stored {fmt_bytes(stored)}",
                ratio=per_byte,
                target="≤ 1.05x",
                passed=report.ok and per_byte <= 1.05,
                values={"read": report.bytes_read, "stored": stored, "ok": report.ok},
            )
        )
        # points(): synthetic manifests
        listing = Repository.create(tmp / "many")
        ldir = listing._domain_dir(uuid, create=True)
        ns = (5, 10, 20) if ctx.quick else (10, 100, 1000)
        times: list[float] = []
        made = 0
        for n in ns:
            while made < n:
                pid = new_point_id(1_700_000_000 + made)
                point = RestorePoint(
                    id=pid,
                    domain="bench",
                    domain_uuid=uuid,
                    time=1_700_000_000 + made,
                    kind=PointKind.FULL,
                    reason="bench",
                    checkpoint=None,
                    parent=None,
                    disks={"vda": DiskEntry(f"f{made}.qcow2", PointKind.FULL, size)},
                )
                (ldir / "points" / f"{pid}.json").write_text(json.dumps(point.to_json()))
                made += 1
            samples = []
            for _ in range(ctx.repetitions(5, quick=2)):
                t0 = time.perf_counter()
                listing.points()
                samples.append(time.perf_counter() - t0)
            times.append(min(samples))
        k = fit_exponent(ns, times)
        rows.append(
            Row(
                ITEM,
                f"points() (n = {', '.join(map(str, ns))})",
                library=", ".join(f"{n}: {fmt_seconds(s)}" for n, s in zip(ns, times, strict=True)),
                ratio=k,
                target="k ≤ 1.10",
                passed=k <= 1.10,
                values={"n": list(ns), "seconds": times, "exponent": k},
            )
        )
    return rows
