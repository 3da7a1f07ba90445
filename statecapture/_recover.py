"""``recover()``: finish or undo what an interrupted run left behind.

A sequence (:func:`~statecapture.backup_via_temporary_snapshot`,
:func:`~statecapture.direct_backup`) or a plain backup job undoes itself when it fails in
process. When the process dies instead (``SIGKILL``, power cut, lost connection, a crashed
notebook kernel), its crash record (:mod:`statecapture._journal`: the one record type of
every run) stays in the domain's metadata and :func:`recover` — from any process, on any
host connected to the same daemon — reads it and undoes the run, in this order:

1. thaw the guest's filesystems when the record says a freeze may be in effect, or the guest
   agent reports them frozen (a thaw of a thawed guest is harmless);
2. end a leftover backup job (``abortJob`` + ``JOB_COMPLETED``), removing its scratch files
   and — from the record — the checkpoint and files of a job that never delivered;
3. merge every temporary overlay back into its original image (active commit, READY event,
   pivot; ``qemu-img commit`` when the domain is shut off) and remove it — overlays are also
   recognised by name (``*.sc-<run>.overlay.qcow2``) when no record names them;
4. delete the checkpoint, the (partial) image files and the private directories of an
   unfinished direct backup;
5. clean up after a plain backup job whose run died and whose job has ended since (a daemon
   restart ends a running job): its record names its checkpoint and files; unless the run
   delivered every disk, both are removed, then the record;
6. clear the record — only when every step above succeeded, so a failed recovery can be
   retried: ``recover()`` is idempotent.

A domain made by :meth:`Repository.boot <statecapture.Repository.boot>` carries a boot
record (:mod:`statecapture._repository.custody`): :func:`recover` reports what it depends on
and whether it can start again, and changes nothing about it (the record, the overlays and
the repository stay; :meth:`~statecapture.Repository.detach` or undefining it are the
caller's choice).

A record written by an older statecapture (two records then: the sequences' journal and the
backup job's record) is read by :mod:`statecapture._journal_legacy` as one record and
repaired the same way."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs

from ._backup import active_backup, recover_stale
from ._journal import Journal, clear_journal, read_journal
from ._sequences import OVERLAY_RE, SEQ_DIRECT, SEQ_SNAPSHOT, discard_backup, merge_overlay
from .errors import (
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    OperationTimeoutError,
    StateCaptureError,
    ThawError,
    UnsupportedError,
    UsageError,
    XMLError,
)

if TYPE_CHECKING:
    from ._blockjob import BlockJob
    from ._domain import Domain
    from ._ports import FreezePort

__all__ = ["RecoveryReport", "recover"]

_T = TypeVar("_T")


@attrs.frozen
class RecoveryReport:
    """What :func:`recover` found on a domain and what it did about it."""

    domain: str
    """The domain's name."""
    found: tuple[str, ...]
    """What was left behind: an unfinished run, a frozen guest, a job, an overlay ..."""
    actions: tuple[str, ...]
    """What recover() did, in order."""
    errors: tuple[str, ...]
    """What it could not do (the journal is kept, so a later call retries)."""
    clean: bool
    """Whether the domain is now free of anything a sequence leaves behind."""

    @property
    def nothing_found(self) -> bool:
        """Whether there was nothing to recover."""
        return not self.found

    def __str__(self) -> str:
        head = (
            f"recover({self.domain!r}): "
            f"{'clean' if self.clean else 'NOT clean'}, {len(self.found)} found, "
            f"{len(self.actions)} action(s), {len(self.errors)} error(s)"
        )
        lines = [head]
        lines += [f"  found:  {f}" for f in self.found] or ["  found:  nothing"]
        lines += [f"  did:    {a}" for a in self.actions]
        lines += [f"  error:  {e}" for e in self.errors]
        return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Recovery:
    def __init__(self, dom: Domain, agent_timeout: float) -> None:
        self.dom = dom
        self.agent_timeout = agent_timeout
        self.found: list[str] = []
        self.actions: list[str] = []
        self.errors: list[str] = []

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        """Run one recovery stage; its failure is reported, and the next stages still run."""
        try:
            fn()
        except (StateCaptureError, OSError) as exc:
            self.errors.append(f"{what}: {exc}")

    # ---- 1. freeze
    def agent(self, fn: Callable[[], _T]) -> _T:
        """Call the guest agent, retrying while it is "not connected" yet: a fresh process
        reconnects to a running domain's agent a moment after it can use the domain."""
        deadline = time.monotonic() + self.agent_timeout
        while True:
            try:
                return fn()
            except GuestAgentError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.25)

    def thaw(self, journal: Journal | None) -> None:
        dom = self.dom
        journalled = journal is not None and journal.fact("frozen") == "1"
        if journalled:
            self.found.append("the journal says a freeze may be in effect")
        if not dom.is_active:
            return
        if not dom.agent_connected:
            if not journalled:
                return  # no agent, no freeze
            try:
                dom.wait_for_agent(self.agent_timeout)
            except (GuestAgentError, OperationTimeoutError) as exc:
                raise GuestAgentError(
                    f"the guest agent is not connected, so the guest cannot be thawed ({exc}); "
                    "call recover() again once it is",
                    operation="recover",
                    domain_name=dom.name,
                ) from exc
        status: str | None
        try:
            status = self.agent(_port(dom).fs_freeze_status)
        except UnsupportedError:  # a driver without raw agent commands (the test driver)
            status = None
        except LibvirtError as exc:
            status = None
            if not journalled:
                self.found.append(f"the guest agent did not say whether it is frozen: {exc}")
        if status == "frozen":
            self.found.append("the guest's filesystems are frozen")
        if status == "frozen" or (journalled and status != "thawed"):
            try:
                count = self.agent(_port(dom).fs_thaw)
            except LibvirtError as exc:
                raise ThawError(
                    f"thawing the filesystems of {dom.name!r} failed; they may still be "
                    f"frozen: {exc}",
                    domain_name=dom.name,
                ) from exc
            self.actions.append(f"thawed the guest's filesystems ({count} thawed)")
        elif journalled and status == "thawed":
            self.actions.append("asked the guest agent: not frozen, nothing to thaw")

    # ---- 2. backup job
    def end_backup_job(self, journal: Journal | None) -> None:
        dom = self.dom
        if not dom.is_active:
            return
        try:
            job = dom.active_backup()
        except UnsupportedError:
            return
        if job is None:
            return
        self.found.append(
            f"a running {job.mode.value} backup job"
            + (f" (checkpoint {job.checkpoint!r})" if job.checkpoint else "")
        )
        cp = journal.fact("checkpoint") if journal is not None else None
        self.actions += discard_backup(dom, job=job, checkpoint=cp)

    # ---- 3. overlays
    def overlays(self, journal: Journal | None) -> None:
        dom = self.dom
        plans: dict[str, tuple[str, str, str | None]] = {}
        if journal is not None and journal.sequence == SEQ_SNAPSHOT:
            originals = journal.facts_with_prefix("original")
            formats = journal.facts_with_prefix("format")
            for name, overlay in journal.facts_with_prefix("overlay").items():
                if name in originals:
                    plans[name] = (originals[name], overlay, formats.get(name))
        definition = dom.definition if dom.is_active else dom.inactive_definition
        for disk in definition.disks:
            if disk.target in plans or not disk.source or not OVERLAY_RE.search(disk.source):
                continue
            if not disk.backing or not disk.backing[0].source:
                self.errors.append(
                    f"disk {disk.target} runs on the statecapture overlay {disk.source}, but "
                    "libvirt does not say what is below it; merge it by hand"
                )
                continue
            self.found.append(f"disk {disk.target} runs on a statecapture overlay {disk.source}")
            plans[disk.target] = (disk.backing[0].source, disk.source, disk.backing[0].format)
        for target, (original, overlay, fmt) in sorted(plans.items()):
            live = next((d for d in definition.disks if d.target == target), None)
            in_use = live is not None and overlay in live.chain
            if in_use:
                if journal is not None:  # (found by name: reported above)
                    self.found.append(f"disk {target} runs on the temporary overlay {overlay}")
            elif os.path.lexists(overlay):
                self.found.append(f"the temporary overlay {overlay} of disk {target} is left")
            else:
                continue
            try:
                self.actions += merge_overlay(
                    dom, target, original=original, overlay=overlay, fmt=fmt
                )
            except (StateCaptureError, OSError) as exc:
                self.errors.append(f"disk {target}: {exc}")
        jobs: tuple[BlockJob, ...] = ()
        if dom.is_active:
            with contextlib.suppress(UnsupportedError):  # a driver without block jobs
                jobs = dom.block_jobs()
            for job in jobs:
                if job.disk not in plans:
                    self.found.append(
                        f"a {job.kind.value} block job on {job.disk} (not a sequence's; left "
                        "alone: Domain.block_jobs() lists it)"
                    )

    # ---- 4. an unfinished direct backup
    def backup_leftovers(self, journal: Journal | None) -> None:
        if journal is None or journal.sequence != SEQ_DIRECT:
            return
        dom = self.dom
        checkpoint = journal.fact("checkpoint")
        files = {k: v for k, v in journal.facts.items() if k.split(":")[0] in ("file", "partial")}
        # A job killed between its start and the record's next write: its section of the
        # record names what it made too (the label's files, its private directories).
        job = journal.job
        dirs: tuple[str, ...] = ()
        if job is not None:
            files.update({f"job file {i}": f for i, f in enumerate(job.files)})
            dirs = job.dirs
            if checkpoint is None and job.created_checkpoint:
                checkpoint = job.checkpoint
        existing = {k: v for k, v in files.items() if os.path.lexists(v)}
        has_cp = False
        if checkpoint is not None:
            with contextlib.suppress(UnsupportedError):
                has_cp = checkpoint in dom.checkpoints
        if existing or has_cp:
            self.found.append(
                "what the unfinished backup made: "
                + ", ".join(
                    [*([f"checkpoint {checkpoint!r}"] if has_cp else []), *existing.values()]
                )
            )
        self.actions += discard_backup(
            dom,
            job=None,
            checkpoint=checkpoint,
            files=files,
            dirs=dirs,
            adopt_checkpoint=checkpoint,
        )

    # ---- a domain booted from a repository: reported, never changed
    def boot_record(self) -> None:
        from ._repository.custody import finding

        line = finding(self.dom)
        if line is not None:
            self.found.append(line)

    # ---- 5. the record of a plain backup job whose run died
    def stale_backup_record(self, found: Journal | None) -> None:
        dom = self.dom
        if found is None or not found.is_backup_job:
            return  # no plain job's record was there to begin with
        try:
            journal = read_journal(dom)  # (stage 2 may have ended the job and its record)
        except XMLError:
            return  # reported as damaged; cleared at the end
        if journal is None or not journal.is_backup_job:
            return
        if dom.is_active:
            with contextlib.suppress(UnsupportedError):  # a driver without jobs runs none
                if active_backup(dom) is not None:
                    return  # a job still runs: stage 2 reported why it could not end it
        self.found.append(
            "the record of a backup job that ended without its run (a crash, a lost "
            "connection or a daemon restart)"
        )
        self.actions += recover_stale(dom, journal)


def recover(dom: Domain, *, force: bool = False, agent_timeout: float = 30.0) -> RecoveryReport:
    """Undo what an interrupted sequence left on ``dom``; say what was found and done.

    Idempotent and safe on a clean domain (it then finds nothing and does nothing). It
    thaws a frozen guest, ends a leftover backup job, merges temporary overlays back into
    the original disks (active commit + pivot, or ``qemu-img commit`` when the domain is
    shut off), removes the checkpoint and the partial files of an unfinished backup (a
    sequence's, or a plain backup job's whose run died: its record), and clears the
    journal — the last only when all of that succeeded, so the report's ``errors`` can be
    fixed and ``recover()`` called again.

    Run it after a crash, from any process or host connected to the domain's daemon. It
    refuses (:class:`InvalidStateError`) while the process that wrote the journal still
    runs on this host — recovering under a live sequence would undo it as it runs — unless
    ``force=True`` (e.g. the PID was reused by an unrelated process).

    Block jobs that are not on a sequence's overlay are reported and left alone, and so is
    a domain :meth:`Repository.boot <statecapture.Repository.boot>` made (a ``found`` line
    says what it depends on, whether it can start again, and what to do). A leftover
    backup job is always ended: there is one per domain and it blocks every new backup.

    ``agent_timeout`` bounds the wait for the guest agent when the journal says the guest
    may be frozen (a fresh process reconnects to the agent a moment after it connects).
    """
    from ._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"recover() needs a statecapture Domain, got {type(dom).__name__}")
    if (
        isinstance(agent_timeout, bool)
        or not isinstance(agent_timeout, int | float)
        or not math.isfinite(agent_timeout)
        or agent_timeout < 0
    ):
        raise UsageError(f"agent_timeout must be a number of seconds, got {agent_timeout!r}")
    run = _Recovery(dom, float(agent_timeout))
    journal: Journal | None = None
    damaged = False
    try:
        journal = read_journal(dom)
    except XMLError as exc:
        damaged = True
        run.found.append(f"a damaged sequence journal ({exc})")
    if journal is not None and not journal.is_backup_job:  # (stage 5 describes a job's)
        run.found.append(journal.describe())
        if (
            not force
            and journal.host == socket.gethostname()
            and journal.pid != os.getpid()
            and _pid_alive(journal.pid)
        ):
            raise InvalidStateError(
                f"domain {dom.name!r} has an {journal.describe()}, and that process is still "
                "running: recover() would undo the run under its feet. Wait for it or stop "
                "it; pass force=True if the process is not a statecapture run (a reused PID).",
                operation="recover",
                domain_name=dom.name,
            )
    run.attempt("thaw", lambda: run.thaw(journal))
    run.attempt("end the backup job", lambda: run.end_backup_job(journal))
    run.attempt("overlays", lambda: run.overlays(journal))
    run.attempt("backup leftovers", lambda: run.backup_leftovers(journal))
    run.attempt("stale backup record", lambda: run.stale_backup_record(journal))
    run.attempt("boot record", run.boot_record)
    if not run.errors and (journal is not None or damaged):
        try:
            if clear_journal(dom):
                run.actions.append("cleared the journal")
        except StateCaptureError as exc:
            run.errors.append(f"clear the journal: {exc}")
    return RecoveryReport(
        domain=dom.name,
        found=tuple(run.found),
        actions=tuple(run.actions),
        errors=tuple(run.errors),
        clean=not run.errors,
    )


def _port(dom: Domain) -> FreezePort:
    """The domain's port as this module uses it: ``FreezePort`` (mypy checks it)."""
    return dom.port
