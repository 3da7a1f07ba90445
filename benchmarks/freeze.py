"""Item 1 — the frozen window: freeze → capture started → thaw, library against raw calls.

The window is measured from the host, from the moment the freeze call is made to the moment
the thaw call returns, the same way for both sides:

* library: the calls are observed through the domain's port, the only way the library
  calls libvirt (``statecapture.testing.faults.record``: a pass-through that adds two clock
  reads per call), so the figure includes everything the library does while the guest is
  frozen. The libvirt capture call inside (``backup_begin`` / ``snapshot_create``) is timed
  the same way, to show where the time goes;
* raw: the same libvirt-python calls made back to back: ``fsFreeze``, the capture call,
  ``fsThaw``.

Raw and library runs alternate on the same guest; the figure is the median of the runs.
Target: library ≤ 1.05 x raw, and the library's own time inside the freeze (the window less
the freeze, capture and thaw calls) ≤ 1 ms median. The note splits the window into the
freeze call, the capture call, the thaw call and the rest (for the library: its own code
while the guest is frozen), and lists the port calls the library made while frozen (every
call through the domain's and its connection's port is recorded; the goal is the capture
call alone).

Rows:

* ``direct_backup`` (push, incremental from the previous run's checkpoint, creating the next
  one — so each run copies only what the guest wrote meanwhile) against ``fsFreeze`` +
  ``backupBegin`` of the same push incremental with a checkpoint + ``fsThaw``;
* ``backup_via_temporary_snapshot`` (with a ``copy`` that copies nothing: only the window
  matters here) against ``fsFreeze`` + ``snapshotCreateXML(DISK_ONLY|ATOMIC|NO_METADATA)``
  + ``fsThaw``;
* the building blocks composed by hand: ``Domain.backup_start(plan)`` with only
  ``BackupStart.begin()`` inside ``fs_frozen`` (a pull plan with a checkpoint), and
  ``fs_frozen`` + ``snapshots.create(plan=…)`` (a disk-only plan);
* the bare freeze scope (``with fs_frozen(dom): pass``) against ``fsFreeze`` + ``fsThaw``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt

import statecapture
from statecapture.testing.faults import record

from ._common import Context, Row, Unavailable, fmt_seconds, median
from ._guest import BenchGuest

NAME = "freeze"
ITEM = 1
TITLE = "frozen window"
NEEDS_GUEST = True
TARGET = "≤ 1.05x, own time ≤ 1 ms"

_names = itertools.count()


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


class _Window:
    """What one run measured: the frozen window and the libvirt capture call inside it."""

    def __init__(self) -> None:
        self.freeze_at: float | None = None
        self.thawed_at: float | None = None
        self.capture_s = 0.0
        self.freeze_s = 0.0
        """Duration of the freeze call itself."""
        self.thaw_s = 0.0
        """Duration of the thaw call itself."""
        self.reported: float | None = None
        """The sequence's own ``SequenceResult.frozen_for`` (sequences only)."""
        self.inside: list[str] = []
        """Port calls the library made between the freeze call's return and the thaw call."""

    @property
    def seconds(self) -> float:
        if self.freeze_at is None or self.thawed_at is None:
            raise Unavailable("no fs_freeze/fs_thaw call observed in the library")
        return self.thawed_at - self.freeze_at


@contextlib.contextmanager
def _observe(dom: statecapture.Domain) -> Iterator[_Window]:
    """Record every call through ``dom``'s port (and its connection's) for the duration of
    the block; the window is filled in from the log when the block ends."""
    window = _Window()
    main = threading.get_ident()
    with record(dom) as log:
        try:
            yield window
        finally:
            freezes, thaws = log.named("fs_freeze"), log.named("fs_thaw")
            if freezes:
                window.freeze_at = freezes[0].started
                window.freeze_s = sum(c.seconds for c in freezes)
            if thaws:
                window.thawed_at = thaws[-1].ended
                window.thaw_s = sum(c.seconds for c in thaws)
            window.capture_s = sum(
                c.seconds for c in log.of(None) if c.name in ("backup_begin", "snapshot_create")
            )
            window.inside = log.between("fs_freeze", "fs_thaw", thread=main)


def _raw_window(raw: Any, capture: Callable[[], object]) -> _Window:
    window = _Window()
    window.freeze_at = time.perf_counter()
    raw.fsFreeze(None, 0)
    t0 = time.perf_counter()
    window.freeze_s = t0 - window.freeze_at
    try:
        capture()
        window.capture_s = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        raw.fsThaw(None, 0)
        window.thawed_at = time.perf_counter()
        window.thaw_s = window.thawed_at - t1
    return window


def _wait_no_backup(raw: Any, timeout: float = 120) -> None:
    """Until libvirt no longer reports a backup job (it has completed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return
        time.sleep(0.05)
    raise RuntimeError("the raw backup job did not end")


def _merge_overlays(g: BenchGuest, suffix: str) -> None:
    """Commit every disk's overlay ending in ``suffix`` back (active commit, READY, pivot)."""
    dom = g.dom
    overlays = [
        (d.target, d.source)
        for d in dom.disks
        if d.device == "disk" and d.source and d.source.endswith(suffix)
    ]
    for target, _src in overlays:
        job = dom.block_commit(target)
        job.wait_ready(timeout=300)
        job.pivot()
    for _target, src in overlays:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(src))


# --------------------------------------------------------------------------- the cases


class _Case:
    label = ""
    raw_label = ""
    reps_factor = 1
    """Runs per repetition count: cheap cases run more often to tame the agent's jitter."""

    def __init__(self, g: BenchGuest) -> None:
        self.g = g

    def setup(self) -> None:
        """Before the first run (not timed)."""

    def teardown(self) -> None:
        """After the last run."""

    def raw(self) -> _Window:
        raise NotImplementedError

    def library(self) -> _Window:
        raise NotImplementedError


class _PullBackup(_Case):
    label = "backup_start + fs_frozen + begin() (pull plan, checkpoint)"
    raw_label = "fsFreeze + backupBegin(pull, checkpoint) + fsThaw"

    def raw(self) -> _Window:
        g, raw = self.g, self.g.raw
        tmp = g.scratch("fw-raw")
        name = _unique("fw-raw")
        disks = "".join(
            f"<disk name='{d}' backup='yes' type='file'><scratch file='{tmp}/{d}.scratch'/></disk>"
            for d in g.disks
        )
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{tmp}/nbd.sock'/>"
            f"<disks>{disks}</disks></domainbackup>"
        )
        cp = f"<domaincheckpoint><name>{name}</name></domaincheckpoint>"
        try:
            return _raw_window(raw, lambda: raw.backupBegin(xml, cp, 0))
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                raw.abortJob()
            _wait_no_backup(raw)
            with contextlib.suppress(libvirt.libvirtError):
                raw.checkpointLookupByName(name, 0).delete(0)
            shutil.rmtree(tmp, ignore_errors=True)

    def library(self) -> _Window:
        dom = self.g.dom
        plan = dom.backup_plan(mode="pull", checkpoint=_unique("fw-lib"))  # outside
        # Entering the start (record, directories, lock) comes before the freeze; only
        # virDomainBackupBegin runs frozen; the job is read back after the thaw.
        with (
            dom.backup_start(plan) as start,
            _observe(dom) as window,
            statecapture.fs_frozen(dom, max_frozen=60),
        ):
            start.begin()
        job = start.job
        job.end()  # not downloaded: the job removes its checkpoint and scratch files
        return window


class _DirectBackup(_Case):
    label = "direct_backup (push, incremental)"
    raw_label = "fsFreeze + backupBegin(push, incremental, checkpoint) + fsThaw"

    def setup(self) -> None:
        if not hasattr(statecapture, "direct_backup"):
            raise Unavailable("statecapture.direct_backup does not exist yet")
        self.out = self.g.scratch("fw-seq")
        self.base = _unique("fw-base")
        self.g.dom.checkpoints.create(self.base)
        self.previous = self.base

    def teardown(self) -> None:
        dom = self.g.dom
        if self.base in dom.checkpoints:
            dom.checkpoints[self.base].delete(children=True)
        shutil.rmtree(self.out, ignore_errors=True)

    def raw(self) -> _Window:
        g, raw = self.g, self.g.raw
        tmp = g.scratch("fw-raw")
        name = _unique("fw-raw")
        disks = "".join(
            f"<disk name='{d}' backup='yes' type='file'><target file='{tmp}/{d}.qcow2'/>"
            "<driver type='qcow2'/></disk>"
            for d in g.disks
        )
        xml = (
            f"<domainbackup mode='push'><incremental>{self.previous}</incremental>"
            f"<disks>{disks}</disks></domainbackup>"
        )
        cp = f"<domaincheckpoint><name>{name}</name></domaincheckpoint>"
        try:
            return _raw_window(raw, lambda: raw.backupBegin(xml, cp, 0))
        finally:
            _wait_no_backup(raw)  # a push job ends by itself
            with contextlib.suppress(libvirt.libvirtError):
                raw.checkpointLookupByName(name, 0).delete(0)
            shutil.rmtree(tmp, ignore_errors=True)

    def library(self) -> _Window:
        name = _unique("fw-seq")
        with _observe(self.g.dom) as window:
            result = statecapture.direct_backup(
                self.g.dom,
                self.out,
                mode="push",
                incremental_from=self.previous,
                checkpoint=name,
                quiesce=True,
                max_frozen=60,
            )
        self.previous = name
        window.reported = result.frozen_for
        return window


class _SnapshotCreate(_Case):
    label = "fs_frozen + snapshots.create(plan=disk-only plan)"
    raw_label = "fsFreeze + snapshotCreateXML(DISK_ONLY|ATOMIC) + fsThaw"

    def _raw_xml(self, name: str) -> str:
        disks = "".join(
            f"<disk name='{t}' snapshot='external'><source file='{d.path}.{name}'/></disk>"
            for t, d in self.g.disks.items()
        )
        return (
            f"<domainsnapshot><name>{name}</name><memory snapshot='no'/>"
            f"<disks>{disks}</disks></domainsnapshot>"
        )

    def raw(self) -> _Window:
        raw = self.g.raw
        name = _unique("fw-raw")
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        try:
            return _raw_window(raw, lambda: raw.snapshotCreateXML(self._raw_xml(name), flags))
        finally:
            _merge_overlays(self.g, f".{name}")
            with contextlib.suppress(statecapture.NotFoundError):
                self.g.dom.snapshots[name].delete(metadata_only=True)

    def library(self) -> _Window:
        dom = self.g.dom
        name = _unique("fw-lib")
        try:
            plan = dom.snapshots.plan(name, disk_only=True)  # outside the freeze
            with _observe(dom) as window, statecapture.fs_frozen(dom, max_frozen=60):
                dom.snapshots.create(plan=plan)
            return window
        finally:
            _merge_overlays(self.g, f".{name}")
            with contextlib.suppress(statecapture.NotFoundError):
                dom.snapshots[name].delete(metadata_only=True)


class _TemporarySnapshot(_SnapshotCreate):
    label = "backup_via_temporary_snapshot"
    raw_label = "fsFreeze + snapshotCreateXML(DISK_ONLY|ATOMIC|NO_METADATA) + fsThaw"

    def setup(self) -> None:
        if not hasattr(statecapture, "backup_via_temporary_snapshot"):
            raise Unavailable("statecapture.backup_via_temporary_snapshot does not exist yet")

    def raw(self) -> _Window:
        raw = self.g.raw
        name = _unique("fw-raw")
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        )
        try:
            return _raw_window(raw, lambda: raw.snapshotCreateXML(self._raw_xml(name), flags))
        finally:
            _merge_overlays(self.g, f".{name}")

    def library(self) -> _Window:
        with _observe(self.g.dom) as window:
            result = statecapture.backup_via_temporary_snapshot(
                self.g.dom, lambda _images: None, quiesce=True, max_frozen=60
            )
        window.reported = result.frozen_for
        return window


class _Bare(_Case):
    label = "fs_frozen (empty block)"
    raw_label = "fsFreeze + fsThaw"
    reps_factor = 3

    def raw(self) -> _Window:
        return _raw_window(self.g.raw, lambda: None)

    def library(self) -> _Window:
        with _observe(self.g.dom) as window, statecapture.fs_frozen(self.g.dom, max_frozen=60):
            pass
        return window


# --------------------------------------------------------------------------- driver


def _compare(ctx: Context, case: _Case, reps: int) -> Row:
    reps *= case.reps_factor
    try:
        case.setup()
    except Unavailable as exc:
        return Row.unavailable(ITEM, case.label, str(exc), TARGET)
    runs: dict[str, list[_Window]] = {"raw": [], "library": []}
    try:
        for r in range(reps):
            order = ("raw", "library") if r % 2 == 0 else ("library", "raw")
            for side in order:
                runs[side].append(case.raw() if side == "raw" else case.library())
    finally:
        case.teardown()
    raw = median(w.seconds for w in runs["raw"])
    lib = median(w.seconds for w in runs["library"])

    def part(side: str, fn: Callable[[_Window], float]) -> str:
        return fmt_seconds(median(fn(w) for w in runs[side]))

    parts = {
        "freeze call": lambda w: w.freeze_s,
        "capture call": lambda w: w.capture_s,
        "thaw call": lambda w: w.thaw_s,
        "the rest": lambda w: w.seconds - w.freeze_s - w.capture_s - w.thaw_s,
    }
    split = ", ".join(
        f"{label} {part('library', fn)} / {part('raw', fn)}" for label, fn in parts.items()
    )
    own = median(w.seconds - w.freeze_s - w.capture_s - w.thaw_s for w in runs["library"])
    calls = sorted({", ".join(w.inside) or "none" for w in runs["library"]})
    ctx.log(
        f"  freeze: {case.label}: library {fmt_seconds(lib)}, raw {fmt_seconds(raw)}, "
        f"own {fmt_seconds(own)}, calls while frozen: {' | '.join(calls)}"
    )
    reported = [w.reported for w in runs["library"]]
    return Row(
        ITEM,
        case.label,
        library=fmt_seconds(lib),
        reference=f"raw {fmt_seconds(raw)}",
        ratio=lib / raw,
        target=TARGET,
        passed=lib <= 1.05 * raw and own <= 0.001,
        note=(
            f"raw: {case.raw_label}; median of {reps}; inside the window (library / raw): "
            f"{split}; library calls while frozen: {' | '.join(calls)}"
        ),
        values={
            "raw_s": [w.seconds for w in runs["raw"]],
            "library_s": [w.seconds for w in runs["library"]],
            "raw_capture_s": [w.capture_s for w in runs["raw"]],
            "library_capture_s": [w.capture_s for w in runs["library"]],
            "raw_freeze_call_s": [w.freeze_s for w in runs["raw"]],
            "library_freeze_call_s": [w.freeze_s for w in runs["library"]],
            "raw_thaw_call_s": [w.thaw_s for w in runs["raw"]],
            "library_thaw_call_s": [w.thaw_s for w in runs["library"]],
            "library_reported_frozen_for_s": reported,
            "library_own_s": [
                w.seconds - w.freeze_s - w.capture_s - w.thaw_s for w in runs["library"]
            ],
            "library_calls_while_frozen": [list(w.inside) for w in runs["library"]],
        },
    )


def run(ctx: Context) -> list[Row]:
    """Frozen windows of the sequences, their building blocks and the bare scope."""
    reps = ctx.repetitions(7, quick=1)
    g = ctx.guest()
    cases: list[_Case] = [
        _DirectBackup(g),
        _TemporarySnapshot(g),
        _PullBackup(g),
        _SnapshotCreate(g),
        _Bare(g),
    ]
    return [_compare(ctx, case, reps) for case in cases]
