"""Domain handles on the test driver (fast tier)."""

from __future__ import annotations

import pytest

import statecapture
from statecapture import DomainState, InvalidStateError, NotFoundError


def test_domain_properties(test_domain: statecapture.Domain) -> None:
    """name, uuid, state, persistence, definition and disks come from libvirt."""
    dom = test_domain
    assert dom.name == "alpha"
    assert dom.uuid == "b17b8f4e-843d-4007-8ae3-070cc145c820"
    assert dom.state is DomainState.RUNNING and dom.state.is_running
    assert dom.is_active and dom.is_persistent
    assert dom.definition.name == "alpha"
    assert dom.has_agent_channel
    vda, sda = dom.disks
    assert (vda.target, vda.device, vda.bus, vda.format) == ("vda", "disk", "virtio", "qcow2")
    assert vda.source == "/var/lib/statecapture-test/alpha.qcow2"
    assert vda.backing == ()
    assert (sda.device, sda.readonly) == ("cdrom", True)
    assert dom.disk("vda") == vda
    with pytest.raises(NotFoundError, match="vdz"):
        dom.disk("vdz")


def test_domain_without_agent_channel(test_conn: statecapture.Connection) -> None:
    """has_agent_channel is False when no guest-agent channel is defined."""
    assert not test_conn.domain("beta").has_agent_channel


def test_lifecycle(test_conn: statecapture.Connection) -> None:
    """suspend/resume/destroy/start/shutdown move the domain through its states."""
    dom = test_conn.domain("alpha")
    dom.suspend()
    assert dom.state is DomainState.PAUSED
    dom.resume()
    assert dom.state is DomainState.RUNNING
    dom.destroy()
    assert dom.state is DomainState.SHUTOFF and not dom.is_active
    with pytest.raises(statecapture.UnsupportedError):
        dom.start(paused=True)  # the test driver implements no start flags
    assert dom.state is DomainState.SHUTOFF
    dom.start()
    dom.shutdown(timeout=10)
    assert dom.state is DomainState.SHUTOFF
    assert dom.wait_for_state(DomainState.SHUTOFF, timeout=1) is DomainState.SHUTOFF


def test_wrong_state_is_typed(test_conn: statecapture.Connection) -> None:
    """Resuming a running domain is an InvalidStateError; nothing changes."""
    dom = test_conn.domain("alpha")
    with pytest.raises(InvalidStateError):
        dom.resume()
    assert dom.state is DomainState.RUNNING


def test_wait_for_state_times_out(test_domain: statecapture.Domain) -> None:
    """wait_for_state raises OperationTimeoutError (a TimeoutError) when the state never comes."""
    with pytest.raises(TimeoutError):
        test_domain.wait_for_state(DomainState.PAUSED, timeout=0.3)
    with pytest.raises(statecapture.UsageError):
        test_domain.wait_for_state(timeout=1)


def test_repr_html(test_domain: statecapture.Domain, test_conn: statecapture.Connection) -> None:
    """Notebook views show the domain's state and disks, escaped."""
    html = test_domain._repr_html_()
    assert "alpha" in html and "vda" in html and "running" in html
    assert "alpha" in test_conn._repr_html_()


def test_xml_is_libvirts_document(test_domain: statecapture.Domain) -> None:
    """Domain.xml() returns libvirt's live document unparsed (definition is the same one
    parsed); inactive=True returns the persistent one."""
    live = test_domain.xml()
    assert live.lstrip().startswith("<domain") and "alpha" in live
    assert statecapture.xml.DomainXML.from_xml(live) == test_domain.definition
    inactive = test_domain.xml(inactive=True)
    assert statecapture.xml.DomainXML.from_xml(inactive) == test_domain.inactive_definition


def test_metadata_round_trip(test_domain: statecapture.Domain) -> None:
    """set_metadata stores one element under a namespace in the live and the persistent
    definition, metadata() reads it back, None removes it; no element reads as None."""
    ns = "urn:example:tool:1"
    assert test_domain.metadata(ns) is None
    test_domain.set_metadata(ns, "tool", "<state step='2'/>")
    stored = test_domain.metadata(ns)
    assert stored is not None and 'step="2"' in stored.replace("'", '"')
    assert ns in test_domain.xml() and ns in test_domain.xml(inactive=True)
    test_domain.set_metadata(ns, "tool", None)
    assert test_domain.metadata(ns) is None
    assert ns not in test_domain.xml(inactive=True)


def test_set_metadata_bad_input_writes_nothing(test_domain: statecapture.Domain) -> None:
    """A bad key, malformed XML or an empty namespace raise UsageError before anything is
    written."""
    ns = "urn:example:tool:1"
    before = test_domain.xml(inactive=True)
    for args in (
        (ns, "not a prefix", "<a/>"),
        (ns, "tool", "<unclosed>"),
        (ns, "tool", "two<a/>"),
        ("", "tool", "<a/>"),
    ):
        with pytest.raises(statecapture.UsageError):
            test_domain.set_metadata(*args)
    assert test_domain.metadata(ns) is None
    assert test_domain.xml(inactive=True) == before
