"""The advisor's answer: :class:`MethodAdvice` per method, :class:`Advice` for a domain (with
``explain()`` for a terminal and ``_repr_html_`` for a notebook), and :func:`advise`, which
gathers the facts, applies the rules to every row of the guide and ranks the methods."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from .._capabilities import Capabilities, probe_domain
from ..errors import UsageError
from .facts import DomainFacts, gather_facts
from .guide import GUIDE, Facet, Fit, Method
from .needs import Needs
from .rules import Blocker, Verdict, _blockers, _downtime, _downtime_class, _seconds, _verdicts

if TYPE_CHECKING:
    from .._domain import Domain

__all__ = ["Advice", "MethodAdvice", "advise"]


@attrs.frozen
class MethodAdvice:
    """One method judged for one domain and one set of needs."""

    method: Method
    rank: int
    """1 is the best fit."""
    summary: str
    """What the method does, after the guide."""
    apis: str
    """The libvirt APIs involved."""
    verdicts: tuple[Verdict, ...]
    """One per :class:`Facet`, in the guide's order."""
    blockers: tuple[Blocker, ...]
    """Why the method cannot be used on this domain now (empty: usable)."""
    downtime: float
    """Estimated guest downtime in seconds (paused, stopped or I/O frozen), scaled from
    measurements on a small TCG guest: an order of magnitude, not a promise."""
    notes: tuple[str, ...] = ()
    """Caveats that do not block the method."""

    @property
    def usable(self) -> bool:
        """No blocker was found."""
        return not self.blockers

    @property
    def unmet(self) -> tuple[Facet, ...]:
        """Facets on which the method does not meet the needs."""
        return tuple(v.facet for v in self.verdicts if v.fit is Fit.POOR)

    @property
    def partial(self) -> tuple[Facet, ...]:
        """Facets on which the method meets the needs with a caveat."""
        return tuple(v.facet for v in self.verdicts if v.fit is Fit.PARTIAL)

    def verdict(self, facet: Facet) -> Verdict:
        """The verdict on ``facet``."""
        for v in self.verdicts:
            if v.facet is facet:
                return v
        raise KeyError(facet)  # pragma: no cover - every facet has a verdict

    def explain(self) -> str:
        """Several lines: summary, blockers, every facet's verdict, notes."""
        status = "usable" if self.usable else "BLOCKED"
        lines = [f"{self.rank}. {self.method.value} — {status}: {self.summary}"]
        lines.append(f"     APIs: {self.apis}; estimated downtime {_seconds(self.downtime)}")
        for b in self.blockers:
            lines.append(f"     blocked: {b}")
        width = max(len(f.value) for f in Facet)
        for v in self.verdicts:
            lines.append(f"     {v.facet.value:<{width}}  {v.fit.value:<7}  {v.statement}")
        for n in self.notes:
            lines.append(f"     note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


@attrs.frozen
class Advice:
    """Every capture method ranked for one domain and one set of :class:`Needs`.

    Iterate for the ranking, index with a :class:`Method`, print (or :meth:`explain`) for a
    terminal, or display in a notebook for a table.
    """

    domain: str
    needs: Needs
    facts: DomainFacts
    capabilities: Capabilities
    methods: tuple[MethodAdvice, ...]
    """All methods, best first."""

    def __iter__(self) -> Iterator[MethodAdvice]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def __getitem__(self, method: Method) -> MethodAdvice:
        for m in self.methods:
            if m.method is method:
                return m
        raise KeyError(method)

    @property
    def best(self) -> MethodAdvice | None:
        """The best usable method, or ``None`` when every method is blocked."""
        return next((m for m in self.methods if m.usable), None)

    @property
    def usable(self) -> tuple[MethodAdvice, ...]:
        """The methods without blockers, best first."""
        return tuple(m for m in self.methods if m.usable)

    def explain(self, *, details: int = 3) -> str:
        """A report for a terminal: the ranking, then ``details`` methods in full."""
        f = self.facts
        lines = [
            f"Advice for domain {self.domain!r} ({f.driver} driver, libvirt "
            f"{self.capabilities.daemon}; {f.state.value}, agent {f.agent})",
            f"Needs: {self.needs.describe()}",
            "",
        ]
        width = max(len(m.value) for m in Method)
        lines.append(f" #  {'method':<{width}}  {'status':<7}  {'downtime':<8}  unmet needs")
        for m in self.methods:
            status = "usable" if m.usable else "blocked"
            unmet = ", ".join(facet.value for facet in m.unmet) or "-"
            lines.append(
                f"{m.rank:>2}  {m.method.value:<{width}}  {status:<7}  "
                f"{_seconds(m.downtime):<8}  {unmet}"
            )
            for b in m.blockers:
                lines.append(f"{'':>4}{'':<{width}}  ↳ {b}")
        shown = [m for m in self.methods if m.usable][:details]
        if shown:
            lines.append("")
            lines.append("Details:")
            for m in shown:
                lines.append(m.explain())
        for note in f.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def _repr_html_(self) -> str:
        from html import escape

        from .._html import table

        headers = ["#", "method", "status", "downtime", *[facet.value for facet in Facet]]
        rows = []
        for m in self.methods:
            status = (
                "usable" if m.usable else "blocked: " + "; ".join(b.message for b in m.blockers)
            )
            cells = [f"{v.fit.value}: {v.statement}" for v in m.verdicts]
            rows.append([str(m.rank), m.method.value, status, _seconds(m.downtime), *cells])
        f = self.facts
        caption = f"Needs: {self.needs.describe()}"
        return (
            f"<div><b>Advice for {escape(self.domain)}</b> — {escape(f.driver)} driver, "
            f"{escape(f.state.value)}, agent {escape(f.agent)}"
            + table(headers, rows, caption=caption)
            + "</div>"
        )


# --------------------------------------------------------------------------- ranking


def advise(dom: Domain, needs: Needs | None = None) -> Advice:
    """Rank every state-capture method for ``dom`` and ``needs`` (default: :class:`Needs`).

    Only reads: the domain's capabilities are probed, its XML, snapshots, checkpoints, jobs
    and metadata are queried, local qcow2 images are inspected with ``qemu-img info
    --force-share``, and a running QEMU domain is asked for its live dirty bitmaps (a QMP
    query through libvirt, which marks the domain tainted ``custom-monitor``; see
    ``docs/hazards.md``). Nothing about the domain changes.
    """
    from .._domain import Domain

    if not isinstance(dom, Domain):
        raise UsageError(f"advise() needs a statecapture Domain, got {type(dom).__name__}")
    if needs is None:
        needs = Needs()
    elif not isinstance(needs, Needs):
        raise UsageError(f"advise() needs a Needs value, got {type(needs).__name__}")
    caps = probe_domain(dom)
    facts = gather_facts(dom)
    judged = []
    for order, (method, row) in enumerate(GUIDE.items()):
        downtime = _downtime(method, facts, needs)
        verdicts = _verdicts(method, row, facts, needs, downtime)
        blockers, notes = _blockers(method, row, facts, caps, needs)
        unmet = sum(1 for v in verdicts if v.fit is Fit.POOR)
        partial = sum(1 for v in verdicts if v.fit is Fit.PARTIAL)
        key = (
            bool(blockers),
            unmet,
            _downtime_class(downtime),
            partial,
            row.discouraged is not None,
            downtime,
            order,
        )
        judged.append((key, method, row, verdicts, blockers, notes, downtime))
    judged.sort(key=lambda item: item[0])
    methods = tuple(
        MethodAdvice(
            method=method,
            rank=rank,
            summary=row.summary,
            apis=row.apis,
            verdicts=verdicts,
            blockers=blockers,
            downtime=downtime,
            notes=notes,
        )
        for rank, (_key, method, row, verdicts, blockers, notes, downtime) in enumerate(
            judged, start=1
        )
    )
    return Advice(dom.name, needs, facts, caps, methods)
