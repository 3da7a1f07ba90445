"""The safe file-creation helpers every writer uses (statecapture/_files.py)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from statecapture import _files
from statecapture.errors import CleanupError, TargetExistsError, UsageError


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory standing for "anywhere else on the host" (where links point)."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


@pytest.fixture
def target(tmp_path: Path) -> Path:
    d = tmp_path / "target"
    d.mkdir()
    return d


def test_lexists_counts_dangling_symlinks(target: Path, outside: Path) -> None:
    """One rule for "exists": a dangling symlink exists (Path.exists() says it does not)."""
    (target / "link").symlink_to(outside / "nowhere")
    assert not (target / "link").exists()
    assert _files.lexists(target / "link")
    with _files.Directory.open(target) as d:
        assert d.exists("link") and not d.exists("free")
    with pytest.raises(TargetExistsError, match="symbolic link") as caught:
        _files.check_free(target / "link")
    assert caught.value.path == str(target / "link")


@pytest.mark.parametrize("kind", ["file", "dangling", "symlink", "directory"])
def test_create_refuses_any_planted_name_and_leaves_it_alone(
    target: Path, outside: Path, kind: str
) -> None:
    """create() is O_EXCL|O_NOFOLLOW: a file, a (dangling) symlink or a directory at the name
    is a TargetExistsError; nothing is written through it and it is left as it was."""
    victim = outside / "victim"
    planted = target / "new.qcow2"
    if kind == "file":
        planted.write_bytes(b"theirs")
    elif kind == "dangling":
        planted.symlink_to(victim)
    elif kind == "symlink":
        victim.write_bytes(b"theirs")
        planted.symlink_to(victim)
    else:
        planted.mkdir()
    before = os.lstat(planted)
    with _files.Directory.open(target) as d, pytest.raises(TargetExistsError):
        d.create("new.qcow2")
    after = os.lstat(planted)
    assert (before.st_ino, before.st_mode, before.st_mtime_ns) == (
        after.st_ino,
        after.st_mode,
        after.st_mtime_ns,
    )
    if kind == "dangling":
        assert not victim.exists()
    if kind in ("file", "symlink"):
        assert planted.read_bytes() == b"theirs"


def test_create_is_owner_only_whatever_the_umask(target: Path) -> None:
    """New files are 0600 even under a permissive umask."""
    old = os.umask(0)
    try:
        with _files.Directory.open(target) as d:
            fd = d.create("f")
            os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target / "f").st_mode) == 0o600


def test_create_rejects_names_that_leave_the_directory(target: Path) -> None:
    """Only plain names are created relative to the directory."""
    with _files.Directory.open(target) as d:
        for bad in ("../x", "a/b", "", ".", ".."):
            with pytest.raises(UsageError):
                d.create(bad)


def test_directory_open_follows_the_path_once(tmp_path: Path, target: Path) -> None:
    """The directory is opened once: renaming it afterwards and planting a symlink at its old
    path does not move where files are created."""
    with _files.Directory.open(target) as d:
        target.rename(tmp_path / "moved")
        (tmp_path / "evil").mkdir()
        target.symlink_to(tmp_path / "evil")
        os.close(d.create("f"))
    assert (tmp_path / "moved" / "f").is_file()
    assert not (tmp_path / "evil" / "f").exists()


def test_fd_path_reaches_our_file_after_its_name_was_swapped(target: Path, outside: Path) -> None:
    """A child process writing to fd_path() writes the file we created, not whatever the name
    points to now (the `.partial` swap attack)."""
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    with _files.Directory.open(target) as d:
        fd = d.create("x.partial")
        try:
            os.rename(target / "x.partial", target / "x.moved")
            (target / "x.partial").symlink_to(victim)
            subprocess.run(["sh", "-c", f"printf data > {_files.fd_path(fd)}"], check=True)
            d.link_fd(fd, "x.final")
            assert not d.remove_if_same("x.partial", fd)  # the planted link is not ours
        finally:
            os.close(fd)
    assert victim.read_bytes() == b"precious"
    assert (target / "x.final").read_bytes() == b"data"
    assert not (target / "x.final").is_symlink()
    assert (target / "x.partial").is_symlink()


def test_link_fd_and_rename_never_replace(target: Path, outside: Path) -> None:
    """Putting a file in place fails with TargetExistsError when the name is taken (a file or
    a dangling symlink), and leaves the taken name alone."""
    (target / "taken").write_bytes(b"theirs")
    (target / "dangling").symlink_to(outside / "nowhere")
    with _files.Directory.open(target) as d, d.staging(".sc-test-") as stage:
        fd = d.create("mine")
        try:
            os.write(fd, b"mine")
            for name in ("taken", "dangling"):
                with pytest.raises(TargetExistsError):
                    d.link_fd(fd, name)
            os.close(stage.create("staged"))
            for name in ("taken", "dangling"):
                with pytest.raises(TargetExistsError):
                    d.rename_from(stage, "staged", name)
            d.rename_from(stage, "staged", "published")
        finally:
            os.close(fd)
    assert (target / "taken").read_bytes() == b"theirs"
    assert os.readlink(target / "dangling") == str(outside / "nowhere")
    assert not (outside / "nowhere").exists()
    assert (target / "published").is_file()


def test_rename_falls_back_to_link_and_unlink(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2 (old C library or file system), link+unlink keeps the no-replace rule."""

    class NoRenameat2:
        def __init__(self, *_a: object, **_k: object) -> None:
            pass

    monkeypatch.setattr(_files.ctypes, "CDLL", NoRenameat2)
    (target / "a").write_bytes(b"a")
    (target / "b").write_bytes(b"b")
    with _files.Directory.open(target) as d:
        with pytest.raises(FileExistsError):
            _files.renameat2_noreplace(d.fd, "a", d.fd, "b")
        _files.renameat2_noreplace(d.fd, "a", d.fd, "c")
    assert (target / "b").read_bytes() == b"b" and (target / "c").read_bytes() == b"a"
    assert not (target / "a").exists()


def test_staging_directory_is_private(target: Path) -> None:
    """staging() makes a new 0700 directory inside the opened one."""
    with _files.Directory.open(target) as d, d.staging(".sc-x-") as stage:
        assert stage.path.parent == target.resolve()
        assert stage.path.name.startswith(".sc-x-")
        st = os.lstat(stage.path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        d.remove_tree(stage.path.name)
    assert list(target.iterdir()) == []


def test_owner_only_fixes_modes_skips_links_and_raises_on_failure(
    target: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """owner_only() makes files 0600, leaves symlinks (and their targets) alone, ignores
    missing files, and raises CleanupError when a chmod fails — never a silent pass."""
    f = target / "f"
    f.write_bytes(b"")
    f.chmod(0o644)
    victim = outside / "victim"
    victim.write_bytes(b"")
    victim.chmod(0o644)
    (target / "link").symlink_to(victim)
    _files.owner_only([f, target / "link", target / "missing"])
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    f.chmod(0o644)

    def refuse(_fd: int, _mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_files.os, "fchmod", refuse)
    with pytest.raises(CleanupError, match=r"owner-only.*not permitted"):
        _files.owner_only([f], what="backup target")


def test_require_trusted_refuses_directories_others_can_rename_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory (or ancestor) someone else can rename entries in is refused for files
    QEMU creates by path; a sticky shared one only when files are staged or the kernel
    refuses to follow others' symlinks there."""
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o755)
    _files.require_trusted(ok, staged=False, what="t")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError, match="writable by other users and not sticky"):
        _files.require_trusted(shared, staged=True, what="t")
    inner = shared / "inner"
    inner.mkdir()
    with pytest.raises(UsageError, match="not sticky"):  # an ancestor counts too
        _files.require_trusted(inner, staged=True, what="t")
    shared.chmod(0o1777)
    _files.require_trusted(shared, staged=True, what="t")
    _files.require_trusted(inner, staged=False, what="t")
    monkeypatch.setattr(_files, "_protected_symlinks", lambda: False)
    with pytest.raises(UsageError, match="protected_symlinks"):
        _files.require_trusted(shared, staged=False, what="t")
    monkeypatch.setattr(_files, "_protected_symlinks", lambda: True)
    _files.require_trusted(shared, staged=False, what="t")
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(UsageError, match="owned by uid 65534"):
            _files.require_trusted(foreign, staged=True, what="t")
