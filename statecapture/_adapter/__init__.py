"""The only package that imports ``libvirt``: the ports' implementation.

Everything else in statecapture talks to libvirt through the typed ports of
:mod:`statecapture._ports`, implemented here:

* ``translate.py`` — :func:`translated`/:func:`translate_error` turn every
  ``libvirt.libvirtError`` into the statecapture hierarchy, in one place, by error code;
  :func:`is_unsupported` is THE rule for "this driver cannot do that",
  :func:`is_connection_loss` the one for "the connection is gone";
* ``connection.py`` — :class:`VirConnection` (``virConnect``; a ``ConnectionPort``);
* ``domain.py`` — :class:`VirDomain` (``virDomain``; a ``DomainPort``): keyword arguments
  and enums in, typed values out, never a raw flag integer;
* ``objects.py`` — :class:`VirSnapshot`, :class:`VirCheckpoint` (the object ports);
* ``qemu.py`` — guest-agent and QEMU monitor (QMP/HMP) passthrough;
* ``probe.py`` — read-only capability probes;
* ``events.py`` — libvirt's event loop (:func:`ensure_event_loop`, once per process, before
  the first connection) and domain events as :class:`~statecapture._events.Event` values.

Hazard notes (see docs/hazards): libvirt-python built against an older libvirt lacks newer
constants, so flags and codes introduced after libvirt 9.0 are literals or
``_const(NAME, value)``; its type hints for ``jobInfo``/``jobStats``/``blockJobInfo``/
``fsInfo`` claim ``str`` but return list/dict/dict/list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._ports import NodeBitmap
from .connection import VirConnection
from .domain import VirDomain, block_job_kind_name
from .events import ensure_event_loop, event_loop_registrations, event_loop_running
from .objects import VirCheckpoint, VirSnapshot
from .translate import (
    _const,
    client_library_version,
    is_connection_loss,
    is_unsupported,
    translate_error,
    translated,
)

__all__ = [
    "NodeBitmap",
    "VirCheckpoint",
    "VirConnection",
    "VirDomain",
    "VirSnapshot",
    "_const",
    "block_job_kind_name",
    "client_library_version",
    "ensure_event_loop",
    "event_loop_registrations",
    "event_loop_running",
    "is_connection_loss",
    "is_unsupported",
    "translate_error",
    "translated",
]

if TYPE_CHECKING:
    # The adapter classes implement the ports (mypy checks the structure here).
    from .._ports import CheckpointObjectPort, ConnectionPort, DomainPort, SnapshotObjectPort

    def _conforms(
        conn: VirConnection, dom: VirDomain, snap: VirSnapshot, cp: VirCheckpoint
    ) -> None:
        _conn: ConnectionPort = conn
        _dom: DomainPort = dom
        _snap: SnapshotObjectPort = snap
        _cp: CheckpointObjectPort = cp
