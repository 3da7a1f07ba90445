"""The pull-mode data path: copy an NBD export into a qcow2 backup image.

A pull-mode backup job exports each disk's point-in-time content over NBD. This module
reads such an export with a real NBD client and writes a qcow2 image:

* **full**: every extent that base:allocation reports as data is copied; zero extents and
  holes are skipped (the new image reads them as zero);
* **incremental**: only extents the ``qemu:dirty-bitmap:…`` context marks dirty are copied,
  into a qcow2 layer whose backing file is the previous backup; a dirty extent that now
  reads as zero is written as an explicit zero cluster (it must hide the older data below).

The reference client is libnbd's Python binding (Debian's ``python3-libnbd``; PyPI has no
libnbd binding). Our interpreter may not see Debian's ``dist-packages``, so :func:`load_nbd`
imports just ``nbd.py`` and ``libnbdmod*.so`` from there — never the whole directory. The
target image is written through ``qemu-nbd`` that libnbd starts with systemd socket
activation (no socket file to clean up). Without libnbd the same copies are made with
``qemu-img`` (``convert`` for full, ``map`` + ``dd`` + ``qemu-io`` for incremental).

Memory stays bounded: data moves in requests of at most :data:`CHUNK` bytes, at most
``_DEPTH`` reads and writes in flight, and extents are streamed, never collected for the
whole disk. Progress is reported in bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol

import attrs

from .errors import StateCaptureError, UnsupportedError

__all__ = [
    "CHUNK",
    "CopyStats",
    "ExportSource",
    "NBDHandle",
    "copy_export",
    "load_nbd",
    "qemu_img",
]

CHUNK: Final = 4 << 20
"""Largest single read/write of the data path (bytes)."""

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
    def aio_command_completed(self, cookie: int) -> bool: ...
    def poll(self, timeout: int) -> int: ...


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


def _extents(h: NBDHandle, context: str, start: int, length: int) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, flags)`` of ``context`` covering ``[start, start+length)``."""
    end = start + length
    cur = start
    while cur < end:
        got: list[tuple[int, int]] = []

        def cb(
            metacontext: str,
            offset: int,
            entries: list[int],
            _err: Any,
            got: list[tuple[int, int]] = got,
        ) -> int:
            if metacontext == context:
                got.extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(min(end - cur, _WINDOW), cur, cb)
        if not got:
            raise StateCaptureError(f"the NBD server sent no {context} extents at offset {cur}")
        for ext_len, flags in got:
            if cur >= end:
                break
            ext_len = min(ext_len, end - cur)
            if ext_len <= 0:
                raise StateCaptureError(f"the NBD server sent an empty {context} extent at {cur}")
            yield cur, ext_len, flags
            cur += ext_len


def _plan(h: NBDHandle, size: int, bitmap_context: str | None) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` of what must be written; streamed, window by window."""
    pos = 0
    while pos < size:
        window = min(size - pos, _WINDOW)
        if bitmap_context is None:
            dirty: Iterator[tuple[int, int, int]] = iter([(pos, window, _DIRTY)])
        else:
            dirty = _extents(h, bitmap_context, pos, window)
        for d_off, d_len, d_flags in dirty:
            if not d_flags & _DIRTY:
                continue
            for a_off, a_len, a_flags in _extents(h, BASE_ALLOCATION, d_off, d_len):
                is_zero = bool(a_flags & _STATE_ZERO)
                if is_zero and bitmap_context is None:
                    continue  # full copy: the new image already reads zero there
                yield a_off, a_len, not is_zero
        pos += window


def _copy_libnbd(
    source: ExportSource,
    dest: Path,
    progress: Progress | None,
) -> CopyStats:
    started = time.monotonic()
    src = _new_handle()
    src.set_export_name(source.export_name)
    src.add_meta_context(BASE_ALLOCATION)
    if source.bitmap_context is not None:
        src.add_meta_context(source.bitmap_context)
    src.connect_unix(source.socket)
    try:
        for ctx in (BASE_ALLOCATION, source.bitmap_context):
            if ctx is not None and not src.can_meta_context(ctx):
                raise UnsupportedError(f"the NBD export {source.export_name!r} lacks {ctx}")
        size = src.get_size()
        planned = sum(length for _o, length, _d in _plan(src, size, source.bitmap_context))
        dst = _new_handle()
        dst.connect_systemd_socket_activation(
            ["qemu-nbd", "--format=qcow2", "--cache=unsafe", "--discard=ignore", str(dest)]
        )
        try:
            if progress is not None:
                progress(0, planned)
            written, zeroed = _pipeline(
                src, dst, _plan(src, size, source.bitmap_context), planned, progress
            )
            dst.flush()
        finally:
            with contextlib.suppress(Exception):
                dst.shutdown()
            del dst
    finally:
        with contextlib.suppress(Exception):
            src.shutdown()
        del src
    return CopyStats(size, written, zeroed, planned, time.monotonic() - started, "libnbd")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DEPTH: Final = 4
"""Reads (and writes) kept in flight by the libnbd copy; memory <= 2 * depth * CHUNK."""


def _wait(h: NBDHandle, cookie: int) -> None:
    while not h.aio_command_completed(cookie):  # raises nbd.Error when the command failed
        h.poll(-1)


def _pipeline(
    src: NBDHandle,
    dst: NBDHandle,
    plan: Iterator[tuple[int, int, bool]],
    planned: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Copy ``plan`` with up to :data:`_DEPTH` reads and writes in flight; (written, zeroed)."""
    mod = load_nbd()
    assert mod is not None
    reads: deque[tuple[int, Any, int, int]] = deque()
    writes: deque[tuple[int, Any]] = deque()
    written = zeroed = 0

    def retire_writes(limit: int) -> None:
        while len(writes) > limit:
            _wait(dst, writes.popleft()[0])

    def finish_read() -> None:
        nonlocal written
        cookie, buf, off, n = reads.popleft()
        _wait(src, cookie)
        retire_writes(_DEPTH - 1)
        writes.append((dst.aio_pwrite(buf, off), buf))
        written += n
        if progress is not None:
            progress(written + zeroed, planned)

    for off, length, is_data in plan:
        if not is_data:
            retire_writes(_DEPTH - 1)
            writes.append((dst.aio_zero(length, off), None))
            zeroed += length
            continue
        pos = off
        while pos < off + length:
            n = min(CHUNK, off + length - pos)
            buf = mod.Buffer(n)
            reads.append((src.aio_pread(buf, pos), buf, pos, n))
            pos += n
            if len(reads) >= _DEPTH:
                finish_read()
    while reads:
        finish_read()
    retire_writes(0)
    if progress is not None:
        progress(written + zeroed, planned)
    return written, zeroed


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


def _copy_qemu_img(source: ExportSource, dest: Path, progress: Progress | None) -> CopyStats:
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
            str(dest),
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
    with tempfile.TemporaryDirectory(prefix=".sc-copy-", dir=dest.parent) as td:
        commands: list[str] = []
        batch_bytes = 0

        def flush_batch() -> None:
            nonlocal batch_bytes
            if commands:
                args: list[str] = []
                for c in commands:
                    args += ["-c", c]
                _run(["qemu-io", "-f", "qcow2", *args, str(dest)])
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


def copy_export(
    source: ExportSource,
    dest: Path,
    *,
    backing: Path | None,
    progress: Progress | None = None,
    client: str | None = None,
) -> CopyStats:
    """Copy ``source`` into the new qcow2 image ``dest`` (which must exist, empty, 0600).

    ``backing`` (incremental only) is the previous backup in the chain; it is recorded as
    a relative file name when it lives in the same directory, so a backup set can move.
    ``client`` forces ``"libnbd"`` or ``"qemu-img"``; default: libnbd when it loads.
    """
    if client is None:
        client = "libnbd" if load_nbd() is not None else "qemu-img"
    if client not in ("libnbd", "qemu-img"):
        raise ValueError(f"client must be 'libnbd' or 'qemu-img', not {client!r}")
    if client == "libnbd" and load_nbd() is None:
        raise UnsupportedError("libnbd's Python binding is not available (python3-libnbd)")
    size = _export_size(source, client)
    create = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        ref = backing.name if backing.parent.resolve() == dest.parent.resolve() else str(backing)
        create += ["-b", ref, "-F", "qcow2"]
    qemu_img(*create, str(dest), str(size))
    if client == "libnbd":
        mod = load_nbd()
        assert mod is not None
        try:
            stats = _copy_libnbd(source, dest, progress)
        except mod.Error as exc:
            raise StateCaptureError(
                f"copying NBD export {source.export_name!r} to {dest} failed: {exc}"
            ) from exc
    else:
        stats = _copy_qemu_img(source, dest, progress)
    # The writers ran without flushing (qemu-nbd cache=unsafe) and have exited: sync once.
    _fsync(dest)
    return stats


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
