"""Item 3 — listing and tree-walking 10, 100, 1000 snapshots and checkpoints (test:///default).

The snapshots (then the checkpoints) of domain ``test`` form a tree in which node ``i`` is a
child of node ``(i - 1) // 4`` (redefined with explicit parents, so setting up costs no disk
work). At each size the benchmark times

* **list**: every item, parents first (``dom.snapshots.list()`` / ``listAllSnapshots``), and
* **walk**: from the roots down through every node's children (one libvirt call per node),

both through statecapture and raw (the time per call: the best of 7 alternating rounds of
``1000 / n`` calls), and fits ``log(time) = k·log(n) + c`` by least squares.
``k`` is the growth exponent: 1.0 is linear. Target: the library's ``k ≤ 1.10``. The note
also gives ``k`` of the library's own share (its time minus raw's: what it adds on top of
the same libvirt calls) and ``k`` over the last step alone (from 100 to 1000), for the library
and raw: where libvirt's own listing grows faster than linearly, the library cannot do better.

libvirt 9.0 validates every checkpoint XML against its RelaxNG schema (tens of ms per call),
so building 1000 checkpoints takes most of this module's run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import libvirt

import statecapture

from ._common import Context, Row, fit_exponent, fmt_seconds, interleave

NAME = "scaling"
NEEDS_GUEST = False
ITEM = 3
TITLE = "scaling"
TARGET = "k ≤ 1.10"
FANOUT = 4


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error; the benchmark expects none."""


def sizes(ctx: Context) -> tuple[int, ...]:
    """The tree sizes measured."""
    return (5, 10, 20) if ctx.quick else (10, 100, 1000)


def run(ctx: Context) -> list[Row]:
    """Build growing snapshot/checkpoint trees and time listing and walking them."""
    libvirt.registerErrorHandler(_quiet, None)
    rounds = ctx.repetitions(7, quick=2)
    ns = sizes(ctx)
    rows: list[Row] = []
    with statecapture.connect("test:///default") as conn:
        dom = conn.domain("test")
        raw_dom: Any = dom.port._raw
        _clear(raw_dom)
        try:
            rows += _measure("snapshots", _SnapshotTree(dom, raw_dom), ns, rounds, ctx)
            _clear(raw_dom)  # the test driver refuses checkpoints while snapshots exist
            rows += _measure("checkpoints", _CheckpointTree(dom, raw_dom), ns, rounds, ctx)
        finally:
            _clear(raw_dom)
    return rows


def _clear(raw_dom: Any) -> None:
    for snap in raw_dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS):
        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN)
    for cp in raw_dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS):
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)


class _SnapshotTree:
    def __init__(self, dom: statecapture.Domain, raw_dom: Any) -> None:
        self.dom = dom
        self.raw = raw_dom
        self.count = 0
        self._domain_xml = raw_dom.XMLDesc(0)

    def grow(self, n: int) -> None:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        while self.count < n:
            i = self.count
            parent = f"<parent><name>s{(i - 1) // FANOUT}</name></parent>" if i else ""
            self.raw.snapshotCreateXML(
                f"<domainsnapshot><name>s{i}</name>{parent}<state>running</state>"
                f"<creationTime>{i + 1}</creationTime><memory snapshot='no'/>"
                f"{self._domain_xml}</domainsnapshot>",
                flags,
            )
            self.count += 1

    def variants(self) -> dict[str, dict[str, Callable[[], object]]]:
        raw, dom = self.raw, self.dom
        topo = libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
        roots = libvirt.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS

        def raw_walk() -> int:
            stack = list(raw.listAllSnapshots(roots))
            seen = 0
            while stack:
                node = stack.pop()
                seen += 1
                stack.extend(node.listAllChildren(0))
            return seen

        def lib_walk() -> int:
            stack = list(dom.snapshots.roots())
            seen = 0
            while stack:
                node = stack.pop()
                seen += 1
                stack.extend(node.children)
            return seen

        return {
            "list": {
                "raw": lambda: raw.listAllSnapshots(topo),
                "library": lambda: dom.snapshots.list(),
            },
            "walk": {"raw": raw_walk, "library": lib_walk},
        }


class _CheckpointTree:
    def __init__(self, dom: statecapture.Domain, raw_dom: Any) -> None:
        self.dom = dom
        self.raw = raw_dom
        self.count = 0

    def grow(self, n: int) -> None:
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        while self.count < n:
            i = self.count
            parent = f"<parent><name>c{(i - 1) // FANOUT}</name></parent>" if i else ""
            self.raw.checkpointCreateXML(
                f"<domaincheckpoint><name>c{i}</name>{parent}"
                f"<creationTime>{i + 1}</creationTime><disks>"
                f"<disk name='vda' checkpoint='bitmap' bitmap='c{i}'/></disks>"
                "</domaincheckpoint>",
                flags,
            )
            self.count += 1

    def variants(self) -> dict[str, dict[str, Callable[[], object]]]:
        raw, dom = self.raw, self.dom
        topo = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL
        roots = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS

        def raw_walk() -> int:
            stack = list(raw.listAllCheckpoints(roots))
            seen = 0
            while stack:
                node = stack.pop()
                seen += 1
                stack.extend(node.listAllChildren(0))
            return seen

        def lib_walk() -> int:
            stack = list(dom.checkpoints.roots())
            seen = 0
            while stack:
                node = stack.pop()
                seen += 1
                stack.extend(node.children)
            return seen

        return {
            "list": {
                "raw": lambda: raw.listAllCheckpoints(topo),
                "library": lambda: dom.checkpoints.list(),
            },
            "walk": {"raw": raw_walk, "library": lib_walk},
        }


def _per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """One round: ``calls`` calls of ``fn``; seconds per call."""

    def timed() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls

    return timed


def _measure(
    kind: str,
    tree: _SnapshotTree | _CheckpointTree,
    ns: tuple[int, ...],
    rounds: int,
    ctx: Context,
) -> list[Row]:
    times: dict[str, dict[str, list[float]]] = {
        op: {"raw": [], "library": []} for op in ("list", "walk")
    }
    samples: dict[str, dict[str, dict[str, list[float]]]] = {"list": {}, "walk": {}}
    for n in ns:
        tree.grow(n)
        for op, variants in tree.variants().items():
            calls = max(1, 1000 // n)  # a round lasts about as long at every size
            got = interleave({k: _per_call(v, calls) for k, v in variants.items()}, rounds)
            samples[op][str(n)] = got
            for k in ("raw", "library"):
                times[op][k].append(min(got[k]))
        ctx.log(f"  scaling: {n} {kind} measured")
    rows = []
    for op in ("list", "walk"):
        lib_k = fit_exponent(ns, times[op]["library"])
        raw_k = fit_exponent(ns, times[op]["raw"])
        per_n = ", ".join(
            f"{n}: {fmt_seconds(t)}" for n, t in zip(ns, times[op]["library"], strict=True)
        )
        # The slope of the last segment: the fit over all sizes is pulled below 1 by the
        # fixed cost per call, which dominates at the smallest size.
        tail_k = fit_exponent(ns[-2:], times[op]["library"][-2:])
        raw_tail_k = fit_exponent(ns[-2:], times[op]["raw"][-2:])
        # The library's own share: what it adds on top of the same libvirt calls.
        share = [lib - raw for lib, raw in zip(times[op]["library"], times[op]["raw"], strict=True)]
        share_k = fit_exponent(ns, share) if min(share) > 0 else None
        share_text = "n/a" if share_k is None else f"{share_k:.2f}"
        rows.append(
            Row(
                3,
                f"{op} {kind} (n = {', '.join(map(str, ns))})",
                library=f"k = {lib_k:.2f}",
                reference=f"raw k = {raw_k:.2f}",
                ratio=times[op]["library"][-1] / times[op]["raw"][-1],
                target=TARGET,
                passed=lib_k <= 1.10,
                note=(
                    f"library times {per_n}; k of the library's own share (library - raw): "
                    f"{share_text}; k from n = {ns[-2]} to {ns[-1]} alone: library "
                    f"{tail_k:.2f}, raw {raw_tail_k:.2f}; ratio = library / raw at n = {ns[-1]}"
                ),
                values={
                    "n": list(ns),
                    "library_s": times[op]["library"],
                    "raw_s": times[op]["raw"],
                    "library_exponent": lib_k,
                    "raw_exponent": raw_k,
                    "library_tail_exponent": tail_k,
                    "raw_tail_exponent": raw_tail_k,
                    "library_share_exponent": share_k,
                    "rounds": samples[op],
                },
            )
        )
    return rows
