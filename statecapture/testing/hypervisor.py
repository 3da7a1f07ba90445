"""An embedded QEMU driver root (``qemu:///embed?root=...``) that cleans up after itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs

from .._connection import Connection, connect
from .._domain import Domain
from ..errors import CleanupError, StateCaptureError, TestEnvironmentError, UsageError
from .guest import TestGuest, close_noting, remove_domain
from .kit import MAX_EMBED_ROOT_LEN, GuestKit, environment_problem, prepare_embed_root

__all__ = ["EmbeddedHypervisor"]

# libvirt opens one embedded root per process, for the life of the process.
_process_root: Path | None = None
# Whether an EmbeddedHypervisor of this process has that root open right now.
_process_root_busy = False
_process_lock = threading.Lock()

_ONE_ROOT_REMEDY = (
    "libvirt opens one embedded root per process: reuse that EmbeddedHypervisor (the "
    "session-scoped sc_hypervisor fixture), or run the other root in a subprocess"
)


def _domains(conn: Connection) -> tuple[Domain, ...]:
    try:
        return conn.domains()
    except StateCaptureError:
        return ()


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value).absolute()


@attrs.define(eq=False)
class EmbeddedHypervisor:
    """QEMU's embedded libvirt driver on a private root directory, as a context manager.

    ``with EmbeddedHypervisor() as hv:`` creates a short owner-only root under ``/tmp``,
    writes the ``qemu.conf`` it needs (QEMU logs to files: there is no virtlogd), builds or
    finds the guest kit, and opens ``qemu:///embed?root=<root>`` in this process — no
    libvirt daemon is involved. :meth:`guest` boots test guests on it. On exit every
    domain in the root is destroyed and undefined (jobs aborted, guests thawed), the
    connection is closed, and the root and the guests' work directory are removed: no
    QEMU process, mount or directory is left behind.

    libvirt opens one embedded root per process for the life of the process: after the
    first one is closed, a later ``EmbeddedHypervisor()`` in the same process reuses its
    root path (created afresh); two open at once, or naming a different ``root``, raise
    :class:`~statecapture.TestEnvironmentError`.

    Args:
        root: the root directory; it must not exist yet or be empty, and be at most
            28 characters long (libvirt's socket paths below it must stay under 108
            bytes). Default: a fresh ``/tmp/sce-XXXXXXXX``.
        kit: the guest kit (default :meth:`GuestKit.ensure`).
    """

    root: Path | None = attrs.field(default=None, converter=_optional_path)
    kit: GuestKit | None = attrs.field(default=None, kw_only=True)
    _connection: Connection | None = attrs.field(default=None, init=False, repr=False)
    _workdir: Path | None = attrs.field(default=None, init=False, repr=False)
    _guests: list[TestGuest] = attrs.field(factory=list, init=False, repr=False)

    # ---- opening
    def open(self) -> EmbeddedHypervisor:
        """Create and open the root (what ``with`` does); returns ``self``.

        Raises :class:`~statecapture.TestEnvironmentError` (with a ``remedy``) when the
        machine lacks QEMU, libvirt's QEMU driver or the kit's tools, when the root is in
        use, too long or not writable, or when this process has a different root open.
        Nothing is left behind on failure.
        """
        if self._connection is not None:
            raise UsageError("this EmbeddedHypervisor is open already")
        problem = environment_problem()
        if problem is not None:
            raise problem
        with contextlib.ExitStack() as undo:
            root = self._make_root(undo)
            kit = self.kit if self.kit is not None else GuestKit.ensure()
            workdir = Path(tempfile.mkdtemp(prefix="sc-guests-"))
            undo.callback(shutil.rmtree, workdir, ignore_errors=True)
            conn = self._connect(root)
            undo.callback(conn.close)
            self.root, self.kit, self._workdir, self._connection = root, kit, workdir, conn
            self._set_busy(True)
            undo.pop_all()
        return self

    @classmethod
    def attach(
        cls, root: str | os.PathLike[str], *, workdir: str | os.PathLike[str] | None = None
    ) -> EmbeddedHypervisor:
        """Open an existing root made by an earlier process (``python -m
        statecapture.testing down`` uses this); :meth:`close` then removes everything in
        it, and *workdir* too."""
        hv = cls(root)
        assert hv.root is not None
        if not (hv.root / "etc" / "qemu.conf").is_file():
            raise TestEnvironmentError(
                f"{hv.root} is not an embedded root made by statecapture.testing",
                remedy="name the root that `python -m statecapture.testing up` printed",
            )
        hv.kit = GuestKit.ensure()
        hv._workdir = Path(workdir) if workdir is not None else None
        with _process_lock:
            if _process_root_busy:
                raise TestEnvironmentError(
                    f"this process has the embedded root {_process_root} open already",
                    remedy=_ONE_ROOT_REMEDY,
                )
        hv._connection = hv._connect(hv.root)
        hv._set_busy(True)
        return hv

    def _make_root(self, undo: contextlib.ExitStack) -> Path:
        requested = self.root
        if requested is not None:
            if len(str(requested)) > MAX_EMBED_ROOT_LEN:
                prepare_embed_root(requested)  # raises the typed error with its remedy
            if requested.is_symlink() or (requested.exists() and not requested.is_dir()):
                raise TestEnvironmentError(
                    f"embedded root {requested} is in use (not a plain directory)",
                    remedy="name a directory that does not exist yet",
                )
            if requested.exists() and any(requested.iterdir()):
                raise TestEnvironmentError(
                    f"embedded root {requested} is in use (not empty)",
                    remedy="name a directory that does not exist yet, or remove this one "
                    "after `python -m statecapture.testing down`",
                )
        with _process_lock:
            if _process_root is not None:
                if _process_root_busy:
                    raise TestEnvironmentError(
                        f"this process has the embedded root {_process_root} open already",
                        remedy=_ONE_ROOT_REMEDY,
                    )
                if requested is not None and requested != _process_root:
                    raise TestEnvironmentError(
                        f"this process opened the embedded root {_process_root} already; "
                        f"cannot open {requested}",
                        remedy=_ONE_ROOT_REMEDY,
                    )
                root = _process_root
            elif requested is None:
                root = Path(tempfile.mkdtemp(prefix="sce-", dir="/tmp"))
            else:
                root = requested
            try:
                root.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise TestEnvironmentError(
                    f"cannot create the embedded root {root}: {exc.strerror}",
                    remedy="name a directory you can write (e.g. under /tmp)",
                ) from exc
            undo.callback(shutil.rmtree, root, ignore_errors=True)
            try:
                prepare_embed_root(root)
            except PermissionError as exc:
                raise TestEnvironmentError(
                    f"cannot write the embedded root {root}: {exc.strerror}",
                    remedy="name a directory you can write (e.g. under /tmp)",
                ) from exc
            return root

    @staticmethod
    def _connect(root: Path) -> Connection:
        global _process_root
        try:
            conn = connect(f"qemu:///embed?root={root}")
        except StateCaptureError as exc:
            text = str(exc)
            if "already open with path" in text:
                remedy = _ONE_ROOT_REMEDY
            elif "ermission" in text:
                remedy = "run as root, or give this user write access to the root"
            elif "libvirt-qemu" in text:
                remedy = "create the libvirt-qemu user (apt-get install libvirt-daemon-system)"
            else:
                remedy = "apt-get install libvirt-daemon-driver-qemu qemu-system-x86"
            raise TestEnvironmentError(
                f"cannot open qemu:///embed?root={root}: {text}", remedy=remedy
            ) from exc
        with _process_lock:
            _process_root = root
        return conn

    @staticmethod
    def _set_busy(busy: bool) -> None:
        global _process_root_busy
        with _process_lock:
            _process_root_busy = busy

    # ---- what tests use
    @property
    def connection(self) -> Connection:
        """The statecapture :class:`~statecapture.Connection` to the root."""
        if self._connection is None:
            raise UsageError("the EmbeddedHypervisor is not open (use `with` or open())")
        return self._connection

    @property
    def uri(self) -> str:
        """``qemu:///embed?root=<root>`` (usable only from this process while it is open)."""
        if self.root is None:
            raise UsageError("the EmbeddedHypervisor is not open (use `with` or open())")
        return f"qemu:///embed?root={self.root}"

    @property
    def workdir(self) -> Path:
        """The owner-only directory where guests keep their disks and console logs."""
        if self._workdir is None:
            raise UsageError("the EmbeddedHypervisor has no work directory")
        return self._workdir

    @property
    def guests(self) -> tuple[TestGuest, ...]:
        """The guests booted through :meth:`guest` and not closed yet."""
        return tuple(self._guests)

    def guest(self, **options: Any) -> TestGuest:
        """Boot a :class:`~statecapture.testing.TestGuest` here; options as
        :meth:`TestGuest.boot` (``disks``, ``size_mib``, ``fmt``, ``agent``, ``start``,
        ``files``, ``name``, ``workdir``, ``timeout``)."""
        return TestGuest.boot(self, **options)

    def _adopt(self, guest: TestGuest) -> None:
        self._guests.append(guest)

    def _forget(self, guest: TestGuest) -> None:
        with contextlib.suppress(ValueError):
            self._guests.remove(guest)

    # ---- closing
    def close(self) -> None:
        """Destroy and undefine every domain in the root, close the connection, remove the
        root and the work directory. Idempotent. Every step runs even when one fails; raises
        :class:`~statecapture.CleanupError` at the end when a domain was still defined after
        its teardown."""
        conn, self._connection = self._connection, None
        if conn is None:
            return
        leftovers: list[str] = []
        try:
            for guest in list(self._guests):
                try:
                    guest.close()
                except CleanupError as exc:
                    leftovers.append(str(exc))
            for dom in _domains(conn):
                try:
                    remove_domain(dom)
                except CleanupError as exc:
                    leftovers.append(str(exc))
        finally:
            conn.close()
            self._set_busy(False)
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
        if leftovers:
            raise CleanupError("; ".join(leftovers))

    def detach(self) -> None:
        """Close the connection but leave the guests running and the root in place (what
        ``python -m statecapture.testing up`` does); :meth:`attach` + :meth:`close` later
        removes them."""
        conn, self._connection = self._connection, None
        for guest in list(self._guests):
            guest.detach()
        if conn is not None:
            conn.close()
            self._set_busy(False)

    def __enter__(self) -> EmbeddedHypervisor:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        close_noting(self.close, exc, "closing the embedded hypervisor")
