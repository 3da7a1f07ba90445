"""Compatibility shim: raw-``virDomain`` agent helpers on top of :mod:`statecapture.testing`.

The helpers take a raw :class:`libvirt.virDomain` (older tests pass ``dom._vir._raw``) or a
statecapture ``Domain``, and
keep their old contract: agent failures raise :class:`libvirt.libvirtError`, a boot that
does not finish raises :class:`TimeoutError` (or :class:`RuntimeError` when the domain
stopped). New tests use :class:`statecapture.testing.TestGuest` (``exec``, ``read``,
``write``) instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

import statecapture
from statecapture._adapter import VirConnection, VirDomain
from statecapture.errors import GuestBootError, LibvirtError
from statecapture.testing import guest as _guest

__all__ = [
    "agent_channel_state",
    "agent_command",
    "guest_exec",
    "read_guest_file",
    "wait_agent",
    "write_guest_file",
]

F = TypeVar("F", bound=Callable[..., Any])


def _wrap(dom: Any) -> VirDomain:
    """A raw virDomain, or a statecapture Domain (what later tests pass), as the adapter's."""
    if isinstance(dom, VirDomain):
        return dom
    if isinstance(dom, statecapture.Domain):
        return dom._vir
    return VirDomain(dom, VirConnection(dom.connect(), "tests._harness"))


def _raw_errors(fn: F) -> F:
    """Re-raise the libvirtError behind a translated statecapture error (old contract)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LibvirtError as exc:
            if isinstance(exc, TimeoutError):
                raise
            if isinstance(exc.__cause__, libvirt.libvirtError):
                raise exc.__cause__ from None
            raise libvirt.libvirtError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@_raw_errors
def agent_command(dom: libvirt.virDomain, command: dict[str, Any], timeout: int = 10) -> Any:
    """Send one agent command (QMP-style dict) and return its ``"return"`` member."""
    return _wrap(dom).agent_command(command, timeout=int(timeout))


def wait_agent(dom: libvirt.virDomain, timeout: float = 60) -> float:
    """Poll ``guest-ping`` until the agent answers; return the seconds waited."""
    try:
        return _guest.wait_for_agent(_wrap(dom), timeout)
    except GuestBootError as exc:
        if exc.timed_out:
            raise TimeoutError(str(exc)) from exc
        raise RuntimeError(str(exc)) from exc


def agent_channel_state(dom: libvirt.virDomain) -> str | None:
    """State of the agent channel in the live XML (``"connected"``, ``"disconnected"``)."""
    return _guest.agent_channel_state(_wrap(dom))


@_raw_errors
def guest_exec(
    dom: libvirt.virDomain, argv: list[str], timeout: float = 10
) -> tuple[int, bytes, bytes]:
    """Run *argv* in the guest; ``(exit code, stdout, stderr)``; TimeoutError if still running."""
    return _guest.run_in_guest(_wrap(dom), argv, timeout=timeout)


@_raw_errors
def read_guest_file(dom: libvirt.virDomain, path: str, timeout: int = 10) -> bytes:
    """Read a whole guest file through the agent."""
    return _guest.read_guest(_wrap(dom), path, timeout=timeout)


@_raw_errors
def write_guest_file(dom: libvirt.virDomain, path: str, data: bytes, timeout: int = 10) -> None:
    """Create/truncate a guest file with *data* through the agent."""
    _guest.write_guest(_wrap(dom), path, data, timeout=timeout)
