"""The tour: ``python -m statecapture.tour [URI] [--domain NAME]`` (also ``nox -s demo``).

Connects to the default URI (``$LIBVIRT_DEFAULT_URI``, else ``test:///default``), lists the
domains with their disks and what the driver can do, asks the advisor for a sample domain,
then walks every capability statecapture offers: it runs each one this driver supports and
says plainly which it cannot do and why.

On ``test:///default`` the tour defines its own sample domain ``tour-vm`` (a qcow2 disk and
a guest-agent channel); everything happens inside this process and nothing on the host
changes. Pointed at a real QEMU domain (``--domain``) with a connected guest agent, it also
runs both documented backup sequences into a temporary directory that it removes afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

import statecapture
from statecapture import Connection, Domain, StateCaptureError, UnsupportedError

__all__ = ["main", "run"]

Stop = Callable[[Connection, Domain, Path], str]
"""A tour stop: runs one capability on a domain (with a scratch directory), returns a line."""

STOPS: list[tuple[str, tuple[str, ...], Stop]] = []
"""(title, capabilities the stop needs, function)."""

TOUR_DOMAIN_XML = """<domain type='test'>
  <name>tour-vm</name>
  <memory unit='MiB'>512</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/tour-vm.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


def stop(title: str, *needs: str) -> Callable[[Stop], Stop]:
    """Register a tour stop under ``title``; ``needs`` names the capabilities it uses."""

    def register(fn: Stop) -> Stop:
        STOPS.append((title, needs, fn))
        return fn

    return register


@stop("lifecycle: suspend / resume")
def _lifecycle(conn: Connection, dom: Domain, scratch: Path) -> str:
    dom.suspend()
    paused = dom.state
    dom.resume()
    return f"suspended ({paused.value}), resumed ({dom.state.value})"


@stop("filesystem freeze: with fs_frozen(dom)", "fs_freeze")
def _freeze(conn: Connection, dom: Domain, scratch: Path) -> str:
    with statecapture.fs_frozen(dom, max_frozen=5.0) as scope:
        count = scope.frozen_count
    return (
        f"{count} filesystem(s) frozen for {scope.frozen_for * 1000:.1f} ms, "
        f"then thawed ({scope.status.value})"
    )


@stop("checkpoints: create, tree, delete", "checkpoint")
def _checkpoints(conn: Connection, dom: Domain, scratch: Path) -> str:
    c1 = dom.checkpoints.create("tour-c1")
    c2 = dom.checkpoints.create("tour-c2")
    try:
        parent = c2.parent
        tree = f"{c1.name} -> {c2.name} (parent of c2: {parent.name if parent else None})"
    finally:
        c1.delete(children=True)
    return f"{tree}; deleted both, {len(dom.checkpoints)} left"


@stop("snapshots: create, tree, revert, delete", "snapshot")
def _snapshots(conn: Connection, dom: Domain, scratch: Path) -> str:
    s1 = dom.snapshots.create("tour-s1", description="first")
    s2 = dom.snapshots.create("tour-s2")
    try:
        kinds = f"{s1.kind.value}, {s2.kind.value}"
        parent = s2.parent
        s1.revert()
        current = dom.snapshots.current
        reverted = current.name if current else None
    finally:
        s1.delete(children=True)
    return (
        f"{s1.name} -> {s2.name} ({kinds}; parent of s2: {parent.name if parent else None}); "
        f"reverted to {reverted}; deleted, {len(dom.snapshots)} left"
    )


@stop("managed save: stop with memory kept, start resumes", "managed_save")
def _managed_save(conn: Connection, dom: Domain, scratch: Path) -> str:
    result = dom.managed_save()
    has = dom.has_managed_save
    dom.start()
    return (
        f"saved (guest down {result.downtime:.3f} s, image kept: {has}); "
        f"start resumed it ({dom.state.value}, image left: {dom.has_managed_save})"
    )


@stop("save / restore: memory state in a file you manage", "save")
def _save_restore(conn: Connection, dom: Domain, scratch: Path) -> str:
    path = scratch / f"{dom.name}.save"
    image = dom.save(path)
    saved = image.result
    restored = conn.restore(path)
    path.unlink()
    downtime = f"{saved.downtime:.3f} s" if saved is not None else "n/a"
    return f"saved to {path.name} (downtime {downtime}); restored ({restored.state.value})"


def _first_disk(dom: Domain) -> str:
    return next(d.target for d in dom.disks if d.device == "disk")


@stop("block commit: fold an overlay back", "block_commit")
def _block_commit(conn: Connection, dom: Domain, scratch: Path) -> str:
    disk = dom.disk(_first_disk(dom))
    if not disk.backing:
        return "nothing to commit: the disk has no backing chain (see the sequences below)"
    with dom.block_commit(disk.target) as job:
        job.wait_ready(timeout=120)
        job.pivot()
    return f"committed {disk.target} into its backing file and pivoted"


@stop("block copy (not the recommended backup path)", "block_copy")
def _block_copy(conn: Connection, dom: Domain, scratch: Path) -> str:
    target = _first_disk(dom)
    with dom.block_copy(target, scratch / "copy.qcow2") as job:
        job.wait_ready(timeout=300)
        job.abort()
    return f"copied {target} and ended the job without pivot"


@stop("backup job (push, full)", "backup")
def _backup(conn: Connection, dom: Domain, scratch: Path) -> str:
    with dom.backup(mode="push", target_dir=scratch / "push") as job:
        job.wait()
        result = job.result
    total = result.bytes_written if result is not None else 0
    return f"pushed {total} bytes for {', '.join(job.disks)}"


def _copy_files(dest: Path) -> Callable[[Mapping[str, Path]], None]:
    def copy(bases: Mapping[str, Path]) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for disk, path in bases.items():
            shutil.copyfile(path, dest / f"{disk}.img")

    return copy


@stop("sequence: backup via a temporary external snapshot", "snapshot", "block_commit")
def _sequence_snapshot(conn: Connection, dom: Domain, scratch: Path) -> str:
    result = statecapture.backup_via_temporary_snapshot(
        dom, _copy_files(scratch / "via-snapshot"), quiesce="best-effort"
    )
    return f"{result.consistency.value} consistent, frozen {result.frozen_for or 0:.3f} s"


@stop("sequence: direct backup (push, new checkpoint)", "backup", "checkpoint")
def _sequence_direct(conn: Connection, dom: Domain, scratch: Path) -> str:
    target = scratch / "direct"
    target.mkdir()
    result = statecapture.direct_backup(dom, target, quiesce="best-effort")
    frozen = result.frozen_for or 0
    consistency = result.consistency.value
    return f"{consistency} consistent, frozen {frozen:.3f} s, checkpoint {result.checkpoint}"


_REPO_DOMAIN_XML = """<domain type='test'>
  <name>tour-repo-vm</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


@stop("backup repository: backup, restore, verify, prune")
def _repository(conn: Connection, dom: Domain, scratch: Path) -> str:
    repo = statecapture.Repository.create(scratch / "repository")
    if dom.capabilities()["backup"].supported is not False:
        p1 = repo.backup(dom, quiesce="best-effort")
        p2 = repo.backup(dom, quiesce="best-effort")
        files = repo.restore(p2, scratch / "restored")
        ok = repo.verify().ok
        pruned = repo.prune(dom, keep_last=1)
        return (
            f"{p1.kind} ({p1.reason}), then {p2.kind} of {p2.bytes_copied} bytes; restored "
            f"{', '.join(files)}; verify {'ok' if ok else 'FAILED'}; pruned "
            f"{len(pruned.removed)} point(s)"
        )
    # No backup jobs (test driver): a shut-off domain is copied with qemu-img alone.
    if shutil.which("qemu-img") is None:
        return "needs qemu-img on the host (and QEMU backup jobs for a running domain)"
    image = scratch / "tour-repo-vda.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"],
        check=True,
        capture_output=True,
    )
    off = conn.define(_REPO_DOMAIN_XML.format(image=image))
    try:
        point = repo.backup(off)
        files = repo.restore(point, scratch / "restored", format="raw")
        ok = repo.verify().ok
    finally:
        off.undefine()
    return (
        "a running domain needs QEMU backup jobs; shown on a shut-off domain: "
        f"{point.kind} ({point.reason}), restored {', '.join(files)}, "
        f"verify {'ok' if ok else 'FAILED'}"
    )


@stop("recover(): nothing left behind")
def _recover(conn: Connection, dom: Domain, scratch: Path) -> str:
    report = statecapture.recover(dom)
    return "clean" if report.clean else str(report)


@contextlib.contextmanager
def _tour_domain(conn: Connection, name: str | None) -> Iterator[Domain | None]:
    if name is not None:
        yield conn.domain(name)
        return
    if conn.driver.lower() != "test":
        running = [d for d in conn.domains() if d.is_active]
        yield running[0] if running else None
        return
    dom = conn.define(TOUR_DOMAIN_XML)
    try:
        dom.start()
        yield dom
    finally:
        with contextlib.suppress(StateCaptureError):
            for cp in dom.checkpoints.list():
                cp.delete(metadata_only=True)
        with contextlib.suppress(StateCaptureError):
            if dom.is_active:
                dom.destroy()
        try:
            dom.undefine(managed_save=True, snapshots_metadata=True, checkpoints_metadata=True)
        except UnsupportedError:
            # The test driver knows no checkpoint-metadata flag; its checkpoints are gone.
            with contextlib.suppress(StateCaptureError):
                dom.undefine(managed_save=True, snapshots_metadata=True)
        except StateCaptureError:
            pass


def run(uri: str | None = None, *, domain: str | None = None, out: TextIO = sys.stdout) -> int:
    """Run the tour; returns the number of stops that failed unexpectedly."""
    failures = 0

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    with statecapture.connect(uri) as conn:
        v = conn.versions
        say(f"Connected to {conn.uri}: {v.driver} driver, libvirt {v.daemon}")
        say(f"  client library {v.library}, hypervisor {v.hypervisor}")
        with _tour_domain(conn, domain) as dom:
            say("\nDomains:")
            for d in conn.domains():
                say(f"  {d.name:20} {d.state.value:10} {d.uuid}")
                for disk in d.disks:
                    chain = " <- ".join(s or "?" for s in disk.chain)
                    say(f"      {disk.target:5} {disk.device:6} {disk.format or '?':6} {chain}")
                say(f"      guest-agent channel: {'yes' if d.has_agent_channel else 'no'}")
            if dom is None:
                say("\nNo running domain: nothing to demonstrate on.")
                return 0
            caps = dom.capabilities()
            say(f"\nWhat this driver can do (probed on {dom.name!r}, nothing changed):")
            for cap in caps:
                mark = {True: "yes", False: "no ", None: "?  "}[cap.supported]
                say(f"  {mark} {cap.name:28} {cap.reason}")
            needs = statecapture.Needs(consistency="application", incremental=True)
            advice = statecapture.advise(dom, needs)
            say(f"\nAdvice for {dom.name!r} ({needs.describe()}):")
            for line in advice.explain(details=1).splitlines():
                say(f"  {line}")
            say(f"\nCapabilities, tried on {dom.name!r}:")
            with tempfile.TemporaryDirectory(prefix="statecapture-tour-") as tmp:
                for title, needs_caps, fn in STOPS:
                    missing = [caps[c] for c in needs_caps if caps[c].supported is False]
                    if missing:
                        say(f"  - {title}: not on this driver: {missing[0].reason}")
                        continue
                    try:
                        outcome = fn(conn, dom, Path(tmp))
                    except UnsupportedError as exc:
                        outcome = f"not on this driver: {exc.libvirt_message or exc}"
                    except StateCaptureError as exc:
                        outcome = f"refused ({type(exc).__name__}): {exc}"
                    except Exception:  # a bug in the tour must not hide the other stops
                        failures += 1
                        outcome = "FAILED:\n" + traceback.format_exc()
                    say(f"  - {title}: {outcome}")
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m statecapture.tour",
        description="Walk statecapture's capabilities on a libvirt connection.",
    )
    parser.add_argument("uri", nargs="?", default=None, help="libvirt URI (default: see docs)")
    parser.add_argument("--domain", default=None, help="run on this domain instead")
    args = parser.parse_args(argv)
    return 1 if run(args.uri, domain=args.domain) else 0


if __name__ == "__main__":
    raise SystemExit(main())
