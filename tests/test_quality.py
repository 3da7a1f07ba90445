"""Static quality gates run as part of the suite, so CI enforces them."""

from __future__ import annotations

import ast
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
    """House rule: statecapture/_adapter/ is the one package that imports libvirt."""
    offenders = []
    adapter = ROOT / "statecapture" / "_adapter"
    for path in (ROOT / "statecapture").rglob("*.py"):
        if path.is_relative_to(adapter):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import libvirt", "from libvirt")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert offenders == []


# ---------------------------------------------------------------- modules that fit in a head
# HACKING.md: "No module above ~800 lines". A module may stay above the limit only while it is
# listed here with the reason; remove the entry when the module is split.
MODULE_MAX_LINES = 800
OVERSIZED_MODULES: dict[str, str] = {}


def test_no_module_above_the_line_limit() -> None:
    """Every module under statecapture/ has at most MODULE_MAX_LINES lines, except those
    OVERSIZED_MODULES lists with a reason; a listed module that fits again must be unlisted."""
    too_long: list[str] = []
    fits: list[str] = []
    for path in sorted((ROOT / "statecapture").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MODULE_MAX_LINES and rel not in OVERSIZED_MODULES:
            too_long.append(f"{rel}: {lines} lines (split it by concept)")
        elif lines <= MODULE_MAX_LINES and rel in OVERSIZED_MODULES:
            fits.append(f"{rel}: {lines} lines (remove it from OVERSIZED_MODULES)")
    missing = [rel for rel in OVERSIZED_MODULES if not (ROOT / rel).is_file()]
    assert too_long == [] and fits == [] and missing == []


# ---------------------------------------------------------------- tests use the public API
# The rule (HACKING.md, "Tests reach into nothing private"): outside tests/_raw.py (the one
# documented seam: libvirt's own objects to act as another tool), a test file
#   * never imports tests._harness (gone: statecapture.testing is the test kit);
#   * never reads or writes an attribute whose name starts with "_" (dunders and IPython's
#     "_repr_*_" display protocol excepted) — except on self/cls, on a module or object that
#     is not statecapture's (sys._getframe, lxml's etree._Element), and on a statecapture
#     module the file names in PRIVATE_MODULES: a unit test of that module, or its fault
#     hook (``_journal._fault_hook``), reaches its private names on purpose;
#   * imports a private statecapture module (a dotted path with a "_" part) only when it is
#     listed for that file in PRIVATE_MODULES;
#   * reaches a private attribute of a statecapture object only where PRIVATE_ATTRIBUTES
#     lists it for that file, with the reason (unit tests of a private planner, fakes).
# Code inside strings (child-process scripts) is not checked.

SEAM = "tests/_raw.py"
_ADAPTER = "statecapture._adapter"  # unit tests of the adapter's rules, constants, event loop
PRIVATE_MODULES: dict[str, set[str]] = {
    "tests/_fleet_worker.py": {"statecapture._journal", "statecapture.fleet.run"},
    "tests/_kill_child.py": {"statecapture._backup", "statecapture._journal"},
    "tests/_proof_child.py": {"statecapture._backup", "statecapture._journal"},
    "tests/_repo_kill_child.py": {"statecapture._journal"},
    "tests/_verify_kit.py": {_ADAPTER},
    "tests/test_adapter_constants.py": {_ADAPTER},
    "tests/test_advisor.py": {"statecapture._advisor", "statecapture._journal"},
    "tests/test_advisor_guide.py": {"statecapture._advisor"},
    "tests/test_backup.py": {
        "statecapture._backup",
        "statecapture._nbd",
        "statecapture._nbd_digest",
        "statecapture._repository",
        "statecapture._restore",
    },
    "tests/test_bitmaps.py": {
        "statecapture._bitmaps",
        "statecapture._locks",
        "statecapture.xml._checkpoint",
    },
    "tests/test_blockjobs.py": {_ADAPTER, "statecapture._blockjob"},
    "tests/test_capabilities.py": {_ADAPTER, "statecapture._capabilities"},
    "tests/test_checkpoints.py": {"statecapture._checkpoint"},
    "tests/test_connection.py": {_ADAPTER},
    "tests/test_errors.py": {_ADAPTER, "statecapture._hints"},
    "tests/test_files.py": {"statecapture._files"},
    "tests/test_fleet.py": {
        "statecapture._connection",
        "statecapture._journal",
        "statecapture.fleet.run",
    },
    "tests/test_freeze.py": {"statecapture._freeze"},
    "tests/test_host_agent.py": {
        "statecapture._advisor",
        "statecapture._agent",
        "statecapture._host",
        "statecapture._memory",
    },
    "tests/test_journal.py": {"statecapture._journal"},
    "tests/test_memory.py": {"statecapture._memory"},
    "tests/test_plans.py": {"statecapture._freeze"},
    "tests/test_properties.py": {
        "statecapture._advisor",
        "statecapture._journal",
        "statecapture._nbd",
        "statecapture._restore",
    },
    "tests/test_qemu_freeze.py": {"statecapture._freeze"},
    "tests/test_qemu_recover.py": {"statecapture._journal"},
    "tests/test_qemu_sequences.py": {"statecapture._journal"},
    "tests/test_qemuimg.py": {"statecapture._qemuimg", "statecapture._restore"},
    "tests/test_recover.py": {"statecapture._backup", "statecapture._journal"},
    "tests/test_repository_instant.py": {"statecapture._nbd", "statecapture._repository"},
    "tests/test_repository_unit.py": {"statecapture._repository"},
    "tests/test_sequences.py": {"statecapture._journal"},
    "tests/test_snapshot_xml.py": {"statecapture._snapshot"},
    "tests/test_snapshots.py": {"statecapture._qemuimg", "statecapture._version"},
}
PRIVATE_ATTRIBUTES: dict[str, dict[str, str]] = {
    "tests/test_checkpoints.py": {"_plan_disks": "unit test of the checkpoint disk planner"},
    "tests/test_snapshots.py": {"_plan": "unit test of the snapshot planner"},
    "tests/test_fleet.py": {"_correct_state": "distributed.LocalCluster's, not ours"},
    "tests/test_recover.py": {
        "_add_files": "fault injection: the record write fails once the image is linked"
    },
}


def _is_private(name: str) -> bool:
    if name.startswith("__") and name.endswith("__"):
        return False
    if name.startswith("_repr_") and name.endswith("_"):  # IPython's display protocol
        return False
    return name.startswith("_")


def _is_statecapture_module(dotted: str, root: Path) -> bool:
    if dotted != "statecapture" and not dotted.startswith("statecapture."):
        return False
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _bound_modules(tree: ast.Module, root: Path) -> dict[str, str]:
    """Local name -> dotted module for every ``import``/``from ... import`` of a module."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if not full.startswith("statecapture") or _is_statecapture_module(full, root):
                    bound[alias.asname or alias.name] = full
    return bound


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _allowed_module(dotted: str, allowed: set[str]) -> bool:
    return any(dotted == m or dotted.startswith(m + ".") for m in allowed)


def _privacy_offences(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    allowed = PRIVATE_MODULES.get(rel, set())
    attrs_ok = PRIVATE_ATTRIBUTES.get(rel, {})
    tree = ast.parse(path.read_text(), filename=rel)
    bound = _bound_modules(tree, root)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.level or not node.module:
                continue
            else:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                if name == "tests._harness" or name.startswith("tests._harness."):
                    found.append(f"{where}: imports {name} (use statecapture.testing)")
                private = any(_is_private(p) for p in name.split(".")[1:])
                if (
                    name.startswith("statecapture.")
                    and private
                    and _is_statecapture_module(name, root)
                    and not _allowed_module(name, allowed)
                ):
                    found.append(f"{where}: imports private module {name}")
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        chain = _dotted(node)
        if chain is not None:
            if chain[0] in ("self", "cls"):
                continue
            module = bound.get(chain[0])
            if module is not None:
                full = ".".join([module, *chain[1:]])
                if not module.startswith("statecapture"):
                    continue  # the standard library's or a third party's private name
                if _allowed_module(full, allowed):
                    continue
        if node.attr in attrs_ok:
            continue
        found.append(f"{where}: reaches {ast.unparse(node)} (use the public API or {SEAM})")
    return found


def test_tests_use_only_public_api() -> None:
    """No test imports tests._harness or reaches a private attribute of a statecapture
    object; private statecapture modules are imported only by the files that unit-test
    them (or use their fault hook), as listed here; tests/_raw.py is the one seam."""
    assert not (ROOT / "tests" / "_harness").exists()
    offences: list[str] = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() != SEAM:
            offences.extend(_privacy_offences(path))
    assert offences == []


def test_privacy_rule_catches_reaches(tmp_path: Path) -> None:
    """The rule above flags ``dom._vir``, ``x._raw``, a tests._harness import and an
    unlisted private module, and lets self, third-party names and dunders through."""
    source = (
        "import sys\n"
        "from tests._harness.agent import guest_exec\n"
        "from statecapture import _journal\n"
        "def f(dom, self):\n"
        "    dom._vir.xml_desc()\n"
        "    dom._vir._raw.abortJob()\n"
        "    _journal._fault_hook = None\n"
        "    self._x = sys._getframe().__class__\n"
    )
    (tmp_path / "tests").mkdir()
    probe = tmp_path / "tests" / "test_sample.py"
    probe.write_text(source)
    (tmp_path / "statecapture").mkdir()
    (tmp_path / "statecapture" / "__init__.py").write_text("")
    (tmp_path / "statecapture" / "_journal.py").write_text("")
    offences = _privacy_offences(probe, tmp_path)
    text = "\n".join(offences)
    assert "imports tests._harness.agent" in text
    assert "imports private module statecapture._journal" in text
    assert "reaches dom._vir " in text and "reaches dom._vir._raw " in text
    assert "_journal._fault_hook" in text  # the module is not listed for this file
    assert "sys._getframe" not in text and "self._x" not in text


# ---------------------------------------------------------------- faults go through the ports
# Fault injection and call spying use statecapture.testing.faults (a pass-through in front of
# a handle's port): no test names an adapter class, and none patches a port object.
_ADAPTER_CLASSES = frozenset({"VirConnection", "VirDomain", "VirSnapshot", "VirCheckpoint"})


def _fault_offences(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if isinstance(node, ast.Name | ast.Attribute | ast.alias):
            if isinstance(node, ast.alias):
                name = node.name
            if name in _ADAPTER_CLASSES:
                found.append(f"{where}: names the adapter class {name}")
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            target = ast.unparse(node.args[0])
            if func.endswith("setattr") and (target.endswith(".port") or "port(" in target):
                found.append(f"{where}: patches a port ({ast.unparse(node)})")
    return found


def test_faults_are_injected_through_the_ports() -> None:
    """No test names an adapter class (VirDomain ...) or patches a port object: faults and
    call spies go through statecapture.testing.faults (docs/testing.md, "Injecting
    faults")."""
    offences: list[str] = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        offences.extend(_fault_offences(path))
    assert offences == []


def test_fault_rule_catches_patches(tmp_path: Path) -> None:
    """The rule above flags an adapter class import, a class patch and a port patch."""
    (tmp_path / "tests").mkdir()
    probe = tmp_path / "tests" / "test_sample.py"
    probe.write_text(
        "from statecapture._adapter import VirDomain\n"
        "def test(monkeypatch, dom):\n"
        "    monkeypatch.setattr(VirDomain, 'fs_thaw', None)\n"
        "    monkeypatch.setattr(dom.port, 'fs_thaw', None)\n"
    )
    text = "\n".join(_fault_offences(probe, tmp_path))
    assert "test_sample.py:1: names the adapter class VirDomain" in text
    assert "test_sample.py:3: names the adapter class VirDomain" in text
    assert "test_sample.py:4: patches a port" in text
