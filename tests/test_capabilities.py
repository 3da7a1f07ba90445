"""Capabilities: probed on the test driver (fast tier) and on embedded QEMU (real tier)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

import statecapture
from statecapture import Capabilities, Capability, Version
from statecapture._adapter import probe, translate_error
from statecapture._capabilities import CAPABILITY_NAMES, _gate
from tests._raw import raw_domain


def _state_of(dom: statecapture.Domain) -> tuple[str, str, str, int, int, bool | None]:
    raw = raw_domain(dom)
    return (
        raw.XMLDesc(0),
        raw.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.is_persistent else "",
        dom.state.value,
        len(raw.listAllSnapshots(0)),
        len(raw.listAllCheckpoints(0)),
        bool(raw.hasManagedSaveImage(0)),
    )


# ----------------------------------------------------------------------------- fast tier


def test_domain_capabilities_on_test_driver(test_domain: statecapture.Domain) -> None:
    """The test driver's answers are probed: what it implements is yes, the rest no."""
    caps = test_domain.capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.driver == "TEST" and caps.domain == "alpha"
    assert caps.daemon == test_domain.connection.versions.daemon
    for name in ("managed_save", "save", "snapshot", "fs_freeze", "checkpoint"):
        assert caps[name].supported is True, caps[name]
        assert "implemented" in caps[name].reason
    assert caps.backup.supported is False
    assert caps.backup.reason == "TEST driver: virDomainBackupBegin not supported"
    assert caps.block_copy.supported is False and "virDomainBlockCopy" in caps.block_copy.reason
    assert caps.block_commit.supported is False
    assert caps.save_params.supported is False
    assert "virDomainSaveParams not supported" in caps.save_params.reason
    assert caps.incremental_backup.supported is False
    assert "no backup support" in caps.incremental_backup.reason
    # QEMU's version history is not applied to another driver (HAZARDS 13).
    assert caps.snapshot_external_revert.supported is None
    assert "TEST not judged" in caps.snapshot_external_revert.reason


def test_connection_capabilities_without_a_domain(test_conn: statecapture.Connection) -> None:
    """Without a domain only connection-level probes answer; the rest say how to find out."""
    caps = test_conn.capabilities()
    assert caps.domain is None
    assert caps.save.supported is True and "virDomainRestoreFlags" in caps.save.reason
    assert caps.managed_save.supported is None
    assert "Domain.capabilities()" in caps.managed_save.reason
    assert caps.backup.supported is None  # the test driver has no domain capabilities XML


def test_capability_values() -> None:
    """A Capability is truthy only when known present; Capabilities iterates in order."""
    assert Capability("x", True, "r") and not Capability("x", None, "r")
    assert not Capability("x", False, "r")
    assert str(Capability("backup", False, "why")) == "backup: no — why"
    assert Capability("x", None, "r").answer == "unknown"


def test_capabilities_iterate_index_and_render(test_domain: statecapture.Domain) -> None:
    """Iteration, indexing, explain() and the HTML view list every capability."""
    caps = test_domain.capabilities()
    assert [c.name for c in caps] == list(CAPABILITY_NAMES)
    assert caps["backup"] is caps.backup
    with pytest.raises(KeyError):
        caps["nope"]
    text = caps.explain()
    assert str(caps) == text
    assert text.splitlines()[0].startswith("Capabilities of domain 'alpha': TEST driver")
    for name in CAPABILITY_NAMES:
        assert name in text
    html = caps._repr_html_()
    assert html.count("<tr>") == len(CAPABILITY_NAMES) + 1
    assert "virDomainBackupBegin not supported" in html


def test_probing_changes_nothing(test_conn: statecapture.Connection) -> None:
    """Probing a running and a shut-off domain leaves XML, state, snapshots,
    checkpoints and managed-save images exactly as they were."""
    for name in ("alpha", "beta"):
        dom = test_conn.domain(name)
        before = _state_of(dom)
        dom.capabilities()
        test_conn.capabilities()
        assert _state_of(dom) == before


def test_read_only_connection_cannot_tell(test_uri: str) -> None:
    """A read-only connection may not call modifying APIs: answers are unknown, not no."""
    with statecapture.connect(test_uri, readonly=True) as conn:
        caps = conn.domain("alpha").capabilities()
    assert caps.managed_save.supported is None
    assert "read only" in caps.managed_save.reason
    assert caps.fs_freeze.supported is None


def test_unknown_procedure_means_unsupported() -> None:
    """An older daemon that does not know an RPC procedure (VIR_ERR_RPC "unknown procedure")
    lacks the API: the probe says so, and a call that meets it raises UnsupportedError —
    not ConnectionLostError, although VIR_ERR_RPC is a connection code otherwise."""
    err = libvirt.libvirtError("unknown procedure: 999")
    err.err = (libvirt.VIR_ERR_RPC, 7, "unknown procedure: 999", 2, None, None, None, 0, 0)

    def managed_save() -> None:
        raise err

    answer = probe.probe("virDomainManagedSave", managed_save, alive=lambda: True)
    assert answer.supported is False
    assert "does not know virDomainManagedSave" in answer.evidence
    assert type(translate_error(err, "managed save")) is statecapture.UnsupportedError


def test_version_gates_compare_the_daemon() -> None:
    """Gates judge the daemon's version and say what is needed and what is there."""
    old = _gate("snapshot_external_revert", "QEMU", Version(9, 0, 0))
    assert old.supported is False
    assert old.reason == "reverting to external snapshots needs libvirt ≥ 9.9.0, daemon is 9.0.0"
    new = _gate("snapshot_external_revert", "QEMU", Version(10, 0, 0))
    assert new.supported is True and "≥ 9.9.0" in new.reason
    assert _gate("save_params", "QEMU", Version(8, 3, 0)).supported is False
    assert _gate("incremental_backup", "QEMU", Version(7, 5, 0)).supported is False
    assert _gate("backup_preserve_on_shutdown", "QEMU", Version(11, 10, 0)).supported is True
    assert _gate("backup_preserve_on_shutdown", "LXC", Version(11, 10, 0)).supported is None


def test_closed_connection_is_a_usage_error(test_uri: str) -> None:
    """Probing through a closed connection is a programmer error, not 'unsupported'."""
    conn = statecapture.connect(test_uri)
    dom = conn.domain("alpha")
    conn.close()
    with pytest.raises(statecapture.UsageError):
        conn.capabilities()
    with pytest.raises(statecapture.UsageError):
        dom.capabilities()


# ----------------------------------------------------------------------------- real tier


@pytest.mark.qemu
def test_qemu_capabilities_are_probed_harmlessly(
    guest: statecapture.Domain, qemu_conn: statecapture.Connection, tmp_path: Path
) -> None:
    """On libvirt 9.0 / QEMU 7.2 every capture API is found by probing, the version gates
    name what the daemon lacks, and probing changes nothing (XML, snapshots, checkpoints,
    managed save, jobs)."""
    before = _state_of(guest)
    caps = guest.capabilities()
    conn_caps = qemu_conn.capabilities()
    assert _state_of(guest) == before
    assert raw_domain(guest).blockJobInfo("vda", 0) == {}
    assert caps.driver == "QEMU" and caps.daemon >= (9, 0)
    for name in (
        "managed_save",
        "save",
        "save_params",
        "snapshot",
        "fs_freeze",
        "block_copy",
        "block_commit",
        "checkpoint",
        "backup",
        "incremental_backup",
        "snapshot_external_delete",
    ):
        assert caps[name].supported is True, caps[name]
    assert "qemuBackupBegin" not in caps.backup.reason  # proven by the idle-job answer
    assert "no backup job running" in caps.backup.reason
    assert "qemuDomainFSFreeze rejected the probe flag" in caps.fs_freeze.reason
    if caps.daemon < (9, 9):
        assert caps.snapshot_external_revert.supported is False
        assert f"daemon is {caps.daemon}" in caps.snapshot_external_revert.reason
    if caps.daemon < (11, 10):
        assert caps.backup_preserve_on_shutdown.supported is False
        assert "11.10" in caps.backup_preserve_on_shutdown.reason
    # Without a domain: backup from the domain capabilities XML, save from restore.
    assert conn_caps.backup.supported is True
    assert "domain capabilities" in conn_caps.backup.reason
    assert conn_caps.save.supported is True and conn_caps.save_params.supported is True
    assert conn_caps.fs_freeze.supported is None
