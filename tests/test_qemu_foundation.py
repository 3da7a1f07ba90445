"""Foundation on real QEMU (embedded driver, TCG guest): connection, domain, disks, events."""

from __future__ import annotations

import pytest

import statecapture
from statecapture import DomainState, EventKind

pytestmark = pytest.mark.qemu


def test_versions_on_qemu(qemu_conn: statecapture.Connection) -> None:
    """The embedded driver reports the daemon-side libvirt and the QEMU version."""
    v = qemu_conn.versions
    assert v.driver.upper() == "QEMU"
    assert v.daemon >= (9, 0)
    assert v.hypervisor is not None and v.hypervisor >= (6, 0)


def test_domain_and_disks_on_qemu(guest_factory, qemu_conn: statecapture.Connection) -> None:
    """Domain properties and disk parsing match what QEMU runs, backing chain included."""
    dom = guest_factory(disks=2)
    assert dom.state is DomainState.RUNNING
    assert dom.is_active and dom.is_persistent
    assert dom.has_agent_channel
    vda, vdb = dom.disks
    assert (vda.target, vdb.target) == ("vda", "vdb")
    assert vda.format == "qcow2" and vda.bus == "virtio" and vda.device == "disk"
    assert vda.source is not None and vda.source.endswith("-disk0.qcow2")
    assert vda.backing == ()  # a fresh qcow2 without backing file
    assert qemu_conn.domain(dom.uuid).name == dom.name
    assert dom.name in [d.name for d in qemu_conn.domains()]


def test_lifecycle_events_on_qemu(guest, qemu_conn: statecapture.Connection) -> None:
    """suspend/resume deliver lifecycle events; destroy stops the guest."""
    dom = guest
    with qemu_conn.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=dom.uuid) as exp:
        dom.suspend()
        assert exp.wait(30).detail["event"] == "suspended"
        assert dom.state is DomainState.PAUSED
        dom.resume()
        assert exp.wait(30).detail["event"] == "resumed"
    with pytest.raises(statecapture.InvalidStateError):
        dom.resume()
    dom.destroy()
    assert dom.wait_for_state(DomainState.SHUTOFF, timeout=30) is DomainState.SHUTOFF
    with pytest.raises(statecapture.InvalidStateError):
        dom.suspend()


def test_unknown_domain_on_qemu(qemu_conn: statecapture.Connection) -> None:
    """NotFoundError on the real driver too."""
    with pytest.raises(statecapture.NotFoundError):
        qemu_conn.domain("no-such-domain")
