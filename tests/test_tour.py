"""The tour (`nox -s demo`): runs every stop without an unexpected failure."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import statecapture
from statecapture import tour

ROOT = Path(__file__).resolve().parents[1]


def test_tour_on_the_embedded_default() -> None:
    """On test:///default every supported capability runs, the rest are explained."""
    out = io.StringIO()
    assert tour.run("test:///default", out=out) == 0
    text = out.getvalue()
    assert "tour-vm" in text
    assert "FAILED" not in text
    assert "snapshots: create, tree, revert, delete: tour-s1 -> tour-s2" in text
    assert "backup job (push, full): not on this driver" in text
    assert "backup repository: backup, restore, verify, prune: a running domain needs QEMU" in text
    assert "full (domain shut off, first backup), restored vda, verify ok" in text
    assert "Advice for 'tour-vm'" in text
    # The tour leaves nothing behind in the connection it used.
    with statecapture.connect("test:///default") as conn:
        assert "tour-vm" not in [d.name for d in conn.domains()]


def test_tour_command_line() -> None:
    """`python -m statecapture.tour` exits 0 on the default URI."""
    env_cmd = [sys.executable, "-m", "statecapture.tour", "test:///default"]
    out = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Capabilities, tried on 'tour-vm'" in out.stdout


@pytest.mark.qemu
def test_tour_on_real_qemu_runs_both_sequences(guest, qemu_uri: str) -> None:
    """With a real guest and its agent, the tour runs block jobs, backups and both sequences."""
    out = io.StringIO()
    failures = tour.run(qemu_uri, domain=guest.name, out=out)
    text = out.getvalue()
    assert failures == 0, text
    assert "sequence: direct backup (push, new checkpoint): application consistent" in text
    assert "sequence: backup via a temporary external snapshot: application consistent" in text
    assert "recover(): nothing left behind: clean" in text
    assert "backup repository: backup, restore, verify, prune: full (first backup), then " in text
    assert guest.block_jobs() == ()
    assert guest.active_backup() is None
