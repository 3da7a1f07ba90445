"""The one seam for host image tools (``_qemuimg.run``) raises a typed :class:`ToolError`."""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

import statecapture
from statecapture import _qemuimg
from statecapture._restore import _first_difference

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def test_tool_error_fields(tmp_path: Path) -> None:
    """A failing qemu-img raises ToolError carrying argv, exit code, stderr and stdout, and
    the error pickles with them."""
    missing = str(tmp_path / "missing.qcow2")
    with pytest.raises(statecapture.ToolError) as info:
        _qemuimg.qemu_img("info", "--output=json", missing)
    exc = info.value
    assert isinstance(exc, statecapture.StateCaptureError)
    assert exc.argv == ("qemu-img", "info", "--output=json", missing)
    assert exc.exit_code == 1
    assert "No such file" in exc.stderr and exc.stdout == ""
    assert "failed (exit 1)" in str(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.argv, back.exit_code, back.stderr) == (exc.argv, exc.exit_code, exc.stderr)


def test_missing_tool_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool not on PATH is UnsupportedError naming the package, not a ToolError."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(statecapture.UnsupportedError, match="qemu-utils"):
        _qemuimg.qemu_io("--version")


def test_compare_offset_from_exit_code(tmp_path: Path) -> None:
    """verify's first difference comes from compare's exit code 1 and its stdout, not from
    the error message."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(p), "1M"], check=True)
    assert _first_difference(str(a), str(b)) is None
    with b.open("r+b") as f:
        f.seek(70000)
        f.write(b"x")
    assert _first_difference(str(a), str(b)) == 69632
