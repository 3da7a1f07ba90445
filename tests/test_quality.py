"""Static quality gates run as part of the suite, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict_clean() -> None:
    """`mypy --strict` (configured in pyproject.toml) reports no error in the package."""
    pytest.importorskip("mypy")
    out = _run(sys.executable, "-m", "mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_clean() -> None:
    """ruff lint and format checks pass over the whole tree."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff not installed")
    lint = _run(ruff, "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run(ruff, "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_only_the_adapter_imports_libvirt() -> None:
    """House rule: statecapture/_adapter.py is the one module that imports libvirt."""
    offenders = []
    for path in (ROOT / "statecapture").rglob("*.py"):
        if path.name == "_adapter.py":
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import libvirt", "from libvirt")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert offenders == []
