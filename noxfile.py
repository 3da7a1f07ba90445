"""Developer and CI entry points: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``demo``.

Each session installs what it needs. System packages (libvirt headers, QEMU, the guest-kit
tools) come from ``scripts/install-deps.sh`` via apt when missing; that needs root, as on
CI and these development machines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent
PYTHON = "3.11"


def _system_deps(session: nox.Session) -> None:
    """Install Debian packages the project needs, when any is missing."""
    script = ROOT / "scripts" / "install-deps.sh"
    if os.environ.get("STATECAPTURE_NO_APT") == "1":
        session.log("STATECAPTURE_NO_APT=1: not installing system packages")
        return
    session.run("bash", str(script), external=True)


def _install(session: nox.Session, *extras: str) -> None:
    _system_deps(session)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite: fast tier (test driver) and real tier (embedded QEMU guests)."""
    _install(session, "test", "docs", "notebook", "fleet")
    args = session.posargs or ["-q"]
    session.run("python", "-m", "pytest", *args, env={"PYTHONUNBUFFERED": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    _install(session, "test")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors."""
    _install(session, "docs")
    out = ROOT / "docs" / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", str(out))


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The tour: connect to the default URI and walk every capability the driver supports.

    ``nox -s demo -- --real`` runs it on a real QEMU guest (statecapture.testing).
    """
    _install(session)
    session.run("python", "-m", "statecapture.tour", *session.posargs)


@nox.session(python=PYTHON)
def example(session: nox.Session) -> None:
    """The documented example test (docs/examples) as an external user runs it: the package
    installed (not editable), pytest started in a temporary directory outside the tree."""
    _system_deps(session)
    session.install(".", "pytest>=8")
    tmp = Path(tempfile.mkdtemp(prefix="statecapture-example-"))  # outside the tree
    try:
        for name in ("conftest.py", "test_with_real_guest.py"):
            shutil.copy2(ROOT / "docs" / "examples" / name, tmp / name)
        session.chdir(tmp)
        session.run(
            "python",
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            env={"STATECAPTURE_REQUIRE_QEMU": "1"},
        )
    finally:
        session.chdir(ROOT)
        shutil.rmtree(tmp, ignore_errors=True)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against raw libvirt-python and external tools (prints ratios, writes JSON)."""
    _install(session, "test", "fleet")
    session.run("python", "-m", "benchmarks", *session.posargs)
