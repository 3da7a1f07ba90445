"""``python -m benchmarks._render RESULTS.json``: a results file as Markdown (for the docs).

Prints the machine line and the table of a run written by ``python -m benchmarks``, so the
figures quoted in ``docs/performance.md`` are pasted from a run, never retyped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._report import format_machine, format_markdown


def main(argv: list[str]) -> int:
    """Print the run's machine description and its table in Markdown."""
    if len(argv) != 1:
        print("usage: python -m benchmarks._render RESULTS.json", file=sys.stderr)
        return 2
    doc = json.loads(Path(argv[0]).read_text())
    print(f"Run of {doc['started_at']} ({doc['duration_s']:.0f} s), options {doc['options']}")
    print()
    print(format_machine(doc["machine"]))
    source = doc.get("extra", {}).get("source")
    if source:
        print(
            f"statecapture: git {source['git_head']}, {source['uncommitted_files']} uncommitted "
            f"file(s), sources {source['sha256']}"
        )
    print()
    print(format_markdown(doc))
    notes = [r for r in doc["rows"] if r["note"]]
    if notes:
        print()
        for r in notes:
            print(f"- [{r['item']}] {r['name']}: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
