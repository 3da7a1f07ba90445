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


# ---------------------------------------------------------------- tests use the public API
# The rule (HACKING.md, "Tests reach into nothing private"): outside tests/_raw.py (the one
# documented seam: libvirt's own objects to act as another tool, the adapter to inject
# faults), a test file
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
_ADAPTER = "statecapture._adapter"  # fault injection at the adapter class (mocks inject faults)
PRIVATE_MODULES: dict[str, set[str]] = {
    "tests/_fleet_worker.py": {"statecapture._journal", "statecapture.fleet.run"},
    "tests/_kill_child.py": {"statecapture._backup", "statecapture._journal"},
    "tests/_proof_child.py": {_ADAPTER, "statecapture._backup", "statecapture._journal"},
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
    "tests/test_capabilities.py": {"statecapture._capabilities"},
    "tests/test_checkpoints.py": {_ADAPTER, "statecapture._checkpoint"},
    "tests/test_connection.py": {_ADAPTER},
    "tests/test_errors.py": {_ADAPTER, "statecapture._hints"},
    "tests/test_files.py": {"statecapture._files"},
    "tests/test_fleet.py": {
        "statecapture._connection",
        "statecapture._journal",
        "statecapture.fleet.run",
    },
    "tests/test_freeze.py": {_ADAPTER, "statecapture._freeze"},
    "tests/test_host_agent.py": {
        "statecapture._advisor",
        "statecapture._agent",
        "statecapture._host",
        "statecapture._memory",
    },
    "tests/test_journal.py": {"statecapture._journal"},
    "tests/test_memory.py": {"statecapture._memory"},
    "tests/test_plans.py": {_ADAPTER, "statecapture._freeze"},
    "tests/test_properties.py": {
        "statecapture._advisor",
        "statecapture._journal",
        "statecapture._nbd",
        "statecapture._restore",
    },
    "tests/test_qemu_freeze.py": {_ADAPTER, "statecapture._freeze"},
    "tests/test_qemu_recover.py": {"statecapture._journal"},
    "tests/test_qemu_sequences.py": {_ADAPTER, "statecapture._journal"},
    "tests/test_qemuimg.py": {"statecapture._qemuimg", "statecapture._restore"},
    "tests/test_recover.py": {_ADAPTER, "statecapture._backup", "statecapture._journal"},
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
    "tests/test_properties.py": {"_vir": "the fake Domain this file defines"},
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
