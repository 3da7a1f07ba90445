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
   two extent lists are intersected here. The plan's byte total is what progress is
   measured against.
2. **full**: ``qemu-img convert -O qcow2 -t none -m 16 -W`` copies the export into the
   empty file we created (by its descriptor path) and makes the image in it: O_DIRECT
   writes (no page-cache copy, nothing left to write back), 16 coroutines, out-of-order
   writes — the fastest setup measured, the same command as the best external setup (see
   docs/performance.md). Where the file system refuses O_DIRECT (tmpfs before Linux 6.6),
   or the image is encrypted, we create the image first and ``convert -n
   --target-is-zero`` fills it; without O_DIRECT it writes through the page cache while a
   :class:`~._nbd_io.Writeback` thread flushes.
3. **incremental**: :func:`~._nbd_io.pipeline` copies the planned extents through a
   ``qemu-nbd`` that libnbd starts with systemd socket activation (no socket file to clean
   up): one thread, one ``poll(2)`` over both sockets, up to 32 requests of at most 512 KiB
   in flight from a fixed buffer pool.
4. The image is ``fsync``-ed once its writer has exited, so a delivered backup is on disk.

While a backup repository collects digests (:mod:`._nbd_digest`), a second connection
reads and hashes the copied blocks alongside the copy. While an encrypted repository
writes (:func:`encrypted_layers`), the new image is created LUKS-encrypted and every
writer encrypts as it writes: no plaintext reaches the disk.

Without libnbd the same copies are made with ``qemu-img`` alone (:mod:`._nbd_fallback`).
Measurements and the reasons for this design: docs/performance.md, "The pull data path".
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import attrs

from . import _nbd_digest
from ._nbd_io import (
    REQUEST_SIZE,
    NBDHandle,
    Progress,
    Writeback,
    convert,
    fsync_path,
    pipeline,
    takes_direct_io,
)
from ._qemuimg import qemu_img
from .errors import StateCaptureError, ToolError, UnsupportedError

__all__ = [
    "CHUNK",
    "REQUEST_SIZE",
    "CopyStats",
    "ExportSource",
    "NBDHandle",
    "Progress",
    "Target",
    "compressed_full_copies",
    "copy_export",
    "create_image",
    "create_target",
    "encrypted_layers",
    "key_objects",
    "load_nbd",
    "nbd_image_opts",
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

_full_copy_engine = "qemu-img"
"""What copies a full export: ``"qemu-img"`` (convert) or ``"libnbd"`` (the pipeline).
Chosen by measurement (docs/performance.md); a variable so tests can run both."""


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


# --------------------------------------------------------------------------- shapes


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


# --------------------------------------------------------------------------- planning


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


def nbd_image_opts(source: ExportSource, *, bitmap: bool) -> str:
    """``--image-opts`` of QEMU's NBD client for ``source`` (``bitmap``: with the dirty
    bitmap as ``x-dirty-bitmap``, for ``qemu-img map``)."""
    opts = [
        "driver=nbd",
        "server.type=unix",
        f"server.path={source.socket}",
        f"export={source.export_name}",
    ]
    if bitmap and source.bitmap_context is not None:
        opts.append(f"x-dirty-bitmap={source.bitmap_context}")
    return ",".join(o.replace(",", ",,") for o in opts)


# --------------------------------------------------------------------------- the image written

_SECRET_ID: Final = "scbk"


@attrs.frozen
class _Encryption:
    secret_file: str
    chains: Mapping[str, int]


_ENCRYPTION: contextvars.ContextVar[_Encryption | None] = contextvars.ContextVar(
    "statecapture_encrypted_layers", default=None
)


@contextlib.contextmanager
def encrypted_layers(secret_file: str, chains: Mapping[str, int]) -> Iterator[None]:
    """While the block runs, every image a copy creates is a LUKS-encrypted qcow2 written
    through QEMU's encryption, and a backing path in ``chains`` is opened as a chain of that
    many encrypted images; the passphrase is in ``secret_file`` (a 0600 file in a private
    directory) — a backup repository with a key."""
    token = _ENCRYPTION.set(_Encryption(secret_file, chains))
    try:
        yield
    finally:
        _ENCRYPTION.reset(token)


_COMPRESSION: contextvars.ContextVar[tuple[str, set[tuple[int, int]]] | None] = (
    contextvars.ContextVar("statecapture_compressed_full_copies", default=None)
)


@contextlib.contextmanager
def compressed_full_copies(method: str | None) -> Iterator[set[tuple[int, int]]]:
    """While the block runs, a full, unencrypted copy by ``qemu-img convert`` writes qcow2
    compressed clusters (``method``: ``"zstd"`` or ``"zlib"``) in the same pass; yields the
    set of ``(st_dev, st_ino)`` of the images so written (a backup repository then skips
    its compression pass for them). ``method=None``: a no-op (yields an empty set)."""
    done: set[tuple[int, int]] = set()
    if method is None:
        yield done
        return
    token = _COMPRESSION.set((method, done))
    try:
        yield done
    finally:
        _COMPRESSION.reset(token)


def key_objects() -> list[str]:
    """``--object secret,…`` for the tools, while :func:`encrypted_layers` is active."""
    enc = _ENCRYPTION.get()
    if enc is None:
        return []
    return [
        "--object",
        f"secret,id={_SECRET_ID},format=raw,file={enc.secret_file.replace(',', ',,')}",
    ]


@attrs.frozen
class Target:
    """The image a copy writes: its path (often a descriptor path) and its backing's path."""

    path: str
    backing: str | None
    direct: bool = False
    """Whether the file takes O_DIRECT writes (a full copy then bypasses the page cache)."""
    encrypted: bool = False
    """Whether the image is LUKS-encrypted (:func:`encrypted_layers`)."""
    created: bool = True
    """Whether the qcow2 image exists already; ``False``: the file is still empty and
    ``qemu-img convert`` makes the image in it (a full plain copy: one process fewer)."""
    compression: str | None = None
    """Compressed clusters of this method (:func:`compressed_full_copies`; ``created`` is
    then ``False``)."""

    def image_opts(self) -> str:
        """``--image-opts`` for a writer: the backing is opened by its real path, not by
        the name in the header (relative to a descriptor path, that would not resolve)."""
        opts = ["driver=qcow2", "file.driver=file", f"file.filename={self.path}"]
        if self.encrypted:
            opts.append(f"encrypt.key-secret={_SECRET_ID}")
        if self.backing is not None:
            opts += [
                "backing.driver=qcow2",
                "backing.file.driver=file",
                f"backing.file.filename={self.backing}",
            ]
            enc = _ENCRYPTION.get()
            layers = 0 if enc is None else enc.chains.get(self.backing, 0)
            opts += [
                f"{'backing.' * d}encrypt.key-secret={_SECRET_ID}" for d in range(1, layers + 1)
            ]
        return ",".join(o.replace(",", ",,") for o in opts)

    def convert_args(self, source: ExportSource) -> list[str]:
        """``qemu-img convert`` arguments copying ``source`` into this (empty) image.

        ``-n --target-is-zero``: write into the image we created and skip whatever reads as
        zero. With O_DIRECT: 16 coroutines writing out of order (the fastest setup measured).
        """
        if self.created:
            args = ["-n", "--target-is-zero", *key_objects()]
        elif self.compression is not None:  # compressed clusters, through the page cache
            opts = f"{_CREATE_OPTS},compression_type={self.compression}"
            args = ["-c", "-o", opts, "-m", "16", "-W"]
        else:  # a new image reads as zero anyway; the options are create_target's
            args = ["-o", _CREATE_OPTS]
        if self.direct:
            args += ["-t", "none", "-m", "16", "-W"]
        args += ["--image-opts", nbd_image_opts(source, bitmap=False)]
        if self.encrypted:
            return [*args, "--target-image-opts", self.image_opts()]
        return [*args, "-O", "qcow2", self.path]


# --------------------------------------------------------------------------- entry point


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
    mod = load_nbd() if client == "libnbd" else None
    if client == "libnbd" and mod is None:
        raise UnsupportedError("libnbd's Python binding is not available (python3-libnbd)")
    src: NBDHandle | None = None
    if mod is not None:  # one connection: its size, then planning and copying
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
    encrypted = _ENCRYPTION.get() is not None
    by_convert = (
        mod is not None
        and backing is None
        and not encrypted
        and source.bitmap_context is None
        and _full_copy_engine == "qemu-img"
    )
    compressing = _COMPRESSION.get() if by_convert else None
    # O_DIRECT suits whole aligned clusters; compressed ones are written through the cache.
    direct = backing is None and compressing is None and takes_direct_io(dest)
    # A plain full copy by qemu-img makes the image itself, in the file we created: the
    # same command as the best external setup, without a `qemu-img create` first.
    convert_creates = by_convert and (direct or compressing is not None)
    try:
        if not convert_creates:
            create_target(dest, size, backing, backing_name)
    except BaseException:
        if src is not None:
            with contextlib.suppress(Exception):
                src.shutdown()
            del src
        raise
    target = Target(
        str(dest),
        None if backing is None else str(backing.absolute()),
        direct=direct,
        encrypted=encrypted,
        created=not convert_creates,
        compression=None if compressing is None else compressing[0],
    )
    with Writeback(dest, enabled=not target.direct) as writeback:
        if mod is not None:
            assert src is not None
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
            from ._nbd_fallback import copy_qemu_img

            stats = copy_qemu_img(source, target, progress)
    if writeback.error is not None:
        raise StateCaptureError(f"writing {dest} to disk failed: {writeback.error}")
    fsync_path(dest)  # the writers have exited; O_DIRECT or not, the metadata must be synced
    if compressing is not None:
        compressing[1].add(_nbd_digest.file_key(dest))
    return stats


def _source_size(src: NBDHandle) -> int:
    """The export's size, from the download's one connection."""
    return src.get_size()


def _export_size(source: ExportSource, client: str) -> int:
    """The export's size, asked with ``qemu-img info`` (the fallback client)."""
    from ._nbd_fallback import export_size

    return export_size(source)


def _copy_libnbd(
    source: ExportSource, dest: Target, progress: Progress | None, src: NBDHandle
) -> CopyStats:
    started = time.monotonic()
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

        def connect() -> NBDHandle:
            h = _new_handle()
            h.set_export_name(source.export_name)
            h.connect_unix(source.socket)
            return h

        with _nbd_digest.while_copying(connect, pieces, size, dest.path):
            if source.bitmap_context is None and _full_copy_engine == "qemu-img":
                src.shutdown()
                convert(dest.convert_args(source), planned, progress)
                written, zeroed = planned, 0
            else:
                written, zeroed = _copy_pipeline(src, pieces, dest, planned, progress)
                # before the digests finish: a server that takes one client at a time
                # (qemu-nbd's default) serves the digest reader only after this one left
                src.shutdown()
    finally:
        with contextlib.suppress(Exception):
            src.shutdown()
        del src
    return CopyStats(size, written, zeroed, planned, time.monotonic() - started, "libnbd")


def _copy_pipeline(
    src: NBDHandle,
    pieces: list[tuple[int, int, bool]],
    dest: Target,
    planned: int,
    progress: Progress | None,
) -> tuple[int, int]:
    mod = load_nbd()
    assert mod is not None
    dst = _new_handle()
    dst.connect_systemd_socket_activation(
        [
            "qemu-nbd",
            *key_objects(),
            "--image-opts",
            "--cache=unsafe",
            "--discard=ignore",
            dest.image_opts(),
        ]
    )
    try:
        written, zeroed = pipeline(src, dst, _requests(iter(pieces)), planned, progress, mod.Buffer)
        dst.flush()
    finally:
        with contextlib.suppress(Exception):
            dst.shutdown()
        del dst  # the last reference: libnbd closes it and reaps qemu-nbd, which has
        # written the image's metadata by the time it exits
    return written, zeroed


_CREATE_OPTS: Final = "cluster_size=65536"
"""The qcow2 options of every image a download makes."""


def create_target(dest: Path, size: int, backing: Path | None, backing_name: str | None) -> None:
    """Create the empty qcow2 image ``dest`` (LUKS-encrypted inside :func:`encrypted_layers`)
    of ``size`` bytes, over ``backing`` (recorded as ``backing_name``) when given."""
    create = ["create", "-q", "-f", "qcow2", *key_objects()]
    opts = _CREATE_OPTS
    if _ENCRYPTION.get() is not None:
        # The passphrase is 256 random-looking bits (derived from the repository key), not
        # a password: PBKDF stretching adds nothing but seconds to every open.
        opts += f",encrypt.format=luks,encrypt.key-secret={_SECRET_ID},encrypt.iter-time=10"
    create += ["-o", opts]
    if backing is not None:
        ref = backing_name
        if ref is None:
            same_dir = backing.parent.resolve() == dest.parent.resolve()
            ref = backing.name if same_dir else str(backing.absolute())
        # -u: the header records ``ref``; the backing is opened by its real path below
        create += ["-u", "-b", ref, "-F", "qcow2"]
    create_image(create, str(dest), str(size))


def create_image(create: list[str], dest: str, size: str) -> None:
    """``qemu-img CREATE… DEST SIZE``; retried when a LUKS create's PBKDF timing measured no
    CPU time ("Unable to get accurate CPU usage": a coarse thread clock on a busy host)."""
    for attempt in range(5):
        try:
            qemu_img(*create, dest, size)
            return
        except ToolError as exc:
            if "accurate CPU usage" not in exc.stderr or attempt == 4:
                raise
