"""Item 9 — fleets on Dask: per-host parallelism and the controller's memory.

The documented deployment on one machine: a ``dask scheduler`` process and two ``dask
worker`` processes standing for two hypervisors (one embedded QEMU root per worker,
``--resources host:h1=2`` / ``host:h2=2``); this process is only the controller.

* **wall time**: 8 tiny guests (4 per host, paused QEMU processes with a 16 MiB data disk
  holding 8 MiB of data) are backed up in full, first one host at a time with
  ``per_host=1`` (each host's *serial share*), then the whole fleet with ``per_host=2``.
  Target: the fleet run takes ≤ 1.2x the slowest host's serial share (the hosts run side by
  side and the engine adds little).
* **controller memory**: ``fleet.prune(dry_run=True)`` over a test-driver host with 1, 10
  and 100 shut-off domains (one real, small task per domain; nothing changes). The
  controller's peak traced memory (``tracemalloc``) during the run must stay flat: it may
  grow by the report and the host's listing only (a few hundred bytes per domain), never by
  futures, task data or the task graph: target at most 1 MiB more at 100 tasks than at 1.
  (Dask's own bounded per-connection message log is set to 10 messages here.)
  ``--quick`` uses 1, 5, 20.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from ._common import Context, Row, Unavailable, fmt_bytes, fmt_seconds

NAME = "fleet"
NEEDS_GUEST = False
ITEM = 9
TITLE = "fleet"
TARGET = "≤ 1.20x"
ROOT = Path(__file__).resolve().parent.parent


def _boot_paused(uri: str, tmp: str, names: list[str]) -> list[str]:
    """On a worker: define and start (paused) one guest per name with a 16 MiB data disk."""
    from statecapture.fleet import run as fleet_run
    from statecapture.testing.kit import domain_xml, ensure_kit, make_data_disk

    conn = fleet_run._connection(uri)
    kit = ensure_kit()
    out = []
    for name in names:
        disk = make_data_disk(Path(tmp) / f"{name}.qcow2", size_mib=16)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(disk)],
            check=True,
            capture_output=True,
        )
        dom = conn.define(domain_xml(name, kit, [disk], agent=False))
        dom.start(paused=True)
        out.append(dom.uuid)
    return out


def _teardown(uri: str) -> None:
    from tests import _fleet_worker

    _fleet_worker.teardown(uri)


def _node(d: Path, n: int) -> str:
    parts = [
        f"<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
        f"<name>vm-{i:04d}</name><memory>8192</memory><os><type>hvm</type></os>"
        "<test:runstate>5</test:runstate></domain>"
        for i in range(n)
    ]
    node = d / f"node-{n}.xml"
    node.write_text("<node>" + "".join(parts) + "</node>")
    return f"test://{node}"


def _start(work: Path, names: tuple[str, ...]) -> tuple[list[subprocess.Popen[bytes]], Path]:
    """``dask scheduler`` and one ``dask worker`` per host, each its own process group (the
    documented deployment, on one machine); the scheduler file."""
    dask = str(Path(sys.executable).parent / "dask")
    sched_file = work / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    ), "DASK_TEMPORARY_DIRECTORY": str(work / "dask")}  # fmt: skip
    common = dict(env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)],
            start_new_session=True, **common,  # type: ignore[arg-type]
        )
    ]  # fmt: skip
    for h in names:
        procs.append(
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(sched_file), "--name", h,
                 "--nthreads", "2", "--resources", f"host:{h}=2", "--memory-limit", "0",
                 "--no-dashboard", "--local-directory", str(work / "dask")],
                start_new_session=True, **common,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    return procs, sched_file


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def run(ctx: Context) -> list[Row]:
    """Start a scheduler and two workers, run both measurements, tear everything down."""
    try:
        import distributed
    except ImportError as exc:
        raise Unavailable("Dask distributed is not installed (statecapture[fleet])") from exc
    if os.geteuid() != 0:
        raise Unavailable("needs root (embedded QEMU roots)")
    import statecapture
    from statecapture import fleet
    from statecapture.testing.kit import ensure_kit
    from tests._isolation import make_embed_root

    ensure_kit()
    work = Path(tempfile.mkdtemp(prefix="sc-bench-fleet-"))
    names = ("h1", "h2")
    roots = {h: make_embed_root(prefix=f"scb{h}-") for h in names}
    procs, sched_file = _start(work, names)
    client: Any = None
    rows: list[Row] = []
    hosts: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if time.monotonic() > deadline:
                raise Unavailable("dask scheduler did not start")
            time.sleep(0.2)
        import dask

        # Dask keeps the last N messages of each connection for debugging (default 1000):
        # bounded, but it would hide the fleet's own per-task footprint below N tasks.
        with dask.config.set({"distributed.admin.low-level-log-length": 10}):
            client = distributed.Client(scheduler_file=str(sched_file), timeout=60)
        client.wait_for_workers(2, timeout=120)
        for h in names:
            (work / h).mkdir()
            statecapture.Repository.create(work / h / "repo")
            hosts.append(
                fleet.Host(h, f"qemu:///embed?root={roots[h]}", repository=work / h / "repo")
            )
        futs = [
            client.submit(
                _boot_paused,
                hosts[i].uri,
                str(work / h),
                [f"scb-{os.getpid()}-{h}-{j}" for j in range(4)],
                resources={f"host:{h}": 1},
                pure=False,
            )
            for i, h in enumerate(names)
        ]
        for f in futs:
            f.result(timeout=600)
        rows.append(_wall(ctx, client, hosts))
        rows.append(_memory(ctx, client, work))
    finally:
        if client is not None:
            for h in hosts:
                try:
                    client.submit(_teardown, h.uri, resources={h.resource: 1}, pure=False).result(
                        timeout=120
                    )
                except Exception as exc:
                    ctx.log(f"fleet: teardown of {h.name} failed: {exc!r}")
            client.close()
        _stop(procs)
        shutil.rmtree(work, ignore_errors=True)
        for r in roots.values():
            shutil.rmtree(r, ignore_errors=True)
    return rows


def _wall(ctx: Context, client: Any, hosts: list[Any]) -> Row:
    from statecapture import fleet

    name = "8 guests, 2 hosts, per_host=2"
    rounds = ctx.repetitions(3, quick=1)
    serial: dict[str, list[float]] = {h.name: [] for h in hosts}
    walls: list[float] = []
    copied = 0
    for _ in range(rounds):  # alternate, keep the best of each: the machine is shared
        for h in hosts:
            t0 = time.monotonic()
            rep = fleet.backup([h], client=client, per_host=1, full=True, quiesce=False)
            serial[h.name].append(time.monotonic() - t0)
            if not rep.ok:
                return Row.unavailable(ITEM, name, str(rep)[:160])
        t0 = time.monotonic()
        rep = fleet.backup(hosts, client=client, per_host=2, full=True, quiesce=False)
        walls.append(time.monotonic() - t0)
        if not rep.ok:
            return Row.unavailable(ITEM, name, str(rep)[:160])
        copied = rep.bytes
    best = {k: min(v) for k, v in serial.items()}
    slowest = max(best.values())
    wall = min(walls)
    ratio = wall / slowest
    ctx.log(f"fleet: serial shares {serial}, fleet runs {walls}")
    return Row(
        ITEM,
        name,
        library=fmt_seconds(wall),
        reference=f"slowest host serial {fmt_seconds(slowest)}",
        ratio=ratio,
        target=TARGET,
        passed=ratio <= 1.20,
        note=f"{fmt_bytes(copied)} copied per run; best of {rounds}; serial shares "
        + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in best.items()),
        values={"serial": serial, "fleet_wall": walls, "bytes": copied},
    )


def _memory(ctx: Context, client: Any, work: Path) -> Row:
    import statecapture
    from statecapture import fleet

    counts = (1, 5, 20) if ctx.quick else (1, 10, 100)
    peaks: dict[int, int] = {}
    for n in counts:
        d = work / f"mem-{n}"
        d.mkdir()
        repo = d / "repo"
        statecapture.Repository.create(repo)
        hosts = [fleet.Host("h1", _node(d, n), repository=repo)]
        tracemalloc.start()
        try:
            rep = fleet.prune(hosts, keep_last=1, dry_run=True, client=client, per_host=2)
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        if not rep.ok or len(rep.results) != n:
            return Row.unavailable(ITEM, "controller memory", str(rep)[:160])
        peaks[n] = peak
    lo, hi = peaks[min(peaks)], peaks[max(peaks)]
    growth = hi - lo
    per_task = growth / (max(peaks) - min(peaks))
    return Row(
        ITEM,
        f"controller peak memory, {min(peaks)} → {max(peaks)} tasks",
        library=f"+{fmt_bytes(growth)} ({fmt_bytes(per_task)}/task)",
        reference=f"{min(peaks)} task: {fmt_bytes(lo)}, {max(peaks)}: {fmt_bytes(hi)}",
        ratio=hi / lo if lo else None,
        target="≤ +1 MiB",
        passed=growth <= 1024 * 1024,
        note="tracemalloc peak on the controller during fleet.prune(dry_run=True) (the "
        "scheduler is another process); what grows is the report itself, one DomainResult "
        "per domain; " + ", ".join(f"{k}: {fmt_bytes(v)}" for k, v in sorted(peaks.items())),
        values={"peaks": peaks, "growth": growth, "per_task": per_task},
    )
