"""Memory state: managed save, save/restore and save images (statecapture/_memory.py).

Fast tier on the private test driver; the real tier (``qemu``) proves every documented
behaviour on embedded QEMU with the tick-writing test guest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import statecapture
from statecapture import (
    DomainState,
    InvalidStateError,
    LibvirtError,
    ManagedSaveResult,
    NotFoundError,
    RestoreResult,
    SaveImage,
    SaveImageError,
    SaveResult,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    XMLError,
    _memory,
)
from statecapture.testing.faults import inject
from tests._raw import raw_domain

GAMMA_XML = """<domain type='test'>
  <name>gamma</name>
  <uuid>5e1d3c2b-0a9f-4e8d-b7c6-a5f4e3d2c1b0</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _names(conn: statecapture.Connection) -> set[str]:
    return {d.name for d in conn.domains()}


# ============================================================================ fast tier
# ---------------------------------------------------------------------------- managed save


def test_managed_save_then_start_resumes(test_domain: statecapture.Domain) -> None:
    """managed_save() stops the domain, records an image and a result; start() consumes it."""
    assert not test_domain.has_managed_save
    result = test_domain.managed_save()
    assert isinstance(result, ManagedSaveResult)
    assert result.domain_name == "alpha"
    assert result.domain_uuid == test_domain.uuid
    assert result.was_running
    assert result.duration >= 0
    assert result.downtime == result.duration
    assert test_domain.state is DomainState.SHUTOFF
    assert test_domain.has_managed_save
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.downtime = 0.0  # type: ignore[misc]
    test_domain.start()
    assert test_domain.state is DomainState.RUNNING
    assert not test_domain.has_managed_save


def test_remove_managed_save(test_domain: statecapture.Domain) -> None:
    """remove_managed_save() deletes the image; with none it raises NotFoundError."""
    with pytest.raises(NotFoundError, match="no managed save image"):
        test_domain.remove_managed_save()
    assert test_domain.state is DomainState.RUNNING  # nothing happened
    test_domain.managed_save()
    test_domain.remove_managed_save()
    assert not test_domain.has_managed_save
    with pytest.raises(NotFoundError):
        test_domain.remove_managed_save()


def test_managed_save_bad_input_changes_nothing(test_conn: statecapture.Connection) -> None:
    """Inactive or transient domains and bad arguments raise typed errors before any change."""
    beta = test_conn.domain("beta")
    beta.destroy()
    with pytest.raises(InvalidStateError, match="needs an active domain"):
        beta.managed_save()
    assert not beta.has_managed_save
    gamma = test_conn.create(GAMMA_XML)
    with pytest.raises(InvalidStateError, match="transient"):
        gamma.managed_save()
    assert gamma.state is DomainState.RUNNING
    alpha = test_conn.domain("alpha")
    with pytest.raises(UsageError, match="running must be"):
        alpha.managed_save(running="yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="bypass_cache"):
        alpha.managed_save(bypass_cache=1)  # type: ignore[arg-type]
    assert alpha.state is DomainState.RUNNING
    assert not alpha.has_managed_save


def test_managed_save_definition_errors(test_domain: statecapture.Domain) -> None:
    """Without an image the definition is NotFound; the test driver cannot read or redefine it."""
    with pytest.raises(NotFoundError):
        _ = test_domain.managed_save_definition
    with pytest.raises(NotFoundError):
        test_domain.redefine_managed_save(running=True)
    with pytest.raises(UsageError, match="needs a definition"):
        test_domain.redefine_managed_save()
    test_domain.managed_save(running=False)
    with pytest.raises(UnsupportedError):
        _ = test_domain.managed_save_definition
    with pytest.raises(UnsupportedError):
        test_domain.redefine_managed_save(running=True)
    other = statecapture.DomainXML.from_xml(GAMMA_XML)
    with pytest.raises(UsageError, match="names domain 'gamma'"):
        test_domain.redefine_managed_save(other)


# ---------------------------------------------------------------------------- save / restore


def test_save_restore_round_trip(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """save() writes a 0600 image, stops the domain and reports; restore() brings it back."""
    target = tmp_path / "alpha.save"
    with _umask(0):  # even a permissive umask gives an owner-only file
        image = test_domain.save(target)
    assert isinstance(image, SaveImage)
    assert image.path == target
    assert _mode(target) == 0o600
    assert test_domain.state is DomainState.SHUTOFF
    result = image.result
    assert isinstance(result, SaveResult)
    assert result.path == target
    assert result.was_running
    assert result.downtime == result.duration >= 0
    assert result.api == "virDomainSaveFlags"  # the test driver lacks virDomainSaveParams
    assert image.definition.name == "alpha"
    assert image.definition.uuid == test_domain.uuid
    assert sorted(os.listdir(tmp_path)) == ["alpha.save", "node.xml"]

    dom = test_domain.connection.restore(target)
    assert dom.name == "alpha"
    assert dom.state is DomainState.RUNNING
    assert target.exists()  # the image stays


def test_restore_result_and_relative_path(
    test_domain: statecapture.Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path is made absolute; SaveImage.restore() returns a RestoreResult."""
    monkeypatch.chdir(tmp_path)
    image = test_domain.save("rel.save")
    assert image.path == tmp_path / "rel.save"
    opened = test_domain.connection.save_image("rel.save")
    assert opened.path == image.path
    assert opened.result is None
    restored = opened.restore()
    assert isinstance(restored, RestoreResult)
    assert restored.domain.uuid == test_domain.uuid
    assert restored.running
    assert 0 <= restored.downtime <= restored.duration
    assert restored.api == "virDomainRestoreFlags"


def test_save_existing_file_refused(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """An existing target raises TargetExistsError (a FileExistsError); nothing changes."""
    target = tmp_path / "taken"
    target.write_bytes(b"precious")
    with pytest.raises(TargetExistsError) as info:
        test_domain.save(target)
    assert isinstance(info.value, FileExistsError)
    assert info.value.path == str(target)
    assert target.read_bytes() == b"precious"
    assert test_domain.state is DomainState.RUNNING


def test_save_overwrite_replaces_atomically(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """overwrite=True replaces an existing file with an owner-only image, leaving no temp file."""
    target = tmp_path / "old.save"
    target.write_bytes(b"old")
    target.chmod(0o644)
    image = test_domain.save(target, overwrite=True)
    assert _mode(target) == 0o600
    assert target.read_bytes() != b"old"
    assert image.definition.name == "alpha"
    assert sorted(os.listdir(tmp_path)) == ["node.xml", "old.save"]


def test_save_bad_input_changes_nothing(test_conn: statecapture.Connection, tmp_path: Path) -> None:
    """Bad paths, arguments, definitions and inactive domains fail before anything changes."""
    alpha = test_conn.domain("alpha")
    beta = test_conn.domain("beta")
    beta.destroy()
    with pytest.raises(InvalidStateError, match="needs an active domain"):
        beta.save(tmp_path / "beta.save")
    with pytest.raises(NotFoundError, match="does not exist"):
        alpha.save(tmp_path / "missing-dir" / "x.save")
    with pytest.raises(UsageError, match="is a directory"):
        alpha.save(tmp_path, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="symbolic link"):
        alpha.save(tmp_path / "link", overwrite=True)
    with pytest.raises(UsageError):
        alpha.save(b"/tmp/bytes.save")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        alpha.save("")
    with pytest.raises(UsageError, match="overwrite"):
        alpha.save(tmp_path / "a.save", overwrite="no")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="running must be"):
        alpha.save(tmp_path / "a.save", running=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="names domain 'gamma'"):
        alpha.save(tmp_path / "a.save", definition=GAMMA_XML)
    other_uuid = attrs.evolve(alpha.definition, uuid="00000000-0000-4000-8000-000000000001")
    with pytest.raises(UsageError, match="UUID"):
        alpha.save(tmp_path / "a.save", definition=other_uuid)
    with pytest.raises(XMLError):
        alpha.save(tmp_path / "a.save", definition="<domain>")
    with pytest.raises(UsageError, match="DomainXML"):
        alpha.save(tmp_path / "a.save", definition=42)  # type: ignore[arg-type]
    assert alpha.state is DomainState.RUNNING
    assert sorted(os.listdir(tmp_path)) == ["link", "node.xml"]


def test_driver_refusal_mid_save_leaves_running_and_no_file(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """When libvirt refuses the save (the test driver lacks PAUSED), the domain keeps running
    and the file statecapture reserved is gone."""
    with pytest.raises(UnsupportedError, match="does not support"):
        test_domain.save(tmp_path / "p.save", running=False)
    assert test_domain.state is DomainState.RUNNING
    assert not (tmp_path / "p.save").exists()


def test_overwrite_failure_keeps_old_file(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """A failed save with overwrite=True leaves the existing file untouched."""
    target = tmp_path / "keep.save"
    target.write_bytes(b"previous image")
    with pytest.raises(UnsupportedError):
        test_domain.save(target, overwrite=True, running=True)
    assert target.read_bytes() == b"previous image"
    assert sorted(os.listdir(tmp_path)) == ["keep.save", "node.xml"]
    assert test_domain.state is DomainState.RUNNING


def test_interrupt_after_completed_save_keeps_image(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """Fault injection: a KeyboardInterrupt right after libvirt finished never deletes the
    only copy of the guest's memory; the image is kept at its path and the error says so."""

    def interrupt() -> None:
        raise KeyboardInterrupt

    target = tmp_path / "ki.save"
    with (
        inject(test_domain, "save", after=interrupt),
        pytest.raises(KeyboardInterrupt) as info,
    ):
        test_domain.save(target)
    assert "completed before the interruption" in "\n".join(info.value.__notes__)
    assert test_domain.state is DomainState.SHUTOFF
    assert _mode(target) == 0o600
    assert test_domain.connection.save_image(target).definition.name == "alpha"


def test_interrupt_before_save_removes_reservation(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """Fault injection: an interrupt before libvirt saved removes the reserved file only."""
    with (
        inject(test_domain, "save", raises=KeyboardInterrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        test_domain.save(tmp_path / "never.save")
    assert not (tmp_path / "never.save").exists()
    assert test_domain.state is DomainState.RUNNING


def test_restore_bad_input(test_conn: statecapture.Connection, tmp_path: Path) -> None:
    """Missing, corrupt and directory paths, and an already running domain, raise typed
    errors and define or start nothing."""
    before = _names(test_conn)
    with pytest.raises(NotFoundError, match="does not exist"):
        test_conn.restore(tmp_path / "nope.save")
    garbage = tmp_path / "garbage.save"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(SaveImageError) as info:
        test_conn.restore(garbage)
    assert info.value.path == str(garbage)
    assert isinstance(info.value, LibvirtError)
    with pytest.raises(SaveImageError):
        test_conn.save_image(garbage)
    with pytest.raises(UsageError, match="directory"):
        test_conn.restore(tmp_path)
    assert _names(test_conn) == before

    alpha = test_conn.domain("alpha")
    image = alpha.save(tmp_path / "alpha.save")
    alpha.start()  # boots afresh; the image's domain is now running
    with pytest.raises(InvalidStateError, match="already running"):
        image.restore()
    with pytest.raises(UsageError, match="running must be"):
        test_conn.restore(image.path, running="paused")  # type: ignore[arg-type]
    assert alpha.state is DomainState.RUNNING


def test_restore_flags_the_driver_lacks(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """running=/definition= on a driver that cannot honour them raise UnsupportedError."""
    image = test_domain.save(tmp_path / "a.save")
    with pytest.raises(UnsupportedError):
        image.restore(running=True)
    defn = attrs.evolve(image.definition, description="changed")
    with pytest.raises(UnsupportedError):
        image.restore(definition=defn)
    assert test_domain.state is DomainState.SHUTOFF
    assert image.restore().running


def test_save_image_redefine(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """A save image's definition can be read and redefined; restore uses the new one."""
    image = test_domain.save(tmp_path / "a.save")
    defn = image.definition
    assert defn.description is None
    image.redefine(attrs.evolve(defn, description="redefined"))
    assert image.definition.description == "redefined"
    assert _mode(image.path) == 0o600
    with pytest.raises(UsageError, match="needs a definition"):
        image.redefine()
    with pytest.raises(UsageError, match="names domain"):
        image.redefine(GAMMA_XML)
    dom = test_domain.connection.restore(image.path)
    assert dom.definition.description == "redefined"


def test_params_api_gated_on_daemon_version(
    test_domain: statecapture.Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virDomainSaveParams is tried only when the daemon is >= 8.4; when the driver lacks
    it, the call falls back to virDomainSaveFlags with nothing done twice."""
    raw = raw_domain(test_domain)
    calls: list[str] = []
    real_params, real_flags = raw.saveParams, raw.saveFlags

    def spy_params(*args: Any) -> Any:
        calls.append("params")
        return real_params(*args)

    def spy_flags(*args: Any) -> Any:
        calls.append("flags")
        return real_flags(*args)

    monkeypatch.setattr(raw, "saveParams", spy_params)
    monkeypatch.setattr(raw, "saveFlags", spy_flags)
    conn = test_domain.connection
    assert conn.versions.daemon >= (8, 4)
    test_domain.save(tmp_path / "new.save")
    assert calls == ["params", "flags"]

    calls.clear()
    conn.restore(tmp_path / "new.save")
    monkeypatch.setattr(
        conn, "_versions", attrs.evolve(conn.versions, daemon=statecapture.Version(8, 3, 0))
    )
    image = test_domain.save(tmp_path / "old.save")
    assert calls == ["flags"]
    assert image.result is not None and image.result.api == "virDomainSaveFlags"


# ---------------------------------------------------------------------------- helpers, values


def test_local_and_remote_paths() -> None:
    """Paths of remote connections are the daemon's: they must be absolute; local ones are
    made absolute."""
    assert _memory._is_local("test:///default")
    assert _memory._is_local("qemu:///embed?root=/tmp/x")
    assert _memory._is_local("qemu+unix:///system")
    assert not _memory._is_local("qemu+ssh://host/system")
    with pytest.raises(UsageError, match="relative"):
        _memory._image_path("x.save", local=False)
    assert _memory._image_path("/srv/x.save", local=False) == Path("/srv/x.save")
    assert _memory._image_path("x.save", local=True).is_absolute()


def test_save_image_error_pickles() -> None:
    """SaveImageError crosses process boundaries with its attributes."""
    exc = SaveImageError("bad", path="/x", code=9, operation="restore")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is SaveImageError
    assert (back.path, back.code, back.operation, str(back)) == ("/x", 9, "restore", "bad")
    assert SaveImageError.__module__ == "statecapture"


# ============================================================================ real tier


def _ticks(dom: statecapture.Domain) -> list[int]:
    from statecapture.testing import read_guest_file

    text = read_guest_file(dom, "/data/ticks").decode()
    return [int(line.split()[0]) for line in text.splitlines() if line.strip()]


def _wait_ticks_past(dom: statecapture.Domain, value: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    ticks: list[int] = []
    while True:
        with contextlib.suppress(statecapture.GuestAgentError):  # agent reconnecting (restore)
            ticks = _ticks(dom)
            if ticks and ticks[-1] > value:
                return ticks
        if time.monotonic() > deadline:
            raise AssertionError(f"guest counter stuck at {ticks[-1:]} (waited for > {value})")
        time.sleep(0.3)


def _assert_continuous(ticks: list[int]) -> None:
    """The in-memory counter never restarted (a reboot would start it again at 1)."""
    assert ticks == sorted(ticks), "counter went backwards: the guest was rebooted"
    assert ticks.count(1) <= 1


@pytest.mark.qemu
def test_qemu_managed_save_resumes_guest(
    guest: statecapture.Domain, qemu_root: Path, qemu_conn: statecapture.Connection, kit: Any
) -> None:
    """Managed save stops the guest into a 0600 image; start() resumes it: the in-memory
    counter continues instead of restarting. The image's definition can be read and
    redefined; typed errors when there is no image."""
    with pytest.raises(NotFoundError):
        guest.remove_managed_save()
    with pytest.raises(NotFoundError):
        _ = guest.managed_save_definition
    before = _wait_ticks_past(guest, 3)[-1]

    result = guest.managed_save()
    assert result.was_running
    assert result.downtime > 0
    assert guest.state is DomainState.SHUTOFF
    assert guest.has_managed_save
    image = qemu_root / "lib" / "qemu" / "save" / f"{guest.name}.save"
    assert _mode(image) == 0o600
    defn = guest.managed_save_definition
    assert defn.uuid == guest.uuid
    guest.redefine_managed_save(attrs.evolve(defn, description="resumed"), running=True)
    assert guest.managed_save_definition.description == "resumed"

    guest.start()
    assert not guest.has_managed_save
    assert guest.state is DomainState.RUNNING
    assert guest.definition.description == "resumed"
    ticks = _wait_ticks_past(guest, before)
    _assert_continuous(ticks)

    # A transient domain cannot be managed-saved: refused before anything happens.
    from statecapture.testing.kit import domain_xml

    transient = qemu_conn.create(domain_xml(f"{guest.name}-t", kit, [], agent=False), paused=True)
    try:
        with pytest.raises(InvalidStateError, match="transient"):
            transient.managed_save()
        assert transient.state is DomainState.PAUSED
        assert not transient.has_managed_save
    finally:
        transient.destroy()

    guest.managed_save(running=False)
    guest.remove_managed_save()
    assert not guest.has_managed_save


@contextlib.contextmanager
def _qemu_log_on_failure(qemu_root: Path, dom: statecapture.Domain) -> Iterator[None]:
    """Attach the tail of QEMU's own log to a failure (QEMU exits tell more there)."""
    try:
        yield
    except BaseException as exc:
        log = qemu_root / "log" / "qemu" / f"{dom.name}.log"
        with contextlib.suppress(OSError):
            exc.add_note(f"{log}:\n" + log.read_text(errors="replace")[-4000:])
        raise


@contextlib.contextmanager
def _full_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.qemu
def test_qemu_save_on_a_full_file_system_leaves_the_guest_running(
    guest: statecapture.Domain, tmp_path: Path
) -> None:
    """On QEMU: a save that fails midway (full file system) leaves the guest running and
    no file behind. Mounting the full tmpfs needs root (CI runs as root; elsewhere the test
    is skipped whole, before anything ran)."""
    if os.geteuid() != 0:  # pragma: no cover - CI runs as root
        pytest.skip("mounting a full tmpfs needs root")
    with _full_tmpfs(tmp_path / "full") as full:
        before = _wait_ticks_past(guest, 0)[-1]
        with pytest.raises(LibvirtError, match="No space left"):
            guest.save(full / "guest.save")
        assert guest.state is DomainState.RUNNING
        assert os.listdir(full) == []
        _wait_ticks_past(guest, before)


@pytest.mark.qemu
def test_qemu_save_restore_round_trip(
    guest: statecapture.Domain,
    qemu_conn: statecapture.Connection,
    qemu_root: Path,
    tmp_path: Path,
) -> None:
    """On QEMU: bad targets (an existing file, a planted symlink, a shared directory) are
    refused with the guest untouched; save writes a 0600 image with virDomainSaveParams;
    corrupt images are refused without side effects; the image's definition is redefined;
    restore resumes the guest where it stopped."""
    target = tmp_path / "guest.save"
    target.write_bytes(b"older")
    target.chmod(0o644)
    with pytest.raises(TargetExistsError):
        guest.save(target)
    assert target.read_bytes() == b"older"
    # A dangling symlink at the image name: refused, left alone, nothing created where it
    # points; a directory others can rename entries in is refused (libvirtd writes by path).
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "planted.save"
    planted.symlink_to(outside / "image")
    with pytest.raises(TargetExistsError):
        guest.save(planted)
    assert os.readlink(planted) == str(outside / "image") and list(outside.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError, match="not sticky"):
        guest.save(shared / "guest.save")
    assert list(shared.iterdir()) == [] and guest.state is DomainState.RUNNING
    planted.unlink()

    before = _wait_ticks_past(guest, 3)[-1]
    image = guest.save(target, overwrite=True)
    assert image.result is not None
    assert image.result.api == "virDomainSaveParams"
    assert image.result.was_running
    assert 0 < image.result.downtime < 120
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".save")) == ["guest.save"]
    assert guest.state is DomainState.SHUTOFF
    with pytest.raises(InvalidStateError, match="needs an active domain"):
        guest.save(tmp_path / "again.save")
    assert not (tmp_path / "again.save").exists()

    # corrupt images: garbage is refused from the header, a truncated one by QEMU
    garbage = tmp_path / "garbage.save"
    garbage.write_bytes(os.urandom(1 << 16))
    with pytest.raises(SaveImageError):
        qemu_conn.restore(garbage)
    truncated = tmp_path / "truncated.save"
    with open(target, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(target.stat().st_size // 2))
    with pytest.raises(SaveImageError):
        qemu_conn.restore(truncated)
    assert guest.state is DomainState.SHUTOFF

    opened = qemu_conn.save_image(target)
    defn = opened.definition
    assert defn.uuid == guest.uuid
    opened.redefine(attrs.evolve(defn, description="from the image"), running=False)
    assert opened.definition.description == "from the image"
    assert _mode(target) == 0o600

    with _qemu_log_on_failure(qemu_root, guest):
        restored = opened.restore()
    assert restored.api == "virDomainRestoreParams"
    assert not restored.running  # the image now says: restore paused
    assert restored.domain.state is DomainState.PAUSED
    assert restored.downtime == restored.duration
    with pytest.raises(InvalidStateError, match="already"):
        qemu_conn.restore(target)
    restored.domain.resume()
    assert guest.definition.description == "from the image"
    ticks = _wait_ticks_past(guest, before)
    _assert_continuous(ticks)

    # and once more, running, through Connection.restore
    guest.save(target, overwrite=True)
    with _qemu_log_on_failure(qemu_root, guest):
        dom = qemu_conn.restore(target, running=True)
    assert dom.state is DomainState.RUNNING
    _assert_continuous(_wait_ticks_past(guest, ticks[-1]))
