"""Public enums that stand in for libvirt's integer constants."""

from __future__ import annotations

import enum

__all__ = ["DomainState", "ShutdownMode"]


class DomainState(enum.Enum):
    """A domain's run state (libvirt's ``virDomainState``)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    """Being shut down (the guest is still running its shutdown)."""
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def is_running(self) -> bool:
        """Whether a guest CPU can execute in this state (running or blocked)."""
        return self in (DomainState.RUNNING, DomainState.BLOCKED)


class ShutdownMode(enum.Enum):
    """How :meth:`Domain.shutdown` asks the guest to power off."""

    DEFAULT = "default"
    """Let the hypervisor driver choose."""
    ACPI = "acpi"
    """Press the virtual ACPI power button."""
    AGENT = "agent"
    """Ask the guest agent (``guest-shutdown``)."""
