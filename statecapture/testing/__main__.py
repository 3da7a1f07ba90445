"""``python -m statecapture.testing up|down|list``: a demo guest to try statecapture on.

``up`` creates an embedded QEMU root, boots the test guest there (agent answering), records
what it made in an owner-only state file and prints the URI and the domain name; the guest
keeps running after the command exits. Use it from a shell or a notebook
(``statecapture.connect(uri)``) or run the tour on it (``python -m statecapture.tour
--real``). ``down`` destroys and undefines the guest and removes the root, the disks and
the state file: nothing is left behind. ``list`` shows what is up.

libvirt lets one process at a time open an embedded root: close other connections to it
(a notebook kernel, a running tour) before ``down``.

The state lives in ``$STATECAPTURE_TESTING_STATE_DIR``, else
``$XDG_RUNTIME_DIR/statecapture-testing``, else ``/tmp/statecapture-testing-<uid>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import StateCaptureError, TestEnvironmentError
from .hypervisor import EmbeddedHypervisor

__all__ = ["DEFAULT_NAME", "main", "read_state", "state_dir", "state_file"]

#: Domain name of the demo guest.
DEFAULT_NAME = "sc-demo"


def state_dir() -> Path:
    """The owner-only directory that holds the demo's state file (not created here)."""
    env = os.environ.get("STATECAPTURE_TESTING_STATE_DIR")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "statecapture-testing"
    return Path(f"/tmp/statecapture-testing-{os.geteuid()}")


def state_file() -> Path:
    """Where ``up`` records the demo guest."""
    return state_dir() / "demo.json"


def _checked_dir(create: bool) -> Path | None:
    d = state_dir()
    if create:
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700, parents=True)
    try:
        st = d.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise TestEnvironmentError(
            f"state directory {d} is not an owner-only directory of this user",
            remedy=f"remove {d} or set STATECAPTURE_TESTING_STATE_DIR to a private directory",
        )
    return d


def read_state() -> dict[str, Any] | None:
    """The demo guest ``up`` recorded, or ``None`` when nothing is up."""
    if _checked_dir(create=False) is None:
        return None
    try:
        fd = os.open(state_file(), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        data: dict[str, Any] = json.load(f)
    return data


def _write_state(data: dict[str, Any]) -> None:
    _checked_dir(create=True)
    path = state_file()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)


def _up(args: argparse.Namespace) -> int:
    state = read_state()
    if state is not None:
        print(
            f"a demo guest is up already: {state['uri']} domain {state['domain']}\n"
            "stop it first: python -m statecapture.testing down",
            file=sys.stderr,
        )
        return 1
    hv = EmbeddedHypervisor().open()
    try:
        t0 = time.monotonic()
        guest = hv.guest(name=args.name, disks=args.disks, timeout=args.timeout)
        booted = time.monotonic() - t0
        data = {
            "uri": hv.uri,
            "root": str(hv.root),
            "workdir": str(hv.workdir),
            "domain": guest.name,
            "disks": [str(p) for p in guest.disk_paths],
            "console_log": str(guest.console_log_path),
        }
        _write_state(data)
    except BaseException:
        hv.close()
        raise
    hv.detach()
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"demo guest {data['domain']} is up (agent answered after {booted:.1f} s)")
    print(f"URI:     {data['uri']}")
    print(f"domain:  {data['domain']}")
    print("try:     python -m statecapture.tour --real")
    print(
        '         python -c "import statecapture as sc; '
        f"print(sc.connect('{data['uri']}').domain('{data['domain']}').capabilities())\""
    )
    print("stop:    python -m statecapture.testing down")
    return 0


def _down(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("no demo guest is up")
        return 0
    root = Path(state["root"])
    if root.exists():
        hv = EmbeddedHypervisor.attach(root, workdir=state.get("workdir"))
        hv.close()
    else:
        import shutil

        shutil.rmtree(state.get("workdir") or "/nonexistent", ignore_errors=True)
    state_file().unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state_dir().rmdir()
    print(f"demo guest {state['domain']} destroyed; {root} removed")
    return 0


def _list(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("no demo guest is up (python -m statecapture.testing up)")
        return 0
    hv = EmbeddedHypervisor.attach(Path(state["root"]))
    try:
        print(f"URI: {state['uri']}")
        for dom in hv.connection.domains():
            print(f"  {dom.name:20} {dom.state.value}")
    finally:
        hv.detach()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m statecapture.testing",
        description="Keep a real test guest (embedded QEMU) running to try statecapture on.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot the demo guest and print its URI")
    up.add_argument("--name", default=DEFAULT_NAME, help=f"domain name (default {DEFAULT_NAME})")
    up.add_argument("--disks", type=int, default=1, help="ext4 data disks (default 1)")
    up.add_argument("--timeout", type=float, default=300, help="boot timeout in seconds")
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    sub.add_parser("down", help="destroy the demo guest and remove everything it made")
    sub.add_parser("list", help="show the demo guest")
    args = parser.parse_args(argv)
    handler = {"up": _up, "down": _down, "list": _list}[args.command]
    try:
        return handler(args)
    except TestEnvironmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(note, file=sys.stderr)
        return 2
    except StateCaptureError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
