"""Checkpoints: Domain.checkpoints and Checkpoint handles.

Fast tier on the private test driver (``test_domain``: running ``alpha`` with qcow2 ``vda``
and cdrom ``sda``; inactive ``beta`` with a raw ``vda``); real tier on embedded QEMU with
the test guest (qcow2 data disks ``vda``/``vdb``, a tick line written to ``/data`` every
0.1 s).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

import statecapture
from statecapture import (
    Checkpoint,
    CheckpointInconsistentError,
    CheckpointXML,
    InvalidStateError,
    LibvirtError,
    NotFoundError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    XMLError,
)
from statecapture._checkpoint import _refine
from statecapture.testing.faults import inject
from tests._raw import raw_domain
from tests.schema import assert_valid


def _names(cps: list[Checkpoint] | tuple[Checkpoint, ...]) -> list[str]:
    return [c.name for c in cps]


def _parent(cp: Checkpoint) -> str | None:
    p = cp.parent
    return p.name if p is not None else None


# ============================================================================ fast tier


def test_create_default_and_collection_queries(test_domain: statecapture.Domain) -> None:
    """create() with libvirt's defaults; [name], in, len, list(), roots(), parent/children."""
    cps = test_domain.checkpoints
    assert len(cps) == 0 and cps.list() == [] and "c1" not in cps
    c1 = cps.create("c1")
    assert isinstance(c1, Checkpoint) and c1.name == "c1" and c1.domain is test_domain
    d = c1.definition
    assert [(x.name, x.checkpoint, x.bitmap) for x in d.disks] == [
        ("vda", "bitmap", "c1"),
        ("sda", "no", None),
    ]
    assert d.domain is not None and d.domain.uuid == test_domain.uuid
    c2 = cps.create("c2")
    c3 = cps.create("c3")
    assert len(cps) == 3 and "c2" in cps and 42 not in cps
    assert _names(cps.list()) == ["c1", "c2", "c3"]  # parents first
    assert _names(list(cps)) == ["c1", "c2", "c3"]
    assert _names(cps.roots()) == ["c1"]
    assert cps["c2"].name == "c2"
    assert c1.parent is None and _parent(c2) == "c1" and _parent(c3) == "c2"
    assert _names(c1.children) == ["c2"] and c3.children == ()
    unnamed = cps.create()  # libvirt names it
    assert unnamed.name in cps and _parent(unnamed) == "c3"
    with pytest.raises(NotFoundError, match="nope") as info:
        cps["nope"]
    assert isinstance(info.value, LookupError)
    assert "c3" in cps._repr_html_() and "vda" in c1._repr_html_()


def test_create_selected_disks(test_domain: statecapture.Domain) -> None:
    """disks=[targets] tracks those disks and sets checkpoint='no' for the others."""
    cps = test_domain.checkpoints
    planned = cps._plan_disks(["vda"])
    assert_valid(CheckpointXML(name="sel", disks=planned).to_xml(), "domaincheckpoint")
    cp = cps.create("sel", disks=["vda"])
    assert [(x.name, x.checkpoint) for x in cp.definition.disks] == [
        ("vda", "bitmap"),
        ("sda", "no"),
    ]
    assert [x.name for x in cp.definition.tracked_disks] == ["vda"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": ".bad"}, UsageError, "not valid"),
        ({"name": "x", "disks": "vda"}, UsageError, "sequence of disk targets"),
        ({"name": "x", "disks": []}, UsageError, "track no disk"),
        ({"name": "x", "disks": ["vda", "vda"]}, UsageError, "more than once"),
        ({"name": "x", "disks": ["vdz"]}, NotFoundError, "no disk 'vdz'"),
        ({"name": "x", "disks": ["sda"]}, UnsupportedError, "cdrom"),
    ],
)
def test_create_refuses_bad_input_before_any_change(
    test_domain: statecapture.Domain, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Bad names and disks raise typed errors and no checkpoint is made."""
    with pytest.raises(error, match=match):
        test_domain.checkpoints.create(**kwargs)
    assert len(test_domain.checkpoints) == 0


def test_create_refuses_taken_name_and_raw_disk(test_conn: statecapture.Connection) -> None:
    """A taken name is a UsageError; a raw disk cannot hold a bitmap (UnsupportedError)."""
    alpha = test_conn.domain("alpha")
    alpha.checkpoints.create("c1")
    with pytest.raises(UsageError, match="already has a checkpoint named 'c1'"):
        alpha.checkpoints.create("c1")
    assert len(alpha.checkpoints) == 1
    beta = test_conn.domain("beta")
    with pytest.raises(UnsupportedError, match="only qcow2 images can hold"):
        beta.checkpoints.create("b1", disks=["vda"])
    assert len(beta.checkpoints) == 0


def test_test_driver_refuses_checkpoint_while_snapshot_exists(
    test_domain: statecapture.Domain,
) -> None:
    """HAZARD 13: the test driver (not QEMU) refuses a checkpoint next to a snapshot."""
    raw_domain(test_domain).snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    with pytest.raises(UnsupportedError, match="snapshot"):
        test_domain.checkpoints.create("c1")
    assert len(test_domain.checkpoints) == 0


def test_dirty_bytes_and_validate_need_support_and_a_running_domain(
    test_domain: statecapture.Domain,
) -> None:
    """The test driver reports no sizes and cannot validate: UnsupportedError, explained.
    A stopped domain: InvalidStateError before libvirt is asked."""
    cp = test_domain.checkpoints.create("c1")
    with pytest.raises(UnsupportedError, match="does not count dirty blocks"):
        cp.dirty_bytes()
    with pytest.raises(UnsupportedError, match="does not support the option"):
        cp.validate()
    with pytest.raises(UnsupportedError):
        test_domain.checkpoints.redefine(cp.definition, validate=True)
    test_domain.destroy()
    with pytest.raises(InvalidStateError, match="needs a running domain"):
        cp.dirty_bytes()
    with pytest.raises(InvalidStateError, match="needs a running domain"):
        cp.validate()
    with pytest.raises(InvalidStateError):
        test_domain.checkpoints.redefine(cp.definition, validate=True)


def test_delete_variants(test_domain: statecapture.Domain) -> None:
    """delete() reparents children; children=True removes the subtree; metadata_only too."""
    cps = test_domain.checkpoints
    for n in ("c1", "c2", "c3", "c4"):
        cps.create(n)
    cps["c2"].delete()
    assert _names(cps.list()) == ["c1", "c3", "c4"] and _parent(cps["c3"]) == "c1"
    cps["c3"].delete(children=True)
    assert _names(cps.list()) == ["c1"]
    cps["c1"].delete(metadata_only=True)
    assert len(cps) == 0


def test_failed_delete_keeps_children_attached(test_domain: statecapture.Domain) -> None:
    """When libvirt fails a delete after detaching the children (libvirt 9.0 does), the
    parent links are restored and the error names the missing bitmap (fault injected)."""
    cps = test_domain.checkpoints
    cps.create("c1")
    cps.create("c2")
    cps.create("c3", disks=["vda"])  # grandchild: untouched
    message = "internal error: bitmap 'c1' not found in backing chain of 'vda'"
    raw = raw_domain(test_domain)

    def detach_children() -> None:  # what libvirt 9.0 does before it fails
        for kid in raw.checkpointLookupByName("c1").listAllChildren(0):
            orphan = CheckpointXML.from_xml(kid.getXMLDesc(0))
            xml = _evolve(orphan, parent=None).to_xml()
            raw.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)

    failure = LibvirtError(
        f"checkpoint delete failed: {message}",
        code=1,
        operation="checkpoint delete",
        domain_name="alpha",
        libvirt_message=message,
    )
    with (
        inject(test_domain, "checkpoint.delete", before=detach_children, raises=failure),
        pytest.raises(CheckpointInconsistentError) as info,
    ):
        cps["c1"].delete()  # the handle's port is the intercepted domain's
    assert (info.value.disk, info.value.bitmap) == ("vda", "c1")
    assert "metadata_only=True" in str(info.value)
    assert _parent(cps["c2"]) == "c1" and _parent(cps["c3"]) == "c2"


def _evolve(cp: CheckpointXML, **kw: Any) -> CheckpointXML:
    import attrs

    return attrs.evolve(cp, **kw)


def test_redefine_brings_metadata_back(test_domain: statecapture.Domain) -> None:
    """redefine() restores a forgotten checkpoint (without validation on the test driver)."""
    cps = test_domain.checkpoints
    saved = cps.create("c1").definition
    cps["c1"].delete(metadata_only=True)
    back = cps.redefine(saved.to_xml(), validate=False)
    assert back.name == "c1" and back.definition == saved
    with pytest.raises(UsageError, match="needs its <name>"):
        cps.redefine(CheckpointXML(), validate=False)
    with pytest.raises(UsageError, match="checkpoint XML text or a CheckpointXML"):
        cps.redefine(42, validate=False)  # type: ignore[arg-type]


def test_export_import_round_trip(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """export_metadata writes an owner-only file, never overwrites by default; after the
    metadata is gone import_metadata brings back the chain and the next checkpoint
    continues it."""
    cps = test_domain.checkpoints
    for n in ("c1", "c2", "c3"):
        cps.create(n)
    before = {c.name: c.definition for c in cps.list()}
    path = tmp_path / "alpha.checkpoints.xml"
    assert cps.export_metadata(path) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(TargetExistsError):
        cps.export_metadata(path)
    assert cps.export_metadata(path, overwrite=True) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files
    # a dangling symlink at the name is refused and left alone, nothing written through it
    planted = tmp_path / "planted.xml"
    planted.symlink_to(tmp_path / "elsewhere.xml")
    with pytest.raises(TargetExistsError):
        cps.export_metadata(planted)
    assert planted.is_symlink() and not (tmp_path / "elsewhere.xml").exists()
    planted.unlink()
    for cp in reversed(cps.list()):
        cp.delete(metadata_only=True)
    assert len(cps) == 0

    imported = cps.import_metadata(path, validate=False)
    assert _names(imported) == ["c1", "c2", "c3"]
    assert {c.name: c.definition for c in cps.list()} == before
    assert _parent(cps.create("c4")) == "c3"
    with pytest.raises(UsageError, match="already has checkpoint"):
        cps.import_metadata(path, validate=False)
    assert len(cps) == 4


def test_import_rolls_back_on_failure(test_domain: statecapture.Domain, tmp_path: Path) -> None:
    """If one redefinition fails, the checkpoints imported before it are removed again."""
    cps = test_domain.checkpoints
    for n in ("c1", "c2", "c3"):
        cps.create(n)
    path = tmp_path / "cp.xml"
    cps.export_metadata(path)
    for cp in reversed(cps.list()):
        cp.delete(metadata_only=True)
    message = "checkpoint inconsistent: missing or broken bitmap 'c2' for disk 'vda'"
    failure = statecapture.CheckpointInconsistentError(
        f"checkpoint create failed: {message}",
        code=109,
        operation="checkpoint create",
        domain_name="alpha",
        libvirt_message=message,
    )
    with (
        inject(
            test_domain,
            "checkpoint_create",
            raises=failure,
            when=lambda xml, **_kw: "<name>c2</name>" in xml,
        ),
        pytest.raises(CheckpointInconsistentError) as info,
    ):
        cps.import_metadata(path, validate=False)
    assert (info.value.disk, info.value.bitmap) == ("vda", "c2")
    assert len(cps) == 0


def test_import_into_domain_with_new_uuid(
    test_conn: statecapture.Connection, test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """A domain defined anew under another UUID accepts the chain (the stored old
    definition is dropped, since libvirt refuses a foreign UUID)."""
    test_domain.checkpoints.create("c1")
    test_domain.checkpoints.create("c2")
    path = tmp_path / "cp.xml"
    test_domain.checkpoints.export_metadata(path)
    xml = test_domain.inactive_definition
    clone = test_conn.define(
        _evolve(xml, name="gamma", uuid="11111111-2222-3333-4444-555555555555")
    )
    clone.start()  # the test driver redefines checkpoints of running domains only
    imported = clone.checkpoints.import_metadata(path, validate=False)
    assert _names(imported) == ["c1", "c2"]
    assert _parent(clone.checkpoints["c2"]) == "c1"
    assert clone.checkpoints["c1"].definition.domain is None


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ("<domain/>", XMLError, "expected a <checkpoints>"),
        ("<checkpoints format='other/1'/>", XMLError, "not a statecapture checkpoint export"),
        (
            "<checkpoints format='statecapture-checkpoints/1'><domaincheckpoint><name>a</name>"
            "<parent><name>zz</name></parent></domaincheckpoint></checkpoints>",
            NotFoundError,
            "parent 'zz'",
        ),
        (
            "<checkpoints format='statecapture-checkpoints/1'>"
            "<domaincheckpoint><name>a</name><parent><name>b</name></parent></domaincheckpoint>"
            "<domaincheckpoint><name>b</name><parent><name>a</name></parent></domaincheckpoint>"
            "</checkpoints>",
            XMLError,
            "cycle",
        ),
        (
            "<checkpoints format='statecapture-checkpoints/1'>"
            "<domaincheckpoint><name>a</name></domaincheckpoint>"
            "<domaincheckpoint><name>a</name></domaincheckpoint></checkpoints>",
            XMLError,
            "twice",
        ),
        (
            "<checkpoints format='statecapture-checkpoints/1'><domaincheckpoint/></checkpoints>",
            XMLError,
            "no <name>",
        ),
    ],
)
def test_import_rejects_bad_files(
    test_domain: statecapture.Domain,
    tmp_path: Path,
    content: str,
    error: type[Exception],
    match: str,
) -> None:
    """Files that are not a consistent export are refused before any change."""
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(error, match=match):
        test_domain.checkpoints.import_metadata(path, validate=False)
    assert len(test_domain.checkpoints) == 0


def test_import_missing_file_and_validate_on_stopped_domain(
    test_domain: statecapture.Domain, tmp_path: Path
) -> None:
    """A missing file is NotFoundError; validate=True on a stopped domain is refused first."""
    with pytest.raises(NotFoundError, match="no checkpoint export"):
        test_domain.checkpoints.import_metadata(tmp_path / "none.xml")
    test_domain.checkpoints.create("c1")
    path = tmp_path / "cp.xml"
    test_domain.checkpoints.export_metadata(path)
    test_domain.checkpoints["c1"].delete(metadata_only=True)
    test_domain.destroy()
    with pytest.raises(InvalidStateError, match="validate=True"):
        test_domain.checkpoints.import_metadata(path)
    assert len(test_domain.checkpoints) == 0


@pytest.mark.parametrize(
    ("message", "code", "cls", "disk", "bitmap"),
    [
        (
            "checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda'",
            109,
            CheckpointInconsistentError,
            "vda",
            "c1",
        ),
        (
            "internal error: bitmap 'c1' not found in backing chain of 'vdb'",
            1,
            CheckpointInconsistentError,
            "vdb",
            "c1",
        ),
        (
            "internal error: unable to execute QEMU command 'transaction': "
            "Bitmap already exists: c2",
            1,
            CheckpointInconsistentError,
            None,
            "c2",
        ),
    ],
)
def test_libvirt_bitmap_messages_name_disk_and_bitmap(
    message: str, code: int, cls: type[Exception], disk: str | None, bitmap: str
) -> None:
    """libvirt 9.0 / QEMU 7.2 messages about bitmaps become CheckpointInconsistentError
    with the disk and bitmap (messages as seen on real QEMU in this project)."""
    exc = statecapture.errors.lookup(code)(
        f"x failed: {message}", code=code, operation="x", libvirt_message=message
    )
    new = _refine(exc, "c1")
    assert isinstance(new, cls)
    assert isinstance(new, CheckpointInconsistentError)
    assert (new.disk, new.bitmap) == (disk, bitmap)
    assert new.libvirt_message == message and new.code == code


def test_raw_disk_message_gets_a_hint() -> None:
    """libvirt's 'unsupported for storage type raw' keeps its class and gains the way out."""
    message = "unsupported configuration: checkpoint for disk vdb unsupported for storage type raw"
    exc = UnsupportedError(f"x: {message}", code=67, libvirt_message=message)
    new = _refine(exc, None)
    assert type(new) is UnsupportedError and "disks=[...]" in str(new)
    other = LibvirtError("x", code=1, libvirt_message="something else")
    assert _refine(other, None) is other


# ============================================================================ real tier


def _qmp(dom: statecapture.Domain, command: str, **arguments: Any) -> Any:
    import libvirt_qemu

    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    reply = libvirt_qemu.qemuMonitorCommand(raw_domain(dom), json.dumps(cmd), 0)
    return json.loads(reply)["return"]


def _bitmaps(dom: statecapture.Domain) -> dict[str, list[str]]:
    """QEMU's view: image path -> bitmap names."""
    nodes = _qmp(dom, "query-named-block-nodes", flat=True)
    return {
        n["file"]: sorted(b["name"] for b in n.get("dirty-bitmaps", []))
        for n in nodes
        if n["drv"] == "qcow2"
    }


def _remove_bitmap_behind_libvirts_back(dom: statecapture.Domain, disk: str, name: str) -> None:
    source = dom.disk(disk).source
    nodes = _qmp(dom, "query-named-block-nodes", flat=True)
    node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == source)
    _qmp(dom, "block-dirty-bitmap-remove", node=node, name=name)


@pytest.mark.qemu
def test_real_checkpoints_sizes_and_broken_bitmap(guest_factory: Any) -> None:
    """On QEMU: default and per-disk checkpoints, dirty bytes per disk growing with guest
    writes, validate() passing, then a bitmap removed behind libvirt's back is detected by
    validate() and dirty_bytes() with the disk and bitmap named; the undeletable checkpoint
    keeps its child attached and goes with delete(metadata_only=True); a metadata-only delete
    leaves the bitmap in the image and a new checkpoint of that name is explained."""
    from statecapture.testing import guest_exec

    dom = guest_factory(disks=2)
    vda, vdb = dom.disk("vda").source, dom.disk("vdb").source
    cps = dom.checkpoints

    c1 = cps.create("c1")
    assert [(d.name, d.checkpoint) for d in c1.definition.disks] == [
        ("vda", "bitmap"),
        ("vdb", "bitmap"),
    ]
    c2 = cps.create("c2", disks=["vda"])
    assert [(d.name, d.checkpoint) for d in c2.definition.disks] == [
        ("vda", "bitmap"),
        ("vdb", "no"),
    ]
    assert _parent(c2) == "c1" and _names(c1.children) == ["c2"]
    assert _bitmaps(dom) == {vda: ["c1", "c2"], vdb: ["c1"]}

    with pytest.raises(NotFoundError, match="vdz"):
        cps.create("c3", disks=["vdz"])
    assert len(cps) == 2

    guest_exec(dom, ["/bin/sh", "-c", "dd if=/dev/urandom of=/data1/x bs=64k count=8"])
    guest_exec(dom, ["/bin/sync"])
    sizes1 = c1.dirty_bytes()
    assert set(sizes1) == {"vda", "vdb"}
    assert sizes1["vdb"] >= 512 * 1024  # the 512 KiB written to /data1, at least
    assert sizes1["vda"] > 0  # the ticks
    assert set(c2.dirty_bytes()) == {"vda"}  # vdb is not tracked by c2
    c1.validate()
    c2.validate()

    # ---- HAZARD 1: the bitmap vanishes behind libvirt's back
    _remove_bitmap_behind_libvirts_back(dom, "vdb", "c1")
    with pytest.raises(CheckpointInconsistentError) as info:
        c1.validate()
    assert (info.value.disk, info.value.bitmap) == ("vdb", "c1")
    assert info.value.code == 109
    c2.validate()  # the other checkpoint is fine
    with pytest.raises(CheckpointInconsistentError) as info:
        c1.dirty_bytes()
    assert (info.value.disk, info.value.bitmap) == ("vdb", "c1")

    # ---- HAZARD 2: it cannot be deleted; libvirt 9.0 would orphan c2, statecapture does not
    with pytest.raises(CheckpointInconsistentError) as info:
        c1.delete()
    assert (info.value.disk, info.value.bitmap) == ("vdb", "c1")
    assert _names(cps.list()) == ["c1", "c2"] and _parent(cps["c2"]) == "c1"

    # ---- HAZARD 3: metadata-only delete leaves bitmaps behind
    c1.delete(metadata_only=True)
    assert _names(cps.list()) == ["c2"] and cps["c2"].parent is None
    assert _bitmaps(dom)[vda] == ["c1", "c2"]  # c1 stays inside vda's image
    with pytest.raises(CheckpointInconsistentError, match="already inside a disk image") as info:
        cps.create("c1")
    assert info.value.bitmap == "c1"
    assert _names(cps.list()) == ["c2"]

    # a proper delete removes the bitmap from the image too
    c3 = cps.create("c3", disks=["vda"])
    c3.delete()
    assert "c3" not in _bitmaps(dom)[vda] and _names(cps.list()) == ["c2"]


@pytest.mark.qemu
def test_real_export_undefine_define_import_continues_chain(
    guest_factory: Any, tmp_path: Path
) -> None:
    """On QEMU: checkpoints exported, the domain shut down and undefined (disks kept),
    defined again — with a raw disk added — and the metadata imported: validation passes
    and the next checkpoint's parent is the last imported one (validating an older one does
    not change that); the raw disk is refused with an explanation, before (explicit disks)
    or by libvirt (default disks). While shut off, QEMU can neither create nor delete."""
    dom = guest_factory(disks=1)
    cps = dom.checkpoints
    cps.create("c1")
    time.sleep(1.1)  # distinct creation times (seconds)
    cps.create("c2")
    path = tmp_path / "chain.xml"
    assert cps.export_metadata(path) == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    definition = dom.inactive_definition

    dom.shutdown(timeout=60)  # a clean close writes the bitmaps into the qcow2 image
    with pytest.raises(InvalidStateError):
        cps["c2"].dirty_bytes()
    with pytest.raises(UnsupportedError, match="inactive"):  # QEMU 9.0: running domains only
        cps["c2"].delete()
    with pytest.raises(UnsupportedError, match="inactive"):
        cps.create("c3")
    assert _names(cps.list()) == ["c1", "c2"] and _parent(cps["c2"]) == "c1"
    dom.undefine(checkpoints_metadata=True)

    extra = tmp_path / "extra.raw"
    with open(extra, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    again = dom.connection.define(_with_raw_disk(definition.to_xml(), extra))
    assert again.uuid == dom.uuid and len(again.checkpoints) == 0
    with pytest.raises(InvalidStateError, match="validate=True"):
        again.checkpoints.import_metadata(path)
    assert len(again.checkpoints) == 0
    with pytest.raises(UnsupportedError, match="only qcow2 images can hold"):
        again.checkpoints.create("c3", disks=["vdb"])

    again.start()
    imported = again.checkpoints.import_metadata(path)  # validates each against the image
    assert _names(imported) == ["c1", "c2"]
    assert _parent(again.checkpoints["c2"]) == "c1"
    for cp in reversed(again.checkpoints.list()):
        cp.validate()  # validating c1 last does not make it the current checkpoint
    with pytest.raises(UnsupportedError, match=r"disks=\[\.\.\.\]"):
        again.checkpoints.create("c3")  # libvirt's default includes the raw vdb
    c3 = again.checkpoints.create("c3", disks=["vda"])
    assert _parent(c3) == "c2"
    assert set(c3.dirty_bytes()) == {"vda"}


@pytest.mark.qemu
def test_real_unknown_checkpoint_and_undefine_refusal_name_the_way_out(guest_factory: Any) -> None:
    """On QEMU: looking up an unknown checkpoint names the ones that exist (closest first);
    undefining a shut-off domain that has checkpoints is refused with an error naming
    undefine(checkpoints_metadata=True), which then succeeds."""
    dom = guest_factory(agent=False, start=False)
    dom.start(paused=True)  # checkpoints need a QEMU process, not a booted guest
    dom.checkpoints.create("nightly-1")
    dom.checkpoints.create("nightly-2")
    with pytest.raises(statecapture.NotFoundError) as info:
        dom.checkpoints["nightly-3"]
    assert "did you mean 'nightly-1' or 'nightly-2'?" in str(info.value) or (
        "did you mean 'nightly-2' or 'nightly-1'?" in str(info.value)
    )
    assert "existing checkpoints: nightly-1, nightly-2" in str(info.value)
    dom.destroy()
    with pytest.raises(InvalidStateError, match=r"undefine\(checkpoints_metadata=True\)") as ref:
        dom.undefine()
    assert "2 checkpoints" in str(ref.value)  # libvirt's own words are kept
    assert dom.is_persistent and len(dom.checkpoints) == 2
    dom.undefine(checkpoints_metadata=True)
    with pytest.raises(statecapture.NotFoundError):
        dom.connection.domain(dom.name)


def _with_raw_disk(xml: str, image: Path) -> str:
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{image}'/><target dev='vdb' bus='virtio'/></disk>"
    )
    return xml.replace("</devices>", disk + "</devices>", 1)
