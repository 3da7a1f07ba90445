"""``<domaincheckpoint>`` documents: a checkpoint's name, parent and per-disk bitmaps.

Everything statecapture does not model (unknown elements and attributes) survives a
:meth:`CheckpointXML.from_xml` → :meth:`CheckpointXML.to_xml` round trip.
"""

from __future__ import annotations

import collections
import re
from typing import Final, Self

import attrs
from lxml import etree

from ..errors import UsageError, XMLError
from ._base import XMLInput, line_of, parse, serialize, text_of
from ._domain import DomainXML

__all__ = ["CHECKPOINT_NAME_PATTERN", "CheckpointDisk", "CheckpointXML"]

#: libvirt's rule for checkpoint names (``domaincheckpoint.rng``): no leading ``.``, no
#: ``/``, no whitespace.
CHECKPOINT_NAME_PATTERN: Final = r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]*"
_NAME_RE: Final = re.compile(CHECKPOINT_NAME_PATTERN + r"\Z")
_MODES: Final = (None, "bitmap", "no")

#: Longest checkpoint or snapshot name, in UTF-8 bytes, that libvirt can keep. libvirt
#: stores each one's metadata as ``<name>.xml``, written through a temporary
#: ``<name>.xml.new``: a file name may have 255 bytes (``NAME_MAX``), so 247 is the most
#: (measured on libvirt 9.0: 247 works, 248 fails with "unable to save metadata" — after
#: QEMU already made the checkpoint's dirty bitmap). QEMU's own bound on bitmap names
#: (1023 bytes) is wider.
METADATA_NAME_MAX: Final = 255 - len(".xml.new")


def check_checkpoint_name(name: object, *, what: str = "checkpoint name") -> str:
    """Return ``name`` when libvirt accepts it as a checkpoint name, else raise UsageError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(
            f"{what} {name!r} is not valid: use letters, digits, '_', '-' and '.', "
            "not starting with '.'"
        )
    size = len(name.encode("utf-8"))
    if size > METADATA_NAME_MAX:
        raise UsageError(
            f"{what} is {size} bytes long; libvirt keeps at most {METADATA_NAME_MAX} "
            f"(its metadata file is named after it and file names have at most 255 bytes): "
            f"{name[:40]}…"
        )
    return name


@attrs.frozen
class CheckpointDisk:
    """One ``<disk>`` of a checkpoint: whether, and in which dirty bitmap, it tracks writes.

    Raises :class:`~statecapture.UsageError` for combinations libvirt's schema forbids
    (a ``bitmap`` or ``size`` on a disk with ``checkpoint='no'``, a negative size).
    """

    name: str
    """The disk: its target (``vda``) or the absolute path of its image."""
    checkpoint: str | None = None
    """``'bitmap'`` (tracked in a qcow2 dirty bitmap), ``'no'`` (not tracked) or ``None``
    (not said; libvirt chooses when it creates the checkpoint)."""
    bitmap: str | None = None
    """Name of the qcow2 dirty bitmap (libvirt names it after the checkpoint by default)."""
    size: int | None = None
    """Bytes written since the checkpoint; only in XML fetched with the size flag from a
    running domain (see :meth:`statecapture.Checkpoint.dirty_bytes`)."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"a checkpoint disk needs a name, got {self.name!r}")
        if self.checkpoint not in _MODES:
            raise UsageError(
                f"checkpoint mode of disk {self.name!r} must be 'bitmap', 'no' or None, "
                f"got {self.checkpoint!r}"
            )
        if self.checkpoint == "no" and (self.bitmap is not None or self.size is not None):
            raise UsageError(f"disk {self.name!r} has checkpoint='no' but names a bitmap or size")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 0):
            raise UsageError(f"dirty size of disk {self.name!r} must be >= 0, got {self.size!r}")

    @property
    def tracked(self) -> bool:
        """Whether this disk has (or will get) a dirty bitmap for the checkpoint."""
        return self.checkpoint == "bitmap" or (self.checkpoint is None and self.bitmap is not None)

    @classmethod
    def from_element(cls, el: etree._Element) -> Self:
        """Build from a parsed ``<disk>`` element of a checkpoint."""
        size = el.get("size")
        if size is not None and not size.isdigit():
            raise XMLError(f"checkpoint disk size {size!r} is not a number", line=line_of(el))
        try:
            return cls(
                name=el.get("name", ""),
                checkpoint=el.get("checkpoint"),
                bitmap=el.get("bitmap"),
                size=int(size) if size is not None else None,
            )
        except UsageError as exc:
            raise XMLError(str(exc), line=line_of(el)) from None

    def apply(self, el: etree._Element) -> None:
        """Write the modelled attributes onto ``el`` (other attributes stay)."""
        el.set("name", self.name)
        for attr, value in (
            ("checkpoint", self.checkpoint),
            ("bitmap", self.bitmap),
            ("size", None if self.size is None else str(self.size)),
        ):
            if value is None:
                if attr in el.attrib:
                    del el.attrib[attr]
            else:
                el.set(attr, value)


@attrs.frozen
class CheckpointXML:
    """A parsed ``<domaincheckpoint>`` document.

    Modelled fields are typed; everything else survives a :meth:`from_xml` → :meth:`to_xml`
    round trip. Change a document with :func:`attrs.evolve` — e.g.
    ``attrs.evolve(cp, domain=None)`` drops the embedded ``<domain>`` copy. Equality compares
    the modelled fields only. The constructor checks names the way libvirt's schema does and
    raises :class:`~statecapture.UsageError` for an invalid one.
    """

    name: str | None = None
    """The checkpoint's name (``None``: libvirt picks one when creating)."""
    parent: str | None = None
    """Name of the parent checkpoint (``None`` for a root)."""
    description: str | None = None
    """Free-form description, kept exactly (whitespace included)."""
    creation_time: int | None = None
    """Creation time in seconds since the epoch (set by libvirt)."""
    disks: tuple[CheckpointDisk, ...] = ()
    """Per-disk checkpoint settings, in document order."""
    domain: DomainXML | None = None
    """The domain definition libvirt stored with the checkpoint, when present."""
    raw: str = attrs.field(default="", repr=False, eq=False)
    """The document as parsed; :meth:`to_xml` starts from it."""

    def __attrs_post_init__(self) -> None:
        if self.name is not None:
            check_checkpoint_name(self.name)
        if self.parent is not None:
            check_checkpoint_name(self.parent, what="parent checkpoint name")
        if self.creation_time is not None and (
            not isinstance(self.creation_time, int) or self.creation_time < 0
        ):
            raise UsageError(f"creation_time must be >= 0, got {self.creation_time!r}")
        counts = collections.Counter(d.name for d in self.disks)  # linear: 40k disks are fine
        dupes = sorted(n for n, k in counts.items() if k > 1)
        if dupes:
            raise UsageError(f"checkpoint names disk(s) {', '.join(dupes)} more than once")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_xml(cls, text: XMLInput) -> Self:
        """Parse a ``<domaincheckpoint>`` document; raises :class:`~statecapture.XMLError`."""
        return cls.from_element(parse(text, expected_root="domaincheckpoint"))

    @classmethod
    def from_element(cls, root: etree._Element) -> Self:
        """Build from an already parsed ``<domaincheckpoint>`` element."""
        if root.tag != "domaincheckpoint":
            raise XMLError(f"expected <domaincheckpoint>, got <{root.tag}>", line=line_of(root))
        parent_el = root.find("parent")
        desc_el = root.find("description")
        ctime_el = root.find("creationTime")
        ctime_text = text_of(ctime_el)
        if ctime_el is not None and ctime_text is not None and not ctime_text.isdigit():
            raise XMLError(f"creationTime {ctime_text!r} is not a number", line=line_of(ctime_el))
        disks_el = root.find("disks")
        disks = (
            tuple(CheckpointDisk.from_element(d) for d in disks_el.iterfind("disk"))
            if disks_el is not None
            else ()
        )
        dom_el = root.find("domain")
        try:
            return cls(
                name=text_of(root.find("name")),
                parent=text_of(parent_el.find("name")) if parent_el is not None else None,
                description=(desc_el.text or "") if desc_el is not None else None,
                creation_time=int(ctime_text) if ctime_text is not None else None,
                disks=disks,
                domain=DomainXML.from_element(dom_el) if dom_el is not None else None,
                raw=etree.tostring(root, encoding="unicode"),
            )
        except UsageError as exc:
            raise XMLError(str(exc), line=line_of(root)) from None

    # ------------------------------------------------------------------ queries
    def disk(self, name: str) -> CheckpointDisk:
        """The disk entry named ``name``; raises ``KeyError`` when there is none."""
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def tracked_disks(self) -> tuple[CheckpointDisk, ...]:
        """The disks that have a dirty bitmap for this checkpoint."""
        return tuple(d for d in self.disks if d.tracked)

    @property
    def sizes(self) -> dict[str, int]:
        """Dirty bytes per disk, for the disks whose ``size`` the document reports."""
        return {d.name: d.size for d in self.disks if d.size is not None}

    # ------------------------------------------------------------------ writing
    def to_element(self) -> etree._Element:
        """The document as an lxml element, modelled fields applied."""
        if self.raw:
            root = parse(self.raw)
        else:
            root = etree.Element("domaincheckpoint")
        _set_text(root, "name", self.name, position=0)
        _set_parent(root, self.parent)
        _set_text(root, "description", self.description, position=None, exact=True)
        _set_text(
            root,
            "creationTime",
            None if self.creation_time is None else str(self.creation_time),
            position=None,
        )
        _set_disks(root, self.disks)
        old_dom = root.find("domain")
        if self.domain is None:
            if old_dom is not None:
                root.remove(old_dom)
        else:
            new_dom = self.domain.to_element()
            if old_dom is not None:
                old_dom.addprevious(new_dom)
                root.remove(old_dom)
            else:
                root.append(new_dom)
        return root

    def to_xml(self) -> str:
        """Serialise, keeping every element and attribute statecapture does not model."""
        return serialize(self.to_element())


def _set_text(
    root: etree._Element,
    tag: str,
    value: str | None,
    *,
    position: int | None,
    exact: bool = False,
) -> None:
    child = root.find(tag)
    if value is None:
        if child is not None:
            root.remove(child)
        return
    if child is None:
        child = etree.Element(tag)
        if position is None:
            _insert_before(root, child, ("disks", "domain"))
        else:
            root.insert(position, child)
    if exact or text_of(child) != value:
        child.text = value


def _insert_before(root: etree._Element, child: etree._Element, before: tuple[str, ...]) -> None:
    for tag in before:
        anchor = root.find(tag)
        if anchor is not None:
            anchor.addprevious(child)
            return
    root.append(child)


def _set_parent(root: etree._Element, parent: str | None) -> None:
    el = root.find("parent")
    if parent is None:
        if el is not None:
            root.remove(el)
        return
    if el is None:
        el = etree.Element("parent")
        name = root.find("name")
        if name is not None:
            name.addnext(el)
        else:
            root.insert(0, el)
    name_el = el.find("name")
    if name_el is None:
        name_el = etree.SubElement(el, "name")
    name_el.text = parent


def _set_disks(root: etree._Element, disks: tuple[CheckpointDisk, ...]) -> None:
    container = root.find("disks")
    if not disks:
        if container is not None:
            root.remove(container)
        return
    if container is None:
        container = etree.Element("disks")
        _insert_before(root, container, ("domain",))
    existing = {el.get("name"): el for el in container.iterfind("disk")}
    for old in list(container):
        if old.tag == "disk":
            container.remove(old)
    for disk in disks:
        el = existing.get(disk.name)
        if el is None:
            el = etree.Element("disk")
        disk.apply(el)
        container.append(el)
