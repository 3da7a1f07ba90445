"""Item 2 — per-operation overhead of the library over raw libvirt-python (test:///default).

Every operation is timed both ways on the same connection and the same domain (``test``):
the raw column is what a user writes by hand with libvirt-python, the library column the
statecapture call that does the same job (preflight checks, typed errors and XML models
included). Rounds alternate raw/library; the figure is the best (lowest) over rounds of the
mean time per call, because on a shared machine other processes only ever add time (the
medians are in the JSON file). Target: ``library ≤ 1.10 x raw + 1 ms``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree

import statecapture
from statecapture.xml import DomainXML

from ._common import Context, Row, fmt_seconds, interleave, median, timed_loop

NAME = "overhead"
NEEDS_GUEST = False
ITEM = 2
TITLE = "per-operation overhead"
TARGET = "≤ 1.10x + 1 ms"

# What Domain.snapshots.create() sends (no VALIDATE: see statecapture/_snapshot/collection.py).
_SNAP_CREATE_FLAGS_OF_LIBRARY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error; the benchmark expects none."""


class _Names:
    """Unique snapshot/checkpoint names across the whole run."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter)}"


def _row(name: str, samples: dict[str, list[float]], note: str = "") -> Row:
    raw = min(samples["raw"])
    lib = min(samples["library"])
    passed = lib <= 1.10 * raw + 1e-3
    return Row(
        2,
        name,
        library=fmt_seconds(lib),
        reference=f"raw {fmt_seconds(raw)}",
        ratio=lib / raw if raw > 0 else None,
        target=TARGET,
        passed=passed,
        note=note,
        values={
            "raw_s": raw,
            "library_s": lib,
            "raw_median_s": median(samples["raw"]),
            "library_median_s": median(samples["library"]),
            "rounds": samples,
        },
    )


def run(ctx: Context) -> list[Row]:
    """Time each operation raw and through statecapture; one row per operation."""
    libvirt.registerErrorHandler(_quiet, None)
    quick = ctx.quick
    many = 10 if quick else 50  # calls per round for sub-millisecond operations
    few = 2 if quick else 3  # calls per round for operations libvirt makes slow
    rows: list[Row] = []
    with statecapture.connect("test:///default") as conn:
        dom = conn.domain("test")
        raw_conn: Any = conn.port._raw
        raw_dom: Any = dom.port._raw
        _clear(raw_dom)
        try:
            rounds = (ctx.repetitions(15, quick=2), ctx.repetitions(9, quick=2))
            rows += _domain_ops(conn, dom, raw_conn, raw_dom, rounds[0], many)
            rows += _snapshot_ops(dom, raw_dom, rounds, many, few)
            _clear(raw_dom)  # the test driver refuses checkpoints while snapshots exist
            rows += _checkpoint_ops(dom, raw_dom, rounds, many, few)
        finally:
            _clear(raw_dom)
    return rows


def _clear(raw_dom: Any) -> None:
    """Remove every snapshot and checkpoint of the test domain."""
    for snap in raw_dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS):
        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN)
    for cp in raw_dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS):
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)


def _domain_ops(
    conn: statecapture.Connection,
    dom: statecapture.Domain,
    raw_conn: Any,
    raw_dom: Any,
    cheap: int,
    many: int,
) -> list[Row]:
    rows = []
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: raw_conn.lookupByName("test")),
            "library": lambda: timed_loop(many, lambda _i: conn.domain("test")),
        },
        cheap,
    )
    rows.append(_row("domain lookup", samples, "library also reads the UUID (identity)"))
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: etree.fromstring(raw_dom.XMLDesc(0))),
            "library": lambda: timed_loop(many, lambda _i: dom.definition),
        },
        cheap,
    )
    rows.append(_row("domain XML → model (XMLDesc + parse)", samples))
    text = raw_dom.XMLDesc(0).encode()
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: etree.fromstring(text)),
            "library": lambda: timed_loop(many, lambda _i: DomainXML.from_xml(text)),
        },
        cheap,
    )
    rows.append(_row("XML parsing only (lxml vs DomainXML)", samples))
    return rows


def _snapshot_ops(
    dom: statecapture.Domain, raw_dom: Any, rounds: tuple[int, int], many: int, few: int
) -> list[Row]:
    """Snapshot create/list/XML/delete; ``rounds`` = (cheap operations, slow ones)."""
    cheap, slow = rounds
    rows = []
    names = _Names("ov-s")
    made: list[str] = []

    def delete_made(_i: int = 0) -> None:
        while made:
            raw_dom.snapshotLookupByName(made.pop(), 0).delete(0)

    def raw_create(flags: int) -> Callable[[int], None]:
        def op(_i: int) -> None:
            name = names()
            raw_dom.snapshotCreateXML(
                f"<domainsnapshot><name>{name}</name></domainsnapshot>", flags
            )
            made.append(name)

        return op

    def lib_create(_i: int) -> None:
        name = names()
        dom.snapshots.create(name)
        made.append(name)

    def create_round(op: Callable[[int], None]) -> Callable[[], float]:
        def one() -> float:
            try:
                return timed_loop(few, op)
            finally:
                delete_made()

        return one

    samples = interleave(
        {"raw": create_round(raw_create(0)), "library": create_round(lib_create)}, slow
    )
    rows.append(
        _row(
            "snapshot create (raw: flags 0)",
            samples,
            "library asks libvirt for ATOMIC (no VALIDATE: it reloads the RelaxNG schema)",
        )
    )
    samples = interleave(
        {
            "raw": create_round(raw_create(_SNAP_CREATE_FLAGS_OF_LIBRARY)),
            "library": create_round(lib_create),
        },
        slow,
    )
    rows.append(_row("snapshot create (raw: same flags)", samples))

    # list and per-snapshot XML with 20 snapshots present
    for _ in range(20):
        raw_create(0)(0)
    topo = libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: raw_dom.listAllSnapshots(topo)),
            "library": lambda: timed_loop(many, lambda _i: dom.snapshots.list()),
        },
        cheap,
    )
    rows.append(_row("snapshot list (20 snapshots)", samples))
    raw_snap = raw_dom.snapshotLookupByName(made[0], 0)
    lib_snap = dom.snapshots[made[0]]
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: etree.fromstring(raw_snap.getXMLDesc(0))),
            "library": lambda: timed_loop(many, lambda _i: lib_snap.definition),
        },
        cheap,
    )
    rows.append(_row("snapshot XML → model", samples))
    delete_made()

    # delete by name: each round first creates (untimed) the snapshots it deletes
    def delete_round(op: Callable[[str], None]) -> Callable[[], float]:
        def one() -> float:
            mine = []
            for _ in range(many // 10 or 1):
                raw_create(0)(0)
                mine.append(made.pop())
            return timed_loop(len(mine), lambda i: op(mine[len(mine) - 1 - i]))

        return one

    samples = interleave(
        {
            "raw": delete_round(lambda n: raw_dom.snapshotLookupByName(n, 0).delete(0)),
            "library": delete_round(lambda n: dom.snapshots[n].delete()),
        },
        cheap,
    )
    rows.append(_row("snapshot delete (by name)", samples))
    return rows


def _checkpoint_ops(
    dom: statecapture.Domain, raw_dom: Any, rounds: tuple[int, int], many: int, few: int
) -> list[Row]:
    """Checkpoint create/list/delete; ``rounds`` = (cheap operations, slow ones)."""
    cheap, slow = rounds
    rows = []
    names = _Names("ov-c")
    made: list[str] = []

    def raw_create(_i: int) -> None:
        name = names()
        raw_dom.checkpointCreateXML(f"<domaincheckpoint><name>{name}</name></domaincheckpoint>", 0)
        made.append(name)

    def lib_create(_i: int) -> None:
        name = names()
        dom.checkpoints.create(name)
        made.append(name)

    def delete_made() -> None:
        while made:  # newest first: always a leaf
            raw_dom.checkpointLookupByName(made.pop(), 0).delete(0)

    def create_round(op: Callable[[int], None]) -> Callable[[], float]:
        def one() -> float:
            try:
                return timed_loop(few, op)
            finally:
                delete_made()

        return one

    samples = interleave(
        {"raw": create_round(raw_create), "library": create_round(lib_create)}, slow
    )
    rows.append(
        _row(
            "checkpoint create",
            samples,
            "libvirt 9.0 validates every checkpoint XML against its RelaxNG schema",
        )
    )
    count = 20 if many >= 50 else 5
    for _ in range(count):
        raw_create(0)
    topo = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL
    samples = interleave(
        {
            "raw": lambda: timed_loop(many, lambda _i: raw_dom.listAllCheckpoints(topo)),
            "library": lambda: timed_loop(many, lambda _i: dom.checkpoints.list()),
        },
        cheap,
    )
    rows.append(_row(f"checkpoint list ({count} checkpoints)", samples))
    delete_made()

    def delete_round(op: Callable[[str], None]) -> Callable[[], float]:
        def one() -> float:
            for _ in range(few):
                raw_create(0)
            mine = list(made)
            made.clear()
            # newest first, so each one deleted is a leaf (no bitmap merge into a child)
            return timed_loop(len(mine), lambda i: op(mine[len(mine) - 1 - i]))

        return one

    samples = interleave(
        {
            "raw": delete_round(lambda n: raw_dom.checkpointLookupByName(n, 0).delete(0)),
            "library": delete_round(lambda n: dom.checkpoints[n].delete()),
        },
        slow,
    )
    rows.append(_row("checkpoint delete (by name)", samples))
    return rows
