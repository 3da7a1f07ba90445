"""Every libvirt constant statecapture writes as a literal equals libvirt's own value.

The table of values comes from libvirt's C headers (``/usr/include/libvirt/libvirt-*.h`` and
``virterror.h``, installed by libvirt-dev; CI installs it, so a missing header FAILS here, it
never skips). What is compared are statecapture's own literals, read from its source and
modules — never ``getattr(libvirt, NAME, literal)``, which would compare libvirt with itself
whenever the binding has the constant:

* every ``_const("VIR_…", literal)`` fallback anywhere in ``statecapture/``;
* the error codes each class of ``statecapture/errors.py`` maps (``cls.codes``), against the
  libvirt names they are meant to be;
* the error-code literals the adapter compares with (``code == 8``, the connection-loss
  rule's error domains and codes).

Codes newer than the installed headers are pinned in :data:`NEWER_THAN_HEADERS` (with the
libvirt release that added them); when the headers do have them, the headers win.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from statecapture import _adapter, errors
from statecapture._adapter import domain, events, translate

HEADERS = Path("/usr/include/libvirt")
PACKAGE = Path(__file__).resolve().parents[1] / "statecapture"

#: Constants newer than libvirt 9.0's headers: name -> (value, libvirt release that added it).
NEWER_THAN_HEADERS: dict[str, tuple[int, str]] = {
    "VIR_ERR_AGENT_COMMAND_TIMEOUT": (112, "11.2.0"),
    "VIR_ERR_AGENT_COMMAND_FAILED": (113, "11.2.0"),
}

#: The libvirt error names each statecapture error class stands for.
CLASS_CODES: dict[type[errors.LibvirtError], set[str]] = {
    errors.NotFoundError: {
        "VIR_ERR_NO_DOMAIN",
        "VIR_ERR_NO_NETWORK",
        "VIR_ERR_NO_STORAGE_POOL",
        "VIR_ERR_NO_STORAGE_VOL",
        "VIR_ERR_NO_NODE_DEVICE",
        "VIR_ERR_NO_SECRET",
        "VIR_ERR_NO_NWFILTER",
        "VIR_ERR_NO_DOMAIN_SNAPSHOT",
        "VIR_ERR_NO_DOMAIN_METADATA",
        "VIR_ERR_DEVICE_MISSING",
        "VIR_ERR_NO_NWFILTER_BINDING",
        "VIR_ERR_NO_DOMAIN_CHECKPOINT",
        "VIR_ERR_NO_DOMAIN_BACKUP",
        "VIR_ERR_NO_NETWORK_PORT",
        "VIR_ERR_NO_INTERFACE",
    },
    errors.UnsupportedError: {
        "VIR_ERR_NO_SUPPORT",
        "VIR_ERR_CONFIG_UNSUPPORTED",
        "VIR_ERR_ARGUMENT_UNSUPPORTED",
        "VIR_ERR_OPERATION_UNSUPPORTED",
        "VIR_ERR_NO_CONNECT",  # an unknown URI scheme: no driver, nothing was connected
    },
    errors.InvalidStateError: {
        "VIR_ERR_OPERATION_INVALID",
        "VIR_ERR_SNAPSHOT_REVERT_RISKY",
        "VIR_ERR_BLOCK_COPY_ACTIVE",
        "VIR_ERR_RESOURCE_BUSY",
        "VIR_ERR_DOM_EXIST",
    },
    errors.GuestAgentError: {
        "VIR_ERR_AGENT_UNRESPONSIVE",
        "VIR_ERR_AGENT_UNSYNCED",
        "VIR_ERR_AGENT_COMMAND_TIMEOUT",
        "VIR_ERR_AGENT_COMMAND_FAILED",
    },
    errors.OperationTimeoutError: {"VIR_ERR_OPERATION_TIMEOUT"},
    errors.CheckpointInconsistentError: {"VIR_ERR_CHECKPOINT_INCONSISTENT"},
    errors.ConnectionLostError: {"VIR_ERR_INVALID_CONN", "VIR_ERR_RPC"},
}

#: Error names behind the integer literals the adapter compares error codes with.
ADAPTER_CODE_LITERALS = {"VIR_ERR_INVALID_ARG", "VIR_ERR_RPC"}
#: The connection-loss rule's error domains and generic codes (``is_connection_loss``).
ADAPTER_LOSS_DOMAINS = {"VIR_FROM_RPC", "VIR_FROM_REMOTE"}
ADAPTER_LOSS_CODES = {"VIR_ERR_INTERNAL_ERROR", "VIR_ERR_SYSTEM_ERROR"}

_ENUM = re.compile(r"typedef\s+enum\s*(?:\w+\s*)?\{(.*?)\}\s*\w+\s*;", re.S)
_ENTRY = re.compile(r"^\s*(VIR_\w+)\s*(?:=\s*(.+?))?\s*$", re.S)


def _eval(expr: str, known: dict[str, int]) -> int:
    """Evaluate an enum initializer: integers, names defined earlier, ``<<``, ``|``, ``-``."""
    tree = ast.parse(re.sub(r"(\d)[UL]+\b", r"\1", expr))

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression | ast.Expr):
            return ev(node.body if isinstance(node, ast.Expression) else node.value)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return known[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.LShift):
                return a << b
            if isinstance(node.op, ast.BitOr):
                return a | b
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
        raise ValueError(f"cannot evaluate {expr!r}")

    return ev(tree.body[0])


def header_constants() -> dict[str, int]:
    """``VIR_*`` enum values from the installed libvirt headers (fails if they are absent)."""
    files = [*sorted(HEADERS.glob("libvirt-*.h")), HEADERS / "virterror.h"]
    missing = [f for f in files if not f.is_file()]
    assert HEADERS.is_dir() and not missing and len(files) > 5, (
        f"libvirt headers missing in {HEADERS} ({missing}): install libvirt-dev"
    )
    table: dict[str, int] = {}
    pending = files
    for _ in range(len(files)):  # enums may name constants of a header parsed later
        retry = []
        for header in pending:
            try:
                table.update(_header_enums(header, table))
            except KeyError:
                retry.append(header)
        pending = retry
    assert not pending, f"unresolvable enum values in {pending}"
    return table


def _header_enums(header: Path, known: dict[str, int]) -> dict[str, int]:
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    text = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    got: dict[str, int] = {}
    for body in _ENUM.findall(text):
        nxt = 0
        for raw in body.split(","):
            if not raw.strip():
                continue
            m = _ENTRY.match(raw)
            assert m, f"{header.name}: cannot parse enum entry {raw!r}"
            name, expr = m.groups()
            value = _eval(expr.strip(), {**known, **got}) if expr else nxt
            got[name] = value
            nxt = value + 1
    return got


@pytest.fixture(scope="module")
def table() -> dict[str, int]:
    got = header_constants()
    for name, (value, _since) in NEWER_THAN_HEADERS.items():
        got.setdefault(name, value)
    return got


def _const_calls() -> list[tuple[str, int, str, int]]:
    """``(file, line, NAME, literal)`` for every ``_const("NAME", literal)`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name | ast.Attribute)
                and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == "_const"
            ):
                name, literal = node.args
                assert isinstance(name, ast.Constant) and isinstance(name.value, str)
                value = ast.literal_eval(literal)
                found.append((path.name, node.lineno, name.value, value))
    return found


def test_header_parser_reads_known_values() -> None:
    """The header parser gets implicit, shifted and negative enum values right (so a
    passing comparison below means something)."""
    got = header_constants()
    assert got["VIR_ERR_OK"] == 0 and got["VIR_ERR_NO_DOMAIN"] == 42
    assert got["VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE"] == 1 << 9
    assert got["VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT"] == -1
    assert got["VIR_DOMAIN_RUNNING"] == 1 and got["VIR_DOMAIN_SHUTOFF"] == 5
    assert len(got) > 1000


def test_newer_constants_are_really_newer_or_agree() -> None:
    """A pinned newer-than-headers value either is absent from the headers or equals them."""
    got = header_constants()
    for name, (value, _since) in NEWER_THAN_HEADERS.items():
        assert got.get(name, value) == value, name


def test_every_const_fallback_equals_the_header_value(table: dict[str, int]) -> None:
    """Each ``_const("VIR_…", literal)`` in statecapture falls back to libvirt's value."""
    calls = _const_calls()
    assert len(calls) >= 9, calls  # the scan found the adapter package's fallbacks
    wrong = [
        f"{file}:{line}: {name} = {literal}, libvirt says {table.get(name)}"
        for file, line, name, literal in calls
        if table.get(name) != literal
    ]
    assert wrong == []


def test_const_returns_its_literal_without_the_binding_constant() -> None:
    """``_const`` returns the literal when the binding lacks the name (what older bindings
    get), so the literals checked above are what runs there."""
    assert _adapter._const("VIR_STATECAPTURE_NOT_A_CONSTANT", 12345) == 12345


def test_error_classes_map_exactly_the_named_libvirt_codes(table: dict[str, int]) -> None:
    """Each error class's ``codes`` are exactly the values of the libvirt names it stands for."""
    for cls, names in CLASS_CODES.items():
        assert cls.codes == {table[n] for n in names}, cls.__name__
    mapped = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and vars(cls).get("codes")  # LibvirtError maps none
    }
    assert mapped == set(CLASS_CODES), "a class maps codes this table does not name"


def _adapter_code_literals() -> set[int]:
    """Integer literals the adapter compares an error code with (``code == 8`` ...)."""
    found: set[int] = set()
    nodes = (
        node
        for path in sorted((PACKAGE / "_adapter").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
    )
    for node in nodes:
        if not isinstance(node, ast.Compare):
            continue
        left = ast.unparse(node.left)
        if "code" not in left:
            continue
        for comp in node.comparators:
            values = comp.elts if isinstance(comp, ast.Tuple | ast.Set) else [comp]
            found.update(
                v.value for v in values if isinstance(v, ast.Constant) and type(v.value) is int
            )
    return found


def test_adapter_error_code_literals_equal_the_header_values(table: dict[str, int]) -> None:
    """The error-code literals in the adapter are the libvirt codes they are meant to be."""
    assert _adapter_code_literals() == {table[n] for n in ADAPTER_CODE_LITERALS}
    assert {table[n] for n in ADAPTER_LOSS_DOMAINS} == translate._FROM_RPC
    assert {table[n] for n in ADAPTER_LOSS_CODES} == translate._LOSS_CODES_FROM_RPC


#: The adapter's integer -> name tables, with the libvirt enum prefix each integer comes from.
ENUM_TABLES = {
    "_LIFECYCLE_EVENTS": ("VIR_DOMAIN_EVENT_", events._LIFECYCLE_EVENTS),
    "_BLOCK_JOB_STATUS": ("VIR_DOMAIN_BLOCK_JOB_", events._BLOCK_JOB_STATUS),
    "_STATE_NAMES": ("VIR_DOMAIN_", domain._STATE_NAMES),
    "_BLOCK_JOB_KINDS": ("VIR_DOMAIN_BLOCK_JOB_TYPE_", domain._BLOCK_JOB_KINDS),
}


@pytest.mark.parametrize("table_name", sorted(ENUM_TABLES))
def test_adapter_enum_tables_match_the_headers(table: dict[str, int], table_name: str) -> None:
    """Each integer the adapter maps to a name is libvirt's value for that name (e.g.
    ``_STATE_NAMES[5] == "shutoff"`` because ``VIR_DOMAIN_SHUTOFF = 5``)."""
    prefix, mapping = ENUM_TABLES[table_name]
    wrong = {}
    for value, name in mapping.items():
        if name == "unknown" and value == 0:
            header = f"{prefix}UNKNOWN"
        else:
            header = prefix + name.upper().replace("-", "_")
        if table.get(header) != value:
            wrong[value] = (name, header, table.get(header))
    assert wrong == {}
