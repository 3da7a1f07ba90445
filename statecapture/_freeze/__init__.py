"""Filesystem freeze: :func:`fs_frozen`, its :class:`FreezeScope`, and the guest agent.

A capture taken while the guest's filesystems are frozen (``fsfreeze`` through the QEMU guest
agent) is *application-consistent*: every write the guest's applications finished is on disk
and nothing is half-written. Without the freeze it is only *crash-consistent*, like pulling
the power cord. A freeze is also an outage for the guest: writes stall until the thaw, Linux
``qemu-ga`` never thaws by itself, and guests can rightfully panic when frozen too long.

So the freeze lives in a single-use scope that always thaws:

* on leaving the block, whatever ends it (return, exception, ``KeyboardInterrupt``, and
  ``SIGTERM``, which is turned into ``SystemExit(143)`` inside the block);
* from a watchdog thread once ``max_frozen`` seconds have passed, even when the block hangs;
* after a freeze call that failed in a way that may still have frozen the guest (libvirt
  before 11.2 reports an agent *timeout* as "agent unresponsive", and the freeze can land
  in the guest later, when its agent wakes up).

A failed thaw raises :class:`~statecapture.ThawError`, never a warning. Thaw attempts are
serialised by a lock shared by the watchdog and the block's exit, so the guest is thawed once
and the thaw counts are reported faithfully.

Nesting: an ``fs_frozen`` scope entered, in the same thread, on a domain that an enclosing
scope of this process holds frozen *joins* that freeze: it freezes nothing, thaws nothing,
and leaving it leaves the guest frozen for the enclosing scope. Entering from another thread
while the freeze is held raises :class:`~statecapture.UsageError`.

Modules: ``agent.py`` (:class:`Filesystem`, ``fs_info``, ``fs_thaw``, ``wait_for_agent``),
``signals.py`` (signals held around the freeze and thaw calls), ``held.py`` (one freeze held
by this process: bounded agent calls, thaw retries, watchdog, registry), ``scope.py``
(:func:`fs_frozen`, :class:`FreezeScope`, :class:`FreezeStatus`).
"""

from __future__ import annotations

from .._agent import agent_connected
from .agent import Filesystem, fs_info, fs_thaw, wait_for_agent
from .scope import FreezeScope, FreezeStatus, fs_frozen

__all__ = [
    "Filesystem",
    "FreezeScope",
    "FreezeStatus",
    "agent_connected",
    "fs_frozen",
    "fs_info",
    "fs_thaw",
    "wait_for_agent",
]
