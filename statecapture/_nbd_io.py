"""The engines of the pull-mode data path (see :mod:`statecapture._nbd`, which plans a copy
and picks one of them): ``qemu-img convert`` with byte progress (:func:`convert`), the libnbd
pipeline between two NBD connections (:func:`pipeline`), and the helpers that put a copy on
disk (:class:`Writeback`, :func:`takes_direct_io`, :func:`fsync_path`).

Nothing here imports libnbd itself: callers pass the handles and libnbd's ``Buffer`` type.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Protocol

from ._qemuimg import QEMU_IMG, executable, tool_error
from .errors import StateCaptureError

__all__ = [
    "DEPTH",
    "REQUEST_SIZE",
    "NBDHandle",
    "Progress",
    "Writeback",
    "convert",
    "fsync_path",
    "pipeline",
    "takes_direct_io",
]

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""

REQUEST_SIZE: Final = 512 << 10
"""Largest read/write request of the libnbd pipeline (bytes); see docs/performance.md."""

DEPTH: Final = 32
"""Requests the pipeline keeps in flight; its buffers total ``DEPTH * REQUEST_SIZE``."""

_PROGRESS_EVERY: Final = 0.1
"""Seconds between progress reports of the pipeline (the last one is always sent)."""

_POLLIN_ISH: Final = select.POLLIN | select.POLLHUP | select.POLLERR
_EVENTS: Final = (0, select.POLLIN, select.POLLOUT, select.POLLIN | select.POLLOUT)
"""poll(2) events for libnbd's AIO_DIRECTION_{NONE, READ, WRITE, BOTH}."""


class NBDHandle(Protocol):
    """The part of ``nbd.NBD`` (libnbd's binding) the data path uses."""

    def set_export_name(self, export_name: str) -> None: ...
    def add_meta_context(self, name: str) -> None: ...
    def connect_unix(self, unixsocket: str) -> None: ...
    def connect_systemd_socket_activation(self, argv: list[str]) -> None: ...
    def can_meta_context(self, metacontext: str) -> bool: ...
    def get_size(self) -> int: ...
    def block_status(
        self,
        count: int,
        offset: int,
        extent: Callable[[str, int, list[int], Any], int],
        flags: int = 0,
    ) -> None: ...
    def pread(self, count: int, offset: int, flags: int = 0) -> bytes: ...
    def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None: ...
    def zero(self, count: int, offset: int, flags: int = 0) -> None: ...
    def flush(self, flags: int = 0) -> None: ...
    def shutdown(self, flags: int = 0) -> None: ...
    def aio_pread(self, buf: Any, offset: int, completion: Any = None, flags: int = 0) -> int: ...
    def aio_pwrite(self, buf: Any, offset: int, completion: Any = None, flags: int = 0) -> int: ...
    def aio_zero(self, count: int, offset: int, completion: Any = None, flags: int = 0) -> int: ...
    def aio_get_fd(self) -> int: ...
    def aio_get_direction(self) -> int: ...
    def aio_notify_read(self) -> None: ...
    def aio_notify_write(self) -> None: ...
    def aio_is_dead(self) -> bool: ...
    def set_pread_initialize(self, request: bool) -> None: ...


_PROGRESS_RE: Final = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def convert(args: list[str], planned: int, progress: Progress | None) -> None:
    """``qemu-img convert -p ARGS``, reporting its share-of-data progress as that share of
    ``planned`` bytes; a failure raises :class:`~statecapture.errors.ToolError`."""
    argv = [QEMU_IMG, "convert", "-p", *args]
    proc = subprocess.Popen(
        [executable(QEMU_IMG, "qemu-img convert"), *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    other = bytearray()  # anything that is not progress: the error message, if it fails
    try:
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                found = _PROGRESS_RE.search(line)
                if found is None:
                    other += line[-2000:] + b"\n"
                    del other[:-4000]
                elif progress is not None:
                    progress(min(planned, round(float(found[1]) / 100 * planned)), planned)
        other += pending
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if proc.returncode != 0:
        raise tool_error(tuple(argv), proc.returncode, other.decode(errors="replace"), "")
    if progress is not None:
        progress(planned, planned)


class Writeback:
    """Write ``path``'s dirty pages to disk in the background while a copy fills it.

    Copies that write through the page cache (the pipeline's ``qemu-nbd --cache=unsafe``,
    or a full copy where the file system refuses O_DIRECT) end with an ``fsync``; this
    thread keeps the disk busy during the copy, so that final sync finds little left. The
    first error stops the thread and is kept in :attr:`error`. ``enabled=False``: a no-op
    (the copy writes with O_DIRECT; there is nothing to write back).
    """

    error: OSError | None = None
    """Why writing back failed, if it did (the copy must then fail too)."""

    def __init__(self, path: Path, interval: float = 0.05, *, enabled: bool = True) -> None:
        self._enabled = enabled
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statecapture-writeback")

    def __enter__(self) -> Writeback:
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._enabled:
            self._thread.join()

    def _run(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except OSError as exc:
            self.error = exc
            return
        try:
            while not self._stop.wait(self._interval):
                os.fdatasync(fd)
        except OSError as exc:
            # Linux reports a write-back error to the descriptors open when it happened,
            # so the final fsync (a new descriptor) may not see what this one saw.
            self.error = exc
        finally:
            os.close(fd)


def takes_direct_io(path: Path) -> bool:
    """Whether ``path``'s file system accepts O_DIRECT (tmpfs before Linux 6.6 does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def fsync_path(path: Path) -> None:
    """``fsync`` the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pipeline(
    src: NBDHandle,
    dst: NBDHandle,
    requests: Iterator[tuple[int, int, bool]],
    planned: int,
    progress: Progress | None,
    buffer: Any,
) -> tuple[int, int]:
    """Copy ``requests`` ``(offset, length, is_data)``; returns (bytes written, bytes zeroed).

    One thread drives both connections: up to :data:`DEPTH` requests are in flight, each
    data request reads into a buffer from a fixed pool and writes that same buffer (no
    Python-level copy), and ``poll(2)`` waits on both sockets at once, so the source keeps
    answering reads while the target is busy writing. ``buffer`` is libnbd's ``nbd.Buffer``
    (views of the pool's buffers are handed to it).
    """
    pool: list[bytearray] = []  # free buffers, allocated on first use (at most DEPTH)
    ready: deque[tuple[bytearray, Any, int]] = deque()  # (buffer, view, offset) read, unwritten
    failures: list[str] = []
    in_flight = 0
    written = zeroed = 0
    last_report = time.monotonic()

    def on_read(buf: bytearray, view: Any, off: int) -> Callable[[Any], int]:
        def done(err: Any) -> int:
            if err.value:
                failures.append(f"reading {len(view)} bytes at {off}: {os.strerror(err.value)}")
            else:
                ready.append((buf, view, off))
            return 1  # retire the command

        return done

    def on_write(buf: bytearray | None, off: int, n: int) -> Callable[[Any], int]:
        def done(err: Any) -> int:
            nonlocal in_flight, written, zeroed
            in_flight -= 1
            if buf is not None:
                pool.append(buf)
            if err.value:
                what = "writing" if buf is not None else "zeroing"
                failures.append(f"{what} {n} bytes at {off}: {os.strerror(err.value)}")
            elif buf is not None:
                written += n
            else:
                zeroed += n
            return 1

        return done

    handles = {src.aio_get_fd(): src, dst.aio_get_fd(): dst}
    poller = select.poll()
    events = dict.fromkeys(handles, -1)
    exhausted = False
    while True:
        while not exhausted and in_flight < DEPTH:
            req = next(requests, None)
            if req is None:
                exhausted = True
                break
            off, n, is_data = req
            in_flight += 1
            if not is_data:
                dst.aio_zero(n, off, completion=on_write(None, off, n))
                continue
            buf = pool.pop() if pool else bytearray(REQUEST_SIZE)
            view = buffer.from_buffer(memoryview(buf)[:n])
            src.aio_pread(view, off, completion=on_read(buf, view, off))
        while ready:
            buf, view, off = ready.popleft()
            dst.aio_pwrite(view, off, completion=on_write(buf, off, len(view)))
        if failures:
            raise StateCaptureError(f"NBD copy failed: {failures[0]}")
        if progress is not None and (
            time.monotonic() - last_report >= _PROGRESS_EVERY or (exhausted and not in_flight)
        ):
            progress(written + zeroed, planned)
            last_report = time.monotonic()
        if exhausted and not in_flight:
            return written, zeroed
        for fd, h in handles.items():
            if h.aio_is_dead():
                raise StateCaptureError("the NBD connection broke during the copy")
            want = _EVENTS[h.aio_get_direction() & 3]
            if want != events[fd]:
                if events[fd] == -1:
                    poller.register(fd, want)
                else:
                    poller.modify(fd, want)
                events[fd] = want
        for fd, revents in poller.poll():
            if revents & _POLLIN_ISH:
                handles[fd].aio_notify_read()
            elif revents & select.POLLOUT:
                handles[fd].aio_notify_write()
