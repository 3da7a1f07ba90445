"""Property tests (Hypothesis) for the pure planners behind the data path, the journal and
the advisor.

* NBD planning (``statecapture/_nbd.py``): extent clipping, the streamed copy plan built
  from block status (whatever extent boundaries and short or long replies the server
  sends), the split into requests, and the qemu-img fallback's intersection: the copied
  set equals the dirty (or allocated) set, no byte is copied twice, none is missed, and a
  piece is written as data exactly where the export reads as data.
* The journal (``statecapture/_journal.py``): for any interleaving of steps, facts and a
  crash after any metadata write, the journal left behind tells recovery the same cleanup
  as the run's own state at that write.
* The advisor (``statecapture/_advisor.py``): relaxing a need never makes a method's
  standing worse (blocked, then the number of unmet needs).

The number of examples comes from the Hypothesis profile (``dev`` locally, ``ci`` in CI;
see ``tests/conftest.py``).
* Restore-chain validation (``statecapture/_restore.py``): from a pool of real qcow2 images
  (two chains with the same file names, a lone full image), any list is accepted exactly
  when it is one chain in order, and otherwise refused naming the first misfit.
"""

from __future__ import annotations

import os
import string
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import statecapture
from statecapture import _advisor, _journal, _nbd
from statecapture._restore import check_chain
from statecapture.errors import StateCaptureError, UsageError

# ----------------------------------------------------------------------------- NBD planning

ZERO = _nbd._STATE_ZERO
DIRTY = _nbd._DIRTY


@st.composite
def disks(draw: st.DrawFn, max_size: int = 96) -> tuple[list[bool], list[bool]]:
    """Per-byte ``(reads_zero, dirty)`` of a small export."""
    size = draw(st.integers(1, max_size))
    zero = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    dirty = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    return zero, dirty


def _runs(bits: list[bool], start: int, cuts: set[int]) -> list[tuple[int, bool]]:
    """Run-length encode ``bits[start:]``, also splitting at ``cuts`` (servers may split
    extents anywhere)."""
    out: list[tuple[int, bool]] = []
    for i in range(start, len(bits)):
        if out and out[-1][1] == bits[i] and i not in cuts:
            out[-1] = (out[-1][0] + 1, bits[i])
        else:
            out.append((1, bits[i]))
    return out


class FakeExport:
    """An NBD handle answering ``block_status`` from per-byte flags (the fault injected is
    the server's freedom: arbitrary extent splits, replies shorter or longer than asked)."""

    def __init__(self, zero: list[bool], dirty: list[bool], data: st.DataObject) -> None:
        self.zero, self.dirty, self.data = zero, dirty, data

    def block_status(self, count: int, offset: int, cb: Any) -> None:
        size = len(self.zero)
        for ctx, bits, flag in (
            (_nbd.BASE_ALLOCATION, self.zero, ZERO),
            ("qemu:dirty-bitmap:b", self.dirty, DIRTY),
        ):
            cuts = set(self.data.draw(st.lists(st.integers(offset, size), max_size=4)))
            runs = _runs(bits, offset, cuts)
            # at least one extent; may stop short of `count` or run past it
            keep = self.data.draw(st.integers(1, len(runs)))
            entries: list[int] = []
            for length, on in runs[:keep]:
                entries += [length, flag if on else 0]
            cb(ctx, offset, entries, None)


def _bytes_of(pieces: list[tuple[int, int, bool]]) -> list[int]:
    return [b for off, n, _d in pieces for b in range(off, off + n)]


def _check_pieces(pieces: list[tuple[int, int, bool]], wanted: set[int], zero: list[bool]):
    assert all(n > 0 for _o, n, _d in pieces)
    copied = _bytes_of(pieces)
    assert len(copied) == len(set(copied)), "a byte is copied twice"
    assert set(copied) == wanted, "the copied set differs from the wanted set"
    for off, n, is_data in pieces:
        assert {not zero[b] for b in range(off, off + n)} == {is_data}


@given(disk=disks(), data=st.data(), window=st.integers(1, 40))
def test_incremental_plan_copies_exactly_the_dirty_bytes(disk, data, window) -> None:
    """The incremental plan covers every dirty byte once and nothing else, with data/zero
    right per piece, for any server extent layout and any window size."""
    zero, dirty = disk
    h = FakeExport(zero, dirty, data)
    with mock.patch.object(_nbd, "_WINDOW", window):
        pieces = list(_nbd._plan(h, len(zero), "qemu:dirty-bitmap:b"))  # type: ignore[arg-type]
    _check_pieces(pieces, {i for i, d in enumerate(dirty) if d}, zero)
    assert [o for o, _n, _d in pieces] == sorted(o for o, _n, _d in pieces)


@given(disk=disks(), data=st.data(), window=st.integers(1, 40))
def test_full_plan_copies_exactly_the_data_bytes(disk, data, window) -> None:
    """The full plan covers every byte that does not read as zero, once, as data."""
    zero, dirty = disk
    h = FakeExport(zero, dirty, data)
    with mock.patch.object(_nbd, "_WINDOW", window):
        pieces = list(_nbd._plan(h, len(zero), None))  # type: ignore[arg-type]
    _check_pieces(pieces, {i for i, z in enumerate(zero) if not z}, zero)


@given(disk=disks(), data=st.data(), req=st.integers(1, 17))
def test_requests_split_without_gaps_or_overlap(disk, data, req) -> None:
    """Requests cover exactly the planned bytes; reads are at most REQUEST_SIZE, zero
    pieces stay whole and every request keeps its piece's data/zero kind."""
    zero, dirty = disk
    h = FakeExport(zero, dirty, data)
    with mock.patch.object(_nbd, "REQUEST_SIZE", req):
        pieces = list(_nbd._plan(h, len(zero), "qemu:dirty-bitmap:b"))  # type: ignore[arg-type]
        requests = list(_nbd._requests(iter(pieces)))
    assert _bytes_of(requests) == _bytes_of(pieces)
    assert all(n <= req for _o, n, d in requests if d)
    assert [r for r in requests if not r[2]] == [p for p in pieces if not p[2]]
    _check_pieces(requests, set(_bytes_of(pieces)), zero)


@given(
    entries=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 3)), min_size=1, max_size=8),
    length=st.integers(1, 100),
)
def test_clip_covers_at_most_the_length(entries, length) -> None:
    """Clipped extents are the reply's leading extents, cut to ``length`` bytes in total."""
    out = _nbd._clip(entries, length, "ctx", 0)
    assert sum(n for n, _f in out) == min(length, sum(n for n, _f in entries))
    assert [f for _n, f in out] == [f for _n, f in entries][: len(out)]
    assert all(n > 0 for n, _f in out)
    assert all(a == b for (a, _), (b, _) in zip(out[:-1], entries, strict=False))


@given(entries=st.lists(st.tuples(st.integers(-3, 0), st.integers(0, 3)), min_size=1))
def test_clip_refuses_empty_extents(entries) -> None:
    """A zero or negative extent length from the server is an error, never a silent gap."""
    with pytest.raises(StateCaptureError, match="empty"):
        _nbd._clip(entries, 10, "ctx", 0)


@given(disk=disks(), data=st.data())
def test_qemu_img_intersection_copies_exactly_the_dirty_bytes(disk, data) -> None:
    """The qemu-img fallback's intersection of dirty ranges with ``qemu-img map`` entries
    covers every dirty byte once, with data/zero right."""
    zero, dirty = disk
    size = len(zero)
    cuts = set(data.draw(st.lists(st.integers(0, size), max_size=6)))
    alloc, off = [], 0
    for n, z in _runs(zero, 0, cuts):
        alloc.append({"start": off, "length": n, "zero": z, "data": not z})
        off += n
    ranges, off = [], 0
    for n, d in _runs(dirty, 0, cuts):
        if d:
            ranges.append((off, n))
        off += n
    pieces = list(_nbd._intersect(ranges, alloc))
    _check_pieces(pieces, {i for i, d in enumerate(dirty) if d}, zero)


# ----------------------------------------------------------------------------- journal


class _Metadata:
    """The domain metadata store, keeping every write (a crash may follow any of them)."""

    def __init__(self) -> None:
        self.history: list[str | None] = []

    def get_metadata(self, _ns: str) -> str | None:
        return self.history[-1] if self.history else None

    def set_metadata(self, _ns: str, _key: str, xml: str | None) -> None:
        self.history.append(xml)


@attrs.define
class _Dom:
    name: str = "prop"
    port: _Metadata = attrs.field(factory=_Metadata)


KEYS = ["original:vda", "overlay:vda", "format:vda", "checkpoint", "frozen", "file:vda"]
VALUES = st.text(alphabet=string.ascii_letters + string.digits + "/._-", min_size=1, max_size=12)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.sampled_from(KEYS), VALUES),
        st.tuples(st.just("drop"), st.sampled_from(KEYS), st.none()),
        st.tuples(st.just("stage"), st.sampled_from(KEYS), VALUES),
        st.tuples(st.just("step"), st.sampled_from(["freeze", "snapshot", "copy"]), st.booleans()),
    ),
    max_size=12,
)


def cleanup_plan(xml: str | None) -> tuple[Any, ...] | None:
    """What :func:`statecapture.recover` reads from a journal to decide its cleanup."""
    if xml is None:
        return None
    j = _journal.Journal.from_xml(xml)
    return (
        j.sequence,
        j.fact("frozen") == "1",
        sorted(
            (name, j.facts_with_prefix("original").get(name), path)
            for name, path in j.facts_with_prefix("overlay").items()
        ),
        j.fact("checkpoint"),
        sorted((k, v) for k, v in j.facts.items() if k.split(":")[0] in ("file", "partial")),
        [(s.name, s.status) for s in j.steps],
    )


class _Boom(Exception):
    pass


@given(first=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3), ops=OPS)
def test_journal_after_any_crash_tells_the_same_cleanup(first, ops) -> None:
    """After every metadata write (a crash may follow any), the stored journal parses back
    to the cleanup the run's own state called for at that write: facts staged before a step
    are stored with its start, dropped facts are gone, steps carry their status."""
    dom = _Dom()
    writer = _journal.JournalWriter.begin(dom, "direct_backup", facts=first)  # type: ignore[arg-type]
    model_facts, staged = dict(first), {}
    steps: list[tuple[str, str]] = []
    expected = [
        ("direct_backup", dict(model_facts), list(steps))
    ]  # the state each write must store

    def write() -> None:
        for k, v in staged.items():
            if v is None:
                model_facts.pop(k, None)
            else:
                model_facts[k] = v
        staged.clear()
        expected.append(("direct_backup", dict(model_facts), list(steps)))

    for op, key, value in ops:
        if op == "record":
            writer.set_fact(key, value)
            staged[key] = value
            write()
        elif op == "drop":
            writer.set_fact(key, None)
            staged[key] = None
            write()
        elif op == "stage":
            writer.stage(key, value)
            staged[key] = value
        else:
            steps[:] = [s for s in steps if s[0] != key] + [(key, "started")]
            write()
            try:
                with writer.step(key):
                    if not value:
                        raise _Boom
            except _Boom:
                pass
            steps[-1] = (key, "done" if value else "failed")
            write()

    history = dom.port.history
    assert len(history) == len(expected)
    for stored, (seq, facts, steps_then) in zip(history, expected, strict=True):
        want = _journal.Journal(seq, "r", "h", 1, 0.0, facts=facts)
        plan = cleanup_plan(stored)
        assert plan is not None
        assert plan[:-1] == cleanup_plan(want.to_xml())[:-1]  # type: ignore[index]
        assert plan[-1] == steps_then
        # replaying twice reads the same: the stored text is a fixed point
        assert _journal.Journal.from_xml(stored).to_xml() == stored


@given(
    facts=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["freeze", "copy"]), st.sampled_from(["started", "done", "failed"])
        ),
        max_size=4,
    ),
    started=st.integers(0, 2_000_000_000),
)
def test_journal_xml_round_trip(facts, steps, started) -> None:
    """Any journal survives its XML form unchanged (what recover() reads is what was
    written)."""
    j = _journal.Journal(
        "backup_via_temporary_snapshot",
        "run-1",
        "host",
        42,
        float(started),
        steps=tuple(_journal.JournalStep(n, s, float(started)) for n, s in steps),
        facts=facts,
    )
    assert _journal.Journal.from_xml(j.to_xml()) == j


# ----------------------------------------------------------------------------- advisor

NEEDS = st.builds(
    statecapture.Needs,
    memory=st.booleans(),
    disks=st.just(True),
    consistency=st.sampled_from(list(statecapture.Consistency)),
    incremental=st.booleans(),
    max_downtime=st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    keep_definition=st.booleans(),
    third_party_access=st.booleans(),
    storage=st.sampled_from(list(statecapture.Storage)),
)


def _relaxations(needs: statecapture.Needs) -> list[statecapture.Needs]:
    """Every single step that asks for less than ``needs``."""
    out = []
    if needs.consistency is statecapture.Consistency.APPLICATION:
        out.append(attrs.evolve(needs, consistency=statecapture.Consistency.CRASH))
    for flag in ("incremental", "keep_definition", "third_party_access"):
        if getattr(needs, flag):
            out.append(attrs.evolve(needs, **{flag: False}))
    if needs.max_downtime is not None:
        out.append(attrs.evolve(needs, max_downtime=needs.max_downtime * 2 + 1))
        out.append(attrs.evolve(needs, max_downtime=None))
    return out


def _standing(method, facts, caps, needs) -> tuple[bool, int]:
    row = _advisor.GUIDE[method]
    downtime = _advisor._downtime(method, facts, needs)
    verdicts = _advisor._verdicts(method, row, facts, needs, downtime)
    blockers, _notes = _advisor._blockers(method, row, facts, caps, needs)
    return bool(blockers), sum(1 for v in verdicts if v.fit is _advisor.Fit.POOR)


@pytest.mark.parametrize("domain", ["alpha", "beta"])
def test_relaxing_a_need_never_worsens_a_method(test_conn, domain) -> None:
    """For each method: with a need relaxed, it is not newly blocked, and when it stays
    unblocked it has no more unmet needs (the advisor's ranking is monotone in the needs).
    Facts and capabilities are read once from the test driver's domain (real runs)."""
    dom = test_conn.domain(domain)
    caps = _advisor.probe_domain(dom)
    facts = _advisor.gather_facts(dom)
    for state in (facts, attrs.evolve(facts, state=statecapture.DomainState.SHUTOFF)):
        check_monotone(state, caps)


def check_monotone(facts: Any, caps: Any) -> None:
    @given(needs=NEEDS)
    def run(needs: statecapture.Needs) -> None:
        for method in statecapture.Method:
            strict = _standing(method, facts, caps, needs)
            for relaxed_needs in _relaxations(needs):
                relaxed = _standing(method, facts, caps, relaxed_needs)
                assert relaxed[0] <= strict[0], (method, needs, relaxed_needs)
                if relaxed[0] == strict[0]:
                    assert relaxed[1] <= strict[1], (method, needs, relaxed_needs)

    run()


# ----------------------------------------------------------------------------- restore chains

#: The pool: ``(directory, file name, index of the base in the pool or None)``. Two chains
#: with the *same* file names in two directories (a layer of the other chain names a base
#: with the right name that is the wrong file) and a lone full image.
_POOL_SPEC: tuple[tuple[str, str, int | None], ...] = (
    ("a", "full.qcow2", None),  # 0
    ("a", "inc1.qcow2", 0),  # 1
    ("a", "inc2.qcow2", 1),  # 2
    ("a", "inc3.qcow2", 2),  # 3
    ("b", "full.qcow2", None),  # 4
    ("b", "inc1.qcow2", 4),  # 5
    ("b", "inc2.qcow2", 5),  # 6
    ("a", "lone.qcow2", None),  # 7
)
_CHAINS = ((0, 1, 2, 3), (4, 5, 6))
# qemu-img is slow: a few examples each, whatever the profile says.
_CHAIN_EXAMPLES = settings(max_examples=min(settings().max_examples, 40))


@pytest.fixture(scope="module")
def chain_pool(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The pool's images, made once per module with ``qemu-img create -b`` (relative base
    names, as statecapture writes its incrementals)."""
    root = tmp_path_factory.mktemp("chains")
    paths: list[Path] = []
    for directory, name, base in _POOL_SPEC:
        (root / directory).mkdir(exist_ok=True)
        path = root / directory / name
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if base is not None:
            cmd += ["-b", _POOL_SPEC[base][1], "-F", "qcow2"]
        subprocess.run([*cmd, str(path), "1M"], check=True, cwd=path.parent)
        paths.append(path)
    return paths


def _first_misfit(picks: list[int]) -> int | None:
    """The oracle: the first layer that does not sit on the one before it (None: a chain)."""
    for i, pick in enumerate(picks):
        base = _POOL_SPEC[pick][2]
        if (i == 0 and base is not None) or (i > 0 and base != picks[i - 1]):
            return i
    return None


@st.composite
def chain_picks(draw: st.DrawFn) -> list[int]:
    """A correct chain's prefix, then maybe permuted, with a layer dropped, a foreign
    layer put in, or any list of pool images at all."""
    chain = list(draw(st.sampled_from(_CHAINS)))
    picks = chain[: draw(st.integers(1, len(chain)))]
    how = draw(st.sampled_from(["correct", "permute", "gap", "foreign", "any"]))
    if how == "permute":
        picks = draw(st.permutations(picks))
    elif how == "gap" and len(picks) > 1:
        del picks[draw(st.integers(0, len(picks) - 2))]
    elif how == "foreign":
        foreign = [i for i in range(len(_POOL_SPEC)) if i not in chain]
        picks.insert(draw(st.integers(0, len(picks))), draw(st.sampled_from(foreign)))
    elif how == "any":
        picks = draw(st.lists(st.integers(0, len(_POOL_SPEC) - 1), min_size=1, max_size=5))
    return picks


@_CHAIN_EXAMPLES
@given(picks=chain_picks())
def test_restore_chain_check_refuses_exactly_the_misfits(
    chain_pool: list[Path], picks: list[int]
) -> None:
    """check_chain (restore_disk's and verify's check) accepts a list of images exactly
    when it is a full image followed by its incrementals in order; any permutation, gap or
    foreign layer (even one whose base has the right file name) is a UsageError naming the
    first layer that does not fit, by position and path."""
    chain = [chain_pool[i] for i in picks]
    bad = _first_misfit(picks)
    if bad is None:
        assert check_chain(chain) == chain
    else:
        with pytest.raises(UsageError) as info:
            check_chain(chain)
        assert f"layer {bad} of the chain ({chain[bad]})" in str(info.value)


@_CHAIN_EXAMPLES
@given(which=st.sampled_from(_CHAINS), data=st.data())
def test_restore_chain_check_accepts_every_correct_chain(
    chain_pool: list[Path], which: tuple[int, ...], data: st.DataObject
) -> None:
    """Every full image with its first k incrementals, in order, passes the check (given as
    absolute or relative paths), and the check returns their absolute paths (the same files)."""
    chain = [chain_pool[i] for i in which[: data.draw(st.integers(1, len(which)))]]
    assert check_chain(chain) == chain
    relative = [os.path.relpath(p) for p in chain]
    assert [p.resolve() for p in check_chain(relative)] == chain
