"""The machine description, the results table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ._common import Row

__all__ = [
    "describe_machine",
    "describe_source",
    "format_machine",
    "format_markdown",
    "format_table",
    "write_json",
]

_ROOT = Path(__file__).resolve().parent.parent

ITEMS = {
    1: "frozen window",
    2: "per-operation overhead (test:///default)",
    3: "scaling (fitted exponent k, 1.0 = linear)",
    4: "full pull backup throughput",
    5: "incremental efficiency",
    6: "push vs pull",
    7: "peak memory of a pull download",
    8: "backup repository (digests, verify, listing)",
}


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _virt() -> str:
    """Whether this machine is itself a VM (matters for TCG speed)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "virtual machine" if " hypervisor" in flags else "bare metal"


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python and the libvirt / QEMU / NBD tool versions."""
    import libvirt

    ver = libvirt.getVersion()
    load = os.getloadavg()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "host": _virt(),
        "kernel": platform.release(),
        "os": _first_line(["lsb_release", "-ds"]) or platform.platform(),
        "python": platform.python_version(),
        "libvirt": f"{ver // 1000000}.{ver // 1000 % 1000}.{ver % 1000}",
        "libvirt_python": _pkg_version("libvirt-python"),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "qemu_img": _first_line(["qemu-img", "--version"]),
        "nbdcopy": _first_line(["nbdcopy", "--version"]),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def describe_source() -> dict[str, Any]:
    """Which statecapture was measured: git HEAD, uncommitted changes, a hash of the sources.

    The hash covers every ``statecapture/**/*.py``; the run compares it at its start and end,
    so results from a tree that changed meanwhile are flagged.
    """
    import hashlib

    h = hashlib.sha256()
    for path in sorted((_ROOT / "statecapture").rglob("*.py")):
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(path.read_bytes())
    head = _first_line(["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(_ROOT), "status", "--porcelain", "--", "statecapture"],
        capture_output=True,
        text=True,
        check=False,
    )
    changed = len(status.stdout.splitlines()) if status.returncode == 0 else None
    return {"git_head": head, "uncommitted_files": changed, "sha256": h.hexdigest()[:16]}


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def format_machine(m: dict[str, Any]) -> str:
    """The machine description as a few lines of text."""
    load = ", ".join(str(x) for x in m.get("load_average_at_start", []))
    return "\n".join(
        [
            f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM ({m['host']}), "
            f"kernel {m['kernel']}, {m['os']}",
            f"software: Python {m['python']}, libvirt {m['libvirt']} "
            f"(libvirt-python {m['libvirt_python']}), {m['qemu']}, {m['nbdcopy']}",
            f"load average at start: {load}",
        ]
    )


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return ""
    return f"{row.ratio:.2f}x"


def format_table(rows: list[Row]) -> str:
    """One text table for every row, grouped by item, with the PASS/MISS column."""
    header = ("#", "measurement", "library", "reference", "ratio", "target", "result")
    lines: list[tuple[str, ...]] = []
    for row in rows:
        if row.na is not None:
            lines.append((str(row.item), row.name, f"n/a ({row.na})", "", "", "", ""))
            continue
        lines.append(
            (
                str(row.item),
                row.name,
                row.library,
                row.reference,
                _ratio(row),
                row.target,
                row.result,
            )
        )
    widths = [len(h) for h in header]
    for row, line in zip(rows, lines, strict=True):
        for i, cell in enumerate(line):
            if row.na is None or i < 2:  # an n/a reason runs on to the end of its line
                widths[i] = max(widths[i], len(cell))

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [fmt(header), fmt(tuple("-" * w for w in widths))]
    last_item = None
    for row, line in zip(rows, lines, strict=True):
        if row.item != last_item:
            if last_item is not None:
                out.append("")
            out.append(f"{row.item}. {ITEMS.get(row.item, '')}")
            last_item = row.item
        out.append(fmt(line))
    notes = [(r.item, r.name, r.note) for r in rows if r.note]
    if notes:
        out.append("")
        out.append("notes:")
        for item, name, note in notes:
            out.append(f"  [{item}] {name}: {note}")
    return "\n".join(out)


def write_json(
    path: Path,
    *,
    machine: dict[str, Any],
    options: dict[str, Any],
    rows: list[Row],
    started: float,
    extra: dict[str, Any],
) -> Path:
    """Write the run's results; returns the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine,
        "options": options,
        "rows": [r.as_json() for r in rows],
        "extra": extra,
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return path


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def format_markdown(doc: dict[str, Any]) -> str:
    """A JSON results document (as written by :func:`write_json`) as a Markdown table."""
    out = [
        "| # | measurement | library | reference | ratio | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        library = f"n/a ({row['na']})" if row["na"] is not None else row["library"]
        cells = [
            str(row["item"]),
            row["name"],
            library,
            row["reference"],
            ratio,
            row["target"],
            f"**{row['result']}**" if row["result"] == "MISS" else row["result"],
        ]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(out)
