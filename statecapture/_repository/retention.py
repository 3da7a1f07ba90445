"""Which points a retention policy keeps (pure: no I/O)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence

from ..errors import UsageError
from .manifest import RestorePoint

__all__ = ["select"]


def _count(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be a non-negative int or None, not {value!r}")
    return value


def select(
    points: Sequence[RestorePoint],
    *,
    keep_last: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
) -> set[str]:
    """The ids of the points to keep (``points`` in any order).

    * ``keep_last=n``: the ``n`` newest points;
    * ``keep_daily=n``: the newest point of each of the ``n`` most recent UTC days with points;
    * ``keep_weekly=n``: the newest point of each of the ``n`` most recent ISO weeks with points.

    The rules add up (a point kept by any rule is kept). At least one rule must keep
    something: a policy that would remove every point is refused (:class:`UsageError`).
    """
    last = _count("keep_last", keep_last)
    daily = _count("keep_daily", keep_daily)
    weekly = _count("keep_weekly", keep_weekly)
    if last + daily + weekly == 0:
        raise UsageError(
            "prune needs keep_last, keep_daily or keep_weekly >= 1 (it never removes every point)"
        )
    newest_first = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    keep = {p.id for p in newest_first[:last]}
    for n, key in ((daily, _day), (weekly, _week)):
        if n == 0:
            continue
        seen: list[str] = []
        for p in newest_first:
            k = key(p)
            if k in seen:
                continue
            seen.append(k)
            keep.add(p.id)
            if len(seen) == n:
                break
    return keep


def _day(p: RestorePoint) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(p.time))


def _week(p: RestorePoint) -> str:
    iso = datetime.datetime.fromtimestamp(p.time, tz=datetime.UTC).isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"
