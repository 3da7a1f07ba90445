"""Live domain handles: :class:`Domain`."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import attrs

from . import _adapter
from ._enums import DomainState, ShutdownMode
from ._events import EventKind
from .errors import InvalidStateError, NotFoundError, OperationTimeoutError, UsageError
from .xml import Disk, DomainXML

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Domain"]


@attrs.define(eq=False)
class Domain:
    """A live handle on one libvirt domain. Get one from :meth:`Connection.domain`.

    Properties query libvirt each time (nothing is cached but the name and UUID), so a
    handle always shows the domain as it is now. Two handles on the same domain are
    different objects; compare :attr:`uuid` to tell whether they name the same domain.
    """

    connection: Connection
    """The connection this handle belongs to."""
    _vir: _adapter.VirDomain = attrs.field(repr=False)
    name: str
    """The domain's name."""
    uuid: str
    """The domain's UUID (the stable identity)."""

    @classmethod
    def _from_vir(cls, conn: Connection, vir: _adapter.VirDomain) -> Domain:
        return cls(conn, vir, vir.name, vir.uuid())

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> DomainState:
        """The current run state."""
        return DomainState(self._vir.state()[0])

    @property
    def is_active(self) -> bool:
        """Whether the domain is running or paused (has a live hypervisor process)."""
        return self._vir.is_active()

    @property
    def is_persistent(self) -> bool:
        """Whether the domain has a persistent definition (survives being stopped)."""
        return self._vir.is_persistent()

    @property
    def definition(self) -> DomainXML:
        """The live definition (the inactive one when the domain is not running)."""
        return DomainXML.from_xml(self._vir.xml_desc())

    @property
    def inactive_definition(self) -> DomainXML:
        """The persistent definition used at the next start."""
        return DomainXML.from_xml(self._vir.xml_desc(inactive=True))

    @property
    def disks(self) -> tuple[Disk, ...]:
        """The domain's disks (cdroms and floppies included; filter on ``device``)."""
        return self.definition.disks

    def disk(self, target: str) -> Disk:
        """The disk with guest target ``target`` (``vda``); :class:`NotFoundError` if none."""
        definition = self.definition
        try:
            return definition.disk(target)
        except KeyError:
            known = ", ".join(d.target for d in definition.disks) or "none"
            raise NotFoundError(
                f"domain {self.name!r} has no disk {target!r} (disks: {known})",
                operation="look up disk",
                domain_name=self.name,
            ) from None

    @property
    def has_agent_channel(self) -> bool:
        """Whether the definition has a guest-agent channel (not whether an agent answers)."""
        return self.definition.has_agent_channel

    # ------------------------------------------------------------------ lifecycle
    def start(
        self, *, paused: bool = False, bypass_cache: bool = False, force_boot: bool = False
    ) -> None:
        """Start the domain.

        A domain with a managed-save image resumes from it unless ``force_boot`` is set
        (which discards the image). ``paused`` leaves the vCPUs stopped.
        """
        self._vir.start(paused=paused, bypass_cache=bypass_cache, force_boot=force_boot)

    def shutdown(
        self, *, mode: ShutdownMode = ShutdownMode.DEFAULT, timeout: float | None = None
    ) -> None:
        """Ask the guest to power off; with ``timeout``, wait until it is shut off.

        Raises :class:`OperationTimeoutError` when the guest is still running after
        ``timeout`` seconds (the request stays in effect; call :meth:`destroy` to force).
        """
        agent = {ShutdownMode.DEFAULT: None, ShutdownMode.AGENT: True, ShutdownMode.ACPI: False}[
            ShutdownMode(mode)
        ]
        self._vir.shutdown(agent=agent)
        if timeout is not None:
            self.wait_for_state(DomainState.SHUTOFF, timeout=timeout)

    def destroy(self, *, graceful: bool = False) -> None:
        """Stop the domain at once (power cut). ``graceful`` refuses to kill a stuck process."""
        self._vir.destroy(graceful=graceful)

    def suspend(self) -> None:
        """Pause the vCPUs; the domain stays active."""
        self._require_active("suspend")
        self._vir.suspend()

    def resume(self) -> None:
        """Resume paused vCPUs; :class:`InvalidStateError` when the domain is not paused."""
        state = self.state
        if state is not DomainState.PAUSED:
            raise InvalidStateError(
                f"resume needs a paused domain; {self.name!r} is {state.value}",
                operation="resume",
                domain_name=self.name,
            )
        self._vir.resume()

    def undefine(
        self,
        *,
        managed_save: bool = False,
        snapshots_metadata: bool = False,
        checkpoints_metadata: bool = False,
        nvram: bool = False,
    ) -> None:
        """Remove the persistent definition (a running domain becomes transient).

        libvirt refuses while managed-save images, snapshot or checkpoint metadata exist
        unless the matching flag asks to remove those too.
        """
        self._vir.undefine(
            managed_save=managed_save,
            snapshots_metadata=snapshots_metadata,
            checkpoints_metadata=checkpoints_metadata,
            nvram=nvram,
        )

    def wait_for_state(self, *states: DomainState, timeout: float) -> DomainState:
        """Block until the domain is in one of ``states``; returns the state reached."""
        if not states:
            raise UsageError("wait_for_state() needs at least one state")
        with self.connection.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=self.uuid) as exp:
            deadline = time.monotonic() + timeout
            while True:
                current = self.state
                if current in states:
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OperationTimeoutError(
                        f"domain {self.name!r} is {current.value}, not "
                        f"{'/'.join(s.value for s in states)}, after {timeout} s",
                        operation="wait for state",
                        domain_name=self.name,
                    )
                # Wake on the next lifecycle event, or re-check every 0.5 s regardless.
                with contextlib.suppress(OperationTimeoutError):
                    exp.wait(min(remaining, 0.5))

    def _require_active(self, operation: str) -> None:
        if not self.is_active:
            raise InvalidStateError(
                f"{operation} needs a running domain; {self.name!r} is {self.state.value}",
                operation=operation,
                domain_name=self.name,
            )

    # ------------------------------------------------------------------ memory state (_memory.py)

    # ------------------------------------------------------------------ snapshots (_snapshot.py)

    # ------------------------------------------------------------------ guest agent, freeze (_freeze.py)

    # ------------------------------------------------------------------ block jobs (_blockjob.py)

    # ------------------------------------------------------------------ checkpoints, backup (_backup.py)

    # ------------------------------------------------------------------ notebook view
    def _repr_html_(self) -> str:
        from ._html import domain_html

        return domain_html(self)
