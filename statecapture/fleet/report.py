"""What a fleet run did: a :class:`DomainResult` per domain, in a :class:`FleetReport`."""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any

import attrs

__all__ = ["DomainResult", "FleetProgress", "FleetReport"]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@attrs.frozen
class DomainResult:
    """The outcome of one task: one operation on one domain of one host.

    A host that could not be reached or listed gives one result with ``domain=""``.
    """

    host: str
    """The host's name."""
    domain: str
    """The domain's name (``""``: the host itself failed, e.g. no worker, no connection)."""
    operation: str
    """``backup``, ``verify``, ``prune`` (or ``list`` for a host-level failure)."""
    ok: bool
    """Whether the operation succeeded."""
    started: float
    """When the task started on the host (epoch seconds)."""
    ended: float
    """When it ended (epoch seconds)."""
    point: str | None = None
    """The restore point made (backup), the newest verified (verify) or kept (prune)."""
    bytes: int = 0
    """Bytes written into the repository (backup) or read from it (verify)."""
    frozen_for: float | None = None
    """Seconds the guest's filesystems were frozen (backup); ``None``: not frozen."""
    error: str | None = None
    """Why it failed (``"ErrorClass: message"``)."""
    domain_uuid: str | None = None
    """The domain's UUID."""
    attempts: int = 1
    """How many times the operation was started (transient errors are retried)."""
    recovered: tuple[str, ...] = ()
    """What :func:`statecapture.recover` found and undid before the operation ran (an
    interrupted earlier attempt)."""
    notes: tuple[str, ...] = ()
    """Anything else worth knowing (the point's kind and reason, pruned points ...)."""

    @property
    def duration(self) -> float:
        """``ended - started`` in seconds."""
        return self.ended - self.started

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (every field, times as epoch seconds)."""
        return {
            "host": self.host,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
            "operation": self.operation,
            "ok": self.ok,
            "point": self.point,
            "bytes": self.bytes,
            "frozen_for": self.frozen_for,
            "error": self.error,
            "started": self.started,
            "ended": self.ended,
            "attempts": self.attempts,
            "recovered": list(self.recovered),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        state = "ok" if self.ok else f"FAILED: {self.error}"
        return f"{self.host}/{self.domain or '*'} {self.operation}: {state}"


@attrs.frozen
class FleetProgress:
    """Passed to a fleet run's ``progress`` callback after each finished task."""

    done: int
    """Tasks finished so far."""
    total: int
    """Tasks known so far (grows while hosts are still being listed)."""
    failed: int
    """Finished tasks that failed."""
    result: DomainResult
    """The task that just finished."""


@attrs.frozen
class FleetReport:
    """What :func:`statecapture.fleet.backup` (``verify``, ``prune``) did across the fleet."""

    operation: str
    """``backup``, ``verify`` or ``prune``."""
    results: tuple[DomainResult, ...]
    """One per domain (and one per host that failed as a whole), by host then domain."""
    started: float
    """When the run started (epoch seconds)."""
    ended: float
    """When the last task ended."""

    @property
    def ok(self) -> bool:
        """Whether every task succeeded."""
        return all(r.ok for r in self.results)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failed(self) -> tuple[DomainResult, ...]:
        """The results that failed."""
        return tuple(r for r in self.results if not r.ok)

    @property
    def succeeded(self) -> tuple[DomainResult, ...]:
        """The results that succeeded."""
        return tuple(r for r in self.results if r.ok)

    @property
    def bytes(self) -> int:
        """Total bytes over every result."""
        return sum(r.bytes for r in self.results)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts in the report, sorted."""
        return tuple(sorted({r.host for r in self.results}))

    def for_host(self, host: str) -> tuple[DomainResult, ...]:
        """The results of one host."""
        return tuple(r for r in self.results if r.host == host)

    def totals(self) -> dict[str, Any]:
        """Counts and sums: ``domains``, ``ok``, ``failed``, ``bytes``, ``seconds``,
        ``max_frozen_for``."""
        frozen = [r.frozen_for for r in self.results if r.frozen_for is not None]
        return {
            "domains": sum(1 for r in self.results if r.domain),
            "ok": len(self.succeeded),
            "failed": len(self.failed),
            "bytes": self.bytes,
            "seconds": round(self.ended - self.started, 3),
            "max_frozen_for": max(frozen) if frozen else None,
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for monitoring: ``ok``, ``operation``, times, ``totals``,
        ``results``."""
        return {
            "format": "statecapture-fleet-report",
            "version": 1,
            "operation": self.operation,
            "ok": self.ok,
            "started": self.started,
            "ended": self.ended,
            "totals": self.totals(),
            "results": [r.to_json() for r in self.results],
        }

    def dumps(self, **kwargs: Any) -> str:
        """:meth:`to_json` as a JSON string (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_json(), **kwargs)

    def __str__(self) -> str:
        t = self.totals()
        head = (
            f"fleet {self.operation}: {'ok' if self.ok else 'FAILED'}, {t['ok']} ok, "
            f"{t['failed']} failed, {t['bytes']} bytes, {t['seconds']} s"
        )
        return "\n".join([head, *(f"  {r}" for r in self.results)])

    def _repr_html_(self) -> str:
        rows = []
        for r in self.results:
            colour = "#2e7d32" if r.ok else "#c62828"
            rows.append(
                "<tr>"
                f"<td>{escape(r.host)}</td><td>{escape(r.domain or '*')}</td>"
                f"<td style='color:{colour}'>{'ok' if r.ok else 'failed'}</td>"
                f"<td><code>{escape(r.point or '')}</code></td><td>{r.bytes}</td>"
                f"<td>{'' if r.frozen_for is None else f'{r.frozen_for:.2f}'}</td>"
                f"<td>{escape(_iso(r.started))}</td><td>{r.duration:.1f}</td>"
                f"<td>{escape(r.error or '')}</td></tr>"
            )
        t = self.totals()
        return (
            f"<div><b>Fleet {escape(self.operation)}</b>: "
            f"{'ok' if self.ok else '<b>FAILED</b>'}, {t['ok']} ok, {t['failed']} failed, "
            f"{t['bytes']} bytes in {t['seconds']} s"
            "<table><thead><tr><th>host</th><th>domain</th><th>result</th><th>point</th>"
            "<th>bytes</th><th>frozen (s)</th><th>started</th><th>seconds</th><th>error</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )
