"""The guide's first sequence: backup via a temporary external snapshot.

::

    freeze → disk-only external snapshot → thaw → copy the frozen images
    → active commit per disk → READY event → pivot per disk → remove the overlays

The undo is *state-driven* (:func:`merge_overlay`): it looks at what the domain runs on now
and finishes whatever is left (commit, READY, pivot, remove), so the same code serves the
in-process rollback and :func:`~statecapture.recover`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
from lxml import etree

from .. import _files, _journal
from .._blockjob import BlockJob, BlockJobKind
from .._journal import boundary
from .._ports import BlockJobPort, SnapshotPort
from ..errors import CleanupError, InvalidStateError, UnsupportedError, UsageError
from ..xml import (
    Disk,
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
)
from ..xml._base import parse, serialize
from .run import (
    SEQ_SNAPSHOT,
    QuiesceMode,
    Run,
    SequenceResult,
    _capture,
    _check_domain,
    _check_max_frozen,
    _check_quiesce,
    _preflight,
    _refuse_jobs,
    _require_api,
)

if TYPE_CHECKING:
    from .._domain import Domain

__all__ = ["OVERLAY_RE", "backup_via_temporary_snapshot", "merge_overlay"]

#: Seconds an active commit may take to become READY (a guest writing fast into the overlay
#: can delay convergence, HAZARDS 8) before the sequence gives up and undoes.
_COMMIT_TIMEOUT: Final = 600.0
#: Seconds a pivot may take to be confirmed by its end event.
_PIVOT_TIMEOUT: Final = 60.0

#: ``<image>.sc-<12 hex>.overlay.qcow2``: a temporary overlay made by statecapture.
OVERLAY_RE: Final = re.compile(r"\.sc-([0-9a-f]{12})\.overlay\.qcow2$")


# --------------------------------------------------------------------------- overlays


def _live_disk(dom: Domain, target: str) -> Disk | None:
    for disk in dom.definition.disks:
        if disk.target == target:
            return disk
    return None


def _inactive_disk(dom: Domain, target: str) -> Disk | None:
    for disk in dom.inactive_definition.disks:
        if disk.target == target:
            return disk
    return None


def _commit_job(dom: Domain, disk: str, job: BlockJob | None) -> BlockJob:
    """The active commit that merges ``disk``'s overlay: ours, one left running, or new."""
    if job is not None and not job.ended:
        return job
    if _port(dom).block_job_info(disk) is not None:
        for running in dom.block_jobs():
            if running.disk != disk:
                continue
            if running.kind is BlockJobKind.ACTIVE_COMMIT:
                return running
            # Some other job on our temporary overlay (a copy left behind): end it first.
            running.abort()
    return dom.block_commit(disk, shallow=True)


def _redefine_disk(dom: Domain, target: str, source: str, fmt: str | None) -> None:
    """Point the persistent definition's ``target`` at ``source`` (dropping its chain)."""
    root = parse(_port(dom).xml_desc(inactive=True, secure=True), expected_root="domain")
    for el in root.iterfind("devices/disk"):
        tgt = el.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        src = el.find("source")
        if src is None:
            src = etree.SubElement(el, "source")
        for attr in ("file", "dev", "name", "volume"):
            if attr in src.attrib:
                del src.attrib[attr]
        src.set("file", source)
        el.set("type", "file")
        backing = el.find("backingStore")
        if backing is not None:
            el.remove(backing)
        if fmt:
            driver = el.find("driver")
            if driver is None:
                driver = etree.Element("driver", name="qemu")
                el.insert(0, driver)
            driver.set("type", fmt)
        break
    dom.connection.port.define(serialize(root))


def _offline_merge(dom: Domain, disk: str, original: str, overlay: str, fmt: str | None) -> str:
    """Commit ``overlay`` into ``original`` with qemu-img while the domain is shut off."""
    from .. import _qemuimg

    info = _qemuimg.image_info(overlay)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing is not None and os.path.abspath(str(backing)) != os.path.abspath(original):
        raise CleanupError(
            f"the overlay {overlay} of disk {disk} is backed by {backing}, not {original}; "
            "not merging it"
        )
    _qemuimg.qemu_img("commit", "-q", "-f", "qcow2", overlay)
    _redefine_disk(dom, disk, original, fmt)
    return (
        f"{disk}: the domain is shut off: merged {overlay} into {original} with qemu-img "
        "commit and pointed the definition back at it"
    )


def merge_overlay(
    dom: Domain,
    disk: str,
    *,
    original: str,
    overlay: str,
    fmt: str | None = None,
    job: BlockJob | None = None,
    timeout: float = _COMMIT_TIMEOUT,
) -> list[str]:
    """Bring ``disk`` back onto ``original``: merge ``overlay`` into it and remove it.

    State-driven and idempotent: on a running domain that runs on the overlay, an active
    commit (``job``, one left running by a killed process, or a new one) is awaited to
    READY and pivoted; on a shut-off domain the overlay is committed with ``qemu-img`` and
    the definition repaired. The overlay file is removed once nothing uses it. Returns what
    was done; raises
    :class:`CleanupError` when the disk runs on something else.
    """
    actions: list[str] = []
    if dom.is_active:
        live = _live_disk(dom, disk)
        if live is None:
            raise CleanupError(f"domain {dom.name!r} has no disk {disk!r} any more")
        if live.source == overlay:
            below = live.backing[0].source if live.backing else None
            if below is not None and below != original:
                raise CleanupError(
                    f"disk {disk} runs on the overlay {overlay}, but its backing file is "
                    f"{below}, not {original}; not merging it"
                )
            commit = _commit_job(dom, disk, job)
            commit.wait_ready(timeout)
            commit.pivot(_PIVOT_TIMEOUT)
            actions.append(
                f"{disk}: merged {overlay} back into {original} (active commit, READY, pivot)"
            )
        elif overlay in live.chain:
            raise CleanupError(
                f"disk {disk} has {overlay} below its active image {live.source}; something "
                "layered on top of the temporary overlay: merge by hand"
            )
        elif live.source != original:
            raise CleanupError(
                f"disk {disk} runs on {live.source}, neither the original {original} nor the "
                f"overlay {overlay}; leaving it alone"
            )
        if dom.is_persistent:
            cfg = _inactive_disk(dom, disk)
            if cfg is not None and cfg.source == overlay:
                _redefine_disk(dom, disk, original, fmt)
                actions.append(f"{disk}: pointed the persistent definition back at {original}")
    else:
        cfg = _inactive_disk(dom, disk)
        if cfg is not None and cfg.source == overlay:
            actions.append(_offline_merge(dom, disk, original, overlay, fmt))
        elif cfg is not None and cfg.source != original:
            raise CleanupError(
                f"disk {disk} of the shut-off domain uses {cfg.source}, neither {original} nor "
                f"{overlay}; leaving it alone"
            )
    if os.path.lexists(overlay):
        try:
            os.unlink(overlay)
        except OSError as exc:
            raise CleanupError(f"could not remove the overlay {overlay}: {exc}") from exc
        actions.append(f"{disk}: removed {overlay}")
    return actions


@attrs.frozen
class _Overlay:
    disk: str
    original: str
    format: str | None
    overlay: str


def _plan_overlays(dom: Domain, overlay_dir: Path | None, run_id: str) -> tuple[_Overlay, ...]:
    plans: list[_Overlay] = []
    definition = dom.definition
    for disk in definition.disks:
        if disk.device != "disk" or disk.readonly or disk.snapshot == "no":
            continue
        if disk.type != "file" or not disk.source:
            raise UnsupportedError(
                f"disk {disk.target} of {dom.name!r} is not a local file ({disk.type}); "
                "backup_via_temporary_snapshot() makes file overlays only: use direct_backup()",
                operation=SEQ_SNAPSHOT,
                domain_name=dom.name,
            )
        if OVERLAY_RE.search(disk.source):
            raise InvalidStateError(
                f"disk {disk.target} of {dom.name!r} runs on a statecapture overlay "
                f"({disk.source}) left by an interrupted run; run statecapture.recover(dom)",
                operation=SEQ_SNAPSHOT,
                domain_name=dom.name,
            )
        source = Path(disk.source)
        directory = overlay_dir if overlay_dir is not None else source.parent
        overlay = directory / f"{source.name}.sc-{run_id[:12]}.overlay.qcow2"
        plans.append(_Overlay(disk.target, disk.source, disk.format, str(overlay)))
    if not plans:
        raise UsageError(f"domain {dom.name!r} has no writable disk to back up")
    for plan in plans:
        path = Path(plan.overlay)
        _files.check_free(path, "overlay")
        if not path.parent.is_dir():
            raise UsageError(f"the overlay directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"the overlay directory {path.parent} is not writable")
        # libvirtd/QEMU create the overlay by this path (HAZARDS 20)
        _files.require_trusted(path.parent, staged=False, what=f"overlay {path}")
    return tuple(plans)


# --------------------------------------------------------------------------- sequence 1


def backup_via_temporary_snapshot(
    dom: Domain,
    copy: Callable[[Mapping[str, Path]], object],
    *,
    quiesce: QuiesceMode = True,
    overlay_dir: str | os.PathLike[str] | None = None,
    max_frozen: float = 10.0,
) -> SequenceResult:
    """Back up a running domain's disks through a temporary external snapshot.

    The guide's first sequence, in one call::

        freeze → disk-only external snapshot of every disk → thaw
        → copy(mapping of disk → frozen image)
        → active commit per disk → READY event → pivot per disk → remove the overlays

    ``copy`` receives a read-only mapping ``{"vda": Path(original image), ...}``: those
    images do not change while ``copy`` runs (the guest writes into temporary overlays), so
    copy them with any tool (``cp``, ``qemu-img convert -U``, rsync ...). When ``copy``
    returns a mapping of disk → backup file, it becomes :attr:`SequenceResult.files`.

    Afterwards the domain runs on its original files again, with everything it wrote
    meanwhile merged in, and the overlays are gone. On any error — an exception from
    ``copy``, ``KeyboardInterrupt``, a failed commit — the same happens before the error
    propagates. If the process dies instead, the journal left in the domain's metadata lets
    :func:`statecapture.recover` finish the job from any process.

    Overlays are ``<overlay_dir or the image's directory>/<image name>.sc-<run>.overlay.qcow2``,
    created by libvirt (one atomic snapshot, no snapshot metadata, never reusing a file).

    Refused before anything changes: a domain that is not running or is not on local
    file disks, ``quiesce=True`` without a connected guest agent (:class:`GuestAgentError`),
    an unfinished earlier run (:class:`InvalidStateError`: run :func:`~statecapture.recover`),
    a block or backup job in progress, an existing overlay file (:class:`TargetExistsError`),
    a driver without block commit (:class:`UnsupportedError`).

    Args:
        dom: a running domain.
        copy: called once with the frozen images; its exceptions roll everything back.
        quiesce: ``True`` freezes the guest's filesystems around the snapshot
            (application-consistent); ``"best-effort"`` does when the agent answers and
            falls back to crash-consistent, saying so in :attr:`SequenceResult.notes`;
            ``False`` never freezes.
        overlay_dir: where the temporary overlays go (default: next to each image).
        max_frozen: the freeze budget in seconds (see :func:`statecapture.fs_frozen`).
    """
    dom = _check_domain(dom, SEQ_SNAPSHOT)
    mode = _check_quiesce(quiesce)
    budget = _check_max_frozen(max_frozen)
    if not callable(copy):
        raise UsageError(f"copy must be a callable taking the mapping of images, got {copy!r}")
    odir: Path | None = None
    if overlay_dir is not None:
        odir = Path(overlay_dir).absolute()
        if not odir.is_dir():
            raise UsageError(f"overlay_dir {odir} is not a directory")
    freeze, notes, record = _preflight(dom, mode, SEQ_SNAPSHOT)
    _require_api(dom, "block_commit", "virDomainBlockCommit", SEQ_SNAPSHOT)
    _refuse_jobs(dom, SEQ_SNAPSHOT)
    run_id = _journal.new_run_id()
    plans = _plan_overlays(dom, odir, run_id)
    by_disk = {p.disk: p for p in plans}
    excluded = [d.target for d in dom.definition.disks if d.target not in by_disk]
    snapshot_xml = SnapshotXML(
        name=f"sc-{run_id[:12]}",
        description="statecapture temporary overlay (backup_via_temporary_snapshot)",
        memory=SnapshotMemory(SnapshotMemoryMode.NO),
        disks=tuple(
            SnapshotDisk(p.disk, SnapshotDiskMode.EXTERNAL, p.overlay, "qcow2") for p in plans
        )
        + tuple(SnapshotDisk(t, SnapshotDiskMode.NO) for t in excluded),
    ).to_xml()
    facts: dict[str, str] = {}
    for p in plans:
        facts[f"original:{p.disk}"] = p.original
        facts[f"overlay:{p.disk}"] = p.overlay
        if p.format:
            facts[f"format:{p.disk}"] = p.format

    jobs: dict[str, BlockJob] = {}
    with Run(dom, SEQ_SNAPSHOT, run_id=run_id, facts=facts, record=record) as run:

        def merge_back() -> list[str]:
            # State-driven (see merge_overlay), so it is registered before the snapshot:
            # an interrupt between "snapshot made" and "undo registered" cannot leak it.
            problems: list[str] = []
            done: list[str] = []
            for p in reversed(plans):
                try:
                    # The planned overlay did not exist before the run (checked), so a file
                    # there now is the run's own, even when the snapshot call failed.
                    done += merge_overlay(
                        dom,
                        p.disk,
                        original=p.original,
                        overlay=p.overlay,
                        fmt=p.format,
                        job=jobs.get(p.disk),
                    )
                except Exception as exc:
                    problems.append(f"{p.disk}: {exc}")
            if problems:
                raise CleanupError(
                    f"merging the temporary overlays of {dom.name!r} back failed: "
                    + "; ".join(problems)
                )
            return done

        run.on_undo("merge the temporary overlays back", merge_back)

        def take_snapshot() -> None:
            _port(dom).snapshot_create(snapshot_xml, disk_only=True, atomic=True, no_metadata=True)

        if freeze:
            run.stage("frozen", "1")
        with run.step("snapshot"):
            frozen_for, quiesced = _capture(
                dom,
                "snapshot",
                take_snapshot,
                freeze=freeze,
                quiesce=mode,
                max_frozen=budget,
                notes=notes,
            )
            run.stage("frozen", None)
            _owner_only(p.overlay for p in plans)

        bases = MappingProxyType({p.disk: Path(p.original) for p in plans})
        with run.step("copy"):
            returned = copy(bases)

        with run.step("commit"):
            for p in plans:
                jobs[p.disk] = dom.block_commit(p.disk, shallow=True)
                boundary(f"in:commit:{p.disk}")
            for p in plans:
                jobs[p.disk].wait_ready(_COMMIT_TIMEOUT)

        with run.step("pivot"):
            for p in plans:
                jobs[p.disk].pivot(_PIVOT_TIMEOUT)
                boundary(f"in:pivot:{p.disk}")

        with run.step("remove"):
            for p in plans:
                merge_overlay(dom, p.disk, original=p.original, overlay=p.overlay, fmt=p.format)

        run.commit()

    files = _as_files(returned, bases)
    return run.result(
        files=files, frozen_for=frozen_for, quiesced=quiesced, checkpoint=None, notes=notes
    )


def _owner_only(paths: Any) -> None:
    """Make the overlays owner-only; a failure raises :class:`CleanupError` (never ignored)."""
    _files.owner_only(paths, what="snapshot overlays")


def _as_files(returned: object, bases: Mapping[str, Path]) -> Mapping[str, Path]:
    if isinstance(returned, Mapping):
        try:
            return MappingProxyType({str(k): Path(v) for k, v in returned.items()})
        except TypeError:
            pass
    return bases


class _TemporaryPort(SnapshotPort, BlockJobPort, Protocol):
    """What this module does through a domain's port: the snapshot, and its commit's job."""


def _port(dom: Domain) -> _TemporaryPort:
    """The domain's port as this module uses it: ``_TemporaryPort`` (mypy checks it)."""
    return dom.port
