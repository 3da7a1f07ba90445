"""The one place where tests reach past statecapture's public API (see HACKING.md, "Tests").

Tests use the public API to act and to look. What it deliberately does not offer lives
here, and only here (``tests/test_quality.py`` forbids private attribute access everywhere
else in ``tests/``):

* :func:`raw_domain` / :func:`raw_connection` — libvirt's own objects for the hypervisor a
  statecapture handle talks to, to play **another tool** (``virsh``, a backup product, a
  second management process) that changes the domain behind statecapture's back: a
  checkpoint or snapshot made elsewhere, a job aborted elsewhere, a freeze made elsewhere,
  a QEMU monitor command. They are the objects of the *same* connection (a second
  ``libvirt.open`` would reach a different hypervisor for the fast tier's private
  ``test:///<file>`` instances, and libvirt allows one embedded QEMU driver per process),
  but every call on them bypasses statecapture exactly as another tool's call would.
* :func:`daemon_version` pretends another daemon version (the version gates read the
  daemon's version once per connection).

Faults are injected through the public ``statecapture.testing.faults`` (a pass-through in
front of a handle's port), never by patching the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
import libvirt

if TYPE_CHECKING:
    from statecapture import Connection, Domain, Version

__all__ = ["daemon_version", "raw_connection", "raw_domain"]


def raw_domain(dom: Domain) -> libvirt.virDomain:
    """libvirt's ``virDomain`` for *dom*, to act as another tool would (no statecapture)."""
    raw: libvirt.virDomain = dom.port._raw
    return raw


def raw_connection(conn: Connection) -> libvirt.virConnect:
    """libvirt's ``virConnect`` behind *conn*, to act as another tool would."""
    raw: libvirt.virConnect = conn.port._raw
    return raw


@contextlib.contextmanager
def daemon_version(conn: Connection, version: Version) -> Iterator[None]:
    """Within the block, *conn*'s version gates see a daemon of *version* (fault injection)."""
    conn._versions = attrs.evolve(conn.versions, daemon=version)
    try:
        yield
    finally:
        conn._versions = None
