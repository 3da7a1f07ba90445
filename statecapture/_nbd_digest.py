"""Block digests taken from the NBD export while the copy runs (a backup repository's
``digests/`` files), instead of reading the stored image back afterwards.

A repository opens :func:`collecting` around its backup; while it is open, every libnbd
download (:func:`statecapture._nbd.copy_export`) starts a :class:`_Reader` thread next to
its copy. The reader opens a second connection to the same export (a backup job's export
is a point-in-time view, so both connections see the same bytes), reads every digest block
the copy's plan touches — for a full copy the blocks holding data, for an incremental the
blocks its dirty extents overlap — and hashes each whole block as the guest sees it. Reads
and hashing release the GIL, so the digests are computed on the other core while
``qemu-img convert`` (or the pipeline) copies. The result is filed under the new image's
inode (``st_dev``, ``st_ino``), which the image keeps when it is linked to its final name.

A copy that fails discards its reader's work; a reader that fails fails the copy. What the
repository does with the result (and how it checks it against the stored layer) is in
``statecapture._repository.backup``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from ._nbd_io import NBDHandle
from .errors import StateCaptureError

__all__ = ["BlockDigests", "Taken", "collecting", "file_key", "touched_blocks", "while_copying"]

_READ_BLOCKS: Final = 4
"""Digest blocks read per request (fewer round trips; at most this many blocks in memory
per reader thread)."""

_THREADS: Final = 2
"""Reader threads (connections): one reads while the other hashes."""


def file_key(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the file at ``path``: what results are filed under."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


@attrs.frozen
class Taken:
    """The digests one download took."""

    size: int
    """The disk's virtual size."""
    blocks: Mapping[int, str]
    """Block index → hex digest, for every block the copy's plan touches."""


@attrs.define(eq=False)
class BlockDigests:
    """Digests of ``block_size`` blocks, each hashed by a new ``new_hash()`` object."""

    block_size: int
    new_hash: Callable[[], Any]
    taken: dict[tuple[int, int], Taken] = attrs.field(factory=dict)
    """Results by :func:`file_key` of the downloaded image."""


_ACTIVE: contextvars.ContextVar[BlockDigests | None] = contextvars.ContextVar(
    "statecapture_block_digests", default=None
)


@contextlib.contextmanager
def collecting(digests: BlockDigests) -> Iterator[BlockDigests]:
    """While the block runs, libnbd downloads file their block digests in ``digests``."""
    token = _ACTIVE.set(digests)
    try:
        yield digests
    finally:
        _ACTIVE.reset(token)


def touched_blocks(pieces: Iterable[tuple[int, int, bool]], block: int) -> list[int]:
    """Sorted indices of the blocks the pieces ``(offset, length, is_data)`` overlap."""
    out: set[int] = set()
    for off, length, _data in pieces:
        if length > 0:
            out.update(range(off // block, (off + length - 1) // block + 1))
    return sorted(out)


class _Reader:
    """The threads that read and hash the wanted blocks of the export.

    :data:`_THREADS` threads, each on its own connection, take the next run of blocks in
    turn: one reads while another hashes (both release the GIL), so the export is not read
    one round trip at a time.
    """

    def __init__(
        self, connect: Callable[[], NBDHandle], blocks: list[int], size: int, sink: BlockDigests
    ) -> None:
        self._connect = connect
        self._blocks = blocks
        self._size = size
        self._sink = sink
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._todo = self._runs()
        self.result: dict[int, str] = {}
        self.error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"statecapture-digests-{i}")
            for i in range(_THREADS)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop after the current requests (the copy failed: the result is not wanted)."""
        self._stop.set()
        self.finish()

    def finish(self) -> None:
        """Wait until every wanted block is digested."""
        for t in self._threads:
            t.join()

    def _runs(self) -> Iterator[tuple[int, int]]:
        """``(first block, count)`` of consecutive wanted blocks, at most _READ_BLOCKS."""
        i = 0
        blocks = self._blocks
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and j - i < _READ_BLOCKS and blocks[j] == blocks[j - 1] + 1:
                j += 1
            yield blocks[i], j - i
            i = j

    def _next(self) -> tuple[int, int] | None:
        with self._lock:
            if self._stop.is_set() or self.error is not None:
                return None
            return next(self._todo, None)

    def _run(self) -> None:
        bs = self._sink.block_size
        try:
            h = self._connect()
            try:
                while (run := self._next()) is not None:
                    first, count = run
                    start = first * bs
                    data = memoryview(h.pread(min(count * bs, self._size - start), start))
                    for k in range(count):
                        hasher = self._sink.new_hash()
                        hasher.update(data[k * bs : (k + 1) * bs])
                        self.result[first + k] = hasher.hexdigest()
            finally:
                with contextlib.suppress(Exception):
                    h.shutdown()
                del h
        except BaseException as exc:  # reported by while_copying, in the copying thread
            with self._lock:
                if self.error is None:
                    self.error = exc


@contextlib.contextmanager
def while_copying(
    connect: Callable[[], NBDHandle],
    pieces: list[tuple[int, int, bool]],
    size: int,
    dest: str,
) -> Iterator[None]:
    """Digest the blocks ``pieces`` touch while the block copies them into ``dest``.

    A no-op unless :func:`collecting` is active. ``connect()`` opens a new connection to
    the export.
    """
    sink = _ACTIVE.get()
    if sink is None:
        yield
        return
    reader = _Reader(connect, touched_blocks(pieces, sink.block_size), size, sink)
    reader.start()
    try:
        yield
    except BaseException:
        reader.stop()
        raise
    reader.finish()
    if reader.error is not None:
        raise StateCaptureError(
            f"reading the export for block digests failed: {reader.error}"
        ) from reader.error
    sink.taken[file_key(dest)] = Taken(size, reader.result)
