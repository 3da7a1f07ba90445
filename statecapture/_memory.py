"""Memory state: managed save, save/restore and save images.

The guide's first two state-capture APIs. Both stop the guest for as long as it takes to
write its whole memory to a file (the *downtime*), and both leave the domain shut off:

* **managed save** (:meth:`Domain.managed_save`): libvirt keeps the image; the next
  :meth:`Domain.start` resumes from it and deletes it. Good for "suspend this guest across a
  host reboot". It is *not* a rollback mechanism: the image is only valid while the disks are
  unchanged, and starting consumes it.
* **save/restore** (:meth:`Domain.save`, :meth:`Connection.restore`): the caller owns the
  file. Paired with copies of the disks it can return a guest to an earlier moment.

Each operation reports what it cost in a frozen result value (:class:`SaveResult`,
:class:`ManagedSaveResult`, :class:`RestoreResult`) with the measured ``downtime``.

Guarantees (proven on real QEMU in tests/test_memory.py):

* arguments, paths and the domain's state are checked before anything touches the guest;
* a save never overwrites a file unless ``overwrite=True``; with it, the old file is replaced
  atomically only once the new image is complete, so a failed save leaves it intact;
* image files statecapture writes are owner-only (0600);
* a failed save or managed save leaves the domain as it was (running stays running) and
  no partial file behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import stat
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import attrs

from . import _files
from ._enums import DomainState
from ._events import EventKind
from ._host import is_local_uri as _is_local
from .errors import (
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    SaveImageError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from .xml import DomainXML

if TYPE_CHECKING:
    from ._connection import Connection
    from ._domain import Domain
    from ._ports import MemoryPort

__all__ = [
    "ManagedSaveResult",
    "RestoreResult",
    "SaveImage",
    "SaveResult",
]

#: libvirt gained virDomainSaveParams/virDomainRestoreParams in 8.4.0.
_PARAMS_API_SINCE = (8, 4, 0)

#: libvirt's virErrorNumber values this module looks at.
_ERR_INTERNAL = 1
_ERR_OPERATION_FAILED = 9
_ERR_SYSTEM = 38

#: Fragments of libvirt/QEMU messages that say "this file is not a usable save image".
_BAD_IMAGE_HINTS = (
    "image magic",
    "header magic",
    "qemu header",
    "image is incomplete",
    "incomplete save",
    "load of migration failed",
    "error while loading state",
)


# ----------------------------------------------------------------------------- results


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@attrs.frozen
class SaveResult:
    """What one :meth:`Domain.save` did and cost.

    libvirt pauses the guest's vCPUs as the save begins and shuts the domain off once the
    image is complete, so the guest does not run for the whole call: ``downtime`` equals
    ``duration`` and the guest stays down until the image is restored.
    """

    path: Path
    """The image file (absolute)."""
    domain_name: str
    """The domain saved."""
    domain_uuid: str
    """Its UUID."""
    was_running: bool
    """Whether the guest was running (not paused) when the save began."""
    duration: float
    """Seconds the save took."""
    downtime: float
    """Seconds, within the call, during which the guest was not running."""
    api: str
    """The libvirt API that did the work (``virDomainSaveParams`` or ``virDomainSaveFlags``)."""
    finished_at: _dt.datetime
    """When the save finished (UTC)."""


@attrs.frozen
class ManagedSaveResult:
    """What one :meth:`Domain.managed_save` did and cost.

    As with :class:`SaveResult`, the guest does not run for the whole call (``downtime``
    equals ``duration``) and stays down until :meth:`Domain.start` resumes it.
    """

    domain_name: str
    """The domain saved."""
    domain_uuid: str
    """Its UUID."""
    was_running: bool
    """Whether the guest was running (not paused) when the save began."""
    duration: float
    """Seconds the managed save took."""
    downtime: float
    """Seconds, within the call, during which the guest was not running."""
    finished_at: _dt.datetime
    """When the managed save finished (UTC)."""


@attrs.frozen
class RestoreResult:
    """What one restore did and cost; returned by :meth:`SaveImage.restore`.

    ``downtime`` runs from the start of the call until the guest's vCPUs ran again (the
    RESUMED lifecycle event or the call's return, whichever came first). A guest restored
    paused did not run at all during the call, so its ``downtime`` is the whole ``duration``
    (and it goes on until you resume it).
    """

    path: Path
    """The image restored from."""
    domain: Domain = attrs.field(eq=False)
    """A handle on the restored domain."""
    running: bool
    """Whether the guest runs now (``False`` when it was restored paused)."""
    duration: float
    """Seconds the restore took."""
    downtime: float
    """Seconds, within the call, during which the guest was not running."""
    api: str
    """The libvirt API that did the work (``virDomainRestoreParams`` or
    ``virDomainRestoreFlags``)."""
    finished_at: _dt.datetime
    """When the restore finished (UTC)."""


# ----------------------------------------------------------------------------- argument checks


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {value!r}")


def _check_running(running: object) -> None:
    if running is not None and not isinstance(running, bool):
        raise UsageError(
            "running must be True (start running), False (start paused) or None (keep the "
            f"state the guest had when it was saved), got {running!r}"
        )


def _image_path(path: object, *, local: bool) -> Path:
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise UsageError(f"a file path (str or os.PathLike) is required, got {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise UsageError(f"a non-empty str path is required, got {path!r}")
    if local:
        return Path(os.path.abspath(text))
    if not PurePosixPath(text).is_absolute():
        raise UsageError(
            f"{text!r} is relative; on a remote connection the path is on the daemon's host "
            "and must be absolute"
        )
    return Path(text)


def _definition_text(
    definition: object, *, name: str, uuid: str | None, operation: str
) -> str | None:
    """Validate an alternative definition for ``name``/``uuid``; None passes through."""
    if definition is None:
        return None
    if isinstance(definition, str):
        parsed = DomainXML.from_xml(definition)  # XMLError with the line
    elif isinstance(definition, DomainXML):
        parsed = definition
    else:
        raise UsageError(
            f"{operation}: definition must be a DomainXML or XML text, "
            f"got {type(definition).__name__}"
        )
    if parsed.name != name:
        raise UsageError(
            f"{operation}: the definition names domain {parsed.name!r}, but the image is of "
            f"{name!r}; an alternative definition may change details, not the domain"
        )
    if parsed.uuid is None and uuid is not None:
        parsed = attrs.evolve(parsed, uuid=uuid)
    elif uuid is not None and parsed.uuid is not None and parsed.uuid.lower() != uuid.lower():
        raise UsageError(
            f"{operation}: the definition has UUID {parsed.uuid}, but the domain's is {uuid}"
        )
    return parsed.to_xml()


def _use_params(conn: Connection) -> bool:
    return conn.versions.daemon >= _PARAMS_API_SINCE


# ----------------------------------------------------------------------------- target files


@attrs.define(eq=False)
class _Target:
    """Where a save writes, and how it is made final or taken back.

    Local connections: libvirtd writes the image by path, so it writes into a private 0700
    staging directory that statecapture makes inside the target's directory (no one else
    can plant or swap a name there); the complete image is then renamed onto the target
    name relative to the directory descriptors. Without ``overwrite`` the target name is
    reserved first by creating it exclusively (``O_EXCL | O_NOFOLLOW``, mode 0600), so a
    file that appears meanwhile is never clobbered. Remote connections: the path is on the
    daemon's host, libvirt writes it directly (libvirt creates new images 0600).
    """

    final: Path
    local: bool
    write_path: Path | None = None
    created: bool = False
    _dir: _files.Directory | None = None
    _stage: _files.Directory | None = None
    _placeholder: int | None = None

    def prepare(self, *, overwrite: bool) -> None:
        if not self.local:
            self.write_path = self.final
            return
        directory = _files.Directory.open(self.final.parent, what="save directory")
        try:
            _files.require_trusted(directory.path, staged=True, what="save")
            if not overwrite:
                self._placeholder = directory.create(self.final.name)
                self.created = True
            self._stage = directory.staging(".sc-save-")
        except BaseException:
            if self._placeholder is not None:
                directory.remove_if_same(self.final.name, self._placeholder)
                os.close(self._placeholder)
                self._placeholder = None
                self.created = False
            directory.close()
            raise
        self._dir = directory
        self.write_path = self._stage.path / self.final.name

    def commit(self) -> None:
        """The image is complete: make it owner-only and put it in place."""
        if not self.local or self.write_path is None or self._dir is None:
            return
        assert self._stage is not None
        _files.owner_only([self.write_path], what="save image")
        # Replaces only our placeholder or, with overwrite=True, the file the caller named.
        os.replace(
            self.final.name,
            self.final.name,
            src_dir_fd=self._stage.fd,
            dst_dir_fd=self._dir.fd,
        )
        self._dir.fsync()
        self.write_path = self.final
        self.created = True
        self._close()

    def discard(self) -> None:
        """The save failed: remove what statecapture created (never a pre-existing file)."""
        if not self.local:
            return
        if self._dir is not None and self._placeholder is not None:
            self._dir.remove_if_same(self.final.name, self._placeholder)
        elif self.created and self.write_path == self.final:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.write_path)
        self.created = False
        self._close()

    def release(self) -> None:
        """Close the descriptors and keep every file where it is (outcome unknown)."""
        for d in (self._stage, self._dir):
            if d is not None:
                d.close()
        self._stage = self._dir = None
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None

    def _close(self) -> None:
        if self._stage is not None:
            stage_name = self._stage.path.name
            self._stage.close()
            self._stage = None
            if self._dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._dir.remove_tree(stage_name)
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None


def _exists(path: Path) -> TargetExistsError:
    return TargetExistsError(
        f"{path} already exists; pass overwrite=True to replace it", path=str(path)
    )


def _check_save_target(path: Path, *, overwrite: bool) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise NotFoundError(
            f"cannot save to {path}: directory {parent} does not exist", operation="save"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not overwrite:  # anything at the name, a dangling symlink too, is left alone
        raise _exists(path)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path} is a symbolic link; statecapture does not write through links")
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file; refusing to replace it")


# ----------------------------------------------------------------------------- stopping saves


def _after_failed_stop(
    dom: Domain, exc: BaseException, *, was_running: bool, target: _Target | None
) -> None:
    """Clean up after a (managed) save that raised; notes go on ``exc``, never replace it."""
    try:
        completed = _port(dom).shut_off_by_save()
    except BaseException as state_exc:  # cannot tell: keep everything, say so
        where = f"; the image file {target.write_path} was kept" if target else ""
        exc.add_note(
            f"statecapture could not tell whether the save of {dom.name!r} completed "
            f"({state_exc}){where}"
        )
        if target is not None:
            target.release()
        return
    if completed:
        # Interrupted (e.g. KeyboardInterrupt) after libvirt finished: the image is the only
        # copy of the guest's memory now, so it is kept and put in place.
        if target is not None:
            try:
                target.commit()
                exc.add_note(
                    f"the save of {dom.name!r} completed before the interruption: the domain "
                    f"is shut off and its image is {target.final}"
                )
            except (OSError, StateCaptureError) as file_exc:
                exc.add_note(
                    f"the save of {dom.name!r} completed; its image stays at "
                    f"{target.write_path} ({file_exc})"
                )
        else:
            exc.add_note(
                f"the managed save of {dom.name!r} completed before the interruption: the "
                "domain is shut off and start() resumes it"
            )
        return
    if target is not None:
        try:
            target.discard()
        except OSError as file_exc:
            exc.add_note(f"could not remove the partial image {target.write_path}: {file_exc}")
    if was_running:
        try:
            if dom.state is DomainState.PAUSED:
                _port(dom).resume()
        except BaseException as resume_exc:
            exc.add_note(
                f"domain {dom.name!r} was left paused and could not be resumed: {resume_exc}"
            )


def _require_savable(dom: Domain, operation: str) -> bool:
    """The domain must be active; returns whether its guest is running (not paused)."""
    state = dom.state
    if state in (DomainState.SHUTOFF, DomainState.NOSTATE, DomainState.CRASHED):
        raise InvalidStateError(
            f"{operation} needs an active domain; {dom.name!r} is {state.value}",
            operation=operation,
            domain_name=dom.name,
        )
    return state.is_running


# ----------------------------------------------------------------------------- domain operations


def managed_save(dom: Domain, *, bypass_cache: bool, running: bool | None) -> ManagedSaveResult:
    """Implementation of :meth:`Domain.managed_save`."""
    _check_flag("bypass_cache", bypass_cache)
    _check_running(running)
    if not dom.is_persistent:
        raise InvalidStateError(
            f"managed save needs a persistent domain; {dom.name!r} is transient (it would "
            "vanish when stopped, and the image with it): use save() with a file instead",
            operation="managed save",
            domain_name=dom.name,
        )
    was_running = _require_savable(dom, "managed save")
    t0 = time.monotonic()
    try:
        _port(dom).managed_save(running=running, bypass_cache=bypass_cache)
    except BaseException as exc:
        _after_failed_stop(dom, exc, was_running=was_running, target=None)
        raise
    duration = time.monotonic() - t0
    return ManagedSaveResult(
        domain_name=dom.name,
        domain_uuid=dom.uuid,
        was_running=was_running,
        duration=duration,
        downtime=duration,
        finished_at=_now(),
    )


def has_managed_save(dom: Domain) -> bool:
    """Implementation of :attr:`Domain.has_managed_save`."""
    return _port(dom).has_managed_save()


def _require_managed_save(dom: Domain, operation: str) -> None:
    if not _port(dom).has_managed_save():
        raise NotFoundError(
            f"domain {dom.name!r} has no managed save image",
            operation=operation,
            domain_name=dom.name,
        )


def remove_managed_save(dom: Domain) -> None:
    """Implementation of :meth:`Domain.remove_managed_save`."""
    _require_managed_save(dom, "remove managed save")
    _port(dom).managed_save_remove()


def managed_save_definition(dom: Domain) -> DomainXML:
    """Implementation of :attr:`Domain.managed_save_definition`."""
    _require_managed_save(dom, "read managed save image")
    return DomainXML.from_xml(_port(dom).managed_save_xml())


def redefine_managed_save(
    dom: Domain, definition: DomainXML | str | None, *, running: bool | None
) -> None:
    """Implementation of :meth:`Domain.redefine_managed_save`."""
    _check_running(running)
    if definition is None and running is None:
        raise UsageError("redefine_managed_save() needs a definition, running=, or both")
    text = _definition_text(
        definition, name=dom.name, uuid=dom.uuid, operation="redefine managed save image"
    )
    _require_managed_save(dom, "redefine managed save image")
    if text is None:
        text = _port(dom).managed_save_xml(secure=True)
    _port(dom).managed_save_define(text, running=running)


def save(
    dom: Domain,
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    running: bool | None,
    definition: DomainXML | str | None,
    bypass_cache: bool,
) -> SaveImage:
    """Implementation of :meth:`Domain.save`."""
    _check_flag("overwrite", overwrite)
    _check_flag("bypass_cache", bypass_cache)
    _check_running(running)
    conn = dom.connection
    local = _is_local(conn.uri)
    final = _image_path(path, local=local)
    dxml = _definition_text(definition, name=dom.name, uuid=dom.uuid, operation="save")
    if local:
        _check_save_target(final, overwrite=overwrite)
    elif not overwrite:
        raise UsageError(
            f"{conn.uri} is remote: statecapture cannot see whether {final} exists on the "
            "daemon's host; pass overwrite=True to accept replacing it"
        )
    was_running = _require_savable(dom, "save")
    use_params = _use_params(conn)
    target = _Target(final, local)
    target.prepare(overwrite=overwrite)
    assert target.write_path is not None
    t0 = time.monotonic()
    try:
        api = _port(dom).save(
            str(target.write_path),
            dxml=dxml,
            running=running,
            bypass_cache=bypass_cache,
            use_params=use_params,
        )
        duration = time.monotonic() - t0
        target.commit()
    except BaseException as exc:
        _after_failed_stop(dom, exc, was_running=was_running, target=target)
        raise
    result = SaveResult(
        path=final,
        domain_name=dom.name,
        domain_uuid=dom.uuid,
        was_running=was_running,
        duration=duration,
        downtime=duration,
        api=api,
        finished_at=_now(),
    )
    return SaveImage(conn, final, result)


# ----------------------------------------------------------------------------- save images


def _read_header(conn: Connection, path: Path, *, secure: bool = False) -> str:
    """The definition in an image's header; typed errors for missing or bad files."""
    if _is_local(conn.uri):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFoundError(
                f"no save image at {path}: the file does not exist", operation="read save image"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is a directory, not a save image")
    try:
        return conn.port.save_image_xml(str(path), secure=secure)
    except UnsupportedError:
        raise
    except LibvirtError as exc:
        raise _classify_image_error(exc, path) from exc


def _classify_image_error(exc: LibvirtError, path: Path) -> LibvirtError:
    message = exc.libvirt_message or str(exc)
    lowered = message.lower()
    if exc.code == _ERR_SYSTEM and "no such file" in lowered:
        return NotFoundError(
            f"no save image at {path}: {message}",
            code=exc.code,
            operation=exc.operation,
            libvirt_message=message,
        )
    if exc.code in (_ERR_INTERNAL, _ERR_OPERATION_FAILED) and any(
        hint in lowered for hint in _BAD_IMAGE_HINTS
    ):
        return SaveImageError(
            f"{path} is not a usable save image: {message}",
            path=str(path),
            code=exc.code,
            operation=exc.operation,
            domain_name=exc.domain_name,
            libvirt_message=message,
        )
    return exc


def open_image(conn: Connection, path: str | os.PathLike[str]) -> SaveImage:
    """Implementation of :meth:`Connection.save_image`."""
    conn.port.check_open()
    final = _image_path(path, local=_is_local(conn.uri))
    DomainXML.from_xml(_read_header(conn, final))
    return SaveImage(conn, final, None)


def restore(
    conn: Connection,
    path: str | os.PathLike[str],
    *,
    running: bool | None,
    definition: DomainXML | str | None,
    bypass_cache: bool,
) -> Domain:
    """Implementation of :meth:`Connection.restore`."""
    _check_running(running)
    _check_flag("bypass_cache", bypass_cache)
    image = open_image(conn, path)
    return image.restore(running=running, definition=definition, bypass_cache=bypass_cache).domain


@attrs.define(eq=False)
class SaveImage:
    """A save image file: the memory of a domain written by :meth:`Domain.save`.

    Get one from :meth:`Domain.save` (then :attr:`result` tells what the save cost) or
    :meth:`Connection.save_image` for a file saved earlier (then :attr:`result` is
    ``None``). The handle reads the file each time it is asked, so it always shows the image
    as it is now. Restore it with :meth:`restore` (or :meth:`Connection.restore`).

    The image holds memory only: restoring it into disks that changed since the save
    confuses the guest. Pair it with copies of the disks taken while the domain was off.
    """

    connection: Connection = attrs.field(repr=False)
    """The connection the image is read and restored through."""
    path: Path
    """The image file (absolute; on the daemon's host for remote connections)."""
    result: SaveResult | None = attrs.field(default=None, repr=False)
    """What the save that wrote this image cost, when this handle came from
    :meth:`Domain.save`; ``None`` for images opened with :meth:`Connection.save_image`."""

    @property
    def definition(self) -> DomainXML:
        """The domain definition stored in the image (used when it is restored)."""
        return DomainXML.from_xml(_read_header(self.connection, self.path))

    def redefine(
        self, definition: DomainXML | str | None = None, *, running: bool | None = None
    ) -> None:
        """Replace the definition stored in the image, its run state on restore, or both.

        The new definition must describe the same domain (name and UUID) and stay
        ABI-compatible with the saved guest; libvirt only accepts changes that do not
        affect the guest (host-side paths, descriptions ...). ``running`` sets whether a
        later restore starts the guest running (``True``) or paused (``False``).
        """
        _check_running(running)
        if definition is None and running is None:
            raise UsageError("redefine() needs a definition, running=, or both")
        current = DomainXML.from_xml(_read_header(self.connection, self.path, secure=True))
        text = _definition_text(
            definition, name=current.name, uuid=current.uuid, operation="redefine save image"
        )
        if text is None:
            text = current.raw
        try:
            self.connection.port.save_image_define(str(self.path), text, running=running)
        except UnsupportedError:
            raise
        except LibvirtError as exc:
            raise _classify_image_error(exc, self.path) from exc

    def restore(
        self,
        *,
        running: bool | None = None,
        definition: DomainXML | str | None = None,
        bypass_cache: bool = False,
    ) -> RestoreResult:
        """Start the saved domain from this image; returns a :class:`RestoreResult`.

        ``running`` chooses the state after the restore: ``True`` running, ``False``
        paused, ``None`` the state the guest had when it was saved (or that
        :meth:`redefine` set). ``definition`` replaces the saved definition for this
        restore only (same rules as :meth:`redefine`). The image file stays; restoring it
        again later returns the guest to the same moment (if the disks match).

        Raises :class:`InvalidStateError` when the image's domain is already running,
        :class:`SaveImageError` when the file is not a usable image, :class:`NotFoundError`
        when it does not exist.
        """
        _check_running(running)
        _check_flag("bypass_cache", bypass_cache)
        conn = self.connection
        saved = DomainXML.from_xml(_read_header(conn, self.path))
        text = _definition_text(definition, name=saved.name, uuid=saved.uuid, operation="restore")
        key = saved.uuid or saved.name
        try:
            existing: Domain | None = conn.domain(key)
        except NotFoundError:
            existing = None
        if existing is not None and existing.is_active:
            raise InvalidStateError(
                f"cannot restore {self.path}: domain {existing.name!r} is already "
                f"{existing.state.value}; stop it first",
                operation="restore",
                domain_name=existing.name,
            )
        use_params = _use_params(conn)
        with conn.events.expect(kind=EventKind.LIFECYCLE, domain_uuid=saved.uuid) as events:
            t0 = time.monotonic()
            try:
                api = conn.port.restore(
                    str(self.path),
                    dxml=text,
                    running=running,
                    bypass_cache=bypass_cache,
                    use_params=use_params,
                )
            except UnsupportedError:
                raise
            except LibvirtError as exc:
                raise _classify_image_error(exc, self.path) from exc
            t1 = time.monotonic()
            seen = []
            while (event := events.poll()) is not None:
                seen.append(event)
        domain = conn.domain(key)
        is_running = domain.state.is_running
        end = t1
        if is_running:
            resumed = [e.timestamp for e in seen if e.detail.get("event") == "resumed"]
            end = min([t1, *resumed])
        return RestoreResult(
            path=self.path,
            domain=domain,
            running=is_running,
            duration=t1 - t0,
            downtime=max(0.0, end - t0),
            api=api,
            finished_at=_now(),
        )


def _port(dom: Domain) -> MemoryPort:
    """The domain's port as this module uses it: ``MemoryPort`` (mypy checks it)."""
    return dom.port
