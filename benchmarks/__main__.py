"""``python -m benchmarks``: run the benchmarks, print one table, write the JSON results."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from . import MODULE_NAMES, modules
from ._common import Context, Row, Unavailable
from ._report import (
    describe_machine,
    describe_source,
    format_machine,
    format_table,
    write_json,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = list(MODULE_NAMES)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="statecapture against raw libvirt-python and external tools.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repetitions (a smoke run; the ratios are not meaningful)",
    )
    p.add_argument(
        "--only",
        default=",".join(names),
        help=f"comma-separated modules to run (default: all of {','.join(names)})",
    )
    p.add_argument(
        "--data-mib",
        type=int,
        default=None,
        help="MiB of incompressible data on the guest's data disk, which is twice as large "
        "(default 1024; 64 with --quick)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default: per module)")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON results")
    p.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    args.only = wanted
    if args.data_mib is None:
        args.data_mib = 64 if args.quick else 1024
    if args.data_mib < 16:
        p.error("--data-mib must be at least 16")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: the guest must not outlive us


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; 0 when every module ran (targets may still be missed)."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    json_path: Path | None = None
    if not args.no_json:
        json_path = args.json or RESULTS / time.strftime(
            "%Y%m%d-%H%M%S.json", time.localtime(started)
        )
        json_path.parent.mkdir(parents=True, exist_ok=True)
    # The embedded QEMU driver runs in this process and logs to stderr (tainted domains,
    # the tear-down of scratch files ...): send that next to the JSON file instead. Read
    # once, when libvirt is loaded: no module imported so far loads it.
    if json_path is not None:
        log_file = json_path.with_suffix(".libvirt.log")
        os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{log_file}")
    else:
        os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", "4:stderr")

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    machine = describe_machine()
    source = describe_source()
    print(format_machine(machine), flush=True)
    print(
        f"statecapture: git {source['git_head']}, {source['uncommitted_files']} uncommitted "
        f"file(s), sources {source['sha256']}",
        flush=True,
    )
    # Test-driver modules first: once booted, the TCG guest keeps one core busy.
    selected = sorted(
        (m for m in modules() if m.NAME in args.only), key=lambda m: bool(m.NEEDS_GUEST)
    )
    guest_holder: list[Any] = []

    def make_guest() -> Any:
        from ._guest import BenchGuest

        guest = BenchGuest.create(data_mib=args.data_mib, log=log)
        guest_holder.append(guest)
        return guest

    ctx = Context(
        quick=args.quick,
        data_mib=args.data_mib,
        reps=args.reps,
        guest_factory=make_guest if any(m.NEEDS_GUEST for m in selected) else None,
        log=log,
    )
    rows: list[Row] = []
    failed = False
    try:
        for module in selected:
            log(f"{module.NAME} ...")
            t0 = time.monotonic()
            try:
                got = module.run(ctx)
            except Unavailable as exc:
                got = [Row.unavailable(module.ITEM, module.TITLE, str(exc))]
            except Exception as exc:  # report, and still run the other modules
                failed = True
                traceback.print_exc()
                got = [Row.unavailable(module.ITEM, module.TITLE, f"failed: {exc!r}"[:160])]
            rows.extend(got)
            log(f"{module.NAME} done in {time.monotonic() - t0:.1f}s")
    finally:
        for guest in guest_holder:
            guest.close()
    rows.sort(key=lambda r: r.item)
    source_after = describe_source()
    if source_after["sha256"] != source["sha256"]:
        print(
            "\nWARNING: statecapture's sources changed during the run "
            f"({source['sha256']} -> {source_after['sha256']}): modules imported after the "
            "change (child processes) measured other code; run again for figures to quote.",
            flush=True,
        )
    guest_info = guest_holder[0].describe() if guest_holder else None
    print()
    print(format_table(rows))
    print(f"\ntotal {time.time() - started:.0f} s")
    if json_path is not None:
        options = {
            "quick": args.quick,
            "only": args.only,
            "data_mib": args.data_mib,
            "reps": args.reps,
        }
        written = write_json(
            json_path,
            machine=machine,
            options=options,
            rows=rows,
            started=started,
            extra={"guest": guest_info, "source": source, "source_after": source_after},
        )
        print(f"results written to {written}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
