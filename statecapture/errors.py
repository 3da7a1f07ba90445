"""The statecapture error hierarchy.

Every error statecapture raises derives from :class:`StateCaptureError`::

    StateCaptureError
    ├── LibvirtError                  libvirt refused or failed (.code, .operation, .domain_name)
    │   ├── NotFoundError             no such domain, snapshot, checkpoint, job (a LookupError)
    │   ├── UnsupportedError          this driver, daemon or hypervisor cannot do it (or no
    │   │                             driver handles the URI)
    │   ├── InvalidStateError         wrong state for the call (e.g. domain not running)
    │   ├── GuestAgentError           the guest agent is missing, unresponsive or failed the command
    │   ├── OperationTimeoutError     the operation timed out (also a TimeoutError)
    │   ├── CheckpointInconsistentError  checkpoint metadata and the qcow2 dirty bitmaps disagree
    │   ├── ConnectionLostError       the connection to libvirt broke
    │   └── SaveImageError            a file is not a usable save image (.path)
    ├── XMLError                      malformed or schema-violating XML (.line)
    ├── CleanupError                  an undo step (thaw, job abort, overlay merge ...) failed
    │   └── ThawError                 the guest's filesystems could not be thawed (may be frozen)
    ├── FreezeExpiredError            the freeze ended before its block did (budget spent, thawed)
    ├── ToolError                     a host tool (qemu-img, qemu-io) failed (.argv, .exit_code,
    │                                 .stderr, .stdout)
    ├── UsageError                    programmer error: closed connection, bad argument
    ├── TargetExistsError             a file would be overwritten (also a FileExistsError)
    ├── RepositoryError               a backup repository refused or failed (.path)
    │   ├── RepositoryFormatError     not a repository, or made by a newer format version
    │   ├── RepositoryLockedError     another writer holds the domain's lock (also a TimeoutError)
    │   ├── ChainError                a stored chain fails validation (missing or wrong layer)
    │   └── RepositoryKeyError        an encrypted repository's key is missing or wrong
    └── TestEnvironmentError          statecapture.testing cannot run a real guest here (.remedy)
        └── GuestBootError            a test guest did not boot in time (.console_log)

Operational errors (the host or guest said no) and programmer errors (:class:`UsageError`)
are separate families, so ``except LibvirtError`` never hides a bug in the calling code.

:func:`lookup` maps a libvirt error code to the class statecapture raises for it; codes
statecapture does not know fall back to :class:`LibvirtError`. All errors pickle, so they
cross process boundaries (``multiprocessing``, ``concurrent.futures``) intact.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "StateCaptureError",
    "LibvirtError",
    "NotFoundError",
    "UnsupportedError",
    "InvalidStateError",
    "GuestAgentError",
    "OperationTimeoutError",
    "CheckpointInconsistentError",
    "ConnectionLostError",
    "SaveImageError",
    "XMLError",
    "CleanupError",
    "ThawError",
    "FreezeExpiredError",
    "ToolError",
    "UsageError",
    "TargetExistsError",
    "RepositoryError",
    "RepositoryFormatError",
    "RepositoryLockedError",
    "ChainError",
    "RepositoryKeyError",
    "TestEnvironmentError",
    "GuestBootError",
    "lookup",
]


def _rebuild(cls: type[StateCaptureError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class StateCaptureError(Exception):
    """Root of every error statecapture raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments live in __dict__; rebuild from them.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class LibvirtError(StateCaptureError):
    """libvirt refused or failed an operation.

    Attributes:
        code: libvirt's ``virErrorNumber`` (``None`` when statecapture detected the problem
            itself, before calling libvirt).
        operation: what statecapture was doing, e.g. ``"snapshot create"``.
        domain_name: the domain concerned, when there is one.
        libvirt_message: libvirt's own message text, unchanged.
    """

    #: libvirt error codes that map to this class (filled by subclasses).
    codes: ClassVar[frozenset[int]] = frozenset()

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        operation: str | None = None,
        domain_name: str | None = None,
        libvirt_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.operation = operation
        self.domain_name = domain_name
        self.libvirt_message = libvirt_message


class NotFoundError(LibvirtError, LookupError):
    """No such domain, snapshot, checkpoint, backup job, disk or file."""

    codes = frozenset({42, 43, 49, 50, 53, 57, 62, 66, 72, 80, 99, 101, 103, 104, 107})


class UnsupportedError(LibvirtError):
    """The driver, daemon or hypervisor cannot do this (or this version cannot).

    Also raised by :func:`~statecapture.connect` when no libvirt driver handles the URI
    (an unknown scheme, or a driver not installed on the host; code 5, ``NO_CONNECT``).
    """

    # 5 NO_CONNECT "no connection driver available": nothing was connected, so nothing lost.
    codes = frozenset({3, 5, 67, 74, 84})


class InvalidStateError(LibvirtError):
    """The object is in the wrong state for the call (not running, job active, locked ...)."""

    codes = frozenset({55, 77, 83, 87, 28})


class GuestAgentError(LibvirtError):
    """The guest agent is missing, not connected, unresponsive, or failed the command.

    libvirt before 11.2 reports an agent *timeout* as "agent unresponsive" (code 86); the
    command may still have run in the guest (a freeze may have happened), so code that gets
    this error must still undo what the command might have done.
    """

    # 86 AGENT_UNRESPONSIVE, 97 AGENT_UNSYNCED, 112 AGENT_COMMAND_TIMEOUT,
    # 113 AGENT_COMMAND_FAILED (libvirt >= 11.2; literals because older bindings lack them).
    codes = frozenset({86, 97, 112, 113})


class OperationTimeoutError(LibvirtError, TimeoutError):
    """The operation did not finish in time (libvirt's or statecapture's own deadline)."""

    codes = frozenset({68})


class CheckpointInconsistentError(LibvirtError):
    """Checkpoint metadata and the qcow2 dirty bitmaps disagree.

    Attributes ``disk`` and ``bitmap`` name the broken pair when known.
    """

    codes = frozenset({109})

    def __init__(
        self,
        message: str,
        *,
        disk: str | None = None,
        bitmap: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.disk = disk
        self.bitmap = bitmap


class ConnectionLostError(LibvirtError):
    """The connection to libvirt is gone (daemon restarted, socket closed, RPC failure).

    libvirt reports most of these as generic errors ("client socket is closed" is an
    internal error, HAZARDS 22); statecapture recognises them by error domain, message and
    ``virConnectIsAlive``. A connection that could not be opened at all (unknown URI scheme,
    no daemon listening) is not a lost one.
    """

    codes = frozenset({6, 39})


class SaveImageError(LibvirtError):
    """A file is not a usable save image.

    It is not a save image at all, is incomplete (left by an interrupted save), truncated or
    otherwise corrupt. ``path`` names the file. Raised before anything is restored when the
    image's header is bad; when only the memory data is damaged, QEMU notices during the
    restore, which then fails and leaves no domain running.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        code: int | None = None,
        operation: str | None = None,
        domain_name: str | None = None,
        libvirt_message: str | None = None,
    ) -> None:
        super().__init__(
            message,
            code=code,
            operation=operation,
            domain_name=domain_name,
            libvirt_message=libvirt_message,
        )
        self.path = path


class XMLError(StateCaptureError, ValueError):
    """Malformed XML, or XML that does not describe what was expected.

    Attributes:
        line: the 1-based line of the problem when the parser knows it.
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{message} (line {line})")
        self.line = line


class CleanupError(StateCaptureError):
    """An undo step failed: a thaw, a job abort, an overlay merge, a file removal.

    A cleanup error never masks the error that triggered the cleanup: when the body already
    raised, the body's error propagates and this one is attached to it as a note (and as
    ``__context__``). When it is raised on its own, the operation itself succeeded but left
    something behind that the message names.
    """


class ThawError(CleanupError):
    """Thawing a guest's filesystems failed: the guest may still be frozen.

    Raised when a :func:`~statecapture.fs_frozen` scope cannot thaw (on exit, from its
    watchdog, or from :meth:`~statecapture.FreezeScope.thaw`). A guest left frozen is an
    outage: retry with :meth:`FreezeScope.thaw() <statecapture.FreezeScope.thaw>` or
    :meth:`Domain.fs_thaw() <statecapture.Domain.fs_thaw>` once the agent answers again.
    The libvirt error that made the thaw fail is ``__cause__``.

    Attributes:
        domain_name: the domain whose filesystems may still be frozen.
    """

    def __init__(self, message: str, *, domain_name: str | None = None) -> None:
        super().__init__(message)
        self.domain_name = domain_name


class FreezeExpiredError(StateCaptureError):
    """The freeze ended before its ``with`` block did: what the block captured may be
    crash-consistent only.

    Raised on leaving a :func:`~statecapture.fs_frozen` block when the watchdog thawed the
    guest because the block outlived ``max_frozen`` (``reason == "watchdog"``), or when the
    guest turned out to be thawed already by someone else (``reason == "external"``).
    Not raised when the block itself raised; its error then carries a note instead.

    Attributes:
        domain_name: the domain concerned.
        reason: ``"watchdog"`` or ``"external"``.
        max_frozen: the budget the scope had, in seconds.
        frozen_for: how long the filesystems were frozen, in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        domain_name: str | None = None,
        reason: str = "watchdog",
        max_frozen: float | None = None,
        frozen_for: float | None = None,
    ) -> None:
        super().__init__(message)
        self.domain_name = domain_name
        self.reason = reason
        self.max_frozen = max_frozen
        self.frozen_for = frozen_for


class ToolError(StateCaptureError):
    """A host tool statecapture runs (``qemu-img``, ``qemu-io``) exited with an error.

    Tell failures apart by these fields, not by the message text.

    Attributes:
        argv: the command line, executable first.
        exit_code: the tool's exit status (``qemu-img compare`` exits 1 when the images
            differ, 2 on an error).
        stderr: what the tool wrote to standard error.
        stdout: what the tool wrote to standard output.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...] = (),
        exit_code: int | None = None,
        stderr: str = "",
        stdout: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.stdout = stdout


class UsageError(StateCaptureError, ValueError):
    """The caller used the API wrongly: closed connection, bad argument, reused scope."""


class TargetExistsError(StateCaptureError, FileExistsError):
    """A file statecapture would write already exists, and overwriting was not asked for."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RepositoryError(StateCaptureError):
    """A backup repository (:class:`~statecapture.Repository`) refused or failed an operation.

    Attributes:
        path: the repository, or the file inside it, concerned (when known).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RepositoryFormatError(RepositoryError):
    """The directory is not a backup repository, or one made by a newer format version."""


class RepositoryLockedError(RepositoryError, TimeoutError):
    """Another writer held the domain's lock in the repository for longer than the timeout."""


class ChainError(RepositoryError):
    """A stored backup chain fails validation: a layer is missing, names the wrong backing
    file, or has the wrong virtual size. Raised before anything is written."""


class RepositoryKeyError(RepositoryError):
    """An encrypted repository was used without its key, with the wrong key, or a key was
    given for a repository that is not encrypted. Raised before anything is read or written."""


class TestEnvironmentError(StateCaptureError):
    """This machine cannot run :mod:`statecapture.testing`'s real-hypervisor guest.

    Raised before anything is started: a Debian package of the guest kit or QEMU is missing,
    the embedded driver's root cannot be created or written, a path is in use, or another
    embedded root is already open in this process. The message says what is wrong;
    ``remedy`` says what to do about it (e.g. the ``apt-get install`` line).

    Attributes:
        remedy: what to install, change or run so that the guest can boot.
        missing: the missing Debian packages or programs, when that is the problem.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, message: str, *, remedy: str = "", missing: tuple[str, ...] = ()) -> None:
        super().__init__(f"{message} (remedy: {remedy})" if remedy else message)
        self.remedy = remedy
        self.missing = tuple(missing)


class GuestBootError(TestEnvironmentError):
    """A test guest did not come up: its agent did not answer in time, or it stopped.

    Nothing is left running: the guest was destroyed and undefined before this was raised.

    Attributes:
        domain_name: the guest's name.
        console_log: the tail of the guest's serial console log (kernel and init messages).
        timed_out: ``True`` when the timeout ran out, ``False`` when the guest stopped.
    """

    def __init__(
        self,
        message: str,
        *,
        domain_name: str | None = None,
        console_log: str = "",
        timed_out: bool = True,
        remedy: str = "",
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.domain_name = domain_name
        self.console_log = console_log
        self.timed_out = timed_out
        if console_log:
            self.add_note(f"--- console log of {domain_name} (tail) ---\n{console_log}")


_BY_CODE: dict[int, type[LibvirtError]] = {}
for _cls in (
    NotFoundError,
    UnsupportedError,
    InvalidStateError,
    GuestAgentError,
    OperationTimeoutError,
    CheckpointInconsistentError,
    ConnectionLostError,
):
    for _code in _cls.codes:
        _BY_CODE[_code] = _cls


def lookup(code: int) -> type[LibvirtError]:
    """Return the error class statecapture raises for a libvirt error ``code``.

    Unknown codes fall back to :class:`LibvirtError`.
    """
    return _BY_CODE.get(code, LibvirtError)


for _public in __all__:
    _obj = globals()[_public]
    if isinstance(_obj, type):
        _obj.__module__ = "statecapture"
