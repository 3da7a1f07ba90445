"""One host-locality rule (``_host``) and one guest-agent state reader (``_agent``).

Every module that asks "is this connection's host this host?" or "is the guest agent
connected?" gets its answer from these, so the answers agree.
"""

from __future__ import annotations

import pytest
from lxml import etree

import statecapture
from statecapture import _advisor, _agent, _memory
from statecapture._agent import AgentState, agent_state_of
from statecapture._host import is_local_uri, writes_host_files


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("test:///default", True),
        ("qemu:///system", True),
        ("qemu:///session", True),
        ("qemu:///embed?root=/tmp/x", True),
        ("qemu+unix:///system", True),
        ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", True),
        ("qemu+ssh:///system", True),
        ("qemu+tcp://:16509/system", True),
        ("qemu+ssh://host/system", False),
        ("qemu+ssh://user@host:22/system", False),
        ("qemu+tcp://h/system", False),
        ("qemu+tls://localhost/system", False),
        ("qemu+ssh://[::1]/system", False),
        ("qemu+ext:///system?command=/bin/true", False),
    ],
)
def test_locality_rule(uri: str, local: bool) -> None:
    """A URI without a host part is local, one naming a host (even localhost) or an external
    command is remote; the advisor and save/restore use this same rule."""
    assert is_local_uri(uri) is local
    assert _advisor._is_local(uri) is local
    assert _memory._is_local(uri) is local


def test_test_driver_writes_no_host_files(test_conn: statecapture.Connection) -> None:
    """The test driver is local but creates no files, so no file checks apply to it."""
    assert is_local_uri(test_conn.uri)
    assert not writes_host_files(test_conn)


def _domain(channel: str) -> etree._Element:
    return etree.fromstring(f"<domain><devices>{channel}</devices></domain>")


_AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'{}/></channel>"


@pytest.mark.parametrize(
    ("channel", "active", "expected"),
    [
        ("", True, AgentState.NO_CHANNEL),
        ("", False, AgentState.NO_CHANNEL),
        (
            "<channel type='unix'><target type='virtio' name='other'/></channel>",
            True,
            AgentState.NO_CHANNEL,
        ),
        (_AGENT.format(" state='connected'"), True, AgentState.CONNECTED),
        (_AGENT.format(" state='disconnected'"), True, AgentState.DISCONNECTED),
        (_AGENT.format(""), True, AgentState.UNKNOWN),
        (_AGENT.format(" state='connected'"), False, AgentState.DISCONNECTED),
        (_AGENT.format(""), False, AgentState.DISCONNECTED),
    ],
)
def test_agent_state_reader(channel: str, active: bool, expected: AgentState) -> None:
    """The one reader: no channel, connected, disconnected, and UNKNOWN when the driver
    reports no state; a domain that does not run has no connected agent."""
    assert agent_state_of(_domain(channel), active=active) is expected


def test_unknown_agent_state_policies(test_domain: statecapture.Domain) -> None:
    """The test driver reports no channel state: the reader says UNKNOWN, which
    ``Domain.agent_connected`` counts as connected, the advisor reports as ``unknown``, and a
    quiesced snapshot refuses (it needs an agent seen connected)."""
    assert _agent.agent_state(test_domain) is AgentState.UNKNOWN
    assert test_domain.agent_connected
    assert statecapture.advise(test_domain).facts.agent == "unknown"
    with pytest.raises(statecapture.GuestAgentError):
        test_domain.snapshots.create("q", quiesce=True)
