"""The one reader of the guest-agent channel state.

libvirt reports whether the guest agent is connected in the live definition: the
``<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='…'/>``
element. :func:`agent_state_of` reads it from a parsed definition, :func:`agent_state` from a
domain, and every module asks one of them (the advisor's facts, ``Domain.agent_connected``,
freezing, quiesced snapshots), so they all give the same answer:

* no such channel: :attr:`AgentState.NO_CHANNEL`;
* a channel on a domain that does not run: :attr:`AgentState.DISCONNECTED`;
* ``state='connected'`` / ``state='disconnected'``: that state;
* a channel without a ``state`` (the driver does not report it, e.g. the test driver):
  :attr:`AgentState.UNKNOWN`. Each caller states what it does with it:
  :func:`agent_connected` (``Domain.agent_connected``, freezing, ``wait_for_agent``) counts it
  as connected, since the agent command that follows finds out; the advisor reports it as a
  note, not a blocker; a quiesced snapshot is refused unless the state is
  :attr:`AgentState.CONNECTED` (it must not depend on an agent nobody saw answer).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from lxml import etree

from .errors import ConnectionLostError, GuestAgentError, LibvirtError
from .xml._base import parse
from .xml._domain import AGENT_CHANNEL

if TYPE_CHECKING:
    from ._domain import Domain
    from ._ports import DomainInfoPort, FreezePort

__all__ = ["AgentState", "agent_answers", "agent_connected", "agent_state", "agent_state_of"]

_AGENT_COMMAND_FAILED = 113
"""libvirt's VIR_ERR_AGENT_COMMAND_FAILED: the agent answered, with an error."""


class AgentState(enum.Enum):
    """What the live definition says about the guest-agent channel."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    NO_CHANNEL = "no channel"
    UNKNOWN = "unknown"
    """The channel is defined, but the driver does not report its state."""

    @property
    def maybe_connected(self) -> bool:
        """Connected, or possibly so (the driver does not say)."""
        return self in (AgentState.CONNECTED, AgentState.UNKNOWN)


def agent_state_of(root: etree._Element, *, active: bool) -> AgentState:
    """The agent state in a parsed ``<domain>`` definition of a domain that does (not) run."""
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            if not active:
                return AgentState.DISCONNECTED
            state = target.get("state")
            if state == "connected":
                return AgentState.CONNECTED
            if state == "disconnected":
                return AgentState.DISCONNECTED
            return AgentState.UNKNOWN
    return AgentState.NO_CHANNEL


def agent_state(dom: Domain) -> AgentState:
    """The agent state of ``dom``, read from its live definition (no agent command is sent)."""
    active = dom.is_active
    return agent_state_of(parse(_port(dom).xml_desc(), expected_root="domain"), active=active)


def agent_connected(dom: Domain) -> bool:
    """Whether the domain runs and its agent channel is connected (``Domain.agent_connected``).

    A channel whose state the driver does not report counts as connected.
    """
    return dom.is_active and agent_state(dom).maybe_connected


def agent_answers(dom: Domain) -> bool:
    """Whether the agent answers a command now (``guest-get-time``, which adds no taint).

    The channel state alone is not enough: a process that has just opened an embedded
    driver sees the channel "connected" while the driver is still reconnecting to the agent,
    and commands fail with "agent is not connected" for a moment. An agent that answers with
    an error (the command is disabled, or refused while frozen) answers; a driver that cannot
    read the guest's time through its agent is trusted on its channel state.
    """
    port: FreezePort = dom.port
    try:
        port.agent_time()
    except GuestAgentError as exc:
        # Not connected, unresponsive, unsynced: not yet.
        return exc.code == _AGENT_COMMAND_FAILED
    except ConnectionLostError:
        raise
    except LibvirtError:
        return True
    return True


def _port(dom: Domain) -> DomainInfoPort:
    """The domain's port as this module uses it: ``DomainInfoPort`` (mypy checks it)."""
    return dom.port
