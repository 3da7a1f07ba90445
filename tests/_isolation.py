"""Session-end isolation check: what the test session made must be gone when it ends.

Fixture cleanup may suppress errors (a half-dead guest must not stop the teardown of the
next one), so nothing there proves that the cleanup worked. This module keeps the record
that the session-end hook in ``tests/conftest.py`` checks:

* :func:`track` registers a directory the session made outside pytest's temporary tree
  (embed roots, short socket directories): it must not exist at the end, and no
  ``qemu-system``/``qemu-nbd`` process may mention it on its command line;
* :func:`record_leak` notes something a teardown could not remove (a domain still defined);
* :func:`qemu_processes` finds QEMU and qemu-nbd processes started by this process (its
  descendants) or running on a tracked path;
* :func:`problems` lists everything left behind; an empty list means the session was clean.

Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

__all__ = ["make_embed_root", "problems", "qemu_processes", "record_leak", "track", "tracked"]

_lock = threading.Lock()
_tracked: list[Path] = []
_leaks: list[str] = []


def track(path: Path | str) -> Path:
    """Register *path* (made by this session outside pytest's tmp tree); returns it."""
    p = Path(path)
    with _lock:
        if p not in _tracked:
            _tracked.append(p)
    return p


def tracked() -> list[Path]:
    """The registered paths, in registration order."""
    with _lock:
        return list(_tracked)


def record_leak(message: str) -> None:
    """Note something a teardown left behind (reported at session end)."""
    with _lock:
        _leaks.append(message)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 4, after the parenthesised command name (which may itself contain spaces).
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        parent = _ppid(pid)
        if parent is None:
            return False
        if parent == ancestor:
            return True
        pid, seen = parent, seen + 1
    return False


def qemu_processes(paths: list[Path] | None = None) -> list[tuple[int, str]]:
    """``(pid, cmdline)`` of qemu-system/qemu-nbd processes that are descendants of this
    process or mention one of *paths* (default: the tracked paths) on their command line."""
    me = os.getpid()
    needles = [str(p).encode() for p in (tracked() if paths is None else paths)]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        with contextlib.suppress(OSError):
            raw = (proc / "cmdline").read_bytes()
            if not raw:
                continue  # a zombie or a kernel thread
            cmdline = raw.replace(b"\0", b" ")
            exe = Path(raw.split(b"\0", 1)[0].decode(errors="replace")).name
            if not (exe.startswith("qemu-system") or exe == "qemu-nbd"):
                continue
            if any(n in cmdline for n in needles) or _descends_from(int(proc.name), me):
                found.append((int(proc.name), cmdline.decode(errors="replace")[:200]))
    return found


def problems(search: list[Path] | None = None) -> list[str]:
    """Everything the session left behind; processes mentioning a path in ``search`` (for
    example the session's temporary directory, which may itself remain) count too."""
    paths = tracked()
    out: list[str] = []
    with _lock:
        out.extend(_leaks)
    out.extend(
        f"{path} still exists (made by this session outside pytest's tmp)"
        for path in paths
        if path.exists() or path.is_symlink()
    )
    out.extend(
        f"process {pid} still runs: {cmdline}"
        for pid, cmdline in qemu_processes(paths + list(search or ()))
    )
    return out


def make_embed_root(prefix: str = "sce-") -> Path:
    """A fresh, short, prepared embed root under ``/tmp`` (``statecapture.testing.kit``),
    registered with :func:`track` (it must be gone when the session ends); the caller
    removes it."""
    from statecapture.testing.kit import make_embed_root as make

    return track(make(prefix))
