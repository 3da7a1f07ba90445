"""Compatibility shim: the guest kit now ships as :mod:`statecapture.testing.kit`.

Kept so existing tests, ``benchmarks/_guest.py`` and ``tests/_kill_child.py`` keep their
imports; new code uses :mod:`statecapture.testing` (``GuestKit``, ``EmbeddedHypervisor``,
``TestGuest``). ``open_embed``/``start_event_loop`` return a raw ``libvirt.virConnect``
for the harness's own smoke check (``python -m tests._harness.verify_kit``).
"""

from __future__ import annotations

from pathlib import Path

import libvirt

from statecapture._adapter import ensure_event_loop
from statecapture.testing import kit as _kit
from statecapture.testing.kit import (
    AGENT_CHANNEL,
    DATA_MOUNTS,
    GUEST_MOUNT_HELPER,
    KERNEL_CMDLINE,
    MAX_EMBED_ROOT_LEN,
    RECIPE_VERSION,
    GuestKit,
    KitBuildError,
    default_cache_dir,
    domain_xml,
    ensure_kit,
    guest_mountpoint,
    make_data_disk,
    prepare_embed_root,
    recipe_key,
)

Kit = GuestKit

__all__ = [
    "AGENT_CHANNEL",
    "DATA_MOUNTS",
    "GUEST_MOUNT_HELPER",
    "KERNEL_CMDLINE",
    "MAX_EMBED_ROOT_LEN",
    "RECIPE_VERSION",
    "Kit",
    "KitBuildError",
    "default_cache_dir",
    "domain_xml",
    "ensure_kit",
    "guest_mountpoint",
    "make_data_disk",
    "make_embed_root",
    "open_embed",
    "prepare_embed_root",
    "recipe_key",
    "start_event_loop",
]


def make_embed_root(prefix: str = "sce-") -> Path:
    """A fresh, short, prepared embed root under ``/tmp``, registered with the session's
    isolation check (it must be gone when the session ends); the caller removes it."""
    from . import isolation

    return isolation.track(_kit.make_embed_root(prefix))


def start_event_loop() -> None:
    """Register libvirt's default event loop once per process (statecapture's loop)."""
    ensure_event_loop()


def open_embed(root: Path) -> libvirt.virConnect:
    """Start the event loop, write qemu.conf and open ``qemu:///embed?root=<root>`` raw."""
    start_event_loop()
    root = Path(root).absolute()
    prepare_embed_root(root)
    return libvirt.open(f"qemu:///embed?root={root}")
