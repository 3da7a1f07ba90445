"""The guest-agent side of a freeze: :class:`Filesystem`, ``fs_info``, ``fs_thaw`` and
``wait_for_agent`` (the ``Domain`` methods of the same names delegate here).
"""

from __future__ import annotations

import math
import time
from numbers import Real
from typing import TYPE_CHECKING

import attrs

from .._agent import AgentState, agent_answers, agent_state
from .._events import EventKind
from ..errors import (
    GuestAgentError,
    InvalidStateError,
    LibvirtError,
    OperationTimeoutError,
    StateCaptureError,
    ThawError,
    UsageError,
)
from ..xml._domain import AGENT_CHANNEL

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import FreezePort

# --------------------------------------------------------------------------- values


@attrs.frozen
class Filesystem:
    """One mounted guest filesystem, as the guest agent reports it (``Domain.fs_info()``)."""

    mountpoint: str
    """Where the guest mounts it (``/data``)."""
    name: str | None = None
    """The guest's device name (``vda``, ``dm-0``); ``None`` when the agent was not asked."""
    fstype: str | None = None
    """The filesystem type (``ext4``, ``xfs``); ``None`` when unknown."""
    disks: tuple[str, ...] = ()
    """Target names (``vda``) of the domain's disks that back it; empty when unknown."""


# --------------------------------------------------------------------------- agent helpers


def check_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UsageError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def wait_for_agent(dom: Domain, timeout: float) -> float:
    """Block until the guest agent is connected; the seconds waited (``Domain.wait_for_agent``)."""
    limit = check_seconds("timeout", timeout)
    assert limit is not None
    start = time.monotonic()
    deadline = start + limit
    events = dom.connection.events
    # Subscribe before looking, so a connect between the look and the wait is not missed.
    with events.expect(kind=EventKind.AGENT_LIFECYCLE, domain_uuid=dom.uuid) as expectation:
        while True:
            dom._require_active("wait for the guest agent")
            state = agent_state(dom)
            if state is AgentState.NO_CHANNEL:
                raise GuestAgentError(
                    f"domain {dom.name!r} has no guest agent channel "
                    f"(<channel> with target name {AGENT_CHANNEL!r}); no agent can connect",
                    operation="wait for the guest agent",
                    domain_name=dom.name,
                )
            if state.maybe_connected and agent_answers(dom):
                return time.monotonic() - start
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError(
                    f"the guest agent of {dom.name!r} did not connect within {limit} s",
                    operation="wait for the guest agent",
                    domain_name=dom.name,
                )
            # Wake on the agent-lifecycle event; look again every second regardless (every
            # 0.25 s while the channel reads connected but the agent does not answer yet).
            pause = 0.25 if state.maybe_connected else 1.0
            event = expectation.poll()
            if event is None:
                try:
                    event = expectation.wait(min(remaining, pause), what="agent connect")
                except OperationTimeoutError:
                    continue
            if event.detail.get("connected") and agent_answers(dom):
                return time.monotonic() - start


def _refused_while_frozen(exc: LibvirtError) -> bool:
    return "frozen state" in (exc.libvirt_message or str(exc)).lower()


def _already_frozen(dom: Domain, exc: LibvirtError, operation: str) -> StateCaptureError:
    err = InvalidStateError(
        f"{operation} on domain {dom.name!r}: the guest's filesystems are frozen already "
        "(by an fs_frozen scope, another process or a tool), and its agent refuses most "
        "commands while frozen",
        code=exc.code,
        operation=operation,
        domain_name=dom.name,
        libvirt_message=exc.libvirt_message,
    )
    err.__cause__ = exc
    return err


def fs_info(dom: Domain) -> tuple[Filesystem, ...]:
    """The guest's mounted filesystems, sorted by mount point (``Domain.fs_info``)."""
    dom._require_active("get filesystem info")
    try:
        rows = _port(dom).fs_info()
    except LibvirtError as exc:
        if _refused_while_frozen(exc):
            raise _already_frozen(dom, exc, "get filesystem info") from exc
        raise
    found = (
        Filesystem(mp, name or None, fstype or None, disks) for mp, name, fstype, disks in rows
    )
    return tuple(sorted(found, key=lambda fs: fs.mountpoint))


def fs_thaw(dom: Domain) -> int:
    """Thaw every frozen filesystem of the guest; how many thawed (``Domain.fs_thaw``)."""
    dom._require_active("filesystem thaw")
    try:
        return _port(dom).fs_thaw()
    except LibvirtError as exc:
        raise ThawError(
            f"thawing the filesystems of {dom.name!r} failed; they may still be frozen: {exc}",
            domain_name=dom.name,
        ) from exc


def _port(dom: Domain) -> FreezePort:
    """The domain's port as this module uses it: ``FreezePort`` (mypy checks it)."""
    return dom.port
