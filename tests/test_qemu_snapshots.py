"""Snapshot promises proven on real QEMU: refusals that change nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from statecapture import DomainState, SnapshotKind, UnsupportedError, UsageError
from tests._proof import sh, tmpfs

pytestmark = pytest.mark.qemu


def test_deleting_an_external_snapshot_over_an_internal_one_is_refused(
    guest_factory: Any,
) -> None:
    """libvirt 9.0 cannot delete an external snapshot whose parent is internal: delete()
    raises UnsupportedError and nothing changes (snapshot kept, the disk stays on its
    overlay, the overlay file and the guest's data stay); metadata_only still works."""
    dom = guest_factory(size_mib=16)
    image = dom.disk("vda").source
    assert image is not None
    internal = dom.snapshots.create("i1", disk_only=False)
    assert internal.kind in (SnapshotKind.INTERNAL, SnapshotKind.INTERNAL_DISK_ONLY)
    external = dom.snapshots.create("x1", disk_only=True)
    assert external.parent is not None and external.parent.name == "i1"
    overlay = f"{image}.x1"
    sh(dom, "echo on-overlay > /data/x1 && sync")
    with pytest.raises(UnsupportedError) as info:
        external.delete()
    print(f"\nrefusal: {info.value}")
    assert sorted(s.name for s in dom.snapshots) == ["i1", "x1"]
    assert dom.disk("vda").source == overlay and os.path.exists(overlay)
    assert dom.state is DomainState.RUNNING
    assert sh(dom, "cat /data/x1") == "on-overlay\n"
    external.delete(metadata_only=True)  # what the refusal suggests instead
    assert sorted(s.name for s in dom.snapshots) == ["i1"]


def test_unwritable_target_directory_is_a_usage_error(guest_factory: Any, tmp_path: Path) -> None:
    """An overlay or memory file in a directory this process cannot write (a read-only
    mount: even root cannot) raises UsageError before anything changes: no snapshot, no
    file, the disk stays on its image and the domain keeps running."""
    dom = guest_factory(agent=False, size_mib=16)
    image = dom.disk("vda").source
    with tmpfs(tmp_path / "ro", "ro") as ro:
        for kwargs in (
            {"disk_only": True, "external": {"vda": ro / "o.qcow2"}},
            {"external": True, "memory": ro / "mem"},
        ):
            with pytest.raises(UsageError, match="not writable"):
                dom.snapshots.create("blocked", **kwargs)
            assert len(dom.snapshots) == 0 and list(ro.iterdir()) == []
            assert dom.disk("vda").source == image and dom.state is DomainState.RUNNING
        assert subprocess.run(["touch", str(ro / "probe")], check=False).returncode != 0
