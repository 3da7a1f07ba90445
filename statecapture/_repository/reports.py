"""Report values of the repository: verify, prune, check (frozen, printable)."""

from __future__ import annotations

from html import escape

import attrs

from .._html import table
from .manifest import RestorePoint, points_html

__all__ = ["CheckReport", "Difference", "PruneReport", "VerifyReport"]


@attrs.frozen
class Difference:
    """One block whose stored data does not match the digest recorded at backup time."""

    point: str
    """The point whose digest map disagrees."""
    disk: str
    """The disk target."""
    offset: int
    """Byte offset of the block in the guest-visible disk."""
    length: int
    """The block's length in bytes."""

    def __str__(self) -> str:
        return f"point {self.point} disk {self.disk}: block at {self.offset} (+{self.length})"


@attrs.frozen
class VerifyReport:
    """What :meth:`Repository.verify` found. ``ok`` is ``True`` when nothing differed."""

    points: tuple[str, ...]
    """The points checked."""
    bytes_read: int
    """Bytes of stored data read."""
    differences: tuple[Difference, ...] = ()
    """Every block whose data differs from its recorded digest."""
    errors: tuple[str, ...] = ()
    """Problems that stopped a chain from being read (missing layer, wrong backing ...)."""

    @property
    def ok(self) -> bool:
        """Whether every checked block matched and every chain was readable."""
        return not self.differences and not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (
            f"verify: {'ok' if self.ok else 'FAILED'}, {len(self.points)} points, "
            f"{self.bytes_read} bytes read"
        )
        lines = [head, *(f"  {d}" for d in self.differences), *(f"  {e}" for e in self.errors)]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [[d.point, d.disk, str(d.offset), str(d.length)] for d in self.differences]
        errs = "".join(f"<li>{escape(e)}</li>" for e in self.errors)
        return (
            f"<div><b>verify: {'ok' if self.ok else 'FAILED'}</b>, {len(self.points)} points"
            + (table(["point", "disk", "offset", "length"], rows) if rows else "")
            + (f"<ul>{errs}</ul>" if errs else "")
            + "</div>"
        )


@attrs.frozen
class PruneReport:
    """What :meth:`Repository.prune` removed (or would remove, with ``dry_run=True``)."""

    removed: tuple[RestorePoint, ...]
    """Points removed (oldest first)."""
    kept: tuple[RestorePoint, ...]
    """Points kept (oldest first), every one still restorable."""
    merged: tuple[str, ...] = ()
    """Layers that absorbed a removed layer (``file <- removed file``)."""
    checkpoints_deleted: tuple[str, ...] = ()
    """Checkpoints deleted on the domain (their bitmaps merged by libvirt)."""
    dry_run: bool = False
    """Whether nothing was changed."""
    notes: tuple[str, ...] = ()
    """Anything worth knowing (e.g. checkpoints left because the domain was not given)."""

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"prune: {verb} {len(self.removed)}, kept {len(self.kept)}",
            *(f"  - {p.id} {p.kind.value}" for p in self.removed),
            *(f"  checkpoint deleted: {c}" for c in self.checkpoints_deleted),
            *(f"  note: {n}" for n in self.notes),
        ]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"<div><b>prune</b>: {verb} {len(self.removed)}, kept {len(self.kept)}"
            + points_html(list(self.removed))
            + "</div>"
        )


@attrs.frozen
class CheckReport:
    """What :meth:`Repository.check` found (and repaired, with ``repair=True``)."""

    orphans: tuple[str, ...] = ()
    """Files no point lists (leftovers of an interrupted run), relative to the repository."""
    broken_points: tuple[str, ...] = ()
    """Points that cannot be restored (a file missing, a chain that does not validate)."""
    problems: tuple[str, ...] = ()
    """What is wrong, one line per problem."""
    repaired: bool = False
    """Whether orphans and broken points were removed."""
    booted: tuple[str, ...] = ()
    """With ``check(conn=...)``: one line per domain booted from the repository and not
    detached (:meth:`Repository.booted`). Information only: one that cannot run as it is
    also in ``problems``."""

    @property
    def ok(self) -> bool:
        """Whether nothing was found (a booted domain that can run is not a problem)."""
        return not self.orphans and not self.broken_points and not self.problems

    def __str__(self) -> str:
        head = f"check: {'ok' if self.ok else 'problems found'}" + (
            " (repaired)" if self.repaired else ""
        )
        return "\n".join(
            [
                head,
                *(f"  orphan: {o}" for o in self.orphans),
                *(f"  broken point: {b}" for b in self.broken_points),
                *(f"  {p}" for p in self.problems),
                *(f"  {b}" for b in self.booted),
            ]
        )

    def _repr_html_(self) -> str:
        return f"<pre>{escape(str(self))}</pre>"
