"""The repository's documented JSON: the repository header and one manifest per point.

Everything here is pure (no I/O besides :func:`parse_json`'s input): values, their JSON form,
and the format checks. The layout and every field are documented in ``docs/repository.md``.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import time
from collections.abc import Mapping
from html import escape
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import attrs

from .._advisor import Consistency
from .._html import table
from ..errors import RepositoryError, RepositoryFormatError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DiskEntry",
    "PointKind",
    "RepositoryInfo",
    "RestorePoint",
    "new_point_id",
]

FORMAT: Final = "statecapture-repository"
"""The ``format`` value of ``repository.json``."""
FORMAT_VERSION: Final = 2
"""The newest format version this statecapture reads. It writes 1, or 2 for an encrypted
repository (so a statecapture that knows no encryption refuses it instead of writing
plain layers into it)."""

COMPRESSIONS: Final = (None, "zstd", "zlib")
"""The values of ``compression`` in ``repository.json``."""

_POINT_ID = re.compile(r"^[0-9]{8}T[0-9]{6}(?:\.[0-9]{6})?Z-[0-9a-f]{6}$")


def new_point_id(now: float | None = None) -> str:
    """A new point id: ``<UTC time with microseconds>Z-<6 hex>``; sorts by time."""
    t = time.time() if now is None else now
    sec, micro = divmod(round(t * 1_000_000), 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(sec))
    return f"{stamp}.{micro:06d}Z-{secrets.token_hex(3)}"


def is_point_id(text: str) -> bool:
    """Whether ``text`` has the shape of a point id (and so is safe as a file-name part)."""
    return bool(_POINT_ID.match(text))


class PointKind(enum.StrEnum):
    """Whether a restore point holds full copies or incremental layers."""

    FULL = "full"
    """Every disk is a standalone image."""
    INCREMENTAL = "incremental"
    """At least one disk is a layer on top of the previous point's image."""


@attrs.frozen
class RepositoryInfo:
    """The contents of ``repository.json``."""

    id: str
    """The repository's identity (32 hex digits); carried by the checkpoints it creates."""
    version: int = 1
    """The format version the repository was written with."""
    created: float = 0.0
    """When the repository was created (UNIX time)."""
    compression: str | None = None
    """How stored images are compressed: ``"zstd"``, ``"zlib"`` or ``None`` (not)."""
    encryption: str | None = None
    """``"luks"``: images are LUKS-encrypted qcow2 (a key is needed); ``None``: plain."""
    key_check: str | None = None
    """Recognises the right key (an HMAC derived from it; not the key)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "id": self.id,
            "created": _iso(self.created),
        }
        if self.compression is not None:
            out["compression"] = self.compression
        if self.encryption is not None:
            out["encryption"] = self.encryption
            out["key_check"] = self.key_check
        return out

    @classmethod
    def from_json(cls, data: object, path: str) -> RepositoryInfo:
        """Parse ``repository.json``; :class:`RepositoryFormatError` when it is not one."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RepositoryFormatError(f"{path} is not a statecapture repository", path=path)
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise RepositoryFormatError(f"{path} has no valid format version", path=path)
        if version > FORMAT_VERSION:
            raise RepositoryFormatError(
                f"{path} was written by a newer statecapture (repository format {version}; "
                f"this one reads up to {FORMAT_VERSION}); upgrade statecapture to use it",
                path=path,
            )
        rid = data.get("id")
        if not isinstance(rid, str) or not re.fullmatch(r"[0-9a-f]{32}", rid):
            raise RepositoryFormatError(f"{path} has no valid repository id", path=path)
        compression = data.get("compression")
        if compression not in COMPRESSIONS:
            raise RepositoryFormatError(
                f"{path} names an unknown compression {compression!r}", path=path
            )
        encryption = data.get("encryption")
        key_check = data.get("key_check")
        if encryption not in (None, "luks") or (
            encryption is not None
            and (not isinstance(key_check, str) or not re.fullmatch(r"[0-9a-f]{64}", key_check))
        ):
            raise RepositoryFormatError(f"{path} has an invalid encryption entry", path=path)
        return cls(
            id=rid,
            version=version,
            created=_parse_iso(data.get("created")),
            compression=compression,
            encryption=encryption,
            key_check=key_check if encryption is not None else None,
        )


@attrs.frozen
class DiskEntry:
    """One disk of a restore point, as the manifest records it."""

    file: str
    """The image's name inside the domain's ``images/`` directory."""
    kind: PointKind
    """``full``: a standalone image; ``incremental``: a layer over :attr:`parent_file`."""
    size: int
    """The disk's virtual size in bytes."""
    bytes_copied: int = 0
    """Data bytes stored in this layer when it was made."""
    parent_file: str | None = None
    """The image this layer's backing reference names (incremental only)."""
    digests: str | None = None
    """The digest file's name inside ``digests/`` (``None``: not digested)."""
    reason: str | None = None
    """Why this disk was copied in full while the point is incremental (e.g. disk added)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {
            "file": self.file,
            "kind": self.kind.value,
            "size": self.size,
            "bytes_copied": self.bytes_copied,
        }
        if self.parent_file is not None:
            out["parent_file"] = self.parent_file
        if self.digests is not None:
            out["digests"] = self.digests
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DiskEntry:
        """Parse one ``disks`` entry."""
        return cls(
            file=_name(data["file"]),
            kind=PointKind(data["kind"]),
            size=int(data["size"]),
            bytes_copied=int(data.get("bytes_copied", 0)),
            parent_file=_name(data["parent_file"]) if data.get("parent_file") else None,
            digests=_name(data["digests"]) if data.get("digests") else None,
            reason=data.get("reason"),
        )


def _name(value: object) -> str:
    """A plain file name (no directory part, not hidden): manifests never point elsewhere."""
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise RepositoryError(f"manifest names an invalid file {value!r}")
    return value


def _frozen_disks(m: Mapping[str, DiskEntry]) -> Mapping[str, DiskEntry]:
    return MappingProxyType(dict(m))


@attrs.frozen
class RestorePoint:
    """One backup of one domain in a :class:`~statecapture.Repository` (a frozen value).

    Made by :meth:`Repository.backup`; listed by :meth:`Repository.points`. ``files`` maps
    each disk target to the top image of its chain (an ordinary qcow2 file:
    ``qemu-img convert TOP out.raw`` restores it without statecapture).
    """

    id: str
    """The point's id, ``<UTC time>Z-<6 hex>`` (sorts by time)."""
    domain: str
    """The domain's name when the point was taken."""
    domain_uuid: str
    """The domain's UUID (the repository keys domains by it)."""
    time: float
    """When the point was taken (UNIX time)."""
    kind: PointKind
    """Full, or incremental on :attr:`parent`."""
    reason: str
    """Why the point is full (first backup, checkpoint missing, bitmap broken, ``full=True``,
    domain shut off) or, for an incremental, ``"incremental"`` plus any disk copied in full."""
    checkpoint: str | None
    """The checkpoint created with the point (the next incremental starts there)."""
    parent: str | None
    """The id of the point the incremental layers sit on."""
    disks: Mapping[str, DiskEntry] = attrs.field(converter=_frozen_disks)
    """Disk target → its manifest entry."""
    bytes_copied: int = 0
    """Data bytes written into the repository for this point (all disks)."""
    frozen_for: float | None = None
    """Seconds the guest was frozen; ``None``: not frozen."""
    consistency: Consistency = Consistency.CRASH
    """Application-consistent (frozen, or taken from a shut-off domain) or crash-consistent."""
    mode: str = "pull"
    """``pull``, ``push`` or ``offline`` (copied from a shut-off domain)."""
    config: tuple[str, ...] = ()
    """Configuration captured with the point: ``inactive.xml``, ``live.xml``, ``nvram``,
    ``tpm`` (names inside the point's ``config/<id>/`` directory)."""
    notes: tuple[str, ...] = ()
    """Anything the backup wants the user to know."""
    root: Path | None = attrs.field(default=None, eq=False, repr=False)
    """The domain's directory in the repository (set when read from a repository)."""

    @property
    def files(self) -> Mapping[str, Path]:
        """Disk target → absolute path of the stored top image of its chain."""
        base = self.root / "images" if self.root is not None else Path("images")
        return MappingProxyType({d: base / e.file for d, e in self.disks.items()})

    @property
    def taken(self) -> str:
        """:attr:`time` as ISO 8601 UTC."""
        return _iso(self.time)

    def to_json(self) -> dict[str, Any]:
        """The manifest JSON object (``points/<id>.json``)."""
        return {
            "format": FORMAT,
            "version": 1,
            "id": self.id,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
            "time": _iso(self.time),
            "kind": self.kind.value,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
            "parent": self.parent,
            "disks": {d: e.to_json() for d, e in sorted(self.disks.items())},
            "bytes_copied": self.bytes_copied,
            "frozen_for": self.frozen_for,
            "consistency": self.consistency.value,
            "mode": self.mode,
            "config": list(self.config),
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: object, *, root: Path | None = None, where: str = "") -> RestorePoint:
        """Parse a point manifest; :class:`RepositoryFormatError` for a newer version,
        :class:`RepositoryError` for a damaged one."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RepositoryError(f"{where} is not a restore point manifest", path=where)
        version = data.get("version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise RepositoryFormatError(
                f"{where} was written by a newer statecapture (format {version})", path=where
            )
        try:
            pid = str(data["id"])
            if not is_point_id(pid):
                raise ValueError(f"bad point id {pid!r}")
            parent = data.get("parent")
            if parent is not None and not is_point_id(str(parent)):
                raise ValueError(f"bad parent id {parent!r}")
            return cls(
                id=pid,
                domain=str(data["domain"]),
                domain_uuid=str(data["domain_uuid"]),
                time=_parse_iso(data["time"]),
                kind=PointKind(data["kind"]),
                reason=str(data.get("reason", "")),
                checkpoint=data.get("checkpoint"),
                parent=parent,
                disks={str(d): DiskEntry.from_json(e) for d, e in data["disks"].items()},
                bytes_copied=int(data.get("bytes_copied", 0)),
                frozen_for=data.get("frozen_for"),
                consistency=Consistency(data.get("consistency", "crash")),
                mode=str(data.get("mode", "pull")),
                config=tuple(_name(c) for c in data.get("config", ())),
                notes=tuple(str(n) for n in data.get("notes", ())),
                root=root,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{where}: damaged restore point manifest ({exc})") from exc

    def __str__(self) -> str:
        disks = ", ".join(
            f"{d} {e.kind.value} {_size(e.bytes_copied)}" for d, e in sorted(self.disks.items())
        )
        frozen = f", frozen {self.frozen_for * 1000:.0f} ms" if self.frozen_for else ""
        return (
            f"{self.id} {self.domain} {self.kind.value} ({self.reason}), "
            f"{self.consistency.value}-consistent{frozen}: {disks}"
        )

    def _repr_html_(self) -> str:
        rows = [
            [
                d,
                e.kind.value,
                _size(e.size),
                _size(e.bytes_copied),
                e.parent_file or "",
                e.reason or "",
            ]
            for d, e in sorted(self.disks.items())
        ]
        return (
            f"<div><b>{escape(self.id)}</b> {escape(self.domain)} — {escape(self.kind.value)}"
            f" ({escape(self.reason)}), {escape(self.consistency.value)}-consistent, "
            f"checkpoint <code>{escape(self.checkpoint or '-')}</code>, parent "
            f"<code>{escape(self.parent or '-')}</code>"
            + table(["disk", "kind", "size", "copied", "backing", "note"], rows)
            + "</div>"
        )


def points_html(points: list[RestorePoint]) -> str:
    """An HTML table of points (for reports' ``_repr_html_``)."""
    rows = [
        [p.id, p.domain, p.kind.value, p.reason, _size(p.bytes_copied), p.parent or ""]
        for p in points
    ]
    return table(["point", "domain", "kind", "reason", "copied", "parent"], rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def now() -> float:
    """The current time, rounded to the microsecond (what the manifest keeps)."""
    return round(time.time() * 1_000_000) / 1_000_000


def _iso(t: float) -> str:
    sec, frac = divmod(round(t * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:06d}Z"


def _parse_iso(value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    text = str(value)
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z", text)
    if not m:
        raise ValueError(f"bad time {text!r}")
    import calendar

    whole = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    frac = int((m.group(2) or "0").ljust(6, "0"))
    return (whole * 1_000_000 + frac) / 1_000_000


def dumps(data: Mapping[str, Any]) -> bytes:
    """Stable, human-readable JSON bytes."""
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def parse_json(raw: bytes, where: str) -> Any:
    """``json.loads`` with a :class:`RepositoryError` naming ``where``."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{where}: not valid JSON ({exc})", path=where) from exc
