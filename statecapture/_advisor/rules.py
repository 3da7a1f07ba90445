"""The ranking rules: downtime estimates, one verdict per facet, and one function per blocker
kind that says why a method cannot be used on this domain now.

Each blocker rule looks at one :class:`_Case` (a method, its guide row, the domain's facts and
capabilities, the caller's needs) and yields :class:`Blocker` values and notes (plain strings:
caveats that do not block). :func:`_blockers` runs them in a fixed order.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Final

import attrs

from .._capabilities import Capabilities
from .._journal import JOURNAL_NS
from .facts import DomainFacts
from .guide import Facet, Fit, Method, _Row
from .needs import Consistency, Needs, Storage

__all__ = ["Blocker", "BlockerKind", "Verdict"]


class BlockerKind(enum.Enum):
    """Why a method cannot be used on this domain right now."""

    UNSUPPORTED = "unsupported"
    """The driver or daemon version lacks the API, or the driver forbids this case."""
    DOMAIN_STATE = "domain state"
    """The domain is shut off (or transient) and the method needs otherwise."""
    AGENT = "guest agent"
    """Quiescing needs the guest agent, which is not configured or not connected."""
    NON_QCOW2_DISK = "non-qcow2 disk"
    """A raw (non-qcow2) disk holds no dirty bitmaps and no internal snapshots."""
    DIRTY_BITMAPS = "dirty bitmaps"
    """Checkpoints or persistent bitmaps make an internal snapshot impossible to revert."""
    UNFINISHED_SEQUENCE = "unfinished sequence"
    """A statecapture sequence was interrupted and must be recovered first."""
    JOB_RUNNING = "job running"
    """A backup or block job already runs on the domain or disk."""


@attrs.frozen
class Verdict:
    """One method on one facet: the guide's statement and how it fits the needs."""

    facet: Facet
    fit: Fit
    statement: str

    def __str__(self) -> str:
        return f"{self.facet.value}: {self.fit.value} — {self.statement}"


@attrs.frozen
class Blocker:
    """Something found on the live domain that makes a method unusable now."""

    kind: BlockerKind
    message: str
    disk: str | None = None
    """The disk concerned, when it is one disk."""

    def __str__(self) -> str:
        return f"[{self.kind.value}] {self.message}"


# Measured on these machines (2 cores, TCG, 256 MiB guest; HAZARDS "Figures"): downtime
# estimates scale these to the domain's memory size.
_FREEZE_WINDOW_S: Final = 0.2  # freeze → backupBegin → thaw ≈ 0.2 s
_FREEZE_SNAPSHOT_S: Final = 0.15  # freeze → disk-only external snapshot → thaw 0.13-0.16 s
_DISK_SNAPSHOT_S: Final = 0.1  # disk-only external snapshot ≈ 0.11 s
_FREEZE_ROUND_TRIP_S: Final = 0.003  # fsFreeze + fsThaw ≈ 3 ms
_SAVE_S_PER_GIB: Final = 8.8  # save 2.2 s
_RESTORE_S_PER_GIB: Final = 3.0  # restore 0.75 s
_INTERNAL_S_PER_GIB: Final = 0.8  # internal snapshot with memory 0.2 s
_PAUSE_TO_END_JOBS_S: Final = 0.05

_DISK_TOUCHING: Final = frozenset(
    {
        Method.INTERNAL_SNAPSHOT,
        Method.INTERNAL_DISK_SNAPSHOT,
        Method.EXTERNAL_SNAPSHOT,
        Method.EXTERNAL_DISK_SNAPSHOT,
        Method.BLOCK_COPY,
        Method.CHECKPOINT,
        Method.BACKUP_PUSH,
        Method.BACKUP_PULL,
        Method.TEMPORARY_SNAPSHOT_BACKUP,
        Method.DIRECT_BACKUP,
    }
)
_INTERNAL: Final = frozenset({Method.INTERNAL_SNAPSHOT, Method.INTERNAL_DISK_SNAPSHOT})
_BACKUPS: Final = frozenset({Method.BACKUP_PUSH, Method.BACKUP_PULL, Method.DIRECT_BACKUP})
_BLOCK_JOB_USERS: Final = frozenset(
    {Method.BLOCK_COPY, Method.TEMPORARY_SNAPSHOT_BACKUP, *_BACKUPS}
)


def _seconds(value: float) -> str:
    if value == 0:
        return "0 s"
    if value < 1:
        return f"≈{value:.2g} s"
    return f"≈{value:.0f} s"


# --------------------------------------------------------------------------- judging


def _downtime(method: Method, facts: DomainFacts, needs: Needs) -> float:
    if not facts.active:
        return 0.0
    gib = (facts.memory_mib or 1024) / 1024
    app = needs.consistency is Consistency.APPLICATION
    if method in (Method.MANAGED_SAVE, Method.SAVE):
        return gib * (_SAVE_S_PER_GIB + _RESTORE_S_PER_GIB)
    if method is Method.INTERNAL_SNAPSHOT:
        return max(0.2, gib * _INTERNAL_S_PER_GIB)
    if method is Method.EXTERNAL_SNAPSHOT:
        return gib * _SAVE_S_PER_GIB
    if method is Method.INTERNAL_DISK_SNAPSHOT:
        return _DISK_SNAPSHOT_S
    if method is Method.EXTERNAL_DISK_SNAPSHOT:
        return _FREEZE_SNAPSHOT_S if app else _DISK_SNAPSHOT_S
    if method is Method.FREEZE_THAW:
        return _FREEZE_ROUND_TRIP_S
    if method is Method.BLOCK_COPY:
        pause = _PAUSE_TO_END_JOBS_S if len(facts.disks) > 1 else 0.0
        return pause + (_FREEZE_ROUND_TRIP_S if app else 0.0)
    if method is Method.TEMPORARY_SNAPSHOT_BACKUP:
        return _FREEZE_SNAPSHOT_S if app else _DISK_SNAPSHOT_S
    if method in (Method.BACKUP_PUSH, Method.BACKUP_PULL, Method.DIRECT_BACKUP):
        return _FREEZE_WINDOW_S if app else 0.0
    return 0.0


def _downtime_class(seconds: float) -> int:
    """0: none, 1: under a second, 2: seconds, 3: longer. Estimates are rough, so the
    ranking compares classes before it compares needs met only partially."""
    if seconds <= 0:
        return 0
    if seconds < 1:
        return 1
    return 2 if seconds < 10 else 3


def _asked(facet: Facet, needs: Needs) -> bool:
    return {
        Facet.DURATION: needs.max_downtime is not None,
        Facet.AMOUNT_OF_STATE: True,
        Facet.QUIESCING: needs.consistency is Consistency.APPLICATION,
        Facet.QUANTITY_OF_FILES: False,
        Facet.DEFINITION_IMPACT: needs.keep_definition,
        Facet.THIRD_PARTY: needs.third_party_access,
        Facet.INCREMENTAL: needs.incremental,
        Facet.LOCALITY: needs.storage is Storage.REMOTE,
        Facet.NETWORK_LATENCY: needs.storage is Storage.REMOTE,
    }[facet]


def _verdicts(
    method: Method, row: _Row, facts: DomainFacts, needs: Needs, downtime: float
) -> tuple[Verdict, ...]:
    out = []
    for facet in Facet:
        fit, text = row.facets[facet]
        if facet is Facet.DURATION:
            text = f"{text} (estimate {_seconds(downtime)})"
            if needs.max_downtime is None:
                fit = Fit.NEUTRAL
            elif downtime > needs.max_downtime:
                fit = Fit.POOR
                text += f"; more than the {needs.max_downtime:g} s allowed"
            else:
                fit = Fit.GOOD
        elif facet is Facet.AMOUNT_OF_STATE:
            fit = _amount_fit(method, row, facts, needs)
        elif not _asked(facet, needs):
            fit = Fit.NEUTRAL
        elif facet is Facet.QUIESCING:
            if row.memory and needs.memory:
                fit = Fit.GOOD
                text = "memory and disks together: restoring resumes the guest where it was"
            elif not facts.active and row.disks:
                fit = Fit.GOOD
                text = "the domain is shut off: its disks are at rest"
            elif fit is Fit.NEUTRAL:
                fit = Fit.POOR
        out.append(Verdict(facet, fit, text))
    return tuple(out)


def _amount_fit(method: Method, row: _Row, facts: DomainFacts, needs: Needs) -> Fit:
    if not (row.memory or row.disks):
        return Fit.POOR
    if needs.memory and not row.memory:
        return Fit.POOR
    if needs.disks and not row.disks:
        # Save and managed save leave the disks for the caller to copy while stopped.
        return Fit.PARTIAL if method in (Method.SAVE, Method.MANAGED_SAVE) else Fit.POOR
    if method is Method.BLOCK_COPY and len(facts.disks) > 1:
        return Fit.PARTIAL
    return Fit.GOOD


def _required(method: Method, row: _Row, needs: Needs) -> tuple[str, ...]:
    req = list(row.requires)
    app = needs.consistency is Consistency.APPLICATION
    if method is Method.TEMPORARY_SNAPSHOT_BACKUP and app:
        req.append("fs_freeze")
    if method in _BACKUPS:
        if app:
            req.append("fs_freeze")
        if needs.incremental:
            req += ["checkpoint", "incremental_backup"]
    return tuple(dict.fromkeys(req))


# --------------------------------------------------------------------------- blocker rules


@attrs.frozen
class _Case:
    """One method judged for one domain: everything a blocker rule looks at."""

    method: Method
    row: _Row
    facts: DomainFacts
    caps: Capabilities
    needs: Needs

    @property
    def app(self) -> bool:
        """Application-consistent disk state is asked for."""
        return self.needs.consistency is Consistency.APPLICATION

    @property
    def qemu(self) -> bool:
        """The domain is a QEMU driver's."""
        return self.facts.driver == "QEMU"


_Finding = Blocker | str
"""A rule's output: a blocker, or a note (a caveat that does not block)."""


def _unfinished_sequence(case: _Case) -> Iterator[_Finding]:
    """UNFINISHED_SEQUENCE: a journalled run still owns the disks."""
    if case.facts.journal is not None and case.method in _DISK_TOUCHING:
        yield Blocker(
            BlockerKind.UNFINISHED_SEQUENCE,
            f"an unfinished {case.facts.journal} run is journalled in the domain's metadata "
            f"({JOURNAL_NS}): recover it first, the disks may still be on its overlays",
        )


def _missing_capabilities(case: _Case) -> Iterator[_Finding]:
    """UNSUPPORTED: a capability the method needs is missing (or could not be probed)."""
    caps = case.caps
    for name in _required(case.method, case.row, case.needs):
        cap = caps[name]
        if name == "incremental_backup" and False in (
            caps.backup.supported,
            caps.checkpoint.supported,
        ):
            continue  # already reported as missing backup or checkpoint support
        if cap.supported is False:
            yield Blocker(BlockerKind.UNSUPPORTED, f"{name}: {cap.reason}")
        elif cap.supported is None:
            yield f"{name} could not be probed: {cap.reason}"


def _domain_state(case: _Case) -> Iterator[_Finding]:
    """DOMAIN_STATE: the method needs a running, or a persistent, domain."""
    facts = case.facts
    if case.row.running and not facts.active:
        yield Blocker(
            BlockerKind.DOMAIN_STATE, f"needs a running domain; it is {facts.state.value}"
        )
    if case.method is Method.MANAGED_SAVE and not facts.persistent:
        yield Blocker(
            BlockerKind.DOMAIN_STATE, "a transient domain cannot have a managed-save image"
        )


def _driver_refuses(case: _Case) -> Iterator[_Finding]:
    """UNSUPPORTED: the driver forbids this case although it has the API."""
    facts = case.facts
    if case.method is Method.INTERNAL_DISK_SNAPSHOT and case.qemu and facts.active:
        yield Blocker(
            BlockerKind.UNSUPPORTED,
            "QEMU driver: an internal snapshot of a running domain must include its memory",
        )
    if case.method is Method.CHECKPOINT and facts.driver == "TEST" and facts.snapshots:
        yield Blocker(
            BlockerKind.UNSUPPORTED,
            "the test driver refuses a checkpoint while snapshots exist",
        )


def _agent(case: _Case) -> Iterator[_Finding]:
    """AGENT: quiescing needs a guest agent that is configured and connected."""
    facts = case.facts
    wants_agent = case.method is Method.FREEZE_THAW or (
        case.app and case.row.quiesce_with_agent and facts.active
    )
    if not (wants_agent and facts.active):
        return
    if facts.agent == "no channel":
        yield Blocker(
            BlockerKind.AGENT,
            "no guest-agent channel (org.qemu.guest_agent.0) in the definition: the "
            "guest's filesystems cannot be frozen",
        )
    elif facts.agent == "disconnected":
        yield Blocker(
            BlockerKind.AGENT,
            "the guest agent is not connected: the guest's filesystems cannot be frozen",
        )
    elif facts.agent == "unknown":
        yield "the driver does not report whether the guest agent is connected"


def _non_qcow2_disks(case: _Case) -> Iterator[_Finding]:
    """NON_QCOW2_DISK: a raw disk holds neither internal snapshots nor dirty bitmaps."""
    if not case.qemu:
        return
    method = case.method
    if method in _INTERNAL:
        why = "internal snapshots need every disk in qcow2"
    elif method is Method.CHECKPOINT:
        why = (
            "it cannot hold a dirty bitmap (leave it out of the checkpoint, or convert it to qcow2)"
        )
    elif method in _BACKUPS and case.needs.incremental:
        why = "no dirty bitmap, so no incremental backup of it (a full backup of it still works)"
    else:
        return
    for disk in case.facts.non_qcow2:
        fmt = disk.format or "unspecified (raw)"
        yield Blocker(
            BlockerKind.NON_QCOW2_DISK, f"{disk.target} is {fmt}: {why}", disk=disk.target
        )


def _dirty_bitmaps(case: _Case) -> Iterator[_Finding]:
    """DIRTY_BITMAPS: an internal snapshot could not be reverted."""
    facts = case.facts
    if case.method not in _INTERNAL or not (facts.checkpoints or facts.bitmaps):
        return
    where = []
    if facts.checkpoints:
        where.append("checkpoints " + ", ".join(facts.checkpoints))
    for target, names in facts.bitmaps.items():
        where.append(f"bitmaps {', '.join(names)} inside {target}'s image")
    yield Blocker(
        BlockerKind.DIRTY_BITMAPS,
        "dirty bitmaps present (" + "; ".join(where) + "): reverting an internal "
        "snapshot then fails with 'Device has active dirty bitmaps' (QEMU 7.2 exited "
        "doing it)",
    )


def _jobs_running(case: _Case) -> Iterator[_Finding]:
    """JOB_RUNNING: a backup job (one per domain) or a disk's block job is in the way."""
    method, facts = case.method, case.facts
    if facts.backup_job and (method in _BACKUPS or method in _BLOCK_JOB_USERS):
        yield Blocker(
            BlockerKind.JOB_RUNNING,
            "a backup job is running (one per domain; block jobs on its disks must wait)",
        )
    if method in _BLOCK_JOB_USERS:
        for target in facts.block_jobs:
            yield Blocker(
                BlockerKind.JOB_RUNNING, f"a block job is running on {target}", disk=target
            )


def _caveats(case: _Case) -> Iterator[_Finding]:
    """Notes only: what works but deserves a warning."""
    method, caps = case.method, case.caps
    if method in (Method.EXTERNAL_SNAPSHOT, Method.EXTERNAL_DISK_SNAPSHOT):
        for name in ("snapshot_external_revert", "snapshot_external_delete"):
            cap = caps[name]
            if cap.supported is False:
                yield f"{name}: {cap.reason}"
    if case.row.discouraged:
        yield case.row.discouraged
    if method in _BACKUPS and caps.backup_preserve_on_shutdown.supported is False:
        reason = caps.backup_preserve_on_shutdown.reason
        yield f"a guest shutdown during the job ends it ({reason})"
    if method is Method.MANAGED_SAVE and case.facts.managed_save_image:
        yield "a managed-save image already exists for this domain"
    if method in (Method.SAVE, Method.MANAGED_SAVE) and case.needs.disks:
        yield "disk state: copy the disks while the guest is stopped"


_RULES: Final[tuple[Callable[[_Case], Iterator[_Finding]], ...]] = (
    _unfinished_sequence,
    _missing_capabilities,
    _domain_state,
    _driver_refuses,
    _agent,
    _non_qcow2_disks,
    _dirty_bitmaps,
    _jobs_running,
    _caveats,
)
"""The blocker rules, in the order their findings are reported."""


def _blockers(
    method: Method, row: _Row, facts: DomainFacts, caps: Capabilities, needs: Needs
) -> tuple[tuple[Blocker, ...], tuple[str, ...]]:
    """Every rule's blockers, and its notes without repeats."""
    case = _Case(method, row, facts, caps, needs)
    blockers: list[Blocker] = []
    notes: list[str] = []
    for rule in _RULES:
        for finding in rule(case):
            if isinstance(finding, Blocker):
                blockers.append(finding)
            else:
                notes.append(finding)
    return tuple(blockers), tuple(dict.fromkeys(notes))
