"""The pull-mode data path: copy an NBD export into a qcow2 backup image.

A pull-mode backup job exports each disk's point-in-time content over NBD. This module
reads such an export and writes a qcow2 image:

* **full**: every extent that base:allocation reports as data is copied; zero extents and
  holes are skipped (the new image reads them as zero);
* **incremental**: only extents the ``qemu:dirty-bitmap:…`` context marks dirty are copied,
  into a qcow2 layer whose backing file is the previous backup; a dirty extent that now
  reads as zero is written as an explicit zero cluster (it must hide the older data below).

The default client is libnbd's Python binding (Debian's ``python3-libnbd``; PyPI has no
libnbd binding). Our interpreter may not see Debian's ``dist-packages``, so :func:`load_nbd`
imports just ``nbd.py`` and ``libnbdmod*.so`` from there — never the whole directory. With
it, a copy goes like this:

1. libnbd connects, checks the meta contexts and plans the copy from block status: one
   request per 1 GiB window answers base:allocation and the dirty bitmap together, and the
   two extent lists are intersected here. The plan is streamed (never a whole-disk list)
   and its byte total is what progress is measured against.
2. **full**: ``qemu-img convert -n --target-is-zero`` copies the export into the image we
   created; its ``-p`` output (the share of the data copied) is reported in bytes.
3. **incremental**: :func:`_pipeline` copies the planned extents through a ``qemu-nbd``
   that libnbd starts with systemd socket activation (no socket file to clean up): one
   thread, one ``poll(2)`` over both sockets, up to :data:`_DEPTH` requests of at most
   :data:`REQUEST_SIZE` in flight, each read into a buffer of a fixed pool and written from
   that same buffer (no Python-level copy).
4. Writers go through the page cache (``qemu-nbd --cache=unsafe``, ``qemu-img convert``'s
   default); a thread (:class:`_Writeback`) ``fdatasync``-s the image every 50 ms while the
   copy runs, and the image is ``fsync``-ed once its writer has exited, so a delivered
   backup is on disk.

Without libnbd the same copies are made with ``qemu-img`` (``convert`` for full, ``map`` +
``dd`` + ``qemu-io`` for incremental; slow for scattered dirty extents: one ``dd`` each).

Why this design — measured, not assumed (2 GiB qcow2 export holding 1 GiB of random data in
16 extents, served by ``qemu-nbd --read-only``; 2 shared cores, load average 3-13; medians
of 5 interleaved rounds; times include creating the image and, for ours, the final sync):

====================================================  =======  ======  ============
copy of the 1 GiB export                              seconds  CPU s   peak RSS
====================================================  =======  ======  ============
``qemu-img convert -O qcow2`` (no sync)               1.4      0.9     24 MiB
``nbdcopy`` to a raw file (no sync)                   1.7      1.3     40 MiB
``nbdcopy --flush`` to a raw file                     3.1      1.3     40 MiB
``qemu-img convert`` + ``sync``                       3.3      0.9     24 MiB
old libnbd path (4 x 4 MiB AIO, final fsync)          5.4      4.7     1069 MiB
this path, full (convert + writeback + fsync)         2.45     1.6     44 MiB
the same without writeback/fsync                      1.2      1.4     44 MiB
:func:`_pipeline` as full copier (no sync)            2.1      3.0     61 MiB
``nbdcopy`` → ``qemu-nbd`` qcow2 target (no sync)     2.3      2.7     23 MiB
====================================================  =======  ======  ============

Against copiers that also flush (``nbdcopy --flush``; ``qemu-img convert`` then ``sync``),
the full path's per-round ratio is 1.28x (median; 0.86-1.38); the copy itself, without
the sync, runs at 1.04x the best of ``qemu-img convert`` and ``nbdcopy``. The final sync
costs 1.5-2 s per GiB on these disks; without the writeback thread it was 0.4-0.9 s more.
(The peak RSS of 44 MiB is the interpreter with this library loaded: 43 MiB.)

* The old path waited on one handle at a time (``poll`` on the source while the target's
  queued writes sat unsent, and the reverse), so reads and writes barely overlapped; and
  libnbd 1.14's binding never frees an ``nbd.Buffer`` passed to ``aio_pread`` (64 x 4 MiB
  reads grew the RSS by 256 MiB), so its memory grew with the bytes copied. The pipeline
  hands views of pooled ``bytearray`` buffers to libnbd instead (flat RSS over 4 GiB).
* Any copy that passes through this process moves each byte through two more socket copies
  and a second QEMU process: 2.7-3 CPU-seconds per GiB against 0.9 for ``qemu-img
  convert``, which writes the qcow2 itself. ``nbdcopy`` → ``qemu-nbd`` costs the same as
  the pipeline, so delegating to it gains nothing; with two busy cores CPU time is wall
  time, hence ``qemu-img convert`` for full copies.
* Pipeline tuning: 512 KiB requests beat 4 MiB ones (cache locality; ``qemu-nbd`` maps and
  unmaps a fresh buffer for every large request), 32 in flight beat 8-16; 4 MiB socket
  send buffers were no faster (one screening round); multi-conn (2 or 4 connections, one
  loop or a thread per connection) gave no consistent gain, so one connection is used and
  no server needs to advertise ``can_multi_conn``.
* Incremental (2048 scattered dirty 64 KiB clusters + 256 zeroed, 144 MiB planned):
  the pipeline with merged block status takes 0.7 s, the old path 1.4 s, the ``qemu-img``
  fallback 39 s; ``qemu-img convert`` cannot copy only the dirty extents of a bitmap.

Memory stays bounded: ``_DEPTH * REQUEST_SIZE`` (16 MiB) of buffers in the pipeline, none
in this process for a full copy, and extents are streamed. Progress is reported in bytes.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol

import attrs

from .errors import StateCaptureError, UnsupportedError

__all__ = [
    "CHUNK",
    "REQUEST_SIZE",
    "CopyStats",
    "ExportSource",
    "NBDHandle",
    "copy_export",
    "load_nbd",
    "qemu_img",
]

CHUNK: Final = 4 << 20
"""Largest piece the ``qemu-img`` fallback copies with one ``dd`` (bytes)."""

_WINDOW: Final = 1 << 30
"""Largest block-status request (QEMU answers at most this much per call anyway)."""

_DEBIAN_DIST: Final = Path("/usr/lib/python3/dist-packages")

BASE_ALLOCATION: Final = "base:allocation"
_STATE_ZERO: Final = 2  # base:allocation: reads as zero
_DIRTY: Final = 1  # qemu:dirty-bitmap: dirty


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


_nbd_lock = threading.Lock()
_nbd_module: ModuleType | None = None
_nbd_probed = False


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_nbd() -> ModuleType | None:
    """libnbd's Python module, or ``None`` when it cannot be loaded (then qemu-img is used).

    Tries ``import nbd`` first; when that fails, loads only ``nbd.py`` and its C extension
    from Debian's ``/usr/lib/python3/dist-packages`` (same CPython minor version, so the same
    ABI). ``$STATECAPTURE_NO_LIBNBD=1`` forces the qemu-img fallback.
    """
    global _nbd_module, _nbd_probed
    if os.environ.get("STATECAPTURE_NO_LIBNBD") == "1":
        return None
    with _nbd_lock:
        if _nbd_probed:
            return _nbd_module
        _nbd_probed = True
        try:
            import nbd  # type: ignore[import-not-found,unused-ignore]

            _nbd_module = nbd
            return _nbd_module
        except ImportError:
            pass
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        sos = sorted(_DEBIAN_DIST.glob(f"libnbdmod.{tag}*.so"))
        py = _DEBIAN_DIST / "nbd.py"
        if not sos or not py.is_file():
            return None
        try:
            if "libnbdmod" not in sys.modules:
                _load_file("libnbdmod", sos[0])
            _nbd_module = _load_file("nbd", py)
        except Exception:  # an ABI mismatch shows up as ImportError/SystemError here
            sys.modules.pop("libnbdmod", None)
            _nbd_module = None
        return _nbd_module


def _new_handle() -> NBDHandle:
    mod = load_nbd()
    if mod is None:  # pragma: no cover - callers check first
        raise UnsupportedError("libnbd's Python binding is not available")
    handle: NBDHandle = mod.NBD()
    return handle


# --------------------------------------------------------------------------- qemu-img helpers


def qemu_img(*args: str, timeout: float | None = None) -> str:
    """Run ``qemu-img`` and return its stdout; a failure raises :class:`StateCaptureError`."""
    return _run(["qemu-img", *args], timeout=timeout)


def _run(argv: list[str], *, timeout: float | None = None) -> str:
    exe = shutil.which(argv[0])
    if exe is None:
        raise UnsupportedError(f"{argv[0]} is not installed (Debian package qemu-utils)")
    try:
        out = subprocess.run(
            [exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise StateCaptureError(f"{argv[0]} {argv[1]} timed out after {timeout} s") from exc
    if out.returncode != 0:
        raise StateCaptureError(
            f"{argv[0]} {' '.join(argv[1:3])} failed: {(out.stderr or out.stdout).strip()}"
        )
    return out.stdout


# --------------------------------------------------------------------------- public shapes


@attrs.frozen
class ExportSource:
    """One NBD export of a pull-mode backup job."""

    socket: str
    """Absolute path of the NBD server's UNIX socket."""
    export_name: str
    """The export (libvirt names it after the disk target unless told otherwise)."""
    bitmap_context: str | None = None
    """``qemu:dirty-bitmap:…`` for an incremental export, ``None`` for a full one."""

    @property
    def uri(self) -> str:
        """The NBD URI (``nbd+unix:///vda?socket=…``)."""
        return f"nbd+unix:///{self.export_name}?socket={self.socket}"


@attrs.frozen
class CopyStats:
    """What one export copy did."""

    size: int
    """Virtual size of the disk (bytes)."""
    bytes_written: int
    """Data bytes read from the export and written to the image."""
    bytes_zeroed: int
    """Bytes written as explicit zero clusters (incremental only)."""
    bytes_planned: int
    """Data + zero bytes the copy set out to write (the dirty or allocated part)."""
    duration: float
    """Seconds the copy took."""
    client: str
    """``libnbd`` or ``qemu-img``: which implementation copied."""


Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""


# --------------------------------------------------------------------------- extents via libnbd


def _clip(
    entries: list[tuple[int, int]], length: int, context: str, start: int
) -> list[tuple[int, int]]:
    """``(length, flags)`` pairs covering at most ``length`` bytes; bad lengths raise."""
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in entries:
        if left <= 0:
            break
        if ext_len <= 0:
            raise StateCaptureError(f"the NBD server sent an empty {context} extent at {start}")
        out.append((min(ext_len, left), flags))
        left -= ext_len
    return out


def _plan(h: NBDHandle, size: int, bitmap_context: str | None) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` of what must be written; streamed, window by window.

    One ``block_status`` round trip answers every negotiated context for the same range, so
    the dirty bitmap and the allocation map are read together and intersected here (one
    request per window, not one per dirty extent).
    """
    contexts = [BASE_ALLOCATION] if bitmap_context is None else [BASE_ALLOCATION, bitmap_context]
    pos = 0
    while pos < size:
        want = min(size - pos, _WINDOW)
        got: dict[str, list[tuple[int, int]]] = {c: [] for c in contexts}

        def cb(
            metacontext: str,
            offset: int,
            entries: list[int],
            _err: Any,
            got: dict[str, list[tuple[int, int]]] = got,
        ) -> int:
            if metacontext in got:
                got[metacontext].extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(want, pos, cb)
        for ctx, entries in got.items():
            if not entries:
                raise StateCaptureError(f"the NBD server sent no {ctx} extents at offset {pos}")
        covered = min(want, *(sum(n for n, _f in entries) for entries in got.values()))
        alloc = _clip(got[BASE_ALLOCATION], covered, BASE_ALLOCATION, pos)
        if bitmap_context is None:
            off = pos
            for ext_len, flags in alloc:
                if not flags & _STATE_ZERO:  # zeros: the new image already reads zero there
                    yield off, ext_len, True
                off += ext_len
        else:
            dirty = _clip(got[bitmap_context], covered, bitmap_context, pos)
            yield from _dirty_pieces(pos, dirty, alloc)
        pos += covered


def _dirty_pieces(
    start: int, dirty: list[tuple[int, int]], alloc: list[tuple[int, int]]
) -> Iterator[tuple[int, int, bool]]:
    """Intersect two extent lists that both begin at ``start``: the dirty parts, split by
    allocation; a dirty part reading as zero is ``is_data=False`` (written as zeros)."""
    d_i = a_i = 0
    d_left, d_flags = dirty[0]
    a_left, a_flags = alloc[0]
    off = start
    while True:
        n = min(d_left, a_left)
        if d_flags & _DIRTY:
            yield off, n, not a_flags & _STATE_ZERO
        off += n
        d_left -= n
        a_left -= n
        if d_left == 0:
            d_i += 1
            if d_i == len(dirty):
                return
            d_left, d_flags = dirty[d_i]
        if a_left == 0:
            a_i += 1
            if a_i == len(alloc):
                return
            a_left, a_flags = alloc[a_i]


def _requests(pieces: Iterator[tuple[int, int, bool]]) -> Iterator[tuple[int, int, bool]]:
    """Split data pieces into reads of at most :data:`REQUEST_SIZE`; zero pieces stay whole."""
    for off, length, is_data in pieces:
        if not is_data:
            yield off, length, False
            continue
        end = off + length
        while off < end:
            n = min(REQUEST_SIZE, end - off)
            yield off, n, True
            off += n


def _connect_source(source: ExportSource) -> NBDHandle:
    """The one connection a libnbd download uses (size, planning and copying)."""
    src = _new_handle()
    src.set_export_name(source.export_name)
    src.add_meta_context(BASE_ALLOCATION)
    if source.bitmap_context is not None:
        src.add_meta_context(source.bitmap_context)
    with contextlib.suppress(AttributeError):  # libnbd < 1.12 always zeroes read buffers
        # nothing is written from a failed read (the copy stops), so skip zeroing buffers
        src.set_pread_initialize(False)
    src.connect_unix(source.socket)
    return src


def _copy_libnbd(
    source: ExportSource,
    dest: _Target,
    progress: Progress | None,
    src: NBDHandle | None = None,
) -> CopyStats:
    started = time.monotonic()
    if src is None:
        src = _connect_source(source)
    try:
        for ctx in (BASE_ALLOCATION, source.bitmap_context):
            if ctx is not None and not src.can_meta_context(ctx):
                raise UnsupportedError(f"the NBD export {source.export_name!r} lacks {ctx}")
        size = src.get_size()
        # Block status is scanned once: the plan is kept and the copy follows it.
        pieces = list(_plan(src, size, source.bitmap_context))
        planned = sum(length for _o, length, _d in pieces)
        if progress is not None:
            progress(0, planned)
        if source.bitmap_context is None and _full_copy_engine == "qemu-img":
            src.shutdown()
            _convert(source, dest.path, planned, progress)
            written, zeroed = planned, 0
        else:
            written, zeroed = _copy_pipeline(src, pieces, dest, planned, progress)
    finally:
        with contextlib.suppress(Exception):
            src.shutdown()
        del src
    return CopyStats(size, written, zeroed, planned, time.monotonic() - started, "libnbd")


def _copy_pipeline(
    src: NBDHandle,
    pieces: list[tuple[int, int, bool]],
    dest: _Target,
    planned: int,
    progress: Progress | None,
) -> tuple[int, int]:
    dst = _new_handle()
    dst.connect_systemd_socket_activation(
        [
            "qemu-nbd",
            *_key_objects(),
            "--image-opts",
            "--cache=unsafe",
            "--discard=ignore",
            dest.image_opts(),
        ]
    )
    try:
        written, zeroed = _pipeline(src, dst, _requests(iter(pieces)), planned, progress)
        dst.flush()
    finally:
        with contextlib.suppress(Exception):
            dst.shutdown()
        del dst  # the last reference: libnbd closes it and reaps qemu-nbd, which has
        # written the image's metadata by the time it exits
    return written, zeroed


_PROGRESS_RE: Final = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _convert(source: ExportSource, dest: str, planned: int, progress: Progress | None) -> None:
    """Full copy by ``qemu-img convert`` into the empty image ``dest``, with byte progress.

    ``-n --target-is-zero``: write into the image we created and skip whatever reads as
    zero (the extents :func:`_plan` skips, plus zero-filled data). ``-p`` prints the share of
    the data it has copied; it is reported as that share of ``planned`` bytes.
    """
    exe = shutil.which("qemu-img")
    if exe is None:
        raise UnsupportedError("qemu-img is not installed (Debian package qemu-utils)")
    argv = [exe, "convert", "-p", "-n", "--target-is-zero", "-O", "qcow2", "--image-opts"]
    argv += [_nbd_image_opts(source, bitmap=False), dest]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        message = other.decode(errors="replace").strip()[-2000:]
        raise StateCaptureError(f"qemu-img convert failed: {message}")
    if progress is not None:
        progress(planned, planned)


class _Writeback:
    """Write ``path``'s dirty pages to disk in the background while a copy fills it.

    The copies write through the page cache (``cache=unsafe``) and :func:`copy_export` ends
    with an ``fsync``; this thread keeps the disk busy during the copy, so that final sync
    finds little left. The first error stops the thread and is kept in :attr:`error`.
    """

    error: OSError | None = None
    """Why writing back failed, if it did (the copy must then fail too)."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statecapture-writeback")

    def __enter__(self) -> _Writeback:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


REQUEST_SIZE: Final = 512 << 10
"""Largest read/write request of the libnbd copy (bytes); see the module docstring."""

_DEPTH: Final = 32
"""Requests the libnbd copy keeps in flight; its buffers total ``_DEPTH * REQUEST_SIZE``."""

_PROGRESS_EVERY: Final = 0.1
"""Seconds between progress reports of the libnbd copy (the last one is always sent)."""

_full_copy_engine = "qemu-img"
"""What copies a full export: ``"qemu-img"`` (convert) or ``"libnbd"`` (:func:`_pipeline`).
Chosen by measurement (module docstring); a variable so benchmarks can compare both."""

_POLLIN_ISH: Final = select.POLLIN | select.POLLHUP | select.POLLERR
_EVENTS: Final = (0, select.POLLIN, select.POLLOUT, select.POLLIN | select.POLLOUT)
"""poll(2) events for libnbd's AIO_DIRECTION_{NONE, READ, WRITE, BOTH}."""


def _pipeline(
    src: NBDHandle,
    dst: NBDHandle,
    requests: Iterator[tuple[int, int, bool]],
    planned: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Copy ``requests`` ``(offset, length, is_data)``; returns (bytes written, bytes zeroed).

    One thread drives both connections: up to :data:`_DEPTH` requests are in flight, each
    data request reads into a buffer from a fixed pool and writes that same buffer (no
    Python-level copy), and ``poll(2)`` waits on both sockets at once, so the source keeps
    answering reads while the target is busy writing.
    """
    mod = load_nbd()
    assert mod is not None
    pool: list[bytearray] = []  # free buffers, allocated on first use (at most _DEPTH)
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
        while not exhausted and in_flight < _DEPTH:
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
            view = mod.Buffer.from_buffer(memoryview(buf)[:n])
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


# --------------------------------------------------------------------------- qemu-img fallback


def _nbd_image_opts(source: ExportSource, *, bitmap: bool) -> str:
    opts = [
        "driver=nbd",
        "server.type=unix",
        f"server.path={source.socket}",
        f"export={source.export_name}",
    ]
    if bitmap and source.bitmap_context is not None:
        opts.append(f"x-dirty-bitmap={source.bitmap_context}")
    return ",".join(o.replace(",", ",,") for o in opts)


def _map(source: ExportSource, *, bitmap: bool) -> list[dict[str, Any]]:
    out = qemu_img("map", "--output=json", "--image-opts", _nbd_image_opts(source, bitmap=bitmap))
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


def _copy_qemu_img(source: ExportSource, dest: _Target, progress: Progress | None) -> CopyStats:
    started = time.monotonic()
    size_info = json.loads(
        qemu_img("info", "--output=json", "--image-opts", _nbd_image_opts(source, bitmap=False))
    )
    size = int(size_info["virtual-size"])
    alloc = _map(source, bitmap=False)
    if source.bitmap_context is None:
        planned = sum(int(e["length"]) for e in alloc if e.get("data"))
        if progress is not None:
            progress(0, planned)
        # -n: write into the image we created; --target-is-zero: skip zero areas entirely.
        qemu_img(
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "--image-opts",
            _nbd_image_opts(source, bitmap=False),
            dest.path,
        )
        if progress is not None:
            progress(planned, planned)
        return CopyStats(size, planned, 0, planned, time.monotonic() - started, "qemu-img")
    # qemu-img map with x-dirty-bitmap reports dirty areas inverted: "data": false = dirty.
    dirty = [
        (int(e["start"]), int(e["length"])) for e in _map(source, bitmap=True) if not e.get("data")
    ]
    pieces = list(_intersect(dirty, alloc))
    planned = sum(length for _o, length, _d in pieces)
    written = zeroed = 0
    if progress is not None:
        progress(0, planned)
    # Chunks go to a private 0700 directory of our own (``dest`` may be a descriptor path).
    with tempfile.TemporaryDirectory(prefix="sc-copy-") as td:
        commands: list[str] = []
        batch_bytes = 0

        def flush_batch() -> None:
            nonlocal batch_bytes
            if commands:
                args: list[str] = []
                for c in commands:
                    args += ["-c", c]
                _run(["qemu-io", *_key_objects(), "--image-opts", *args, dest.image_opts()])
                for f in Path(td).iterdir():
                    f.unlink()
                commands.clear()
                batch_bytes = 0

        for off, length, is_data in pieces:
            if not is_data:
                commands.append(f"write -q -z {off} {length}")
                zeroed += length
                continue
            pos = off
            while pos < off + length:
                n = min(CHUNK, off + length - pos)
                chunk = Path(td) / f"{pos}.raw"
                _dd(source, chunk, pos, n)
                commands.append(f"write -q -s {chunk} {pos} {n}")
                pos += n
                written += n
                batch_bytes += n
                if batch_bytes >= 16 * CHUNK:
                    flush_batch()
                    if progress is not None:
                        progress(written + zeroed, planned)
        flush_batch()
    if progress is not None:
        progress(written + zeroed, planned)
    return CopyStats(size, written, zeroed, planned, time.monotonic() - started, "qemu-img")


def _intersect(
    dirty: list[tuple[int, int]], alloc: list[dict[str, Any]]
) -> Iterator[tuple[int, int, bool]]:
    """Split dirty ranges by allocation: ``(offset, length, is_data)``."""
    for d_off, d_len in dirty:
        d_end = d_off + d_len
        for e in alloc:
            a_off, a_len = int(e["start"]), int(e["length"])
            lo, hi = max(d_off, a_off), min(d_end, a_off + a_len)
            if lo < hi:
                yield lo, hi - lo, not (e.get("zero") and not e.get("data"))


def _dd(source: ExportSource, out: Path, offset: int, length: int) -> None:
    """Copy ``[offset, offset+length)`` of the export to the raw file ``out``."""
    bs = 65536 if offset % 65536 == 0 and length % 65536 == 0 else 512
    qemu_img(
        "dd",
        "-O",
        "raw",
        "--image-opts",
        f"bs={bs}",
        f"skip={offset // bs}",
        # qemu-img dd counts `count` from the start of the input, skipped blocks included
        f"count={offset // bs + length // bs}",
        f"if={_nbd_image_opts(source, bitmap=False)}",
        f"of={out}",
    )
    got = out.stat().st_size
    if got != length:
        raise StateCaptureError(f"qemu-img dd read {got} bytes at {offset}, wanted {length}")


# --------------------------------------------------------------------------- entry point


_BACKING_KEY: contextvars.ContextVar[tuple[str, Mapping[str, int]] | None] = contextvars.ContextVar(
    "statecapture_backing_key", default=None
)
"""``(secret file, {backing path: layers})`` while a backup writes onto encrypted chains."""


@contextlib.contextmanager
def encrypted_backing(secret_file: str, chains: Mapping[str, int]) -> Iterator[None]:
    """While the block runs, a writer whose backing is a path in ``chains`` opens it as a
    chain of that many LUKS-encrypted qcow2 images, with the passphrase in ``secret_file``
    (a 0600 file in a private directory) — a backup repository with a key."""
    token = _BACKING_KEY.set((secret_file, chains))
    try:
        yield
    finally:
        _BACKING_KEY.reset(token)


def _key_objects() -> list[str]:
    key = _BACKING_KEY.get()
    if key is None:
        return []
    return ["--object", f"secret,id=scbk,format=raw,file={key[0].replace(',', ',,')}"]


@attrs.frozen
class _Target:
    """The image a copy writes: its path (often a descriptor path) and its backing's path."""

    path: str
    backing: str | None

    def image_opts(self) -> str:
        """``--image-opts`` for a writer: the backing is opened by its real path, not by
        the name in the header (relative to a descriptor path, that would not resolve)."""
        opts = ["driver=qcow2", "file.driver=file", f"file.filename={self.path}"]
        if self.backing is not None:
            opts += [
                "backing.driver=qcow2",
                "backing.file.driver=file",
                f"backing.file.filename={self.backing}",
            ]
            key = _BACKING_KEY.get()
            layers = 0 if key is None else key[1].get(self.backing, 0)
            opts += [f"{'backing.' * d}encrypt.key-secret=scbk" for d in range(1, layers + 1)]
        return ",".join(o.replace(",", ",,") for o in opts)


def copy_export(
    source: ExportSource,
    dest: Path,
    *,
    backing: Path | None,
    backing_name: str | None = None,
    progress: Progress | None = None,
    client: str | None = None,
) -> CopyStats:
    """Copy ``source`` into the new qcow2 image ``dest`` (which must exist, empty, 0600).

    ``dest`` may be a descriptor path (:func:`statecapture._files.fd_path`): every tool
    reopens the file statecapture created, never a name someone could swap. ``backing``
    (incremental only) is the previous backup in the chain, opened by that path;
    ``backing_name`` is what the new layer's header records (default: the file name when it
    lives beside ``dest``, so a backup set can move, else the absolute path).
    ``client`` forces ``"libnbd"`` or ``"qemu-img"``; default: libnbd when it loads.
    """
    if client is None:
        client = "libnbd" if load_nbd() is not None else "qemu-img"
    if client not in ("libnbd", "qemu-img"):
        raise ValueError(f"client must be 'libnbd' or 'qemu-img', not {client!r}")
    if client == "libnbd" and load_nbd() is None:
        raise UnsupportedError("libnbd's Python binding is not available (python3-libnbd)")
    src: NBDHandle | None = None
    if client == "libnbd":  # one connection: its size, then planning and copying
        mod = load_nbd()
        assert mod is not None
        try:
            src = _connect_source(source)
            size = _source_size(src)
        except mod.Error as exc:
            if src is not None:
                with contextlib.suppress(Exception):
                    src.shutdown()
            src = None
            raise StateCaptureError(
                f"reading NBD export {source.export_name!r} failed: {exc}"
            ) from exc
    else:
        size = _export_size(source, client)
    try:
        _create_target(dest, size, backing, backing_name)
    except BaseException:
        if src is not None:
            with contextlib.suppress(Exception):
                src.shutdown()
            del src
        raise
    target = _Target(str(dest), None if backing is None else str(backing.absolute()))
    with _Writeback(dest) as writeback:
        if client == "libnbd":
            mod = load_nbd()
            assert mod is not None
            try:
                stats = _copy_libnbd(source, target, progress, src)
            except BaseException as exc:
                # The failed frames still reference the NBD handles; clearing them lets
                # libnbd close the connections and reap its qemu-nbd now, not at garbage
                # collection (a traceback kept by the caller would keep qemu-nbd around).
                traceback.clear_frames(exc.__traceback__)
                if isinstance(exc, mod.Error):
                    raise StateCaptureError(
                        f"copying NBD export {source.export_name!r} to {dest} failed: {exc}"
                    ) from exc
                raise
        else:
            stats = _copy_qemu_img(source, target, progress)
    if writeback.error is not None:
        raise StateCaptureError(f"writing {dest} to disk failed: {writeback.error}")
    # The writers ran without flushing (qemu-nbd cache=unsafe) and have exited: sync once.
    _fsync(dest)
    return stats


def _source_size(src: NBDHandle) -> int:
    """The export's size, from the download's one connection."""
    return src.get_size()


def _create_target(dest: Path, size: int, backing: Path | None, backing_name: str | None) -> None:
    create = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        ref = backing_name
        if ref is None:
            same_dir = backing.parent.resolve() == dest.parent.resolve()
            ref = backing.name if same_dir else str(backing.absolute())
        # -u: the header records ``ref``; the backing is opened by its real path below
        create += ["-u", "-b", ref, "-F", "qcow2"]
    qemu_img(*create, str(dest), str(size))


def _export_size(source: ExportSource, client: str) -> int:
    if client == "libnbd":
        h = _new_handle()
        h.set_export_name(source.export_name)
        h.connect_unix(source.socket)
        try:
            return h.get_size()
        finally:
            with contextlib.suppress(Exception):
                h.shutdown()
            del h
    info = json.loads(
        qemu_img("info", "--output=json", "--image-opts", _nbd_image_opts(source, bitmap=False))
    )
    return int(info["virtual-size"])
