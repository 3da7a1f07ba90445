"""Backup jobs (push and pull), the NBD data path, restore and verify.

Fast tier: the test driver has no backup jobs, so statecapture must say so before touching
anything; restore/verify run on images made here with qemu-img.

Real tier (embedded QEMU, TCG guests). How the byte-identical references are taken: the
domain is *paused*, every disk is flushed through QEMU (HMP ``qemu-io -d <alias> "flush"``,
so QEMU's cached qcow2 metadata reaches the file — HAZARDS 15), the image is copied with
``qemu-img convert -U -O raw``, and the backup job is started while the domain is still
paused; only then does the guest resume. The reference and the job's point in time are
therefore the same instant, and a backup is correct iff its restored chain is byte-identical
to the reference. The guest keeps writing (its tick file every 0.1 s, plus 1 MiB of random
data per round) between rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lxml import etree

import statecapture
from statecapture import (
    BackupMode,
    DiskBackupMode,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    StateCaptureError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    restore_disk,
    verify,
)
from statecapture._restore import image_digest
from statecapture.testing.faults import inject
from tests._raw import raw_domain

MiB = 1 << 20


# ----------------------------------------------------------------------------- helpers


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _image(path: Path, size: str = "8M", *, backing: Path | None = None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    _qemu_img(*args, str(path), size)
    return path


def _write(path: Path, offset: int, data: bytes, *, fmt: str = "qcow2") -> None:
    blob = path.with_suffix(".blob")
    blob.write_bytes(data)
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -q -s {blob} {offset} {len(data)}", str(path)],
        check=True,
        capture_output=True,
    )
    blob.unlink()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- fast tier


def test_default_driver_has_no_backups() -> None:
    """test:///default raises UnsupportedError for backups, naming the missing API."""
    with statecapture.connect("test:///default") as conn:
        dom = conn.domain("test")
        with pytest.raises(UnsupportedError, match=r"virDomainBackup\w+") as info:
            dom.backup(mode="pull")
        assert "virDomainBackupBegin" in str(info.value)
        with pytest.raises(UnsupportedError, match="backup jobs"):
            dom.active_backup()


def test_unsupported_is_raised_before_anything_changes(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """No checkpoint, no file, no metadata record appears when the driver lacks backups."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedError):
        test_domain.backup(mode="push", target_dir=out, checkpoint="cp1")
    assert "cp1" not in test_domain.checkpoints
    assert list(out.iterdir()) == []
    assert "x-statecapture:backup" not in test_domain.xml()


def test_bad_mode_is_a_usage_error(test_domain: statecapture.Domain) -> None:
    """An unknown mode is refused as a programmer error."""
    with pytest.raises(UsageError, match="push' or 'pull"):
        test_domain.backup(mode="sideways")


def test_restore_flattens_a_chain_and_never_overwrites(tmp_path: Path) -> None:
    """restore_disk applies incrementals over the full image; nothing outside the list is read.

    The layers name their base by relative file name (as statecapture writes them); what
    the base's own header says is ignored (the full image's stale backing is never opened).
    """
    full = _image(tmp_path / "full.qcow2")
    _write(full, 0, b"A" * 65536)
    _write(full, 2 * MiB, b"B" * 65536)
    inc1 = _image(tmp_path / "inc1.qcow2", backing=Path("full.qcow2"))
    _write(inc1, 2 * MiB, b"C" * 65536)
    inc2 = _image(tmp_path / "inc2.qcow2", backing=Path("inc1.qcow2"))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -q -z {0} {65536}", str(inc2)], check=True
    )
    expected = bytearray(8 * MiB)
    expected[2 * MiB : 2 * MiB + 65536] = b"C" * 65536  # inc2 zeroed the A cluster
    ref = tmp_path / "expected.raw"
    ref.write_bytes(bytes(expected))

    out = restore_disk([full, inc1, inc2], tmp_path / "restored.raw", format="raw")
    assert out.read_bytes() == bytes(expected)
    assert _mode(out) == 0o600
    assert verify([full, inc1, inc2], ref).identical
    bad = verify([full, inc1], ref)
    assert not bad and bad.first_difference == 0
    with pytest.raises(TargetExistsError):
        restore_disk([full], out)
    restore_disk([full], out, overwrite=True)
    assert image_digest(out) == image_digest(full)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(NotFoundError):
        restore_disk([tmp_path / "missing.qcow2"], tmp_path / "x.qcow2")


def _three_layers(tmp_path: Path, *, absolute: bool = False) -> tuple[Path, Path, Path]:
    """full <- inc1 <- inc2, each incremental naming its base (relative or absolute)."""
    full = _image(tmp_path / "full.qcow2")
    _write(full, 0, b"A" * 65536)
    inc1 = _image(tmp_path / "inc1.qcow2", backing=full if absolute else Path("full.qcow2"))
    _write(inc1, MiB, b"B" * 65536)
    inc2 = _image(tmp_path / "inc2.qcow2", backing=inc1 if absolute else Path("inc1.qcow2"))
    _write(inc2, 2 * MiB, b"C" * 65536)
    return full, inc1, inc2


@pytest.mark.parametrize(
    ("order", "bad_layer", "says"),
    [
        (("full", "inc2"), 1, "does not fit: it sits on 'inc1.qcow2'"),
        (("inc1", "full"), 0, "is an incremental layer on 'full.qcow2'"),
        (("inc2",), 0, "is an incremental layer on 'inc1.qcow2'"),
        (("full", "inc2", "inc1"), 1, "does not fit"),
        (("full", "full"), 1, "records no base image"),
    ],
)
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_refuses_a_chain_that_does_not_fit(
    tmp_path: Path, order: tuple[str, ...], bad_layer: int, says: str, fmt: str
) -> None:
    """A gap, a wrong order or a lone incremental is a UsageError naming the layer (index
    and path) that does not fit, raised before anything is written: no destination, no
    partial file; verify() refuses the same chain."""
    layers = dict(zip(("full", "inc1", "inc2"), _three_layers(tmp_path), strict=True))
    chain = [layers[name] for name in order]
    before = sorted(p.name for p in tmp_path.iterdir())
    dest = tmp_path / f"restored.{fmt}"
    with pytest.raises(UsageError) as info:
        restore_disk(chain, dest, format=fmt)
    message = str(info.value)
    assert f"layer {bad_layer} of the chain ({chain[bad_layer]})" in message
    assert says in message
    assert not os.path.lexists(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UsageError, match=f"layer {bad_layer} "):
        verify(chain, layers["full"])


def test_restore_checks_absolute_and_relative_backing_names(tmp_path: Path) -> None:
    """Absolute backing paths and relative names both resolve against the layer's directory;
    a chain moved as a whole (relative names) still fits, and restores the same content."""
    absolute = tmp_path / "abs"
    absolute.mkdir()
    chain = list(_three_layers(absolute, absolute=True))
    out = restore_disk(chain, tmp_path / "abs.raw", format="raw")
    moved = tmp_path / "moved"
    (tmp_path / "rel").mkdir()
    rel = list(_three_layers(tmp_path / "rel"))
    (tmp_path / "rel").rename(moved)
    rel = [moved / p.name for p in rel]
    out2 = restore_disk(rel, tmp_path / "rel.raw", format="raw")
    assert out.read_bytes() == out2.read_bytes()
    assert out.read_bytes()[2 * MiB : 2 * MiB + 4] == b"CCCC"


def test_restore_refuses_a_layer_of_another_chain(tmp_path: Path) -> None:
    """A layer whose base is a different file with the same name (another chain's) or a
    layer of another disk size is refused, naming it."""
    full, inc1, _inc2 = _three_layers(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    *_rest, o_inc2 = _three_layers(other)
    with pytest.raises(UsageError, match=r"layer 2 of the chain .* does not fit"):
        restore_disk([full, inc1, o_inc2], tmp_path / "x.qcow2")
    big = _image(tmp_path / "big.qcow2", "16M", backing=Path("full.qcow2"))
    with pytest.raises(UsageError, match=r"layer 1 of the chain .* virtual size"):
        restore_disk([full, big], tmp_path / "x.qcow2")
    raw = tmp_path / "inc.raw"
    raw.write_bytes(bytes(8 * MiB))
    with pytest.raises(UsageError, match=r"layer 1 of the chain .* is raw"):
        restore_disk([full, raw], tmp_path / "x.qcow2")
    assert not os.path.lexists(tmp_path / "x.qcow2")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_restore_never_writes_through_a_symlinked_destination(tmp_path: Path) -> None:
    """A symlink at the destination counts as an existing file: refused, its target untouched."""
    full, _inc1, _inc2 = _three_layers(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "restored.qcow2"
    link.symlink_to(victim)
    with pytest.raises(TargetExistsError):
        restore_disk([full], link)
    dangling = tmp_path / "dangling.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TargetExistsError):
        restore_disk([full], dangling)
    assert victim.read_bytes() == b"keep" and not (tmp_path / "nowhere").exists()


def test_restore_refuses_a_link_planted_at_the_destination_or_its_partial_name(
    tmp_path: Path,
) -> None:
    """A symlink planted at the destination or at its partial name (``.<name>.partial``) is
    a TargetExistsError raised before anything is written: the link and what it points to
    are left untouched, and no file appears. ``overwrite=True`` replaces a link at the
    destination itself (rename), never writing through it."""
    full, _inc1, _inc2 = _three_layers(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    dest = tmp_path / "restored.qcow2"
    partial = tmp_path / ".restored.qcow2.partial"
    partial.symlink_to(victim)
    for overwrite in (False, True):
        with pytest.raises(TargetExistsError, match="partial"):
            restore_disk([full], dest, overwrite=overwrite)
        assert partial.is_symlink() and os.readlink(partial) == str(victim)
        assert victim.read_bytes() == b"keep" and not os.path.lexists(dest)
    partial.unlink()
    dest.symlink_to(victim)
    with pytest.raises(TargetExistsError, match="restore destination"):
        restore_disk([full], dest)
    assert dest.is_symlink() and victim.read_bytes() == b"keep"
    assert not os.path.lexists(partial)
    restore_disk([full], dest, overwrite=True)
    assert not dest.is_symlink() and _mode(dest) == 0o600
    assert image_digest(dest) == image_digest(full)
    assert victim.read_bytes() == b"keep" and not os.path.lexists(partial)


# ----------------------------------------------------------------------------- real tier


def _live_aliases(dom: statecapture.Domain) -> dict[str, str]:
    root = etree.fromstring(dom.xml().encode())
    out = {}
    for disk in root.iter("disk"):
        target, alias = disk.find("target"), disk.find("alias")
        if target is not None and alias is not None:
            out[target.get("dev", "")] = alias.get("name", "")
    return out


def _reference(dom: statecapture.Domain, disks: list[str], tmp: Path, tag: str) -> dict[str, Path]:
    """Raw copies of ``disks`` of the (paused) domain, flushed through QEMU first."""
    import libvirt_qemu

    aliases = _live_aliases(dom)
    refs = {}
    for disk in disks:
        libvirt_qemu.qemuMonitorCommand(
            raw_domain(dom),
            f'qemu-io -d {aliases[disk]} "flush"',
            1,  # HMP
        )
        ref = tmp / f"ref-{tag}-{disk}.raw"
        _qemu_img("convert", "-U", "-O", "raw", str(dom.disk(disk).source), str(ref))
        refs[disk] = ref
    return refs


def _guest_writes(dom: statecapture.Domain, name: str, mib: int = 1) -> None:
    from statecapture.testing import guest_exec

    code, _out, err = guest_exec(
        dom,
        ["sh", "-c", f"dd if=/dev/urandom of=/data/{name} bs=64k count={16 * mib} && sync"],
        timeout=60,
    )
    assert code == 0, err


def _start_paused(dom: statecapture.Domain, disks: list[str], tmp: Path, tag: str, **kw):
    """Pause, take references (and dirty counts), start the job, resume."""
    dom.suspend()
    try:
        refs = _reference(dom, disks, tmp, tag)
        prev = kw.get("incremental_from")
        dirty = dom.checkpoints[prev].dirty_bytes() if prev else {}
        job = dom.backup(**kw)
    finally:
        dom.resume()
    return job, refs, dirty


@pytest.mark.qemu
def test_push_full_then_two_incrementals(guest: statecapture.Domain, tmp_path: Path) -> None:
    """Push: full + 2 incrementals restore byte-identical to the disk at each job's start.

    Incrementals hold about the dirty bytes (far less than the disk), each layer's header
    names the previous backup, and every image is owner-only.
    """
    out = tmp_path / "push"
    out.mkdir()
    results, refs, dirties, seen = [], [], [], []
    for i, (cp, prev) in enumerate([("p1", None), ("p2", "p1"), ("p3", "p2")]):
        if i:
            _guest_writes(guest, f"push{i}")
        job, ref, dirty = _start_paused(
            guest,
            ["vda"],
            tmp_path,
            cp,
            mode="push",
            target_dir=out,
            checkpoint=cp,
            incremental_from=prev,
        )
        with job:
            assert job.mode is BackupMode.PUSH
            result = job.wait(progress=seen.append)
        assert guest.active_backup() is None
        results.append(result)
        refs.append(ref["vda"])
        dirties.append(dirty)
    chain = [r.disk("vda").file for r in results]
    assert [p.name for p in chain] == [f"{guest.name}.vda.p{i}.qcow2" for i in (1, 2, 3)]
    for i in range(3):
        assert verify(chain[: i + 1], refs[i]).identical, f"round {i}"
        assert _mode(chain[i]) == 0o600
    full, inc1, inc2 = (r.disk("vda") for r in results)
    assert full.mode is DiskBackupMode.FULL and inc1.mode is DiskBackupMode.INCREMENTAL
    assert inc1.incremental_from == "p1" and inc2.backing == chain[1]
    for inc, dirty in ((inc1, dirties[1]), (inc2, dirties[2])):
        assert MiB <= inc.bytes_written <= dirty["vda"], (inc, dirty)
        assert inc.bytes_written >= 0.5 * dirty["vda"]
        assert inc.bytes_written < inc.size / 8  # nowhere near the whole disk
    # the chain on disk is self-describing (relative backing names) and restores the same
    info = json.loads(_qemu_img("info", "--output=json", "--backing-chain", str(chain[2])))
    assert [Path(i["filename"]).name for i in info] == [p.name for p in reversed(chain)]
    restored = restore_disk(chain, tmp_path / "push-restored.qcow2")
    assert image_digest(restored) == image_digest(refs[2])
    # an incremental whose previous backup is not beside it names that backup by file name
    # (libvirt made the live disk its backing file): restore_disk places it by that name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _guest_writes(guest, "push4")
    job, ref, _dirty = _start_paused(
        guest,
        ["vda"],
        tmp_path,
        "p4",
        mode="push",
        target_dir=elsewhere,
        checkpoint="p4",
        incremental_from="p3",
    )
    with job:
        lone = job.wait().disk("vda")
    assert lone.backing is None
    # its header still records what it sits on (by name), so the chain check can place it
    lone_info = json.loads(_qemu_img("info", "-U", "--output=json", str(lone.file)))
    assert lone_info["backing-filename"] == chain[2].name
    with pytest.raises(UsageError, match="layer 2 of the chain"):
        verify([*chain[:2], lone.file], ref["vda"])
    assert verify([*chain, lone.file], ref["vda"]).identical
    assert {c.name for c in guest.checkpoints} == {"p1", "p2", "p3", "p4"}


def _attach_disk(dom: statecapture.Domain, target: str, tmp: Path) -> Path:
    from statecapture.testing.kit import make_data_disk

    path = make_data_disk(tmp / f"hotplug-{target}.qcow2", size_mib=32)
    xml = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
    )
    raw_domain(dom).attachDeviceFlags(xml, 1)  # VIR_DOMAIN_AFFECT_LIVE
    return path


@pytest.mark.qemu
def test_pull_full_then_two_incrementals_with_added_disk(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """Pull: full + 2 incrementals over NBD, both NBD clients, a disk added in between.

    Each restored chain is byte-identical to the disk at its job's start; incrementals copy
    exactly the dirty extents; the disk added after checkpoint q1 is backed up in full in the
    next job while vda stays incremental; scratch files and private sockets are gone after
    each job.
    """
    dest = tmp_path / "pull"
    dest.mkdir()
    rounds = [
        ("q1", None, ["vda"], "libnbd"),
        ("q2", "q1", ["vda", "vdb"], "qemu-img"),
        ("q3", "q2", ["vda", "vdb"], "libnbd"),
    ]
    if statecapture._nbd.load_nbd() is None:
        pytest.fail("python3-libnbd must be installed for the real tier (scripts/install-deps.sh)")
    results, refs, dirties, progress = [], [], [], []
    for i, (cp, prev, disks, client) in enumerate(rounds):
        if i == 1:
            _attach_disk(guest, "vdb", tmp_path)
        if i:
            _guest_writes(guest, f"pull{i}")
        job, ref, dirty = _start_paused(
            guest, disks, tmp_path, cp, mode="pull", checkpoint=cp, incremental_from=prev
        )
        with job:
            exports = {e.disk: e for e in job.exports}
            assert set(exports) == set(disks)
            sock = Path(exports["vda"].socket)
            assert sock.exists()
            if i == 1:
                assert exports["vda"].mode is DiskBackupMode.INCREMENTAL
                assert exports["vda"].bitmap_context == "qemu:dirty-bitmap:backup-vda"
                assert exports["vdb"].mode is DiskBackupMode.FULL
                assert exports["vdb"].bitmap_context is None
            if i == 2:
                # never overwrite: an existing file with a target's name is refused up
                # front, before any disk is copied, and the job can still be downloaded
                from statecapture._backup import backup_file_name

                clash = dest / backup_file_name(guest.name, "vdb", job.label)
                clash.write_bytes(b"precious")
                with pytest.raises(statecapture.TargetExistsError) as refused:
                    job.download(dest, client=client)
                assert refused.value.path == str(clash)
                assert clash.read_bytes() == b"precious"
                assert not (dest / backup_file_name(guest.name, "vda", job.label)).exists()
                assert not list(dest.glob(".*.partial"))
                clash.unlink()
            result = job.download(dest, progress=progress.append, client=client)
            assert job.progress().bytes_done > 0
        assert not sock.exists() and not sock.parent.exists()
        assert guest.active_backup() is None
        results.append(result)
        refs.append(ref)
        dirties.append(dirty)
    assert progress and all(p.disk in ("vda", "vdb") for p in progress)
    for disk, first in (("vda", 0), ("vdb", 1)):
        chain = [r.disk(disk).file for r in results[first:]]
        for i in range(first, 3):
            assert verify(chain[: i - first + 1], refs[i][disk]).identical, (disk, i)
        for f in chain:
            assert _mode(f) == 0o600
    assert results[1].disk("vdb").mode is DiskBackupMode.FULL
    assert results[1].disk("vda").mode is DiskBackupMode.INCREMENTAL
    assert results[2].disk("vdb").mode is DiskBackupMode.INCREMENTAL
    for i in (1, 2):
        inc = results[i].disk("vda")
        assert MiB <= inc.bytes_written <= dirties[i]["vda"]
        assert inc.bytes_written >= 0.9 * dirties[i]["vda"], (inc, dirties[i])
    # a pull incremental is a real qcow2 layer over the previous backup
    info = json.loads(_qemu_img("info", "--output=json", str(results[2].disk("vda").file)))
    assert info["backing-filename"] == results[1].disk("vda").file.name
    # no partial file of any download is left
    assert not list(dest.glob(".*.partial"))


@pytest.mark.qemu
def test_one_job_per_domain_and_failed_jobs_leave_nothing(guest_factory, tmp_path: Path) -> None:
    """A second job is refused at once; failed jobs remove their checkpoint and files.

    Failures are real: a pull job ended before any download, a push job whose target
    filesystem fills up (QEMU reports ENOSPC), a download that fills its destination. The
    small filesystem is mounted before the guest starts: QEMU runs in its own mount
    namespace and may not see mounts made later.
    """
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(small)], check=True
    )
    try:
        guest = guest_factory(files={"blob": os.urandom(3 * MiB)})  # more than fits
        with guest.backup(mode="pull", checkpoint="f0") as job:
            started = time.monotonic()
            with pytest.raises(InvalidStateError, match="already runs a pull backup"):
                guest.backup(mode="push", target_dir=tmp_path)
            assert time.monotonic() - started < 5
            found = guest.active_backup()
            assert found is not None and found.checkpoint == "f0"
            assert found.mode is BackupMode.PULL
            scratch = [Path(d.store) for d in job.xml.backed_up if d.store]
            assert scratch and all(s.exists() for s in scratch)
        assert job.state == "failed"  # ended without a download: nothing delivered
        assert "f0" not in guest.checkpoints
        assert not any(s.exists() for s in scratch)

        job = guest.backup(mode="push", target_dir=small, checkpoint="f1")
        with pytest.raises(LibvirtError, match="failed"):
            job.wait()
        assert job.state == "failed"
        assert "f1" not in guest.checkpoints
        assert list(small.iterdir()) == []
        assert guest.active_backup() is None

        with pytest.raises(StateCaptureError), guest.backup(mode="pull", checkpoint="f2") as job:
            job.download(small)
        assert "f2" not in guest.checkpoints
        assert list(small.iterdir()) == []
        assert guest.active_backup() is None
    finally:
        subprocess.run(["umount", str(small)], check=True)
    # an existing target is refused before anything starts
    clash = tmp_path / f"{guest.name}.vda.f3.qcow2"
    clash.write_bytes(b"keep me")
    with pytest.raises(TargetExistsError):
        guest.backup(mode="push", target_dir=tmp_path, checkpoint="f3")
    assert clash.read_bytes() == b"keep me" and "f3" not in guest.checkpoints
    assert len(guest.checkpoints) == 0
    # a guest shutdown ends the job (HAZARDS 7): the undelivered checkpoint goes, and so does
    # its bitmap, which QEMU wrote into the image when it closed it cleanly
    from statecapture import ShutdownMode

    job = guest.backup(mode="pull", checkpoint="f4")
    guest.shutdown(mode=ShutdownMode.AGENT, timeout=120)
    info = json.loads(_qemu_img("info", "--output=json", str(guest.disk("vda").source)))
    assert "f4" in [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]
    assert job.end() is None and job.state == "failed"
    assert "f4" not in guest.checkpoints
    info = json.loads(_qemu_img("info", "--output=json", str(guest.disk("vda").source)))
    bitmaps = info["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == []


@pytest.mark.qemu
def test_interrupted_backup_notes_what_was_rolled_back(
    guest_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt that rolls a backup back carries a note saying what was undone:
    inside the job's block and right after libvirt started the job, the job is ended and
    its checkpoint deleted, and the note says so; nothing is left behind (libvirt removes the
    target file of a cancelled push job itself)."""
    dom = guest_factory(agent=False, start=False)
    dom.start(paused=True)  # a backup needs a QEMU process, not a booted guest
    with pytest.raises(KeyboardInterrupt) as info, dom.backup(mode="pull", checkpoint="k1"):
        raise KeyboardInterrupt
    note = "\n".join(info.value.__notes__)
    assert f"rolled back the backup of {dom.name!r} after KeyboardInterrupt" in note
    assert "ended the running pull backup job" in note
    assert "deleted the checkpoint 'k1'" in note
    assert len(dom.checkpoints) == 0 and dom.active_backup() is None

    def interrupt() -> None:
        raise KeyboardInterrupt  # Ctrl-C the moment libvirt returns

    with (
        inject(dom, "backup_begin", after=interrupt),
        pytest.raises(KeyboardInterrupt) as info,
    ):
        dom.backup(mode="push", target_dir=tmp_path, checkpoint="k2")
    note = "\n".join(info.value.__notes__)
    assert "deleted the checkpoint 'k2' made with it" in note
    assert "ended the half-started backup job" in note
    assert list(tmp_path.glob("*.k2.*")) == []
    assert len(dom.checkpoints) == 0 and dom.active_backup() is None

    # The push job of a tiny disk may complete between our look and abortJob ("no job is
    # active"): that job ended, it is no cleanup failure; its complete target is removed.
    def job_done() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                raw_domain(dom).backupGetXMLDesc()
            except Exception:  # libvirt: no backup job any more
                return
            time.sleep(0.01)
        raise AssertionError("the push job did not complete")

    with (
        inject(dom, "backup_begin", after=interrupt),
        inject(dom, "backup_abort_job", before=job_done),
        pytest.raises(KeyboardInterrupt) as info,
    ):
        dom.backup(mode="push", target_dir=tmp_path, checkpoint="k3")
    note = "\n".join(info.value.__notes__)
    assert "ended the half-started backup job (it completed first)" in note
    assert "failed" not in note and "deleted the checkpoint 'k3' made with it" in note
    assert list(tmp_path.glob("*.k3.*")) == []
    assert len(dom.checkpoints) == 0 and dom.active_backup() is None


# ----------------------------------------------------------------------------- planted names


def _plant(directory: Path, name: str, outside: Path) -> Path:
    """A dangling symlink at ``directory/name`` pointing to ``outside/name``."""
    link = directory / name
    link.symlink_to(outside / name)
    return link


def _untouched(link: Path, outside: Path) -> None:
    assert link.is_symlink() and os.readlink(link) == str(outside / link.name)
    assert list(outside.iterdir()) == []


@pytest.mark.qemu
def test_planted_symlinks_never_redirect_backup_files(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """A dangling symlink at a push target name, a pull download's final or ``.partial`` name
    is a TargetExistsError raised before anything changes; the link is left as it was and
    nothing is created where it points. Scratch files live in a private directory inside
    scratch_dir, so a link at the name they used to get is never followed either; the
    directory is gone after the job. A link planted at a push target's name while the job
    runs is never written through or replaced; a completed job whose process died has its
    image moved into place by the next backup. A shared directory others can rename entries
    in is refused for push targets (QEMU creates them by path)."""
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = _plant(out, f"{guest.name}.vda.s1.qcow2", outside)
    with pytest.raises(TargetExistsError) as info:
        guest.backup(mode="push", target_dir=out, checkpoint="s1")
    assert info.value.path == str(link)
    _untouched(link, outside)
    assert "s1" not in guest.checkpoints and guest.active_backup() is None
    link.unlink()
    # A name planted while the job runs: QEMU writes into the job's private directory, and
    # the finished image is never moved over (or through) the planted name: the job fails
    # cleanly, its checkpoint and files go, and the link stays.
    job = guest.backup(mode="push", target_dir=out, checkpoint="s1")
    assert all(Path(d.store).parent.parent == out.resolve() for d in job.xml.backed_up)
    late = _plant(out, f"{guest.name}.vda.s1.qcow2", outside)
    with pytest.raises(TargetExistsError):
        job.wait()
    _untouched(late, outside)
    assert job.state == "failed" and "s1" not in guest.checkpoints
    assert list(out.iterdir()) == [late]
    late.unlink()

    # A process that died after its push job completed (simulated: the handle is dropped
    # without wait()): the next backup's clean-up moves the completed image from the private
    # directory to its final name and removes the directory.
    from statecapture import _backup

    job = guest.backup(mode="push", target_dir=out, checkpoint="s0")
    job.adopted = True  # dropped on purpose: no "never ended" warning
    deadline = time.monotonic() + 120
    while _backup.job_xml(guest) is not None:
        assert time.monotonic() < deadline, "the push job did not finish"
        time.sleep(0.2)
    time.sleep(1)  # HAZARDS 14: QEMU releases the file just after the job ends
    _backup.settle_stale_record(guest, "backup")
    done = out / f"{guest.name}.vda.s0.qcow2"
    assert list(out.iterdir()) == [done] and done.is_file() and not done.is_symlink()
    assert "s0" in guest.checkpoints
    done.unlink()
    guest.checkpoints["s0"].delete()

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError, match="not sticky"):
        guest.backup(mode="push", target_dir=shared, checkpoint="s1")
    assert list(shared.iterdir()) == [] and "s1" not in guest.checkpoints

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    old_scratch = _plant(scratch, f".{guest.name}.vda.s2.qcow2.scratch", outside)
    with guest.backup(mode="pull", checkpoint="s2", scratch_dir=scratch) as job:
        stores = [Path(d.store) for d in job.xml.backed_up if d.store]
        assert stores
        for store in stores:
            assert store.parent.parent == scratch.resolve()
            assert store.is_file() and not store.is_symlink()
            assert _mode(store.parent) == 0o700
        final = _plant(out, f"{guest.name}.vda.s2.qcow2", outside)
        with pytest.raises(TargetExistsError):
            job.download(out)
        _untouched(final, outside)
        final.unlink()
        partial = _plant(out, f".{guest.name}.vda.s2.qcow2.partial", outside)
        with pytest.raises(TargetExistsError):
            job.download(out)
        _untouched(partial, outside)
        partial.unlink()
        result = job.download(out)
    _untouched(old_scratch, outside)
    assert list(scratch.iterdir()) == [old_scratch]
    backup = result.disk("vda").file
    assert backup.parent == out.resolve() and backup.is_file() and not backup.is_symlink()
    assert _mode(backup) == 0o600
    assert sorted(p.name for p in out.iterdir()) == [backup.name]


@pytest.mark.qemu
def test_partial_swapped_for_a_symlink_never_redirects_the_download(
    guest: statecapture.Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write dest_dir swaps the fresh ``.partial`` file for a symlink right
    after statecapture created it (fault injected between creation and the copy): every
    tool still writes the file statecapture created, the file the link points to keeps its
    bytes, the result is a regular file inside dest_dir holding the backup, and the
    swapped-in link is left alone. Then the same for an incremental layer (its backing
    opened by path, its header naming the previous backup)."""
    from statecapture import _nbd

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    real_copy = _nbd.copy_export
    swapped: list[Path] = []

    def swap_then_copy(source: _nbd.ExportSource, dest: Path, **kw: object) -> object:
        (partial,) = out.glob(".*.partial")
        partial.rename(out / f"stolen-{len(swapped)}")
        partial.symlink_to(victim)
        swapped.append(partial)
        return real_copy(source, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_nbd, "copy_export", swap_then_copy)
    results, refs = [], []
    for cp, prev, client in (("w1", None, "libnbd"), ("w2", "w1", "qemu-img")):
        if prev:
            _guest_writes(guest, "swap")
        job, ref, _dirty = _start_paused(
            guest, ["vda"], tmp_path, cp, mode="pull", checkpoint=cp, incremental_from=prev
        )
        with job:
            results.append(job.download(out, client=client))
        refs.append(ref["vda"])
        assert victim.read_bytes() == b"precious"
        link = swapped[-1]
        assert link.is_symlink() and os.readlink(link) == str(victim)
        link.unlink()
    full, inc = (r.disk("vda").file for r in results)
    for i, f in enumerate((full, inc)):
        assert f.parent == out.resolve() and f.is_file() and not f.is_symlink()
        assert _mode(f) == 0o600
        assert f.stat().st_ino == (out / f"stolen-{i}").stat().st_ino
    info = json.loads(_qemu_img("info", "--output=json", str(inc)))
    assert info["backing-filename"] == full.name
    assert verify([full], refs[0]).identical and verify([full, inc], refs[1]).identical


# ----------------------------------------------------------------------------- killed process

_CHILD_PRELUDE = """
import json, os, signal, sys, time
sys.path.insert(0, {repo!r})
import statecapture
from tests._raw import raw_domain
conn = statecapture.connect({uri!r})
"""

_CHILD_START = """
from statecapture.testing.kit import domain_xml, ensure_kit, make_data_disk
from pathlib import Path
disk = make_data_disk(Path({tmp!r}) / "k.qcow2")
dom = conn.define(domain_xml("sc-killed", ensure_kit(), [disk], agent=False,
                             log_path=Path({tmp!r}) / "k.log"))
dom.start(paused=True)  # a backup needs a QEMU process, not a booted guest
job = dom.backup(mode="pull", checkpoint="k1")
print(json.dumps({{"socket": job.exports[0].socket,
                   "scratch": [d.store for d in job.xml.backed_up]}}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no end(): a crash
"""

_CHILD_RECOVER = """
dom = conn.domain("sc-killed")
job = dom.active_backup()
report = {{"found": job is not None}}
if job is not None:
    report.update(mode=job.mode.value, checkpoint=job.checkpoint, adopted=job.adopted,
                  cps_before=[c.name for c in dom.checkpoints])
    t = time.monotonic()
    report["end_result"] = job.end() is not None
    report["end_seconds"] = time.monotonic() - t
report["after"] = dom.active_backup() is not None
report["cps_after"] = [c.name for c in dom.checkpoints]
t = time.monotonic()
with dom.backup(mode="pull") as again:  # no stale job: starts and ends at once
    pass
report["next_job_seconds"] = time.monotonic() - t
conn.close()
print(json.dumps(report), flush=True)
"""

_CHILD_START_AGAIN = """
dom = conn.domain("sc-killed")
job = dom.backup(mode="pull", checkpoint="k2")
print(json.dumps({{"scratch": [d.store for d in job.xml.backed_up]}}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

_CHILD_STALE = """
dom = conn.domain("sc-killed")
raw_domain(dom).abortJob()  # the job ends while nobody watches (e.g. a daemon restart)
while dom.active_backup() is not None:
    time.sleep(0.05)
report = {{"cps_before": [c.name for c in dom.checkpoints]}}
with dom.backup(mode="pull") as again:  # first cleans up after the dead, undelivered run
    report["cps_during"] = [c.name for c in dom.checkpoints]
report["cps_after"] = [c.name for c in dom.checkpoints]
dom.destroy()
dom.undefine(checkpoints_metadata=True)
conn.close()
print(json.dumps(report), flush=True)
"""

_CHILD_CLEANUP = """
for dom in conn.domains():
    for step in (lambda: raw_domain(dom).abortJob(), dom.destroy,
                 lambda: dom.undefine(checkpoints_metadata=True)):
        try:
            step()
        except Exception:
            pass
conn.close()
"""


def _child(script: str, **fmt: str) -> subprocess.CompletedProcess[str]:
    body = textwrap.dedent(_CHILD_PRELUDE.format(**fmt) + script.format(**fmt))
    return subprocess.run(
        [sys.executable, "-c", body],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=fmt["repo"],
    )


@pytest.mark.qemu
def test_leftover_job_after_killed_process_is_found_and_ended(kit: object, tmp_path: Path) -> None:
    """A job whose process was SIGKILLed is found by active_backup() and ended cleanly.

    libvirt's embedded driver locks its root per process (a second process cannot open a
    root this test process holds), so the scenario runs in a root of its own: child 1 starts
    a pull job with a new checkpoint and kills itself; child 2 reopens the root, finds the
    job, ends it (waiting for JOB_COMPLETED), which also removes the checkpoint the dead run
    recorded (it never delivered), and proves the next job starts without a stale lock. A
    second killed run whose job then ends unobserved is cleaned up by the next backup().
    """
    from statecapture.testing.kit import prepare_embed_root
    from tests import _isolation as isolation

    root = isolation.track(f"/tmp/sc-kill-{os.getpid()}")
    prepare_embed_root(root)
    fmt = {
        "repo": str(Path(__file__).resolve().parents[1]),
        "uri": f"qemu:///embed?root={root}",
        "tmp": str(tmp_path),
    }
    try:
        first = _child(_CHILD_START, **fmt)
        assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
        started = json.loads(first.stdout.strip().splitlines()[-1])
        assert Path(started["socket"]).exists()
        second = _child(_CHILD_RECOVER, **fmt)
        assert second.returncode == 0, second.stderr[-3000:]
        report = json.loads(second.stdout.strip().splitlines()[-1])
        assert report["found"] and report["adopted"] and report["mode"] == "pull"
        assert report["checkpoint"] == "k1" and report["cps_before"] == ["k1"]
        assert report["end_result"] is False  # nothing was delivered
        assert report["after"] is False and report["cps_after"] == []
        assert report["next_job_seconds"] < 10
        assert not Path(started["socket"]).exists()
        assert not any(Path(s).exists() for s in started["scratch"])
        # killed again, and this time the job ends before anyone adopts it: the next
        # backup() finds the dead run's record and removes its undelivered checkpoint
        third = _child(_CHILD_START_AGAIN, **fmt)
        assert third.returncode == -signal.SIGKILL, third.stderr[-2000:]
        fourth = _child(_CHILD_STALE, **fmt)
        assert fourth.returncode == 0, fourth.stderr[-3000:]
        stale = json.loads(fourth.stdout.strip().splitlines()[-1])
        assert stale == {"cps_before": ["k2"], "cps_during": [], "cps_after": []}
    finally:
        _child(_CHILD_CLEANUP, **fmt)
        for pidfile in (root / "run" / "qemu").glob("sc-killed*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(root)], check=False)


# ----------------------------------------------------------------------------- data path, no VM


def _serve(image: Path, sock: Path, bitmap: str | None = None) -> subprocess.Popen[bytes]:
    argv = ["qemu-nbd", "-r", "-f", "qcow2", "-x", "vda", "--socket", str(sock), "--persistent"]
    if bitmap is not None:
        argv += ["-B", bitmap]
    proc = subprocess.Popen([*argv, str(image)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("client", ["libnbd", "qemu-img"])
def test_copy_export_full_and_incremental_over_nbd(tmp_path: Path, client: str) -> None:
    """Both NBD clients copy a full export sparsely and only the dirty extents of a bitmap.

    qemu-nbd serves an image and its persistent dirty bitmap exactly as QEMU serves a pull
    job's export; the incremental layer over the full copy restores the final content.
    """
    from statecapture import _nbd

    if client == "libnbd" and _nbd.load_nbd() is None:
        pytest.skip("python3-libnbd is not installed")
    disk = _image(tmp_path / "disk.qcow2", "16M")
    _write(disk, 0, os.urandom(MiB))
    _qemu_img("bitmap", "--add", "--enable", str(disk), "b1")
    full = tmp_path / "full.qcow2"
    full.touch(mode=0o600)
    sock = tmp_path / "s.sock"
    proc = _serve(disk, sock)
    try:
        stats = _nbd.copy_export(
            _nbd.ExportSource(str(sock), "vda"), full, backing=None, client=client
        )
    finally:
        proc.terminate()
        proc.wait()
    assert stats.bytes_written == MiB and stats.client == client  # zeros skipped
    # the guest writes 192 KiB of new data and zeroes one old cluster
    _write(disk, 8 * MiB, os.urandom(3 * 65536))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -z 0 65536", str(disk)], check=True)
    inc = tmp_path / "inc.qcow2"
    inc.touch(mode=0o600)
    sock.unlink(missing_ok=True)
    proc = _serve(disk, sock, bitmap="b1")
    try:
        source = _nbd.ExportSource(str(sock), "vda", "qemu:dirty-bitmap:b1")
        stats = _nbd.copy_export(source, inc, backing=full, client=client)
    finally:
        proc.terminate()
        proc.wait()
    assert stats.bytes_written == 3 * 65536 and stats.bytes_zeroed == 65536
    assert (
        json.loads(_qemu_img("info", "--output=json", str(inc)))["backing-filename"] == "full.qcow2"
    )
    assert verify([full, inc], disk).identical


def _children() -> set[int]:
    """PIDs of this process's children, running or unreaped (zombies count)."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    found.add(int(entry.name))
    return found


def _data_extents(image: Path) -> int:
    entries = json.loads(_qemu_img("map", "--output=json", str(image)))
    return sum(e["length"] for e in entries if e["data"] and not e.get("zero"))


@pytest.mark.parametrize("engine", ["qemu-img", "libnbd"])
def test_full_copy_engines_copy_data_only_and_report_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """Both full-copy engines of the libnbd path (qemu-img convert, the AIO pipeline) copy
    exactly the data extents, report progress in bytes from 0 to the planned total, and
    leave no helper process behind, also when the copy fails.
    """
    from statecapture import _nbd

    if _nbd.load_nbd() is None:
        pytest.skip("python3-libnbd is not installed")
    monkeypatch.setattr(_nbd, "_full_copy_engine", engine)
    disk = _image(tmp_path / "disk.qcow2", "64M")
    _write(disk, 0, os.urandom(3 * MiB + 4096))  # not a whole number of requests
    _write(disk, 40 * MiB, os.urandom(2 * MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -z {8 * MiB} {MiB}", str(disk)])
    data = _data_extents(disk)
    sock = tmp_path / "s.sock"
    proc = _serve(disk, sock)
    try:
        helpers = _children()
        out = tmp_path / "full.qcow2"
        out.touch(mode=0o600)
        seen: list[tuple[int, int]] = []
        stats = _nbd.copy_export(
            _nbd.ExportSource(str(sock), "vda"),
            out,
            backing=None,
            progress=lambda done, total: seen.append((done, total)),
            client="libnbd",
        )
        assert _children() == helpers
        if engine == "qemu-img":  # convert makes the image itself: a bad option fails it
            monkeypatch.setattr(_nbd, "_CREATE_OPTS", "cluster_size=3")
        else:  # the pipeline writes into the image we made: one that is too small
            monkeypatch.setattr(_nbd, "_export_size", lambda _source, _client: 4 * MiB)
            monkeypatch.setattr(_nbd, "_source_size", lambda _handle: 4 * MiB)
        small = tmp_path / "small.qcow2"
        small.touch(mode=0o600)
        with pytest.raises(StateCaptureError, match="failed") as failure:
            _nbd.copy_export(_nbd.ExportSource(str(sock), "vda"), small, backing=None)
        # qemu-nbd / qemu-img are reaped although the caller still holds the traceback
        assert _children() == helpers, failure.traceback
    finally:
        proc.terminate()
        proc.wait()
    assert stats.bytes_planned == stats.bytes_written == data and stats.bytes_zeroed == 0
    assert seen[0] == (0, data) and seen[-1] == (data, data)
    assert all(total == data for _done, total in seen)
    assert [done for done, _t in seen] == sorted(done for done, _t in seen)
    assert _data_extents(out) <= data  # the zeroed and unallocated parts stay holes
    assert verify([out], disk).identical


def test_full_copy_writes_compressed_clusters_in_one_pass(tmp_path: Path) -> None:
    """Inside ``compressed_full_copies("zstd")`` a full copy writes qcow2 compressed
    clusters itself (no second pass: the file we created keeps its inode and is listed),
    the content equals the source, and compressible data takes less space."""
    from statecapture import _nbd

    if _nbd.load_nbd() is None:
        pytest.skip("python3-libnbd is not installed")
    disk = _image(tmp_path / "disk.qcow2", "32M")
    _write(disk, 0, b"statecapture " * (8 * MiB // 13))
    _write(disk, 16 * MiB, os.urandom(MiB))
    sock = tmp_path / "s.sock"
    proc = _serve(disk, sock)
    try:
        out = tmp_path / "full.qcow2"
        out.touch(mode=0o600)
        ino = out.stat().st_ino
        with _nbd.compressed_full_copies("zstd") as written:
            _nbd.copy_export(_nbd.ExportSource(str(sock), "vda"), out, backing=None)
        assert written == {(out.stat().st_dev, ino)}
        plain = tmp_path / "plain.qcow2"
        plain.touch(mode=0o600)
        _nbd.copy_export(_nbd.ExportSource(str(sock), "vda"), plain, backing=None)
    finally:
        proc.terminate()
        proc.wait()
    info = json.loads(_qemu_img("info", "--output=json", str(out)))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert out.stat().st_blocks < plain.stat().st_blocks / 2
    assert out.stat().st_mode & 0o777 == 0o600
    assert verify([out], disk).identical
    with _nbd.compressed_full_copies(None) as nothing:
        assert nothing == set()


def test_digests_taken_during_the_copy_match_the_stored_chain(tmp_path: Path) -> None:
    """While a digest collector is active, a libnbd download hashes every block its plan
    touches from a second connection to the export: for a full copy the digests equal those
    read back from the written image (every data block), for an incremental one exactly
    the blocks its layer touches, equal to those read back through the chain. Without a
    collector nothing is taken."""
    from statecapture import _nbd, _nbd_digest
    from statecapture._repository import digests as dg

    if _nbd.load_nbd() is None:
        pytest.skip("python3-libnbd is not installed")
    disk = _image(tmp_path / "disk.qcow2", "16M")
    _write(disk, 0, os.urandom(3 * MiB + 4096))
    _write(disk, 9 * MiB, os.urandom(MiB // 2))
    sink = _nbd_digest.BlockDigests(dg.BLOCK_SIZE, lambda: dg.hasher(None))

    def copy(sock: Path, out: Path, backing: Path | None, bitmap: str | None) -> None:
        out.touch(mode=0o600)
        with _nbd_digest.collecting(sink):
            _nbd.copy_export(
                _nbd.ExportSource(str(sock), "vda", bitmap), out, backing=backing, client="libnbd"
            )

    full, layer = tmp_path / "full.qcow2", tmp_path / "layer.qcow2"
    proc = _serve(disk, tmp_path / "a.sock")
    try:
        copy(tmp_path / "a.sock", full, None, None)
        other = tmp_path / "other.qcow2"
        other.touch(mode=0o600)
        _nbd.copy_export(_nbd.ExportSource(str(tmp_path / "a.sock"), "vda"), other, backing=None)
    finally:
        proc.terminate()
        proc.wait()
    assert set(sink.taken) == {_nbd_digest.file_key(full)}  # none for `other`
    taken = sink.taken[_nbd_digest.file_key(full)]
    assert sorted(taken.blocks) == [0, 1, 2, 3, 9]
    assert dict(taken.blocks) == dg.digest_blocks(full, 16 * MiB, set(taken.blocks).__contains__)
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b"], check=True)
    _write(disk, 5 * MiB + 4096, os.urandom(8192))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -z {MiB} {MiB}", str(disk)])
    proc = _serve(disk, tmp_path / "b.sock", bitmap="b")
    try:
        copy(tmp_path / "b.sock", layer, full, "qemu:dirty-bitmap:b")
    finally:
        proc.terminate()
        proc.wait()
    taken = sink.taken[_nbd_digest.file_key(layer)]
    touched = dg.layer_blocks(dg.read_map(layer))
    assert set(taken.blocks) == touched == {1, 5}
    assert dict(taken.blocks) == dg.digest_blocks(layer, 16 * MiB, touched.__contains__)
