"""The crash record of a backup job, kept in the domain's own metadata.

A running job records what its cleanup needs — its checkpoint, its files, its private
directories — before it starts (never while the guest is frozen), so that after a crash or
a kill :meth:`Domain.active_backup` and :func:`statecapture.recover`, from any process, can
end the job and remove what it never delivered (:func:`recover_stale`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
from lxml import etree

from . import _files, _nbd
from ._backup_plan import PUSH_STAGING
from .errors import CleanupError, LibvirtError, StateCaptureError
from .xml._base import parse

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "RECORD_KEY",
    "RECORD_NS",
    "Record",
    "delete_checkpoint",
    "discard_stale_record",
    "final_path",
    "publish",
    "read_record",
    "recover_stale",
    "remove_file",
    "write_record",
]

RECORD_NS: Final = "urn:x-statecapture:backup:1"
"""Metadata namespace of the record a running job keeps in the domain XML."""
RECORD_KEY: Final = "scbackup"


def remove_file(path: Path, errors: list[str]) -> bool:
    """Remove ``path``; ``True`` when a file was there and is gone now."""
    if not os.path.lexists(path):
        # Never created (on a read-only mount even unlinking a missing name fails: EROFS).
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        errors.append(f"remove {path}: {exc}")
        return False
    return True


def final_path(store: Path) -> Path:
    """Where the push target QEMU wrote at ``store`` goes: beside its staging directory."""
    if store.parent.name.startswith(PUSH_STAGING):
        return store.parent.parent / store.name
    return store


def publish(store: Path, final: Path) -> None:
    """Move a finished push target from its staging directory to its final name.

    Relative to both directories' descriptors, with ``RENAME_NOREPLACE``: a name that
    appeared meanwhile raises :class:`TargetExistsError` and is left untouched.
    """
    with (
        _files.Directory.open(final.parent, what="target_dir") as tdir,
        _files.Directory.open(store.parent, what="staging directory") as stage,
    ):
        tdir.rename_from(stage, store.name, final.name)
        tdir.fsync()


def delete_checkpoint(dom: Domain, name: str, errors: list[str]) -> bool:
    """Delete checkpoint ``name`` if it exists, bitmaps included; ``True`` when deleted.

    On a running domain libvirt deletes the bitmaps. When a shutdown ended the job (HAZARDS
    7) QEMU is gone and libvirt 9.0 cannot: the bitmaps (written into the qcow2 images at the
    clean close) are removed with ``qemu-img bitmap --remove``, then the metadata is dropped —
    never metadata alone, which would leave bitmaps behind (HAZARDS 3).
    """
    try:
        if name not in dom.checkpoints:
            return False
        cp = dom.checkpoints[name]
        if dom.is_active:
            cp.delete()
            return True
        definition = dom.definition
        for disk in cp.definition.tracked_disks:
            try:
                image = definition.disk(disk.name).source
            except KeyError:  # a hot-plugged disk that left with the live definition
                continue
            if image is None:
                continue
            try:
                _nbd.qemu_img("bitmap", "--remove", image, disk.bitmap or name)
            except StateCaptureError as exc:
                if "not found" not in str(exc).lower():
                    raise
        cp.delete(metadata_only=True)
    except StateCaptureError as exc:
        errors.append(f"delete checkpoint {name!r}: {exc}")
        return False
    return True


# --------------------------------------------------------------------------- the record


@attrs.frozen
class Record:
    """What a running job must remember for cleanup, kept in the domain's metadata."""

    mode: str
    checkpoint: str | None
    created_checkpoint: bool
    incremental_from: str | None
    label: str
    started: float
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    delivered: bool = False

    def to_xml(self) -> str:
        el = etree.Element("backup")
        el.set("mode", self.mode)
        if self.delivered:
            el.set("delivered", "yes")
        el.set("label", self.label)
        el.set("started", repr(self.started))
        if self.checkpoint is not None:
            el.set("checkpoint", self.checkpoint)
            el.set("created", "yes" if self.created_checkpoint else "no")
        if self.incremental_from is not None:
            el.set("incremental", self.incremental_from)
        for f in self.files:
            etree.SubElement(el, "file").set("path", f)
        for d in self.dirs:
            etree.SubElement(el, "dir").set("path", d)
        return etree.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> Record:
        root = parse(text)
        return cls(
            mode=root.get("mode", "push"),
            checkpoint=root.get("checkpoint"),
            created_checkpoint=root.get("created") == "yes",
            incremental_from=root.get("incremental"),
            label=root.get("label", "backup"),
            started=float(root.get("started", "0")),
            files=tuple(e.get("path", "") for e in root.iterfind("file") if e.get("path")),
            dirs=tuple(e.get("path", "") for e in root.iterfind("dir") if e.get("path")),
            delivered=root.get("delivered") == "yes",
        )


def read_record(dom: Domain) -> Record | None:
    text = dom.port.get_metadata(RECORD_NS)
    if text is None:
        return None
    try:
        return Record.from_xml(text)
    except Exception:  # a damaged record must not block the domain's backups
        return None


def write_record(dom: Domain, record: Record | None) -> None:
    dom.port.set_metadata(RECORD_NS, RECORD_KEY, None if record is None else record.to_xml())


def clear_record(dom: Domain, errors: list[str]) -> None:
    """Remove the domain's record; a failure is added to ``errors``."""
    try:
        write_record(dom, None)
    except LibvirtError as exc:
        errors.append(f"clear the backup record: {exc}")


def discard_stale_record(dom: Domain) -> list[str]:
    """Remove what a dead run's record names — files and private directories — and the
    record itself, delivered or not (a discarded run keeps nothing). Returns the problems."""
    record = read_record(dom)
    errors: list[str] = []
    if record is not None:
        for f in record.files:
            remove_file(Path(f), errors)
        for d in record.dirs:
            try:
                shutil.rmtree(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"remove {d}: {exc}")
    clear_record(dom, errors)
    return errors


def _push_delivered(files: Sequence[str]) -> bool:
    """Whether a dead run's push job left every target: each staged target is still in its
    staging directory, or was already moved to its final name. A final name counts only
    when it is recorded (the run records it before the move), so a file someone else put
    there never makes a job look delivered. Targets without staging (a job begun by an
    older statecapture) must all exist themselves."""
    recorded = set(files)
    staged = [Path(f) for f in files if final_path(Path(f)) != Path(f)]
    if not staged:
        return bool(files) and all(map(os.path.isfile, files))
    return all(
        p.is_file() or (str(final_path(p)) in recorded and final_path(p).is_file()) for p in staged
    )


def recover_stale(dom: Domain) -> list[str]:
    """Clean up after a run that died and whose job has ended since (no job runs now).

    A push job that completed left every target (libvirt deletes the targets of a failed
    push job); a pull run marked its record delivered after its last download. Anything
    else never delivered: its checkpoint and files go, so no incremental builds on it.
    Returns what it did (empty when there was no record).
    """
    record = read_record(dom)
    if record is None:
        if dom.port.get_metadata(RECORD_NS) is not None:  # damaged: drop it
            write_record(dom, None)
            return ["cleared a damaged backup record"]
        return []
    actions: list[str] = []
    delivered = record.delivered or (record.mode == "push" and _push_delivered(record.files))
    errors: list[str] = []
    if delivered:
        actions.append(
            f"the interrupted {record.mode} backup {record.label!r} had delivered every disk; "
            "kept its files and checkpoint"
        )
    else:
        cp = record.checkpoint
        if cp is not None and record.created_checkpoint and cp in dom.checkpoints:
            delete_checkpoint(dom, cp, errors)
            actions.append(f"deleted the checkpoint {cp!r} it created")
        for f in record.files:
            if os.path.lexists(f):
                remove_file(Path(f), errors)
                actions.append(f"removed {f}")
    if delivered and record.mode == "push":
        for f in record.files:  # completed targets still in their staging directory
            final = final_path(Path(f))
            if final != Path(f) and os.path.isfile(f):
                try:
                    publish(Path(f), final)
                    actions.append(f"moved {f} to {final}")
                except (OSError, StateCaptureError) as exc:
                    errors.append(f"move {f} to {final}: {exc}")
    for d in record.dirs:
        if os.path.lexists(d):
            shutil.rmtree(d, ignore_errors=True)
            actions.append(f"removed {d}")
    if errors:
        raise CleanupError(
            f"cleaning up after an interrupted backup of {dom.name!r} failed (the record is "
            f"kept for a retry): {'; '.join(errors)}"
        )
    write_record(dom, None)
    actions.append(f"cleared the stale record of the {record.mode} backup {record.label!r}")
    return actions
