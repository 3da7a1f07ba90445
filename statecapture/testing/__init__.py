"""Test your own code against a real hypervisor: a tiny real guest on embedded QEMU.

* :class:`GuestKit` builds (once, cached under ``~/.cache/statecapture/guestkit``) a tiny
  Linux guest from Debian packages: a cloud kernel, a busybox initramfs with the virtio
  modules and ``qemu-ga``, and ext4 data disks.
* :class:`EmbeddedHypervisor` opens ``qemu:///embed`` on a private root directory in this
  process (no libvirt daemon) and removes everything on exit.
* :class:`TestGuest` boots the kit there and reaches into it through the guest agent:
  ``exec``, ``write``, ``read``, ``sha256``, ``sync``, ``flush_host_images``; its
  ``domain`` is a statecapture :class:`~statecapture.Domain`.
* :func:`guest_exec`, :func:`read_guest_file`, :func:`write_guest_file` and
  :func:`agent_command` do the same on any running :class:`~statecapture.Domain` with a
  guest agent; :func:`wait_agent` waits until that agent answers.
* A pytest plugin (opt in with ``pytest_plugins = ["statecapture.testing"]``) provides the
  fixtures ``sc_hypervisor``, ``sc_guest_factory`` and ``sc_guest`` and the marker
  ``requires_qemu``.
* ``python -m statecapture.testing up|down|list`` keeps a demo guest running for a shell
  or a notebook.
* :mod:`statecapture.testing.faults` (import it explicitly) makes named libvirt calls of a
  handle fail, wait or be interrupted, and records every call, without monkeypatching:
  ``inject(dom, "fs_thaw", raises=...)``, ``record(dom)``.

Needs Linux on x86_64 with the Debian packages ``qemu-system-x86``, ``qemu-utils``,
``e2fsprogs`` and ``libvirt-daemon-driver-qemu`` (and, to build the kit once, ``apt`` with
package lists); :func:`environment_problem` says what is missing, and every entry point
raises :class:`~statecapture.TestEnvironmentError` with the remedy.
"""

from __future__ import annotations

import importlib.util

from ..errors import GuestBootError, TestEnvironmentError
from .guest import (
    TestGuest,
    agent_command,
    guest_exec,
    read_guest_file,
    wait_agent,
    write_guest_file,
)
from .hypervisor import EmbeddedHypervisor
from .kit import GuestKit, KitBuildError, environment_problem, make_data_disk

__all__ = [
    "GuestKit",
    "EmbeddedHypervisor",
    "TestGuest",
    "agent_command",
    "guest_exec",
    "read_guest_file",
    "write_guest_file",
    "wait_agent",
    "environment_problem",
    "make_data_disk",
    "TestEnvironmentError",
    "GuestBootError",
    "KitBuildError",
]

if importlib.util.find_spec("pytest") is not None:
    # `pytest_plugins = ["statecapture.testing"]` loads this module as the plugin.
    from .plugin import (  # noqa: F401
        pytest_collection_modifyitems,
        pytest_configure,
        sc_guest,
        sc_guest_factory,
        sc_hypervisor,
    )
