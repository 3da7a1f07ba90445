"""QEMU passthrough: guest-agent commands and QMP/HMP monitor commands (``libvirt_qemu``).

libvirt marks a domain tainted (``custom-ga-command``, ``custom-monitor``: one log line,
listed by ``virDomainGetMessages``) when these are used; nothing else changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu

from .. import errors
from .._ports import NodeBitmap
from .translate import call, translate_error

__all__ = ["agent_command", "fs_freeze_status", "hmp_command", "node_bitmaps", "qmp"]


def fs_freeze_status(raw: Any, name: str, alive: Callable[[], bool], timeout: int) -> str:
    """The guest agent's ``guest-fsfreeze-status``: ``"frozen"`` or ``"thawed"``."""
    operation = "guest agent freeze status"
    command = json.dumps({"execute": "guest-fsfreeze-status"})
    reply = call(
        operation,
        libvirt_qemu.qemuAgentCommand,
        raw,
        command,
        max(1, int(timeout)),
        0,
        domain_name=name,
        alive=alive,
    )
    try:
        status = json.loads(str(reply))["return"]
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.GuestAgentError(
            f"{operation} on domain {name!r}: unexpected reply {reply!r}",
            operation=operation,
            domain_name=name,
        ) from exc
    return str(status)


def agent_command(raw: Any, name: str, command: dict[str, Any], timeout: int) -> Any:
    """One guest-agent command's ``"return"`` member; every failure is a GuestAgentError."""
    operation = f"guest agent command {command.get('execute')!r}"
    try:
        reply = libvirt_qemu.qemuAgentCommand(raw, json.dumps(command), max(1, int(timeout)), 0)
    except libvirt.libvirtError as exc:
        base = translate_error(exc, operation, domain_name=name)
        raise errors.GuestAgentError(
            str(base),
            code=base.code,
            operation=operation,
            domain_name=name,
            libvirt_message=base.libvirt_message,
        ) from exc
    try:
        return json.loads(str(reply)).get("return")
    except (ValueError, AttributeError) as exc:
        raise errors.GuestAgentError(
            f"{operation} on domain {name!r}: unexpected reply {reply!r}",
            operation=operation,
            domain_name=name,
        ) from exc


def hmp_command(raw: Any, name: str, alive: Callable[[], bool], command: str) -> str:
    """One QEMU human-monitor (HMP) command's output."""
    hmp = int(getattr(libvirt_qemu, "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP", 1))
    reply = call(
        "QEMU monitor command",
        libvirt_qemu.qemuMonitorCommand,
        raw,
        command,
        hmp,
        domain_name=name,
        alive=alive,
    )
    return str(reply)


def qmp(
    raw: Any,
    name: str,
    alive: Callable[[], bool],
    operation: str,
    command: str,
    arguments: dict[str, Any] | None,
) -> Any:
    """Run one QMP command through ``qemuMonitorCommand``; its ``return`` value.

    QMP's own errors become :class:`~statecapture.NotFoundError` (a node or bitmap that is
    not there) or :class:`~statecapture.LibvirtError`.
    """
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    reply = call(
        operation,
        libvirt_qemu.qemuMonitorCommand,
        raw,
        json.dumps(request),
        0,
        domain_name=name,
        alive=alive,
    )
    try:
        decoded = json.loads(str(reply))
    except ValueError as exc:
        raise errors.LibvirtError(
            f"{operation} on domain {name!r}: QEMU answered no JSON ({reply!r})",
            operation=operation,
            domain_name=name,
        ) from exc
    if isinstance(decoded, dict) and "error" in decoded:
        err = decoded["error"] if isinstance(decoded["error"], dict) else {}
        desc = str(err.get("desc", decoded["error"]))
        lowered = desc.lower()
        cls: type[errors.LibvirtError] = errors.LibvirtError
        if "not found" in lowered or "cannot find" in lowered:
            cls = errors.NotFoundError
        raise cls(
            f"{operation} on domain {name!r} failed: QEMU said: {desc}",
            operation=operation,
            domain_name=name,
            libvirt_message=desc,
        )
    if not isinstance(decoded, dict) or "return" not in decoded:
        raise errors.LibvirtError(
            f"{operation} on domain {name!r}: unexpected QEMU reply {reply!r}",
            operation=operation,
            domain_name=name,
        )
    return decoded["return"]


def node_bitmaps(nodes: object) -> list[NodeBitmap]:
    """The dirty bitmaps in a ``query-named-block-nodes`` answer."""
    out: list[NodeBitmap] = []
    for node in nodes if isinstance(nodes, list) else ():
        if not isinstance(node, dict):
            continue
        name = str(node.get("node-name") or "")
        filename = node.get("file")
        for bm in node.get("dirty-bitmaps") or ():
            if not isinstance(bm, dict) or "name" not in bm:
                continue
            out.append(
                NodeBitmap(
                    node=name,
                    driver=str(node.get("drv") or ""),
                    filename=str(filename) if filename else None,
                    name=str(bm["name"]),
                    persistent=bool(bm.get("persistent", False)),
                    recording=bool(bm.get("recording", True)),
                    busy=bool(bm.get("busy", False)),
                    granularity=int(bm.get("granularity", 0)),
                    count=int(bm.get("count", 0)),
                )
            )
    return out
