"""Repository compression and encryption: bytes stored and backup throughput.

Standalone (``PYTHONPATH=. python -m benchmarks.repo_compression [--mib N] [--reps R]``):
a shut-off domain on the embedded QEMU driver owns one qcow2 disk holding ``N`` MiB of
either compressible data (text lines) or random data; each repetition backs it up (full,
offline path: ``qemu-img convert``, then the compression pass, then digests) into a new
repository per setting (``None``, ``"zlib"``, ``"zstd"``, and ``"luks"``: encrypted with a
key), alternating the order. Reported:
the median wall time of :meth:`Repository.backup`, data MiB/s (data bytes / median time) and
bytes stored on disk (the image file's allocated blocks). Every stored point is restored
once and compared with the source disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
SETTINGS: tuple[str | None, ...] = (None, "zlib", "zstd", "luks")
KEY_SECRET = b"benchmark-secret-0123456789"


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _make_disk(path: Path, mib: int, kind: str) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        if kind == "random":
            for _ in range(mib):
                f.write(os.urandom(MiB))
        else:
            line = b"2026-12-06T04:00:00Z host=web1 GET /index.html 200 1234 statecapture\n"
            block = (line * (MiB // len(line) + 1))[:MiB]
            for i in range(mib):
                f.write(block[:-8] + i.to_bytes(8, "little"))
        f.truncate(2 * mib * MiB)  # half the disk unallocated
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def _domain_xml(name: str, disk: Path) -> str:
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a Markdown table."""
    import statecapture
    from statecapture.testing.kit import make_embed_root

    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sc-bench-comp-"))
    root = make_embed_root()
    conn = statecapture.connect(f"qemu:///embed?root={root}")
    rows = []
    try:
        for kind in ("compressible", "random"):
            disk = _make_disk(work / f"{kind}.qcow2", args.mib, kind)
            ref = _sha_raw(disk, work)
            dom = conn.define(_domain_xml(f"sc-bench-{os.getpid()}-{kind}", disk))
            try:
                times: dict[str | None, list[float]] = {s: [] for s in SETTINGS}
                stored: dict[str | None, int] = {}
                data = 0
                for r in range(args.reps):
                    k = r % len(SETTINGS)
                    order = SETTINGS[k:] + SETTINGS[:k]
                    for s in order:
                        rdir = work / f"repo-{kind}-{s}-{r}"
                        if s == "luks":
                            key = statecapture.RepositoryKey(KEY_SECRET)
                            repo = statecapture.Repository.create(rdir, key=key)
                        else:
                            repo = statecapture.Repository.create(rdir, compression=s)
                        t0 = time.perf_counter()
                        p = repo.backup(dom)
                        times[s].append(time.perf_counter() - t0)
                        img = rdir / "domains" / dom.uuid / "images" / p.disks["vda"].file
                        stored[s] = img.stat().st_blocks * 512
                        data = p.bytes_copied
                        if r == 0:
                            out = repo.restore(p, work / f"out-{kind}-{s}", format="raw")
                            if _sha(out["vda"]) != ref:
                                raise SystemExit(f"restore of {kind}/{s} differs")
                            shutil.rmtree(work / f"out-{kind}-{s}")
                        shutil.rmtree(rdir)
                for s in SETTINGS:
                    med = statistics.median(times[s])
                    rows.append((kind, s or "none", data, stored[s], med, data / MiB / med))
            finally:
                dom.undefine(checkpoints_metadata=True)
    finally:
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.mib} MiB of data per disk, median of {args.reps} alternating runs\n")
    print("| data | storage | data bytes | stored bytes | ratio | median time | MiB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, s, data, st, med, rate in rows:
        print(f"| {kind} | {s} | {data} | {st} | {st / data:.2f} | {med:.2f} s | {rate:.0f} |")
    return 0


def _sha_raw(disk: Path, work: Path) -> str:
    raw = work / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    try:
        return _sha(raw)
    finally:
        raw.unlink()


if __name__ == "__main__":
    sys.exit(main())
