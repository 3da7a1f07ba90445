"""statecapture.testing: the real-hypervisor kit users test their own code with.

Fast tier: typed errors with remedies for a machine that cannot run the guest, bad roots
refused before anything is created, the opt-in plugin's exact skip reason, the CLI's state
handling. Real tier: TestGuest's agent methods, flush_host_images making an outside read
valid, a boot timeout leaving nothing behind, ``up``/``down`` leaving nothing behind, and
the documented example test file passing from outside the source tree against a copy of
the package as the wheel ships it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import statecapture
from statecapture.testing import (
    EmbeddedHypervisor,
    GuestBootError,
    TestEnvironmentError,
    TestGuest,
    agent_command,
    environment_problem,
    guest_exec,
    read_guest_file,
    wait_agent,
    write_guest_file,
)
from statecapture.testing import hypervisor as hv_module
from statecapture.testing import kit as kit_module

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 900) -> Any:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _qemu_cmdlines() -> list[str]:
    """Full command lines of the QEMU processes on this machine."""
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in line:
                lines.append(line)
    return lines


def _env(**extra: str) -> dict[str, str]:
    drop = {"STATECAPTURE_SKIP_QEMU", "STATECAPTURE_REQUIRE_QEMU", "STATECAPTURE_TESTING_STATE_DIR"}
    keep = {"PYTEST_DEBUG_TEMPROOT"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and (k in keep or not k.startswith("PYTEST_"))
    }
    env.update(extra)
    return env


# ============================================================================ fast tier


def test_test_named_classes_are_not_collected(tmp_path: Path) -> None:
    """Importing TestGuest / TestEnvironmentError into a test module adds no test class."""
    (tmp_path / "test_imports.py").write_text(
        "from statecapture.testing import TestGuest, TestEnvironmentError\n"
        "def test_nothing():\n    pass\n"
    )
    out = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
        ],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(REPO)),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 test collected" in out.stdout
    assert "PytestCollectionWarning" not in out.stdout + out.stderr


def test_errors_carry_remedy_and_console_log_and_pickle() -> None:
    """Both errors keep their remedy / console log (also as a note) across pickling."""
    env_err = TestEnvironmentError("no qemu", remedy="apt-get install qemu-utils", missing=("x",))
    assert "remedy: apt-get install qemu-utils" in str(env_err)
    boot = GuestBootError("no agent", domain_name="g", console_log="Linux version", remedy="r")
    for err in (env_err, boot):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert back.remedy == err.remedy
    back = pickle.loads(pickle.dumps(boot))
    assert back.console_log == "Linux version" and back.timed_out
    assert any("Linux version" in n for n in back.__notes__)
    assert isinstance(boot, TestEnvironmentError) and isinstance(
        boot, statecapture.StateCaptureError
    )


def test_missing_packages_are_named_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine without QEMU's tools or libvirt's QEMU driver gets the Debian package names
    and the apt-get line (faults injected: the tools and the driver are reported absent)."""
    monkeypatch.delenv("STATECAPTURE_SKIP_QEMU", raising=False)
    monkeypatch.setattr(kit_module, "_which", lambda name: None)
    monkeypatch.setattr(kit_module.glob, "glob", lambda pattern: [])
    problem = environment_problem()
    assert problem is not None
    for package in ("qemu-system-x86", "qemu-utils", "e2fsprogs", "libvirt-daemon-driver-qemu"):
        assert package in problem.missing
        assert package in problem.remedy
    assert problem.remedy.startswith("apt-get install")


def test_skip_env_is_reported_as_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """STATECAPTURE_SKIP_QEMU=1 is a reason of its own, named exactly."""
    monkeypatch.setenv("STATECAPTURE_SKIP_QEMU", "1")
    problem = environment_problem()
    assert problem is not None and str(problem).startswith("STATECAPTURE_SKIP_QEMU=1")


@pytest.mark.parametrize("kind", ["long", "not-empty", "symlink", "file"])
def test_bad_roots_are_refused_before_anything_is_made(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root that is too long, in use (not empty), a symlink or a file raises
    TestEnvironmentError with a remedy; nothing is created or removed."""
    monkeypatch.setattr(hv_module, "environment_problem", lambda: None)
    short = Path(f"/tmp/sct-{os.getpid()}")
    assert not short.exists()
    if kind == "long":
        root = tmp_path / ("r" * 40)
    elif kind == "not-empty":
        root = tmp_path / "r"
        root.mkdir()
        (root / "keep").write_text("mine")
    elif kind == "symlink":
        root = short
        root.symlink_to(tmp_path)
    else:
        root = short
        root.write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        with pytest.raises(TestEnvironmentError) as info:
            EmbeddedHypervisor(root).open()
        assert info.value.remedy
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        if kind == "not-empty":
            assert (root / "keep").read_text() == "mine"
        if kind == "long":
            assert not root.exists()
    finally:
        if short.is_symlink() or short.is_file():
            short.unlink()


def test_plugin_skips_marked_tests_with_the_exact_reason(tmp_path: Path) -> None:
    """With the plugin opted in, a ``requires_qemu`` test and a fixture user are skipped with
    environment_problem()'s text, remedy included."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["statecapture.testing"]\n')
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.requires_qemu\n"
        "def test_marked():\n    raise AssertionError('ran')\n"
        "def test_fixture(sc_guest):\n    raise AssertionError('ran')\n"
    )
    out = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
            "-W",
            "error",
        ],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(REPO), STATECAPTURE_SKIP_QEMU="1"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    reason = "statecapture.testing: STATECAPTURE_SKIP_QEMU=1 (remedy: unset STATECAPTURE_SKIP_QEMU)"
    assert out.stdout.count(reason) == 2, out.stdout
    assert "2 skipped" in out.stdout


def test_plugin_is_not_auto_loaded(tmp_path: Path) -> None:
    """Installing statecapture adds no fixtures to other projects' runs (opt-in only)."""
    (tmp_path / "test_y.py").write_text("def test_y(sc_guest):\n    pass\n")
    out = _run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}"],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(REPO)),
    )
    assert "fixture 'sc_guest' not found" in out.stdout


def test_cli_down_and_list_with_nothing_up(tmp_path: Path) -> None:
    """``down`` and ``list`` with nothing up say so and succeed."""
    env = _env(PYTHONPATH=str(REPO), STATECAPTURE_TESTING_STATE_DIR=str(tmp_path / "state"))
    for cmd, text in (("down", "no demo guest is up"), ("list", "no demo guest is up")):
        out = _run([sys.executable, "-m", "statecapture.testing", cmd], cwd=tmp_path, env=env)
        assert out.returncode == 0 and text in out.stdout, out.stderr


def test_cli_refuses_a_state_dir_others_can_write(tmp_path: Path) -> None:
    """A state directory that is not owner-only is refused with a remedy (exit 2)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    env = _env(PYTHONPATH=str(REPO), STATECAPTURE_TESTING_STATE_DIR=str(state))
    out = _run([sys.executable, "-m", "statecapture.testing", "list"], cwd=tmp_path, env=env)
    assert out.returncode == 2 and "owner-only" in out.stderr and "remedy" in out.stderr


def test_cleanup_failure_never_masks_the_tests_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that cannot be removed raises CleanupError from close(); leaving a ``with``
    block on an error attaches it as a note instead (fault injected: removal fails)."""
    from types import SimpleNamespace

    from statecapture.testing import guest as guest_module

    def failing_remove(vir: object) -> None:
        raise statecapture.CleanupError("domain g still defined after teardown: [undefine: x]")

    monkeypatch.setattr(guest_module, "remove_domain", failing_remove)
    hv = SimpleNamespace(_forget=lambda guest: None)
    dom = SimpleNamespace(port=None, name="g")

    def make() -> TestGuest:
        return TestGuest(hv, dom, (), tmp_path / "log", tmp_path)  # type: ignore[arg-type]

    with pytest.raises(statecapture.CleanupError, match="still defined"):
        make().close()
    with pytest.raises(KeyError) as info, make():
        raise KeyError("the test's own failure")
    assert any("still defined" in note for note in info.value.__notes__)


def test_testing_public_names_are_pinned_and_documented() -> None:
    """statecapture.testing's public names are exactly these, each with a docstring."""
    import statecapture.testing as testing

    assert set(testing.__all__) == {
        "GuestKit",
        "EmbeddedHypervisor",
        "TestGuest",
        "agent_command",
        "guest_exec",
        "read_guest_file",
        "write_guest_file",
        "wait_agent",
        "environment_problem",
        "make_data_disk",
        "TestEnvironmentError",
        "GuestBootError",
        "KitBuildError",
    }
    for name in testing.__all__:
        assert getattr(testing, name).__doc__, name
    assert TestEnvironmentError is statecapture.TestEnvironmentError
    assert issubclass(testing.KitBuildError, TestEnvironmentError)


def test_wheel_ships_the_testing_package() -> None:
    """setuptools' package discovery from pyproject.toml includes statecapture.testing."""
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "statecapture.testing" in find_packages(where=str(REPO), include=include)


# ============================================================================ real tier


@pytest.mark.qemu
def test_guest_methods_reach_into_the_guest(
    qemu_hypervisor: EmbeddedHypervisor, tmp_path: Path
) -> None:
    """exec (with stdin, exit code, stderr), write, read, sha256 and sync work through the
    agent; ``domain`` is a statecapture Domain; close removes the domain."""
    import hashlib

    guest = qemu_hypervisor.guest(workdir=tmp_path, name=f"sc-{os.getpid()}-methods")
    with guest:
        assert isinstance(guest.domain, statecapture.Domain)
        assert guest.exec(["sh", "-c", "cat; echo e >&2; exit 3"], input=b"in\n") == (
            3,
            b"in\n",
            b"e\n",
        )
        data = os.urandom(100_000)
        guest.write("/data/blob", data)
        guest.sync()
        assert guest.read("/data/blob") == data
        assert guest.sha256("/data/blob") == hashlib.sha256(data).hexdigest()
        # the same on any Domain with an agent
        write_guest_file(guest.domain, "/data/small", b"x\n")
        assert read_guest_file(guest.domain, "/data/small") == b"x\n"
        assert guest_exec(guest.domain, ["cat", "/data/small"]) == (0, b"x\n", b"")
        assert agent_command(guest.domain, {"execute": "guest-ping"}) == {}
        assert wait_agent(guest.domain, timeout=60) >= 0
        with pytest.raises(statecapture.GuestAgentError):
            guest.read("/data/does-not-exist")
    names = [d.name for d in qemu_hypervisor.connection.domains()]
    assert guest.name not in names


@pytest.mark.qemu
def test_flush_host_images_makes_an_outside_read_valid(
    qemu_hypervisor: EmbeddedHypervisor, tmp_path: Path
) -> None:
    """After sync + suspend + flush_host_images, a file the guest wrote is in the image as
    read from outside QEMU (qemu-img + debugfs)."""
    with qemu_hypervisor.guest(workdir=tmp_path, name=f"sc-{os.getpid()}-flush") as guest:
        data = os.urandom(300_000)
        guest.write("/data/outside", data)
        guest.sync()
        guest.domain.suspend()
        guest.flush_host_images()
        raw = tmp_path / "copy.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(guest.disk_paths[0]), str(raw)],
            check=True,
        )
        # debugfs does not replay ext4's journal; e2fsck does (on our copy only), so what is
        # compared is QEMU's cache, not the guest file system's journalling.
        subprocess.run(["e2fsck", "-fy", str(raw)], check=False, capture_output=True)
        dumped = tmp_path / "dumped"
        subprocess.run(
            ["debugfs", "-R", f"dump /outside {dumped}", str(raw)], check=True, capture_output=True
        )
        assert dumped.read_bytes() == data


@pytest.mark.qemu
def test_boot_timeout_raises_with_console_log_and_leaves_nothing(
    qemu_hypervisor: EmbeddedHypervisor, tmp_path: Path
) -> None:
    """A guest whose agent does not answer in time raises GuestBootError carrying the console
    log; the domain is destroyed and undefined before the error propagates."""
    name = f"sc-{os.getpid()}-timeout"
    with pytest.raises(GuestBootError) as info:
        qemu_hypervisor.guest(workdir=tmp_path, name=name, timeout=2)
    err = info.value
    assert err.timed_out and err.domain_name == name and err.remedy
    log = (tmp_path / f"{name}.console.log").read_text(errors="replace")
    assert err.console_log == log[-4000:]
    assert name not in [d.name for d in qemu_hypervisor.connection.domains()]
    assert not [line for line in _qemu_cmdlines() if f"guest={name}," in line]


@pytest.mark.qemu
def test_second_root_in_one_process_is_refused(qemu_hypervisor: EmbeddedHypervisor) -> None:
    """While this process holds its embedded root, another EmbeddedHypervisor (any root)
    raises TestEnvironmentError naming the remedy, and creates no directory."""
    other = Path(f"/tmp/sct2-{os.getpid()}")
    for root in (None, other):
        with pytest.raises(TestEnvironmentError, match="open already") as info:
            EmbeddedHypervisor(root).open()
        assert "subprocess" in info.value.remedy
    assert not other.exists()


def _leftovers(state: dict[str, Any]) -> list[str]:
    left = [p for p in (state["root"], state["workdir"]) if Path(p).exists()]
    left += [line for line in _qemu_cmdlines() if state["root"] in line]
    return left


@pytest.mark.qemu
def test_cli_up_then_down_leaves_nothing_behind(tmp_path: Path) -> None:
    """``up`` leaves a guest running after the command exits (agent answering, URI printed);
    ``down`` removes it: no QEMU process, no root, no disks, no state file."""
    import json

    state_dir = tmp_path / "state"
    env = _env(PYTHONPATH=str(REPO), STATECAPTURE_TESTING_STATE_DIR=str(state_dir))
    name = f"sc-{os.getpid()}-demo"
    cli = [sys.executable, "-m", "statecapture.testing"]
    up = _run([*cli, "up", "--name", name, "--json"], cwd=tmp_path, env=env)
    state: dict[str, Any] | None = None
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout.strip().splitlines()[-1])
        assert state["domain"] == name
        assert (state_dir / "demo.json").stat().st_mode & 0o777 == 0o600
        assert any(state["root"] in line for line in _qemu_cmdlines())
        listed = _run([*cli, "list"], cwd=tmp_path, env=env)
        assert f"{name}" in listed.stdout and "running" in listed.stdout, listed.stderr
    finally:
        down = _run([*cli, "down"], cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert state is not None
    assert _leftovers(state) == []
    assert not state_dir.exists()


def _install_like_a_wheel(site: Path) -> None:
    """Copy what the wheel ships (pyproject's package discovery and package data) to site."""
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = config.get("package-data", {})
    for package in find_packages(where=str(REPO), include=config["packages"]["find"]["include"]):
        src = REPO / package.replace(".", "/")
        dst = site / package.replace(".", "/")
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            shutil.copy2(f, dst / f.name)
        for pattern in data.get(package, []):
            for f in src.glob(pattern):  # patterns may name subdirectories (_advisor/...)
                target = dst / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


@pytest.mark.qemu
def test_documented_example_passes_from_outside_the_source_tree(tmp_path: Path) -> None:
    """docs/examples (conftest.py + test_with_real_guest.py) passes in a temporary directory
    against the package as installed, not the source tree."""
    site, project = tmp_path / "site", tmp_path / "project"
    site.mkdir()
    project.mkdir()
    _install_like_a_wheel(site)
    for f in ("conftest.py", "test_with_real_guest.py"):
        shutil.copy2(EXAMPLES / f, project / f)
    env = _env(PYTHONPATH=str(site), STATECAPTURE_REQUIRE_QEMU="1")
    where = _run(
        [sys.executable, "-c", "import statecapture.testing as t; print(t.__file__)"],
        cwd=project,
        env=env,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    out = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
            "-W",
            "error",
        ],
        cwd=project,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "3 passed" in out.stdout
