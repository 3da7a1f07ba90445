"""Checkpoints: :class:`CheckpointCollection` (``Domain.checkpoints``) and :class:`Checkpoint`.

A checkpoint marks a point in time from which libvirt tracks the blocks the guest writes,
in one qcow2 *dirty bitmap* per disk. libvirt keeps the checkpoint's metadata; QEMU keeps
the bitmaps inside the images. The two drift apart easily (hazards 1-3 in
``docs/checkpoints.md``), so this module validates, explains and preserves them:

* :meth:`Checkpoint.validate` asks libvirt to compare metadata and bitmaps
  (``REDEFINE | REDEFINE_VALIDATE``) and names the broken disk and bitmap;
* libvirt's own errors about missing or stale bitmaps become
  :class:`~statecapture.CheckpointInconsistentError` with ``disk``/``bitmap`` set;
* :meth:`CheckpointCollection.export_metadata` / :meth:`~CheckpointCollection.import_metadata`
  carry the whole chain across an undefine/define or a move to another host.
"""

from __future__ import annotations

import builtins
import contextlib
import heapq
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
from lxml import etree

from . import _bitmaps, _files, _locks
from ._hints import add_names_hint
from ._ports import CheckpointObjectPort, NodeBitmap
from .errors import (
    CheckpointInconsistentError,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from .xml import CheckpointDisk, CheckpointXML, DomainXML
from .xml._base import parse, serialize
from .xml._checkpoint import check_checkpoint_name

if TYPE_CHECKING:
    from ._domain import Domain
    from ._ports import CheckpointPort

__all__ = ["EXPORT_FORMAT", "Checkpoint", "CheckpointCollection"]

#: Root element and format tag of the files :meth:`CheckpointCollection.export_metadata`
#: writes.
EXPORT_ROOT: Final = "checkpoints"
EXPORT_FORMAT: Final = "statecapture-checkpoints/1"

# libvirt 9.0 / QEMU 7.2 messages that name a broken (disk, bitmap) pair.
_BROKEN_PATTERNS: Final = (
    # 109 CHECKPOINT_INCONSISTENT from REDEFINE_VALIDATE
    re.compile(r"bitmap '(?P<bitmap>[^']+)' for disk '(?P<disk>[^']+)'"),
    # delete of a checkpoint whose bitmap vanished (code 1)
    re.compile(r"bitmap '(?P<bitmap>[^']+)' not found in backing chain of '(?P<disk>[^']+)'"),
)
# create when a bitmap of that name is already inside an image (QEMU's message)
_EXISTS_PATTERN: Final = re.compile(r"Bitmap already exists: (?P<bitmap>[^\s'\"]+)")
_RAW_PATTERN: Final = re.compile(r"checkpoint for disk (?P<disk>\S+) unsupported for storage type")


def _derived(exc: LibvirtError, cls: type[LibvirtError], message: str) -> LibvirtError:
    return cls(
        message,
        code=exc.code,
        operation=exc.operation,
        domain_name=exc.domain_name,
        libvirt_message=exc.libvirt_message,
    )


def _refine(exc: LibvirtError, checkpoint: str | None) -> LibvirtError:
    """Turn libvirt's messages about bitmaps into errors that name the disk and bitmap."""
    msg = exc.libvirt_message or str(exc)
    what = f"checkpoint {checkpoint!r}" if checkpoint else "the checkpoint"
    where = f" of domain {exc.domain_name!r}" if exc.domain_name else ""
    for pattern in _BROKEN_PATTERNS:
        m = pattern.search(msg)
        if m:
            disk, bitmap = m["disk"], m["bitmap"]
            new = CheckpointInconsistentError(
                f"{what}{where} is inconsistent: dirty bitmap {bitmap!r} of disk {disk!r} is "
                "missing or broken (the image was restored or replaced, the bitmap was removed "
                "outside libvirt, or QEMU stopped without a clean close). Incremental backups "
                "from this checkpoint are impossible; delete it with delete(metadata_only=True) "
                "(bitmaps it has on other disks stay in their images) and start a new chain "
                f"with a full backup. libvirt said: {msg}",
                disk=disk,
                bitmap=bitmap,
                code=exc.code,
                operation=exc.operation,
                domain_name=exc.domain_name,
                libvirt_message=exc.libvirt_message,
            )
            return new
    m = _EXISTS_PATTERN.search(msg)
    if m:
        bitmap = m["bitmap"]
        return CheckpointInconsistentError(
            f"cannot create {what}{where}: a dirty bitmap named {bitmap!r} is already inside a "
            "disk image although libvirt has no checkpoint for it (left behind by a "
            "metadata-only delete, lost libvirt metadata or an interrupted run). Choose another "
            "name, or remove the stale bitmap while the domain is shut off "
            f"(qemu-img bitmap --remove IMAGE {bitmap}). libvirt said: {msg}",
            bitmap=bitmap,
            code=exc.code,
            operation=exc.operation,
            domain_name=exc.domain_name,
            libvirt_message=exc.libvirt_message,
        )
    m = _RAW_PATTERN.search(msg)
    if m and isinstance(exc, UnsupportedError):
        return _derived(
            exc,
            UnsupportedError,
            f"{exc} — dirty bitmaps live inside qcow2 images, so a disk in another format "
            f"({m['disk']}) cannot be part of a checkpoint; pass disks=[...] naming only the "
            "qcow2 disks (the others get checkpoint='no')",
        )
    return exc


@contextlib.contextmanager
def _refined(checkpoint: str | None) -> Iterator[None]:
    try:
        yield
    except LibvirtError as exc:
        new = _refine(exc, checkpoint)
        if new is exc:
            raise
        raise new from exc


def _need_active(domain: Domain, operation: str, why: str) -> None:
    if not domain.is_active:
        raise InvalidStateError(
            f"{operation} needs a running domain ({why}); {domain.name!r} is {domain.state.value}",
            operation=operation,
            domain_name=domain.name,
        )


@attrs.define(eq=False)
class Checkpoint:
    """A live handle on one checkpoint of a domain.

    Get one from :attr:`Domain.checkpoints <statecapture.Domain.checkpoints>`
    (``dom.checkpoints["c1"]``, ``create()``, ``list()``). Properties query libvirt each time.
    """

    domain: Domain
    """The domain the checkpoint belongs to."""
    _port: CheckpointObjectPort = attrs.field(repr=False)
    name: str
    """The checkpoint's name (also the default name of its dirty bitmaps)."""

    @classmethod
    def _from_port(cls, domain: Domain, vir: CheckpointObjectPort) -> Checkpoint:
        return cls(domain, vir, vir.name)

    # ------------------------------------------------------------------ queries
    @property
    def definition(self) -> CheckpointXML:
        """The checkpoint's XML (with the domain definition libvirt stored with it)."""
        return CheckpointXML.from_xml(self._port.xml_desc())

    @property
    def parent(self) -> Checkpoint | None:
        """The parent checkpoint, ``None`` for a root."""
        name = CheckpointXML.from_xml(self._port.xml_desc(no_domain=True)).parent
        if name is None:
            return None
        return Checkpoint._from_port(self.domain, _port(self.domain).checkpoint_lookup(name))

    @property
    def children(self) -> tuple[Checkpoint, ...]:
        """The direct children, sorted by name."""
        with _locks.domain_lock(self.domain.uuid, "list checkpoint children"):
            found = self._port.children()
        kids = [Checkpoint._from_port(self.domain, v) for v in found]
        return tuple(sorted(kids, key=lambda c: c.name))

    def dirty_bytes(self) -> dict[str, int]:
        """Bytes written to each tracked disk since this checkpoint, e.g. ``{'vda': 327680}``.

        Counted at the bitmap's granularity (64 KiB clusters by default), so the figure is
        what an incremental backup from this checkpoint would copy. Needs a running domain
        (:class:`InvalidStateError` otherwise). When libvirt reports no size for a tracked
        disk, the checkpoint is validated: a missing bitmap raises
        :class:`CheckpointInconsistentError` naming it; a driver that reports no sizes at all
        (the test driver) raises :class:`UnsupportedError`.
        """
        _need_active(self.domain, "checkpoint dirty size", "QEMU counts dirty blocks live")
        with _locks.domain_lock(self.domain.uuid, "checkpoint dirty size"), _refined(self.name):
            cp = CheckpointXML.from_xml(self._port.xml_desc(size=True, no_domain=True))
        missing = [d.name for d in cp.tracked_disks if d.size is None]
        if missing:
            try:
                self.validate()
            except UnsupportedError as exc:
                raise UnsupportedError(
                    f"libvirt reported no dirty size for disk(s) {', '.join(missing)} of "
                    f"checkpoint {self.name!r} and this driver cannot validate checkpoints: "
                    "it does not count dirty blocks",
                    operation="checkpoint dirty size",
                    domain_name=self.domain.name,
                ) from exc
            raise UnsupportedError(
                f"libvirt reported no dirty size for disk(s) {', '.join(missing)} of "
                f"checkpoint {self.name!r} although the checkpoint validates",
                operation="checkpoint dirty size",
                domain_name=self.domain.name,
            )
        return {d.name: d.size for d in cp.tracked_disks if d.size is not None}

    # ------------------------------------------------------------------ checks and changes
    def validate(self) -> None:
        """Check that every bitmap the checkpoint names exists and is usable.

        Redefines the checkpoint with its own XML and ``REDEFINE | REDEFINE_VALIDATE``
        (nothing changes when it passes). Raises :class:`CheckpointInconsistentError` with
        ``disk`` and ``bitmap`` set when a bitmap is missing or broken,
        :class:`InvalidStateError` when the domain is not running (QEMU checks the bitmaps
        of the open images), :class:`UnsupportedError` when the driver cannot validate.
        """
        _need_active(self.domain, "checkpoint validate", "QEMU checks the bitmaps it has open")
        with _locks.domain_lock(self.domain.uuid, "checkpoint validate"), _refined(self.name):
            xml = self._port.xml_desc()
            _port(self.domain).checkpoint_create(xml, redefine=True, validate=True)

    def delete(self, *, children: bool = False, metadata_only: bool = False) -> None:
        """Delete the checkpoint (and with ``children`` its descendants).

        By default libvirt deletes the checkpoint's dirty bitmaps too, merging them into the
        parent's so the parent still covers every write since it was made; the QEMU driver
        needs the domain running for that. ``metadata_only`` forgets the checkpoint in
        libvirt but **leaves its bitmaps inside the qcow2 images** (hazard 3): QEMU keeps
        updating them, a later checkpoint of the same name fails with "bitmap already
        exists", and reverting an internal snapshot of such an image can kill the domain.
        Use it for a checkpoint whose bitmap is already gone (a
        :class:`CheckpointInconsistentError` from this method or from :meth:`validate`).

        If libvirt fails, the parent links of the children are restored (libvirt 9.0
        detaches them before it fails); a failure to restore is attached as a note.
        Holds the domain's lock (see :class:`~statecapture.Connection` on threads), so a
        concurrent delete of a child or a backup's start or end never interleaves.
        """
        with _locks.domain_lock(self.domain.uuid, "checkpoint delete"):
            self._delete(children=children, metadata_only=metadata_only)

    def _delete(self, *, children: bool, metadata_only: bool) -> None:
        kids: builtins.list[tuple[str, str]] = []
        if not children:
            kids = [(k.name, k.xml_desc()) for k in self._port.children()]
        try:
            with _refined(self.name):
                self._port.delete(children=children, metadata_only=metadata_only)
        except BaseException as exc:
            for name, xml in kids:
                try:
                    current = _port(self.domain).checkpoint_lookup(name)
                    if CheckpointXML.from_xml(current.xml_desc(no_domain=True)).parent is None:
                        _port(self.domain).checkpoint_create(xml, redefine=True)
                except Exception as undo:  # never mask the delete's own error
                    exc.add_note(
                        f"statecapture could not restore the parent link of checkpoint "
                        f"{name!r} to {self.name!r}: {undo}"
                    )
            raise

    def _repr_html_(self) -> str:
        from ._html import table

        cp = self.definition
        rows = [
            [d.name, d.checkpoint or "", d.bitmap or "", "" if d.size is None else str(d.size)]
            for d in cp.disks
        ]
        return (
            f"<div>checkpoint <b>{_esc(self.name)}</b> of {_esc(self.domain.name)}, parent "
            f"{_esc(cp.parent or '—')}"
            + table(["disk", "checkpoint", "bitmap", "dirty bytes"], rows)
            + "</div>"
        )


def _esc(text: str) -> str:
    from html import escape

    return escape(text)


def _as_xml(xml: CheckpointXML | str) -> CheckpointXML:
    if isinstance(xml, CheckpointXML):
        return xml
    if isinstance(xml, str | bytes):
        return CheckpointXML.from_xml(xml)
    raise UsageError(f"expected checkpoint XML text or a CheckpointXML, got {type(xml).__name__}")


@attrs.define(eq=False)
class CheckpointCollection:
    """The checkpoints of one domain: ``dom.checkpoints``.

    ``dom.checkpoints["c1"]`` looks one up (:class:`NotFoundError`, a ``LookupError``, when
    there is none; its message lists the checkpoints that exist, or the closest names),
    ``"c1" in dom.checkpoints`` tests, ``len()`` counts, iteration yields :meth:`list`.
    Every call queries libvirt.
    """

    domain: Domain
    """The domain whose checkpoints these are."""

    # ------------------------------------------------------------------ lookup
    def __getitem__(self, name: str) -> Checkpoint:
        if not isinstance(name, str):
            raise UsageError(f"checkpoint names are strings, got {name!r}")
        vir = _port(self.domain)
        try:
            found = vir.checkpoint_lookup(name)
        except NotFoundError as exc:
            names = lambda: (c.name for c in vir.list_checkpoints())  # noqa: E731
            add_names_hint(exc, name, names, "checkpoint")
            raise
        return Checkpoint._from_port(self.domain, found)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            _port(self.domain).checkpoint_lookup(name)
        except NotFoundError:
            return False
        return True

    def __len__(self) -> int:
        with _locks.domain_lock(self.domain.uuid, "list checkpoints"):
            return len(_port(self.domain).list_checkpoints())

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.list())

    def list(self) -> builtins.list[Checkpoint]:
        """Every checkpoint, parents before their children (topological order)."""
        with _locks.domain_lock(self.domain.uuid, "list checkpoints"):
            found = _port(self.domain).list_checkpoints(topological=True)
        return [Checkpoint._from_port(self.domain, v) for v in found]

    def roots(self) -> builtins.list[Checkpoint]:
        """The checkpoints without a parent, sorted by name."""
        with _locks.domain_lock(self.domain.uuid, "list checkpoints"):
            found = _port(self.domain).list_checkpoints(roots=True)
        roots = [Checkpoint._from_port(self.domain, v) for v in found]
        return sorted(roots, key=lambda c: c.name)

    # ------------------------------------------------------------------ create
    def create(self, name: str | None = None, *, disks: Sequence[str] | None = None) -> Checkpoint:
        """Create a checkpoint: from now on, writes to the chosen disks are tracked.

        ``disks=None`` lets libvirt choose (the QEMU driver tracks every disk and fails on a
        non-qcow2 one; the error says so). A sequence of targets (``["vda"]``) tracks those
        disks in a dirty bitmap named after the checkpoint and leaves the others out
        (``checkpoint='no'``). ``name=None`` lets libvirt name it (creation time).

        Checked before anything changes: :class:`UsageError` for an invalid or taken name
        (names are bounded at 247 UTF-8 bytes: libvirt cannot store longer ones) or an empty
        disk list, :class:`NotFoundError` for an unknown disk,
        :class:`UnsupportedError` for a disk that cannot hold a bitmap (not qcow2, cdrom).
        The new checkpoint's parent is the domain's current (latest) checkpoint.

        A create that fails leaves no dirty bitmap behind: on a running domain statecapture
        reads QEMU's bitmaps before the call and, after a failure, removes any bitmap QEMU
        gained that no checkpoint uses (a note on the error says so). Holds the domain's
        lock throughout.
        """
        dom = self.domain
        if name is not None:
            check_checkpoint_name(name)
        cp_disks: tuple[CheckpointDisk, ...] = ()
        if disks is not None:
            cp_disks = self._plan_disks(disks)
        xml = CheckpointXML(name=name, disks=cp_disks).to_xml()
        with _locks.domain_lock(dom.uuid, "checkpoint create"):
            if name is not None and name in self:
                raise UsageError(
                    f"domain {dom.name!r} already has a checkpoint named {name!r}",
                )
            before = _bitmaps.query_or_none(dom)
            try:
                with _refined(name):
                    vir = _port(dom).checkpoint_create(xml)
            except BaseException as exc:
                if before is not None:
                    remove_orphan_bitmaps(dom, before, exc)
                raise
        return Checkpoint._from_port(dom, vir)

    def _plan_disks(
        self, disks: Sequence[str], *, definition: DomainXML | None = None
    ) -> tuple[CheckpointDisk, ...]:
        dom = self.domain
        if isinstance(disks, str | bytes) or not all(isinstance(d, str) for d in disks):
            raise UsageError(f"disks must be a sequence of disk targets, got {disks!r}")
        wanted = builtins.list(dict.fromkeys(disks))
        if not wanted:
            raise UsageError("disks=[] would track no disk; pass None for libvirt's default")
        if len(wanted) != len(disks):
            raise UsageError(f"disks names a disk more than once: {builtins.list(disks)!r}")
        if definition is None:
            definition = dom.definition
        known = {d.target: d for d in definition.disks}
        for target in wanted:
            disk = known.get(target)
            if disk is None:
                raise NotFoundError(
                    f"domain {dom.name!r} has no disk {target!r} "
                    f"(disks: {', '.join(known) or 'none'})",
                    operation="checkpoint create",
                    domain_name=dom.name,
                )
            if disk.device != "disk":
                raise UnsupportedError(
                    f"disk {target!r} of domain {dom.name!r} is a {disk.device}: only "
                    "writable disks can be tracked by a checkpoint",
                    operation="checkpoint create",
                    domain_name=dom.name,
                )
            if disk.format is not None and disk.format != "qcow2":
                raise UnsupportedError(
                    f"disk {target!r} of domain {dom.name!r} is {disk.format}: a checkpoint "
                    "keeps a dirty bitmap inside the disk image, which only qcow2 images can "
                    "hold. Convert the image to qcow2 or leave the disk out of disks=[...]",
                    operation="checkpoint create",
                    domain_name=dom.name,
                )
        return tuple(
            CheckpointDisk(d.target, "bitmap")
            if d.target in wanted
            else CheckpointDisk(d.target, "no")
            for d in definition.disks
        )

    # ------------------------------------------------------------------ redefine
    def redefine(self, xml: CheckpointXML | str, *, validate: bool = True) -> Checkpoint:
        """(Re)define checkpoint metadata from XML (``REDEFINE``), e.g. after a move.

        Brings back a checkpoint whose bitmaps are still in the images but whose libvirt
        metadata was lost (or updates an existing one). ``validate`` also asks libvirt to
        check that the bitmaps exist (domain must be running; see :meth:`Checkpoint.validate`).
        The parent named in the XML must already be defined. Raises
        :class:`CheckpointInconsistentError` naming the disk and bitmap when validation fails.
        """
        cp = _as_xml(xml)
        if cp.name is None:
            raise UsageError("redefining a checkpoint needs its <name>")
        if validate:
            _need_active(self.domain, "checkpoint redefine", "validate=True checks live bitmaps")
        cp = self._fit_domain(cp)
        with _locks.domain_lock(self.domain.uuid, "checkpoint redefine"), _refined(cp.name):
            vir = _port(self.domain).checkpoint_create(
                cp.to_xml(), redefine=True, validate=validate
            )
        return Checkpoint._from_port(self.domain, vir)

    def _fit_domain(self, cp: CheckpointXML) -> CheckpointXML:
        # libvirt refuses an embedded <domain> with another UUID ("must use uuid ..."); it is
        # a record of the past definition only, so a domain defined anew keeps the chain.
        if cp.domain is not None and cp.domain.uuid not in (None, self.domain.uuid):
            return attrs.evolve(cp, domain=None)
        return cp

    # ------------------------------------------------------------------ export / import
    def export_metadata(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> int:
        """Write every checkpoint's metadata to ``path``; returns how many were written.

        The file (owner-only, mode 0600) holds each checkpoint's full XML, parents first, so
        :meth:`import_metadata` can bring the chain back after the domain was undefined and
        defined again or moved to another host together with its images. It is not a backup:
        the dirty bitmaps stay in the images. An existing file raises
        :class:`TargetExistsError` unless ``overwrite``.
        """
        target = Path(os.path.abspath(path))
        if _files.lexists(target) and not overwrite:  # a dangling symlink exists too
            raise TargetExistsError(
                f"{target} exists; pass overwrite=True to replace it", path=str(target)
            )
        dom = self.domain
        root = etree.Element(EXPORT_ROOT, format=EXPORT_FORMAT, domain=dom.name, uuid=dom.uuid)
        root.set("exported", str(int(time.time())))
        count = 0
        for vir in _port(dom).list_checkpoints(topological=True):
            root.append(parse(vir.xml_desc(), expected_root="domaincheckpoint"))
            count += 1
        data = serialize(root) + "\n"
        _write_private(target, data, overwrite=overwrite)
        return count

    def import_metadata(
        self, path: str | os.PathLike[str], *, validate: bool = True
    ) -> builtins.list[Checkpoint]:
        """Redefine every checkpoint saved by :meth:`export_metadata`; returns them in order.

        Checkpoints are redefined parents first, oldest first, so the newest one becomes the
        domain's current checkpoint and the next :meth:`create` continues the chain from it.
        ``validate`` checks each against the bitmaps in the images (the domain must be
        running). A domain defined anew with another UUID is accepted: the old definition
        stored in each checkpoint is then dropped (libvirt refuses a foreign UUID).

        Checked before any change: the file is a checkpoint export (:class:`XMLError`),
        every parent is in the file or already defined (:class:`NotFoundError`), no name is
        defined already (:class:`UsageError`). If one redefinition fails (e.g.
        :class:`CheckpointInconsistentError`), those already imported are removed again
        (metadata only) so the domain is left as it was.
        """
        source = Path(path)
        try:
            text = source.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"no checkpoint export at {source}", operation="checkpoint import"
            ) from None
        root = parse(text, expected_root=EXPORT_ROOT)
        if root.get("format") != EXPORT_FORMAT:
            raise XMLError(
                f"{source} is not a statecapture checkpoint export "
                f"(format {root.get('format')!r}, expected {EXPORT_FORMAT!r})"
            )
        cps = [CheckpointXML.from_element(el) for el in root.iterfind("domaincheckpoint")]
        dom = self.domain
        existing = {v.name for v in _port(dom).list_checkpoints()}
        order = _import_order(cps, existing)
        taken = sorted(c.name for c in order if c.name in existing)
        if taken:
            raise UsageError(
                f"domain {dom.name!r} already has checkpoint(s) {', '.join(map(str, taken))}; "
                "delete them (metadata_only=True) before importing, or redefine() one by one"
            )
        if validate and order:
            _need_active(dom, "checkpoint import", "validate=True checks live bitmaps")
        imported: builtins.list[Checkpoint] = []
        with _locks.domain_lock(dom.uuid, "checkpoint import"), contextlib.ExitStack() as undo:
            for cp in order:
                fitted = self._fit_domain(cp)
                with _refined(cp.name):
                    vir = _port(dom).checkpoint_create(
                        fitted.to_xml(), redefine=True, validate=validate
                    )
                undo.callback(_forget, vir)
                imported.append(Checkpoint._from_port(dom, vir))
            undo.pop_all()
        return imported

    # ------------------------------------------------------------------ notebook view
    def _repr_html_(self) -> str:
        from ._html import table

        rows = []
        for cp in self.list():
            d = CheckpointXML.from_xml(cp._port.xml_desc(no_domain=True))
            tracked = ", ".join(x.name for x in d.tracked_disks)
            created = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.creation_time))
                if d.creation_time is not None
                else ""
            )
            rows.append([cp.name, d.parent or "", created, tracked])
        return (
            f"<div>checkpoints of <b>{_esc(self.domain.name)}</b>"
            + table(["name", "parent", "created", "tracked disks"], rows)
            + "</div>"
        )


def remove_orphan_bitmaps(
    dom: Domain, before: Mapping[str, tuple[NodeBitmap, ...]], exc: BaseException
) -> None:
    """After a failed checkpoint create (caller holds the domain's lock): remove the dirty
    bitmaps QEMU gained since ``before`` that no checkpoint uses; notes go on ``exc``."""
    try:
        known: set[str] = set()
        for vir in _port(dom).list_checkpoints():
            known.add(vir.name)
            cp = CheckpointXML.from_xml(vir.xml_desc(no_domain=True))
            known.update(d.bitmap for d in cp.disks if d.bitmap)
    except Exception as err:  # cannot tell which bitmaps are libvirt's: touch none
        exc.add_note(f"statecapture did not look for a dirty bitmap left behind: {err}")
        return
    _bitmaps.remove_new_orphans(dom, before, known, exc)


def _forget(vir: CheckpointObjectPort) -> None:
    """Undo of an import step: drop the metadata only (the bitmaps were there before)."""
    vir.delete(metadata_only=True)


def _import_order(
    cps: builtins.list[CheckpointXML], existing: set[str]
) -> builtins.list[CheckpointXML]:
    """Parents first; among the ready ones the oldest first (the newest ends up current)."""
    by_name: dict[str, CheckpointXML] = {}
    for cp in cps:
        if cp.name is None:
            raise XMLError("a checkpoint in the export has no <name>")
        if cp.name in by_name:
            raise XMLError(f"checkpoint {cp.name!r} appears twice in the export")
        by_name[cp.name] = cp
    for cp in cps:
        if cp.parent is not None and cp.parent not in by_name and cp.parent not in existing:
            raise NotFoundError(
                f"parent {cp.parent!r} of checkpoint {cp.name!r} is neither in the export nor "
                "defined on the domain",
                operation="checkpoint import",
            )
    waiting = {n: cp.parent for n, cp in by_name.items() if cp.parent in by_name}
    index = {n: i for i, n in enumerate(by_name)}
    heap = [(cp.creation_time or 0, index[n], n) for n, cp in by_name.items() if n not in waiting]
    heapq.heapify(heap)
    order: builtins.list[CheckpointXML] = []
    while heap:
        _, _, name = heapq.heappop(heap)
        order.append(by_name[name])
        for child in [c for c, p in waiting.items() if p == name]:
            del waiting[child]
            heapq.heappush(heap, (by_name[child].creation_time or 0, index[child], child))
    if waiting:
        raise XMLError(f"checkpoint parents form a cycle: {', '.join(sorted(waiting))}")
    return order


def _write_private(target: Path, data: str, *, overwrite: bool) -> None:
    """Write ``data`` owner-only; never replace a file unless ``overwrite``.

    Created relative to the opened directory (``O_EXCL | O_NOFOLLOW``), written through the
    descriptor, and put in place from that descriptor: a name swapped meanwhile redirects
    nothing (see :mod:`statecapture._files`).
    """
    with _files.Directory.open(target.parent, what="export directory") as d:
        if not overwrite:
            d.check_free(target.name)
        tmp = f".{target.name}.{os.getpid()}.tmp"
        fd = d.create(tmp, flags=os.O_WRONLY)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
            if overwrite:
                if not d.same_file(tmp, fd):
                    raise TargetExistsError(
                        f"{d.join(tmp)} was replaced while statecapture wrote it",
                        path=str(d.join(tmp)),
                    )
                os.replace(tmp, target.name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            else:
                d.link_fd(fd, target.name)  # fails if target appeared meanwhile
                d.remove_if_same(tmp, fd)
            d.fsync()
        except BaseException:
            d.remove_if_same(tmp, fd)  # only our file; a swapped-in name stays
            raise
        finally:
            os.close(fd)


def _port(dom: Domain) -> CheckpointPort:
    """The domain's port as this module uses it: ``CheckpointPort`` (mypy checks it)."""
    return dom.port
