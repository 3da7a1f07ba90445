"""Host-side image inspection with ``qemu-img`` (not libvirt, so it lives outside _adapter).

Used by preflight checks that must look inside a disk image without touching the guest, e.g.
"does this qcow2 hold persistent dirty bitmaps?" (an internal snapshot revert on such an image
makes QEMU 7.2 exit with "Device has active dirty bitmaps"). ``--force-share`` lets the
inspection run while QEMU holds the image open; bitmaps added while the domain runs are only
written to the file when QEMU closes it, so callers also ask libvirt for checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any, Final

from .errors import OperationTimeoutError, StateCaptureError, UnsupportedError

__all__ = ["QEMU_IMG", "image_info", "persistent_bitmaps"]

QEMU_IMG: Final = "qemu-img"
"""The executable looked up on ``$PATH``."""


def _executable() -> str:
    found = shutil.which(QEMU_IMG)
    if found is None:
        raise UnsupportedError(
            f"{QEMU_IMG} is not installed on this host, so statecapture cannot inspect disk "
            "images before changing them; install it (Debian: qemu-utils)",
            operation="qemu-img info",
        )
    return found


def image_info(path: str, *, timeout: float = 30.0) -> Mapping[str, Any]:
    """``qemu-img info --force-share --output=json`` of the image at ``path``.

    Raises :class:`UnsupportedError` when qemu-img is missing, :class:`OperationTimeoutError`
    after ``timeout`` seconds, :class:`StateCaptureError` when qemu-img fails (unreadable or
    not an image).
    """
    argv = [_executable(), "info", "--force-share", "--output=json", "--", path]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise OperationTimeoutError(
            f"qemu-img info {path!r} did not finish within {timeout} s",
            operation="qemu-img info",
        ) from exc
    if done.returncode != 0:
        raise StateCaptureError(
            f"qemu-img info {path!r} failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    try:
        info = json.loads(done.stdout)
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
