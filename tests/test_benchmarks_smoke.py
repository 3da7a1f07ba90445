"""Smoke test of the benchmarks (``benchmarks/``): the quick, test-driver-only part runs.

No timing is asserted: the benchmarks measure, the test suite only keeps their code working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_overhead_and_scaling_run(tmp_path: Path) -> None:
    """`python -m benchmarks --quick --only overhead,scaling` prints its table and writes the
    JSON results, with one row per operation and a fitted exponent per scaling series."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "overhead,scaling",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2. per-operation overhead" in proc.stdout
    assert "3. scaling" in proc.stdout
    assert "machine:" in proc.stdout
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["item"] for r in rows} == {2, 3}
    assert all(r["result"] in ("PASS", "MISS") for r in rows), rows
    names = {r["name"] for r in rows if r["item"] == 2}
    assert {"domain lookup", "snapshot delete (by name)", "checkpoint create"} <= names
    scaling = [r for r in rows if r["item"] == 3]
    assert len(scaling) == 4
    assert all(isinstance(r["values"]["library_exponent"], float) for r in scaling)
    assert doc["machine"]["cores"] >= 1


def test_unknown_module_is_refused() -> None:
    """`--only` with an unknown module name fails with a usage error, running nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nosuch", "--no-json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown module" in proc.stderr


def test_fit_exponent_recovers_the_power() -> None:
    """The least-squares fit of log(time) on log(n) returns the exponent of a power law."""
    from benchmarks._common import fit_exponent

    ns = [10, 100, 1000]
    assert abs(fit_exponent(ns, [2e-6 * n for n in ns]) - 1.0) < 1e-9
    assert abs(fit_exponent(ns, [3e-7 * n**2 for n in ns]) - 2.0) < 1e-9
