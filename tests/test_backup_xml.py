"""BackupXML: libvirt's <domainbackup> as a value (pure, no libvirt)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statecapture import (
    BackupDiskXML,
    BackupMode,
    BackupXML,
    DiskBackupMode,
    NBDServer,
    UsageError,
    XMLError,
)
from tests.schema import assert_valid

LIBVIRT_PULL = """<domainbackup mode='pull'>
  <incremental>cp1</incremental>
  <server transport='unix' socket='/run/sc/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1'
          exportname='vda' exportbitmap='backup-vda' index='3'>
      <driver type='qcow2'/>
      <scratch file='/var/tmp/vda.scratch'>
        <seclabel model='dac' relabel='no'/>
      </scratch>
    </disk>
    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' index='4'>
      <driver type='qcow2'/>
      <scratch file='/var/tmp/vdb.scratch'/>
    </disk>
    <disk name='sda' backup='no'/>
  </disks>
</domainbackup>"""


def test_parse_libvirt_pull_document() -> None:
    """A pull job as libvirt reports it parses into modes, exports and bitmap contexts."""
    b = BackupXML.from_xml(LIBVIRT_PULL)
    assert b.mode is BackupMode.PULL
    assert b.server == NBDServer.unix("/run/sc/nbd.sock")
    assert [d.name for d in b.backed_up] == ["vda", "vdb"]
    assert b.disk_mode("vda") is DiskBackupMode.INCREMENTAL
    assert b.disk_mode("vdb") is DiskBackupMode.FULL
    assert b.disk_checkpoint("vda") == "cp1"
    assert b.disk_checkpoint("vdb") is None
    vda = b.disk("vda")
    assert vda.store == "/var/tmp/vda.scratch"
    assert vda.dirty_bitmap_context == "qemu:dirty-bitmap:backup-vda"
    assert b.disk("vdb").dirty_bitmap_context is None
    assert not b.disk("sda").backup


def test_round_trip_keeps_unmodelled_xml() -> None:
    """Seclabels and libvirt's index survive from_xml -> to_xml; modelled edits apply."""
    import attrs

    b = BackupXML.from_xml(LIBVIRT_PULL)
    again = BackupXML.from_xml(b.to_xml())
    assert again == b
    assert "seclabel" in b.to_xml() and 'index="3"' in b.to_xml()
    moved = attrs.evolve(
        b, disks=(attrs.evolve(b.disk("vda"), store="/srv/vda.scratch"), *b.disks[1:])
    )
    text = moved.to_xml()
    assert "/srv/vda.scratch" in text and "seclabel" in text


def test_default_mode_rule() -> None:
    """Without backupmode a disk is incremental iff a checkpoint is named (libvirt's rule)."""
    b = BackupXML(
        incremental="cp1",
        disks=(BackupDiskXML("vda", store="/b/vda.qcow2"), BackupDiskXML("vdb", store="/b/b")),
    )
    assert b.disk_mode("vda") is DiskBackupMode.INCREMENTAL
    assert BackupXML(disks=(BackupDiskXML("vda"),)).disk_mode("vda") is DiskBackupMode.FULL


def test_generated_push_document_validates() -> None:
    """What Domain.backup builds for push (full + incremental + excluded) passes the schema."""
    b = BackupXML(
        disks=(
            BackupDiskXML(
                "vda",
                mode=DiskBackupMode.INCREMENTAL,
                incremental="cp1",
                store="/b/dom.vda.cp2.qcow2",
                format="qcow2",
            ),
            BackupDiskXML("vdb", mode=DiskBackupMode.FULL, store="/b/x.qcow2", format="qcow2"),
            BackupDiskXML("vdc", backup=False),
        )
    )
    assert_valid(b.to_xml(), "domainbackup")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": BackupMode.PULL}, "NBD server"),
        ({"server": NBDServer.unix("/s")}, "pull-mode"),
        ({"disks": (BackupDiskXML("vda"), BackupDiskXML("vda"))}, "twice"),
        ({"disks": (BackupDiskXML("vda", mode=DiskBackupMode.INCREMENTAL),)}, "no checkpoint"),
        ({"disks": (BackupDiskXML("vda", export_name="x"),)}, "pull mode"),
        (
            {
                "mode": BackupMode.PULL,
                "server": NBDServer.unix("/s"),
                "disks": (BackupDiskXML("vda", format="raw"),),
            },
            "qcow2",
        ),
    ],
)
def test_inconsistent_documents_are_refused(kwargs: dict[str, object], match: str) -> None:
    """Combinations the schema or libvirt rejects raise UsageError when built."""
    with pytest.raises(UsageError, match=match):
        BackupXML(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": DiskBackupMode.FULL, "incremental": "cp"}, "full backup"),
        ({"store": "relative.qcow2"}, "absolute"),
        ({"backup": False, "store": "/x"}, "excluded"),
        ({"type": "network"}, "file"),
    ],
)
def test_bad_disks_are_refused(kwargs: dict[str, object], match: str) -> None:
    """A disk entry that libvirt would reject raises UsageError."""
    with pytest.raises(UsageError, match=match):
        BackupDiskXML("vda", **kwargs)  # type: ignore[arg-type]


def test_servers() -> None:
    """UNIX and TCP servers validate their fields and produce NBD URIs."""
    assert NBDServer.unix("/run/s.sock").uri == "nbd+unix:///?socket=/run/s.sock"
    assert NBDServer.tcp("localhost", 10809).uri == "nbd://localhost:10809/"
    with pytest.raises(UsageError):
        NBDServer.unix("relative.sock")
    with pytest.raises(UsageError):
        NBDServer("tcp")
    with pytest.raises(UsageError):
        NBDServer("rdma", socket="/x")


def test_tls_server_uri_says_nbds() -> None:
    """A server that requires TLS has an nbds URI (the NBD URI spec's TLS scheme), so a
    client given the URI negotiates TLS; tls=False/None stay nbd; an IPv6 address is
    bracketed. The server's XML still validates."""
    assert NBDServer.tcp("backup.example.org", 10809, tls=True).uri == (
        "nbds://backup.example.org:10809/"
    )
    assert NBDServer.unix("/run/s.sock", tls=True).uri == "nbds+unix:///?socket=/run/s.sock"
    assert NBDServer.tcp("h", 10809, tls=False).uri == "nbd://h:10809/"
    assert NBDServer.tcp("::1", 10810).uri == "nbd://[::1]:10810/"
    doc = BackupXML(
        mode=BackupMode.PULL,
        server=NBDServer.tcp("backup.example.org", 10809, tls=True),
        disks=(BackupDiskXML("vda"),),
    )
    assert_valid(doc.to_xml(), "domainbackup")
    assert BackupXML.from_xml(doc.to_xml()).server == doc.server


@pytest.mark.parametrize(
    "text",
    [
        "<domainbackup mode='sideways'/>",
        "<domainbackup><disks><disk/></disks></domainbackup>",
        "<domainbackup mode='pull'><server transport='unix' socket='rel'/></domainbackup>",
        "<domainbackup><disks><disk name='vda' backupmode='sometimes'/></disks></domainbackup>",
        "<domainsnapshot/>",
        "<domainbackup",
    ],
)
def test_malformed_documents_raise_xmlerror(text: str) -> None:
    """Bad input raises XMLError (a ValueError), never a bare lxml or attrs error."""
    with pytest.raises(XMLError):
        BackupXML.from_xml(text)


# ----------------------------------------------------------------------------- property test

_names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_paths = _names.map(lambda n: f"/b/{n}.img")


@st.composite
def _disks(draw: st.DrawFn, *, pull: bool, incremental: str | None) -> BackupDiskXML:
    name = draw(st.from_regex(r"(vd|sd|hd)[a-z]{1,2}", fullmatch=True))
    if not draw(st.booleans()):
        return BackupDiskXML(name, backup=False)
    mode = draw(st.sampled_from([None, DiskBackupMode.FULL, DiskBackupMode.INCREMENTAL]))
    inc = None
    if mode is not DiskBackupMode.FULL:
        inc = draw(st.one_of(st.none(), _names))
        if mode is DiskBackupMode.INCREMENTAL and inc is None and incremental is None:
            inc = draw(_names)
    type_ = draw(st.sampled_from(["file", "block"]))
    store = draw(st.one_of(st.none(), _paths)) if type_ == "file" else draw(_paths)
    fmt = "qcow2" if pull else draw(st.sampled_from([None, "qcow2", "raw"]))
    if pull and store is None:
        fmt = None  # the schema pairs a pull driver with a scratch file
    return BackupDiskXML(
        name,
        mode=mode,
        incremental=inc,
        type=type_,
        store=store,
        format=draw(st.sampled_from([None, fmt])),
        export_name=draw(st.one_of(st.none(), _names)) if pull else None,
        export_bitmap=draw(st.one_of(st.none(), _names)) if pull else None,
    )


@st.composite
def _documents(draw: st.DrawFn) -> BackupXML:
    pull = draw(st.booleans())
    incremental = draw(st.one_of(st.none(), _names))
    disks = draw(st.lists(_disks(pull=pull, incremental=incremental), max_size=4))
    unique = {d.name: d for d in disks}
    server = None
    if pull:
        server = draw(
            st.one_of(
                _paths.map(NBDServer.unix),
                st.builds(
                    NBDServer.tcp,
                    st.sampled_from(["localhost", "127.0.0.1", "backup.example"]),
                    st.integers(1, 65535),
                    tls=st.one_of(st.none(), st.booleans()),
                ),
            )
        )
    return BackupXML(
        mode=BackupMode.PULL if pull else BackupMode.PUSH,
        incremental=incremental,
        server=server,
        disks=tuple(unique.values()),
    )


@settings(deadline=None)  # examples: the dev/ci profile (tests/conftest.py)
@given(_documents())
def test_round_trip_and_schema(doc: BackupXML) -> None:
    """Any BackupXML we can build serialises to schema-valid XML that parses back equal."""
    text = doc.to_xml()
    assert_valid(text, "domainbackup")
    assert BackupXML.from_xml(text) == doc
    # and a second round trip from the parsed document is stable
    assert BackupXML.from_xml(BackupXML.from_xml(text).to_xml()).to_xml() == text
