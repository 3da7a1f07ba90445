"""Small helpers shared by the repository modules."""

from __future__ import annotations

import re
from typing import Final

from ..errors import NotFoundError, UsageError

_UUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_OP: Final = "repository"


def _not_found(what: str) -> NotFoundError:
    return NotFoundError(what, operation=_OP)


def _uuid_of(domain: object) -> str | None:
    from .._domain import Domain

    if domain is None:
        return None
    if isinstance(domain, Domain):
        return domain.uuid
    if isinstance(domain, str):
        return domain if _UUID.match(domain) else None
    raise UsageError(f"domain must be a Domain, a name or a UUID, not {domain!r}")


def _time_of(pid: str) -> float:
    from .manifest import _parse_iso

    stamp = pid.split("Z-")[0]
    iso = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}Z"
    return _parse_iso(iso)


def _safe(disk: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", disk).lstrip(".") or "_"
