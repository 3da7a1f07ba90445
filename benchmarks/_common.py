"""What every benchmark module shares: result rows, the run context, timing and fitting."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._guest import BenchGuest

__all__ = [
    "Context",
    "Row",
    "Unavailable",
    "fit_exponent",
    "fmt_bytes",
    "fmt_seconds",
    "interleave",
    "median",
    "timed_loop",
]


class Unavailable(Exception):
    """A measurement cannot run here; the message is the reason shown as ``n/a (reason)``."""


@dataclass
class Row:
    """One line of the results table (and one object in the JSON file).

    ``ratio`` is ``library / reference`` (time: lower is better; throughput: higher is
    better, see ``higher_is_better``). ``passed`` is ``None`` for rows without a target
    (informational) and for rows that could not be measured (``na`` holds the reason).
    """

    item: int
    """Which measurement of the issue (1 frozen window … 7 peak memory)."""
    name: str
    library: str = ""
    """The library's figure, formatted."""
    reference: str = ""
    """What it is compared with, formatted (``raw 1.2 ms``, ``nbdcopy 800 MiB/s`` …)."""
    ratio: float | None = None
    target: str = ""
    """The target as text (``≤ 1.10x``); empty: informational row."""
    passed: bool | None = None
    note: str = ""
    na: str | None = None
    """Reason the row could not be measured (printed as ``n/a (reason)``)."""
    higher_is_better: bool = False
    """Whether a larger ratio is better (throughput) rather than a smaller one (time)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Raw numbers for the JSON file (seconds, bytes, per-round samples …)."""

    @classmethod
    def unavailable(cls, item: int, name: str, reason: str, target: str = "") -> Row:
        """A row that could not be measured."""
        return cls(item, name, target=target, na=reason)

    @property
    def result(self) -> str:
        """``PASS``, ``MISS``, ``n/a`` or ``info``."""
        if self.na is not None:
            return "n/a"
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "MISS"

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return {
            "item": self.item,
            "name": self.name,
            "library": self.library,
            "reference": self.reference,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "result": self.result,
            "note": self.note,
            "na": self.na,
            "values": self.values,
        }


@dataclass
class Context:
    """What a benchmark module gets: the options and, on demand, the shared real guest."""

    quick: bool
    data_mib: int
    reps: int | None
    """Repetitions override (``--reps``); ``None``: each module's default."""
    guest_factory: Callable[[], BenchGuest] | None = None
    _guest: BenchGuest | None = None
    _guest_error: str | None = None
    log: Callable[[str], None] = print

    def guest(self) -> BenchGuest:
        """The shared benchmark guest, booted on first use.

        The first failure to boot it propagates; later calls raise :class:`Unavailable`
        with that failure as the reason, so one broken guest does not cost one boot per
        module.
        """
        if self._guest is None:
            if self.guest_factory is None:
                raise Unavailable("no QEMU guest in this run")
            if self._guest_error is not None:
                raise Unavailable(f"the guest did not start: {self._guest_error}")
            try:
                self._guest = self.guest_factory()
            except Exception as exc:
                self._guest_error = repr(exc)[:120]
                raise
        return self._guest

    def repetitions(self, default: int, quick: int = 1) -> int:
        """``--reps`` when given, else ``quick`` in quick mode, else ``default``."""
        if self.reps is not None:
            return max(1, self.reps)
        return quick if self.quick else default


# --------------------------------------------------------------------------- timing


def timed_loop(
    n: int,
    op: Callable[[int], object],
    *,
    setup: Callable[[int], object] | None = None,
    teardown: Callable[[int], object] | None = None,
) -> float:
    """Seconds per call of ``op(i)`` over ``n`` calls; setup/teardown are not timed."""
    total = 0.0
    for i in range(n):
        if setup is not None:
            setup(i)
        t0 = time.perf_counter()
        op(i)
        total += time.perf_counter() - t0
        if teardown is not None:
            teardown(i)
    return total / n


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant's round ``rounds`` times, alternating the order every round.

    Raw and library rounds alternate (AB, BA, AB …), so drift in the machine's load hits
    both alike. Each callable returns one figure per round (seconds per operation). As in
    :mod:`timeit`, the cyclic garbage collector is off while a round runs (and collects
    before it), so one variant does not pay for the other's garbage.
    """
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                out[name].append(variants[name]())
            finally:
                if was_enabled:
                    gc.enable()
    return out


def median(values: Iterable[float]) -> float:
    """The median (of a non-empty iterable)."""
    return float(statistics.median(list(values)))


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``: the order
    statistics whose ranks the binomial(n, 1/2) distribution puts around the middle.
    With few values the interval is wide (n = 9 gives about 96 % from the 2nd to the
    8th value); it never pretends more precision than the rounds give."""
    xs = sorted(values)
    n = len(xs)
    if n < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    # largest k with P(B <= k - 1) <= (1 - level) / 2 , B ~ binomial(n, 1/2)
    tail = (1.0 - level) / 2.0
    cum, k = 0.0, 0
    for i in range(n + 1):
        cum += math.comb(n, i) / 2.0**n
        if cum > tail:
            break
        k = i + 1
    k = max(1, k)
    return xs[k - 1], xs[n - k]


def fit_exponent(ns: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(n)``: 1.0 means linear growth."""
    if len(ns) != len(times) or len(ns) < 2:
        raise ValueError("need at least two (n, time) points")
    xs = [math.log(n) for n in ns]
    ys = [math.log(max(t, 1e-9)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


# --------------------------------------------------------------------------- formatting


def fmt_seconds(seconds: float) -> str:
    """``12.3 µs``, ``4.56 ms``, ``1.23 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    """``512 KiB``, ``12.5 MiB``, ``1.00 GiB``."""
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"
