"""The one seam that runs host image tools (``qemu-img``, ``qemu-io``; not libvirt, so it
lives outside _adapter).

:func:`run` looks the tool up on ``$PATH`` and runs it without a shell. A missing tool raises
:class:`UnsupportedError` naming the Debian package, a timeout :class:`OperationTimeoutError`,
a non-zero exit :class:`ToolError` with the command line, exit code, stderr and stdout, so
callers tell failures apart by those fields rather than by message text.

On top of it, host-side image inspection used by preflight checks that must look inside a
disk image without touching the guest, e.g. "does this qcow2 hold persistent dirty bitmaps?"
(an internal snapshot revert on such an image makes QEMU 7.2 exit with "Device has active
dirty bitmaps"). ``--force-share`` lets the inspection run while QEMU holds the image open;
bitmaps added while the domain runs are only written to the file when QEMU closes it, so
callers also ask libvirt for checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any, Final

from .errors import OperationTimeoutError, StateCaptureError, ToolError, UnsupportedError

__all__ = [
    "QEMU_IMG",
    "QEMU_IO",
    "executable",
    "image_info",
    "persistent_bitmaps",
    "qemu_img",
    "qemu_io",
    "run",
    "tool_error",
]

QEMU_IMG: Final = "qemu-img"
"""The executable looked up on ``$PATH``."""
QEMU_IO: Final = "qemu-io"


def executable(tool: str, operation: str) -> str:
    """The path of ``tool`` on ``$PATH``; :class:`UnsupportedError` when it is missing."""
    found = shutil.which(tool)
    if found is None:
        raise UnsupportedError(
            f"{tool} is not installed on this host, so statecapture cannot work on disk "
            "images with it; install it (Debian: qemu-utils)",
            operation=operation,
        )
    return found


def run(
    tool: str, *args: str, timeout: float | None = None, cwd: str | os.PathLike[str] | None = None
) -> str:
    """Run ``tool args…`` (in ``cwd`` when given: relative image names) and return its stdout.

    Raises :class:`UnsupportedError` when the tool is missing, :class:`OperationTimeoutError`
    after ``timeout`` seconds, :class:`ToolError` when it exits non-zero.
    """
    operation = " ".join((tool, *args[:1]))
    argv = (tool, *args)
    try:
        done = subprocess.run(
            [executable(tool, operation), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise OperationTimeoutError(
            f"{' '.join(argv[:3])} did not finish within {timeout} s", operation=operation
        ) from exc
    if done.returncode != 0:
        raise tool_error(argv, done.returncode, done.stderr, done.stdout)
    return done.stdout


def tool_error(argv: tuple[str, ...], exit_code: int, stderr: str, stdout: str) -> ToolError:
    """The :class:`ToolError` of a tool run (``argv``) that exited with ``exit_code``."""
    detail = (stderr or stdout).strip()[-2000:]
    return ToolError(
        f"{' '.join(argv[:3])} failed (exit {exit_code}): {detail}",
        argv=argv,
        exit_code=exit_code,
        stderr=stderr,
        stdout=stdout,
    )


def qemu_img(
    *args: str, timeout: float | None = None, cwd: str | os.PathLike[str] | None = None
) -> str:
    """Run ``qemu-img args…`` and return its stdout (errors as for :func:`run`)."""
    return run(QEMU_IMG, *args, timeout=timeout, cwd=cwd)


def qemu_io(*args: str, timeout: float | None = None) -> str:
    """Run ``qemu-io args…`` and return its stdout (errors as for :func:`run`)."""
    return run(QEMU_IO, *args, timeout=timeout)


def image_info(path: str, *, timeout: float = 30.0) -> Mapping[str, Any]:
    """``qemu-img info --force-share --output=json`` of the image at ``path``.

    Raises :class:`UnsupportedError` when qemu-img is missing, :class:`OperationTimeoutError`
    after ``timeout`` seconds, :class:`ToolError` when qemu-img fails (unreadable or not an
    image), :class:`StateCaptureError` when it prints no JSON object.
    """
    out = qemu_img("info", "--force-share", "--output=json", "--", path, timeout=timeout)
    try:
        info = json.loads(out)
    except json.JSONDecodeError as exc:
        raise StateCaptureError(f"qemu-img info {path!r} printed no JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise StateCaptureError(f"qemu-img info {path!r} printed unexpected JSON")
    return info


def persistent_bitmaps(path: str, *, timeout: float = 30.0) -> tuple[str, ...]:
    """Names of the persistent dirty bitmaps stored in the qcow2 image at ``path``.

    Empty for images of other formats and for qcow2 images without bitmaps.
    """
    info = image_info(path, timeout=timeout)
    if info.get("format") != "qcow2":
        return ()
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    bitmaps = data.get("bitmaps") if isinstance(data, dict) else None
    if not isinstance(bitmaps, list):
        return ()
    return tuple(str(b.get("name", "?")) for b in bitmaps if isinstance(b, dict))
