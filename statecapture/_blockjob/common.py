"""What the block-job modules share: timeout and bandwidth checks, the event subscription,
and reading the live ``<disk>`` elements.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lxml import etree

from .._events import EventKind, Expectation
from ..errors import (
    InvalidStateError,
    NotFoundError,
    UsageError,
)
from ..xml._base import parse

if TYPE_CHECKING:
    from .._domain import Domain
    from .._ports import BlockJobPort

# ----------------------------------------------------------------------------- helpers


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise UsageError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _check_bandwidth(value: int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"bandwidth must be a non-negative int (bytes per second), got {value!r}")


def _expect(dom: Domain, target: str) -> Expectation:
    """Subscribe to this disk's block-job events (before the job starts)."""
    return dom.connection.events.expect(
        lambda ev: ev.detail.get("disk") == target,
        kind=EventKind.BLOCK_JOB,
        domain_uuid=dom.uuid,
    )


def _live_disks(dom: Domain) -> list[etree._Element]:
    root = parse(_port(dom).xml_desc(), expected_root="domain")
    return list(root.iterfind("devices/disk"))


def _disk_target(el: etree._Element) -> str | None:
    tgt = el.find("target")
    return tgt.get("dev") if tgt is not None else None


def _disk_source(el: etree._Element) -> str | None:
    src = el.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "name", "volume"):
        value = src.get(attr)
        if value:
            return value
    return None


def _resolve_disk(dom: Domain, disk: str) -> etree._Element:
    """The live ``<disk>`` named by target (``vda``) or by its active image's path."""
    if not isinstance(disk, str) or not disk:
        raise UsageError(f"a disk target name (e.g. 'vda') is required, got {disk!r}")
    elements = _live_disks(dom)
    for el in elements:
        if _disk_target(el) == disk:
            return el
    for el in elements:
        if _disk_source(el) == disk:
            return el
    known = ", ".join(filter(None, (_disk_target(el) for el in elements))) or "none"
    raise NotFoundError(
        f"domain {dom.name!r} has no disk {disk!r} (disks: {known})",
        operation="look up disk",
        domain_name=dom.name,
    )


def _mirror_ready(dom: Domain, target: str) -> bool:
    for el in _live_disks(dom):
        if _disk_target(el) == target:
            mirror = el.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


def _require_no_job(dom: Domain, target: str, operation: str) -> None:
    info = _port(dom).block_job_info(target)
    if info is not None:
        raise InvalidStateError(
            f"disk {target!r} of {dom.name!r} already has a {info[0]} block job running; "
            "end it first (Domain.block_jobs() lists it)",
            operation=operation,
            domain_name=dom.name,
        )


def _port(dom: Domain) -> BlockJobPort:
    """The domain's port as this module uses it: ``BlockJobPort`` (mypy checks it)."""
    return dom.port
