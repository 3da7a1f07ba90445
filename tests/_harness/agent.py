"""qemu-guest-agent helpers on top of ``libvirt_qemu.qemuAgentCommand``.

All functions take a running :class:`libvirt.virDomain` whose XML has the
``org.qemu.guest_agent.0`` channel (see :func:`tests._harness.guestkit.domain_xml`).
Agent errors surface as :class:`libvirt.libvirtError`; timeouts of the polling
helpers as :class:`TimeoutError`.

While a filesystem is frozen qemu-ga refuses everything but guest-ping,
guest-info, guest-sync*, guest-fsfreeze-status and guest-fsfreeze-thaw, so
:func:`guest_exec` and the file helpers fail until ``fsThaw``.  After an agent
command times out, libvirt answers "Guest agent not available for now" until
the agent has caught up.
"""

from __future__ import annotations

import base64
import json
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import libvirt_qemu

__all__ = [
    "agent_channel_state",
    "agent_command",
    "guest_exec",
    "read_guest_file",
    "wait_agent",
    "write_guest_file",
]

# Largest chunk asked for per guest-file-read.
_READ_CHUNK = 1 << 20
# Largest chunk sent per guest-file-write: qemu-ga parses JSON slowly under TCG.
_WRITE_CHUNK = 48 << 10


def agent_command(dom: libvirt.virDomain, command: dict[str, Any], timeout: int = 10) -> Any:
    """Send one agent command and return its ``"return"`` member.

    *command* is the QMP-style dict, e.g. ``{"execute": "guest-ping"}``.
    *timeout* is in seconds (libvirt's agent timeout; it must be >= 1 here).
    Raises :class:`libvirt.libvirtError` when the agent is not connected, does
    not answer in time, or answers with an error.
    """
    out = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), int(timeout), 0)
    if out is None:  # pragma: no cover - bindings raise instead
        raise libvirt.libvirtError(f"agent command {command.get('execute')} failed")
    reply = json.loads(out)
    return reply.get("return")


def wait_agent(dom: libvirt.virDomain, timeout: float = 60) -> float:
    """Poll ``guest-ping`` until the agent answers; return the seconds waited.

    Pings only once the live XML shows the channel ``state='connected'``, so
    libvirt's default error handler does not print one error per poll.
    Raises :class:`TimeoutError` after *timeout* seconds (the last libvirt
    error is chained) and :class:`RuntimeError` if the domain stops.  Under
    TCG on a busy 2-core host boot can take 30 s: use timeouts >= 120 s.
    Event-driven alternative:
    ``VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE`` (state CONNECTED).
    """
    start = time.monotonic()
    deadline = start + timeout
    last: Exception | None = None
    while True:
        # Ping only once libvirt reports the channel connected: failed agent
        # calls are logged by libvirt's default error handler, which would
        # spam stderr while the guest boots.
        if agent_channel_state(dom) in ("connected", None):
            try:
                agent_command(dom, {"execute": "guest-ping"}, timeout=5)
                return time.monotonic() - start
            except libvirt.libvirtError as e:
                last = e
        elif not dom.isActive():
            raise RuntimeError(
                f"domain {dom.name()} stopped while waiting for its agent (see its console log)"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest agent of {dom.name()} not up after {timeout}s") from last
        time.sleep(0.1)


def agent_channel_state(dom: libvirt.virDomain) -> str | None:
    """State of the agent channel in the live XML: ``"connected"``,
    ``"disconnected"``, or None if libvirt does not report it."""
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except libvirt.libvirtError:
        return "disconnected"
    for tgt in root.iterfind("./devices/channel/target"):
        if tgt.get("name") == "org.qemu.guest_agent.0":
            return tgt.get("state")
    return "disconnected"


def guest_exec(
    dom: libvirt.virDomain, argv: list[str], timeout: float = 10
) -> tuple[int, bytes, bytes]:
    """Run *argv* in the guest; return ``(exit code, stdout, stderr)``.

    ``argv[0]`` is looked up in the guest's ``PATH`` (busybox applets are in
    ``/bin``, ``/sbin``, ``/usr/bin``).  A process killed by signal N yields
    exit code ``-N``.  Raises :class:`TimeoutError` if the process has not
    exited after *timeout* seconds (it is left running in the guest).
    """
    if not argv:
        raise ValueError("argv must not be empty")
    per_call = max(5, min(int(timeout), 30))
    res = agent_command(
        dom,
        {
            "execute": "guest-exec",
            "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
        },
        timeout=per_call,
    )
    pid = res["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = agent_command(
            dom, {"execute": "guest-exec-status", "arguments": {"pid": pid}}, timeout=per_call
        )
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", ""))
            err = base64.b64decode(st.get("err-data", ""))
            if "exitcode" in st:
                code = int(st["exitcode"])
            else:
                code = -int(st.get("signal", 0))
            return code, out, err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest-exec {argv!r} (pid {pid}) still running after {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def read_guest_file(dom: libvirt.virDomain, path: str, timeout: int = 10) -> bytes:
    """Read a whole guest file via guest-file-open/read/close (~2 MB/s under TCG)."""
    handle = agent_command(
        dom, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}, timeout
    )
    chunks: list[bytes] = []
    try:
        while True:
            r = agent_command(
                dom,
                {
                    "execute": "guest-file-read",
                    "arguments": {"handle": handle, "count": _READ_CHUNK},
                },
                timeout,
            )
            chunks.append(base64.b64decode(r.get("buf-b64", "")))
            if r.get("eof") or not r.get("count"):
                break
    finally:
        agent_command(
            dom, {"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout
        )
    return b"".join(chunks)


def write_guest_file(dom: libvirt.virDomain, path: str, data: bytes, timeout: int = 10) -> None:
    """Create/truncate a guest file with *data* via guest-file-open/write/close.

    Sent in 48 KiB chunks: qemu-ga 7.2 hangs on a guest-file-write payload
    above ~128 KiB (libvirt then reports "Guest agent not available for now"
    until it answers again).  Throughput is only ~300 KB/s under TCG; put bulk
    data on the disk with ``make_data_disk(files=...)`` instead.
    """
    handle = agent_command(
        dom, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}, timeout
    )
    try:
        for i in range(0, len(data), _WRITE_CHUNK):
            chunk = data[i : i + _WRITE_CHUNK]
            agent_command(
                dom,
                {
                    "execute": "guest-file-write",
                    "arguments": {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                },
                timeout,
            )
        agent_command(
            dom, {"execute": "guest-file-flush", "arguments": {"handle": handle}}, timeout
        )
    finally:
        agent_command(
            dom, {"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout
        )
