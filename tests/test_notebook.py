"""docs/tour.ipynb runs from top to bottom without an error, on this interpreter.

The notebook is executed with nbclient in a kernel started from ``sys.executable`` (a
kernelspec written into a temporary Jupyter path), so it sees this checkout's statecapture
and libvirt binding. It connects to ``test:///default`` only, so nothing on the host changes.
The stored notebook keeps no outputs: they would go stale and bloat diffs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tour.ipynb"

_MISSING = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]


def test_stored_notebook_has_no_outputs() -> None:
    """Every code cell is stored unexecuted: no outputs, no execution count."""
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [], cell["source"]
        assert cell["execution_count"] is None, cell["source"]


@pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {_MISSING} (pip install .[notebook])")
def test_tour_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executing every cell raises nothing; the domain, snapshots, checkpoint tree and advice
    render (the HTML views appear in the outputs)."""
    import nbformat
    from nbclient import NotebookClient

    # A kernelspec for this very interpreter, found through a private JUPYTER_PATH.
    spec_dir = tmp_path / "jupyter" / "kernels" / "statecapture-tests"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "statecapture tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="statecapture-tests",
        timeout=120,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    html = [
        out["data"]["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "data" in out and "text/html" in out["data"]
    ]
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert len(html) >= 5, "connection, domain, snapshots, checkpoints and advice render as HTML"
    assert any("monday" in h and "wednesday" in h for h in html)
    assert "monday\n    tuesday\n        wednesday" in text
    assert "Advice for domain 'test'" in text
