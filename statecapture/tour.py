"""The tour: ``python -m statecapture.tour [URI]`` (also ``nox -s demo``).

Connects to the default URI (``$LIBVIRT_DEFAULT_URI``, else ``test:///default``), lists the
domains with their disks, then walks every capability statecapture offers, running each on
this driver where it can and saying plainly which it cannot do and why. On
``test:///default`` everything happens inside this process: nothing on the host changes.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import TextIO

import statecapture
from statecapture import Connection, Domain, StateCaptureError, UnsupportedError

__all__ = ["main", "run"]

Stop = Callable[[Connection, Domain, TextIO], str]
"""A tour stop: runs one capability, returns a one-line outcome."""

STOPS: list[tuple[str, Stop]] = []


def stop(title: str) -> Callable[[Stop], Stop]:
    def register(fn: Stop) -> Stop:
        STOPS.append((title, fn))
        return fn

    return register


@stop("domain lifecycle (suspend / resume)")
def _lifecycle(conn: Connection, dom: Domain, out: TextIO) -> str:
    if not dom.is_active:
        return "skipped: the domain is not running"
    dom.suspend()
    paused = dom.state
    dom.resume()
    return f"suspended ({paused.value}) and resumed ({dom.state.value})"


def _pick_domain(conn: Connection) -> Domain | None:
    running = [d for d in conn.domains() if d.is_active]
    return running[0] if running else None


def run(uri: str | None = None, out: TextIO = sys.stdout) -> int:
    """Run the tour; returns the number of stops that failed unexpectedly."""
    failures = 0
    with statecapture.connect(uri) as conn:
        v = conn.versions
        print(f"Connected to {conn.uri}: {v.driver} driver, libvirt {v.daemon}", file=out)
        print(f"  client library {v.library}, hypervisor {v.hypervisor}", file=out)
        print("\nDomains:", file=out)
        for dom in conn.domains():
            print(f"  {dom.name:20} {dom.state.value:10} {dom.uuid}", file=out)
            for disk in dom.disks:
                chain = " <- ".join(s or "?" for s in disk.chain)
                print(
                    f"      {disk.target:5} {disk.device:6} {disk.format or '?':6} {chain}",
                    file=out,
                )
            agent = "yes" if dom.has_agent_channel else "no"
            print(f"      guest-agent channel: {agent}", file=out)
        dom = _pick_domain(conn)
        if dom is None:
            print("\nNo running domain: nothing to demonstrate on.", file=out)
            return 0
        print(f"\nCapabilities, tried on {dom.name!r}:", file=out)
        for title, fn in STOPS:
            try:
                outcome = fn(conn, dom, out)
            except UnsupportedError as exc:
                outcome = f"not on this driver: {exc.libvirt_message or exc}"
            except StateCaptureError as exc:
                outcome = f"refused: {exc}"
            except Exception:  # a bug in the tour itself must not hide the other stops
                failures += 1
                outcome = "FAILED:\n" + traceback.format_exc()
            print(f"  - {title}: {outcome}", file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m statecapture.tour", description=__doc__)
    parser.add_argument("uri", nargs="?", default=None, help="libvirt URI (default: see above)")
    args = parser.parse_args(argv)
    return 1 if run(args.uri) else 0


if __name__ == "__main__":
    raise SystemExit(main())
