"""What a driver and daemon can do, probed rather than assumed: :class:`Capabilities`.

Every capability is found out by asking the connection, never by trusting a version number
alone and never by changing anything:

* APIs without a read-only counterpart (managed save, save, snapshot, freeze, block copy and
  commit, checkpoint, backup) are called with a flag bit no libvirt API defines. Every
  driver checks its flags before doing anything and answers "unsupported flags"; a driver
  without the API answers "not supported" before reaching driver code.
* ``virDomainBackupGetXMLDesc`` tells "backup supported but idle" (NO_DOMAIN_BACKUP) from
  "no backup support" (NO_SUPPORT); ``virConnectGetDomainCapabilities`` lists
  ``<backup supported='yes'/>``.
* What cannot be probed without side effects (deleting or reverting external snapshots,
  incremental backup being on by default, keeping a backup job across a guest shutdown) is
  gated on the *daemon's* version (``conn.versions.daemon``), never the client library's.

Each :class:`Capability` carries the evidence as a sentence, so users and the advisor can
explain an answer ("Test driver: virDomainBackupBegin not supported", "needs libvirt ≥ 9.9,
daemon is 9.0.0").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import attrs

from ._version import Version
from .errors import XMLError
from .xml._base import parse

if TYPE_CHECKING:
    from ._connection import Connection
    from ._domain import Domain
    from ._ports import ConnectionPort, ProbePort

__all__ = ["Capabilities", "Capability", "probe_connection", "probe_domain"]


@attrs.frozen
class Capability:
    """One thing a driver may or may not do, with the evidence.

    ``bool(cap)`` is true only when the capability is known to be present.
    """

    name: str
    """The capability's name (the :class:`Capabilities` attribute)."""
    supported: bool | None
    """``True``/``False`` when probed, ``None`` when the probe could not tell."""
    reason: str
    """Why statecapture believes it: the probe's answer or the version gate."""

    def __bool__(self) -> bool:
        return self.supported is True

    @property
    def answer(self) -> str:
        """``yes``, ``no`` or ``unknown``."""
        return {True: "yes", False: "no", None: "unknown"}[self.supported]

    def __str__(self) -> str:
        return f"{self.name}: {self.answer} — {self.reason}"


#: The capability names in display order, each with a one-line description.
CAPABILITY_NAMES: Final = {
    "managed_save": "managed save (virDomainManagedSave)",
    "save": "save to / restore from a file (virDomainSaveFlags, virDomainRestoreFlags)",
    "save_params": "save/restore with typed parameters (virDomainSaveParams, libvirt ≥ 8.4)",
    "snapshot": "snapshots (virDomainSnapshotCreateXML)",
    "snapshot_external_delete": "deleting external snapshots (QEMU driver, libvirt ≥ 9.0)",
    "snapshot_external_revert": "reverting to external snapshots (QEMU driver, libvirt ≥ 9.9)",
    "fs_freeze": "guest filesystem freeze/thaw (virDomainFSFreeze)",
    "block_copy": "block copy (virDomainBlockCopy)",
    "block_commit": "block commit (virDomainBlockCommit)",
    "checkpoint": "checkpoints (virDomainCheckpointCreateXML)",
    "backup": "backup jobs, push and pull (virDomainBackupBegin)",
    "incremental_backup": "incremental backup from a checkpoint (QEMU: libvirt ≥ 7.6, QEMU ≥ 6.1)",
    "backup_preserve_on_shutdown": "keep a backup job across a guest shutdown (libvirt ≥ 11.10)",
}

# Version gates for what cannot be probed without side effects (HAZARDS 7, 12). They are
# the QEMU driver's history; other drivers are not judged by them.
_GATES: Final[dict[str, tuple[tuple[int, int, int], str]]] = {
    "save_params": ((8, 4, 0), "virDomainSaveParams/virDomainRestoreParams"),
    "snapshot_external_delete": ((9, 0, 0), "deleting external snapshots"),
    "snapshot_external_revert": ((9, 9, 0), "reverting to external snapshots"),
    "incremental_backup": ((7, 6, 0), "incremental backup enabled by default"),
    "backup_preserve_on_shutdown": (
        (11, 10, 0),
        "VIR_DOMAIN_BACKUP_BEGIN_PRESERVE_SHUTDOWN_DOMAIN",
    ),
}
_QEMU_FOR_INCREMENTAL: Final = (6, 1, 0)


@attrs.frozen
class Capabilities:
    """What one driver and daemon version can do, probed (see :meth:`Domain.capabilities`).

    Iterating yields every :class:`Capability` in a stable order; ``caps["backup"]`` or
    ``caps.backup`` gets one. :meth:`explain` (also ``str()``) prints a table a terminal
    user can read, and notebooks show an HTML table.
    """

    driver: str
    """The driver's name (``QEMU``, ``Test`` ...)."""
    daemon: Version
    """The daemon's libvirt version (what the gates compare against)."""
    hypervisor: Version | None
    """The hypervisor's version when the driver reports one."""
    domain: str | None
    """The domain probed on, ``None`` for :meth:`Connection.capabilities`."""
    managed_save: Capability
    save: Capability
    save_params: Capability
    snapshot: Capability
    snapshot_external_delete: Capability
    snapshot_external_revert: Capability
    fs_freeze: Capability
    block_copy: Capability
    block_commit: Capability
    checkpoint: Capability
    backup: Capability
    incremental_backup: Capability
    backup_preserve_on_shutdown: Capability

    def __iter__(self) -> Iterator[Capability]:
        for name in CAPABILITY_NAMES:
            yield self[name]

    def __getitem__(self, name: str) -> Capability:
        if name not in CAPABILITY_NAMES:
            raise KeyError(name)
        cap: Capability = getattr(self, name)
        return cap

    def explain(self) -> str:
        """A plain-text table: one line per capability with its answer and evidence."""
        where = f"domain {self.domain!r}" if self.domain else "the connection"
        hyper = f", hypervisor {self.hypervisor}" if self.hypervisor else ""
        lines = [f"Capabilities of {where}: {self.driver} driver, libvirt {self.daemon}{hyper}"]
        width = max(len(n) for n in CAPABILITY_NAMES)
        for cap in self:
            lines.append(f"  {cap.name:<{width}}  {cap.answer:<7}  {cap.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def _repr_html_(self) -> str:
        from ._html import table

        where = f"domain {self.domain!r}" if self.domain else "connection"
        rows = [[cap.name, cap.answer, cap.reason] for cap in self]
        caption = f"Capabilities of {where}: {self.driver} driver, libvirt {self.daemon}"
        return "<div>" + table(["capability", "supported", "why"], rows, caption=caption) + "</div>"


# --------------------------------------------------------------------------- probing


def _gate(
    name: str, driver: str, daemon: Version, *, also: bool | None = True, why_not: str = ""
) -> Capability:
    """A capability decided by the daemon's version (QEMU driver only)."""
    (minimum, what) = _GATES[name]
    need = Version(*minimum)
    if driver != "QEMU":
        return Capability(
            name, None, f"{what}: libvirt's version gate is the QEMU driver's; {driver} not judged"
        )
    if daemon < need:
        return Capability(name, False, f"{what} needs libvirt ≥ {need}, daemon is {daemon}")
    if also is False:
        return Capability(name, False, why_not)
    if also is None:
        return Capability(name, None, why_not)
    return Capability(name, True, f"{what}: daemon {daemon} ≥ {need}")


def _probed(name: str, driver: str, answer: tuple[bool | None, str]) -> Capability:
    supported, evidence = answer
    return Capability(name, supported, f"{driver} driver: {evidence}")


def _backup_in_domcaps(xml: str | None) -> bool | None:
    if xml is None:
        return None
    try:
        root = parse(xml)
    except XMLError:
        return None
    el = root.find("features/backup")
    if el is None:
        return False  # a daemon that predates the element has no backup feature
    return el.get("supported") == "yes"


def _incremental(
    backup: Capability, checkpoint: Capability, driver: str, daemon: Version, hyper: Version | None
) -> Capability:
    name = "incremental_backup"
    if backup.supported is False:
        return Capability(name, False, f"no backup support ({backup.reason})")
    if checkpoint.supported is False:
        return Capability(name, False, f"no checkpoint support ({checkpoint.reason})")
    if driver != "QEMU":
        return _gate(name, driver, daemon)
    if hyper is not None and hyper < _QEMU_FOR_INCREMENTAL:
        need = Version(*_QEMU_FOR_INCREMENTAL)
        return _gate(
            name,
            driver,
            daemon,
            also=False,
            why_not=f"incremental backup needs QEMU ≥ {need}, hypervisor is {hyper}",
        )
    if backup.supported is None or checkpoint.supported is None:
        return _gate(
            name,
            driver,
            daemon,
            also=None,
            why_not="backup or checkpoint support unknown: probe on a domain",
        )
    return _gate(name, driver, daemon)


def _save_params(
    driver: str,
    daemon: Version,
    answer: tuple[bool | None, str] | None,
    conn_answer: tuple[bool | None, str],
) -> Capability:
    name = "save_params"
    need = Version(*_GATES[name][0])
    answers = [a for a in (answer, conn_answer) if a is not None]
    if any(a[0] is False for a in answers):
        evidence = "; ".join(a[1] for a in answers if a[0] is False)
        if daemon < need:
            evidence += f" (added in libvirt {need}, daemon is {daemon})"
        return Capability(name, False, f"{driver} driver: {evidence}")
    if answers and all(a[0] is True for a in answers):
        return Capability(name, True, f"{driver} driver: " + "; ".join(a[1] for a in answers))
    return Capability(name, None, f"{driver} driver: " + "; ".join(a[1] for a in answers))


def probe_connection(conn: Connection) -> Capabilities:
    """Capabilities knowable without a domain (the rest are ``unknown``)."""
    return _probe(conn, None)


def probe_domain(dom: Domain) -> Capabilities:
    """Capabilities probed on ``dom`` (nothing about the domain changes)."""
    return _probe(dom.connection, dom)


def _probe(conn: Connection, dom: Domain | None) -> Capabilities:
    vir: ConnectionPort = conn.port
    versions = conn.versions
    driver, daemon, hyper = versions.driver, versions.daemon, versions.hypervisor
    vdom: ProbePort | None = dom.port if dom is not None else None
    no_domain = (None, "needs a domain to probe: use Domain.capabilities()")

    def probe(feature: str) -> tuple[bool | None, str]:
        if vdom is None:
            return no_domain
        return vdom.probe_api(feature)

    restore = vir.probe_api("restore")
    save_answer = probe("save")
    if save_answer[0] is False or restore[0] is False:
        save = Capability(
            "save",
            False,
            f"{driver} driver: " + "; ".join(a[1] for a in (save_answer, restore) if a[0] is False),
        )
    elif vdom is None:
        save = Capability("save", restore[0], f"{driver} driver: {restore[1]} (restore side)")
    else:
        save = _probed("save", driver, save_answer)

    save_params = _save_params(
        driver,
        daemon,
        probe("save_params") if vdom is not None else None,
        vir.probe_api("restore_params"),
    )

    # Backup: the idle-job answer on a domain is the proof; domain capabilities XML the
    # connection-level hint.
    domcaps = _backup_in_domcaps(vir.domain_capabilities_xml()) if vdom is None else None
    if vdom is not None:
        implemented, job = vdom.probe_backup_job()
        if implemented:
            why = "a backup job is running" if job is not None else "no backup job running"
            backup = Capability(
                "backup", True, f"{driver} driver: virDomainBackupGetXMLDesc answers ({why})"
            )
        else:
            backup = Capability(
                "backup", False, f"{driver} driver: virDomainBackupBegin not supported"
            )
    elif domcaps is not None:
        state = "yes" if domcaps else "no"
        backup = Capability(
            "backup", domcaps, f"{driver} driver: domain capabilities say backup supported={state}"
        )
    else:
        backup = Capability("backup", None, f"{driver} driver: {no_domain[1]}")

    snapshot = _probed("snapshot", driver, probe("snapshot"))
    checkpoint = _probed("checkpoint", driver, probe("checkpoint"))

    def snapshot_gate(name: str) -> Capability:
        if snapshot.supported is False:
            return Capability(name, False, f"no snapshot support ({snapshot.reason})")
        return _gate(name, driver, daemon)

    preserve = _gate("backup_preserve_on_shutdown", driver, daemon)
    if backup.supported is False:
        preserve = Capability(preserve.name, False, f"no backup support ({backup.reason})")

    return Capabilities(
        driver=driver,
        daemon=daemon,
        hypervisor=hyper,
        domain=dom.name if dom is not None else None,
        managed_save=_probed("managed_save", driver, probe("managed_save")),
        save=save,
        save_params=save_params,
        snapshot=snapshot,
        snapshot_external_delete=snapshot_gate("snapshot_external_delete"),
        snapshot_external_revert=snapshot_gate("snapshot_external_revert"),
        fs_freeze=_probed("fs_freeze", driver, probe("fs_freeze")),
        block_copy=_probed("block_copy", driver, probe("block_copy")),
        block_commit=_probed("block_commit", driver, probe("block_commit")),
        checkpoint=checkpoint,
        backup=backup,
        incremental_backup=_incremental(backup, checkpoint, driver, daemon, hyper),
        backup_preserve_on_shutdown=preserve,
    )
