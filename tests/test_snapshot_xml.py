"""SnapshotXML: typed parts, round trips, preserved unknown XML, schema-valid output."""

from __future__ import annotations

import datetime

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from statecapture import (
    DomainXML,
    SnapshotDisk,
    SnapshotDiskMode,
    SnapshotMemory,
    SnapshotMemoryMode,
    SnapshotXML,
    UsageError,
    XMLError,
)
from statecapture._snapshot import SnapshotKind
from tests.schema import assert_valid

DOMAIN = """<domain type='kvm'>
  <name>guest1</name>
  <uuid>b17b8f4e-843d-4007-8ae3-070cc145c820</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/guest1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""

# What libvirt 9.0 reports for an external snapshot with memory, plus extras it may add.
EXTERNAL = f"""<domainsnapshot>
  <name>e1</name>
  <description>before the upgrade</description>
  <state>running</state>
  <parent>
    <name>i1</name>
  </parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='external' file='/images/guest1.e1.memory'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/images/guest1.qcow2.e1'>
        <seclabel model='dac' relabel='no'/>
      </source>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  {DOMAIN}
  <cookie>
    <cpu mode='custom'><model>qemu64</model></cpu>
  </cookie>
</domainsnapshot>"""


def test_parse_external_snapshot() -> None:
    """Every modelled part of a libvirt snapshot document is typed."""
    snap = SnapshotXML.from_xml(EXTERNAL)
    assert snap.name == "e1"
    assert snap.description == "before the upgrade"
    assert snap.state == "running"
    assert snap.parent == "i1"
    assert snap.creation_time == 1700000000
    assert snap.created == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)
    assert snap.memory == SnapshotMemory(SnapshotMemoryMode.EXTERNAL, "/images/guest1.e1.memory")
    vda, vdb = snap.disks
    assert vda == SnapshotDisk("vda", SnapshotDiskMode.EXTERNAL, "/images/guest1.qcow2.e1", "qcow2")
    assert vdb == SnapshotDisk("vdb", SnapshotDiskMode.NO)
    assert snap.disk("vdb") is vdb
    with pytest.raises(KeyError):
        snap.disk("vdc")
    assert isinstance(snap.domain, DomainXML)
    assert snap.domain.name == "guest1"
    assert snap.domain.disks[0].source == "/images/guest1.qcow2"
    assert snap.is_external and snap.has_memory
    assert SnapshotKind.of(snap) is SnapshotKind.EXTERNAL


def test_round_trip_keeps_unknown_xml() -> None:
    """from_xml -> to_xml keeps the cookie, seclabels and the whole embedded domain."""
    snap = SnapshotXML.from_xml(EXTERNAL)
    out = snap.to_xml()
    assert SnapshotXML.from_xml(out) == snap
    root = etree.fromstring(out)
    assert root.find("cookie/cpu/model").text == "qemu64"
    assert root.find("disks/disk/source/seclabel").get("model") == "dac"
    assert root.find("domain/os/type").text == "hvm"
    assert_valid(out, "domainsnapshot")


def test_evolve_changes_only_modelled_fields() -> None:
    """attrs.evolve + to_xml rewrites the modelled parts and keeps the rest."""
    snap = SnapshotXML.from_xml(EXTERNAL)
    new_vda = attrs.evolve(snap.disks[0], source="/elsewhere/vda.e1")
    changed = attrs.evolve(
        snap,
        description="renamed",
        parent=None,
        disks=(new_vda,),
        domain=attrs.evolve(snap.domain, description="captured"),
    )
    out = changed.to_xml()
    assert_valid(out, "domainsnapshot")
    again = SnapshotXML.from_xml(out)
    assert again == changed
    root = etree.fromstring(out)
    assert root.find("parent") is None
    assert [d.get("name") for d in root.iterfind("disks/disk")] == ["vda"]
    assert root.find("disks/disk/source").get("file") == "/elsewhere/vda.e1"
    assert root.find("disks/disk/source/seclabel") is not None  # kept on the renamed source
    assert root.find("domain/description").text == "captured"
    assert root.find("cookie") is not None
    dropped = attrs.evolve(changed, memory=None, disks=(), domain=None).to_xml()
    root = etree.fromstring(dropped)
    assert root.find("memory") is None and root.find("disks") is None
    assert root.find("domain") is None


def test_switching_a_disk_to_internal_drops_overlay_parts() -> None:
    """A disk turned internal loses its source, driver and type (the schema forbids them)."""
    snap = SnapshotXML.from_xml(EXTERNAL)
    internal = attrs.evolve(snap, disks=(SnapshotDisk("vda", SnapshotDiskMode.INTERNAL),))
    out = internal.to_xml()
    el = etree.fromstring(out).find("disks/disk")
    assert el.attrib == {"name": "vda", "snapshot": "internal"}
    assert len(el) == 0


def test_internal_and_disk_only_kinds() -> None:
    """The kind follows the memory and disk modes."""
    internal = SnapshotXML(
        memory=SnapshotMemory("internal"), disks=(SnapshotDisk("vda", "internal"),)
    )
    assert SnapshotKind.of(internal) is SnapshotKind.INTERNAL
    off = SnapshotXML(state="shutoff", memory=SnapshotMemory("no"))
    assert SnapshotKind.of(off) is SnapshotKind.INTERNAL_DISK_ONLY
    disk_only = SnapshotXML(
        state="disk-snapshot",
        memory=SnapshotMemory("no"),
        disks=(SnapshotDisk("vda", source="/i/vda.s1"),),
    )
    assert disk_only.disks[0].effective_mode is SnapshotDiskMode.EXTERNAL
    assert SnapshotKind.of(disk_only) is SnapshotKind.EXTERNAL_DISK_ONLY
    assert not SnapshotKind.EXTERNAL_DISK_ONLY.with_memory
    assert SnapshotKind.EXTERNAL_DISK_ONLY.external
    # Without <memory>, the state tells whether memory was captured.
    assert SnapshotXML(state="paused").has_memory
    assert not SnapshotXML(state="disk-snapshot").has_memory


def test_minimal_document_for_create() -> None:
    """A document built from scratch is what snapshot creation needs, and schema-valid."""
    doc = SnapshotXML(
        name="s1",
        description="nightly",
        memory=SnapshotMemory(SnapshotMemoryMode.NO),
        disks=(SnapshotDisk("vda", SnapshotDiskMode.EXTERNAL, "/i/vda.s1", "qcow2"),),
    )
    out = doc.to_xml()
    assert_valid(out, "domainsnapshot")
    assert out.startswith("<domainsnapshot>")
    assert SnapshotXML.from_xml(out) == doc


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<domainsnapshot><name>x</name>", "malformed"),
        ("<domain><name>x</name></domain>", "expected a <domainsnapshot>"),
        ("<domainsnapshot><memory snapshot='sideways'/></domainsnapshot>", "memory snapshot mode"),
        ("<domainsnapshot><memory/></domainsnapshot>", "snapshot="),
        ("<domainsnapshot><memory snapshot='external'/></domainsnapshot>", "needs the file"),
        ("<domainsnapshot><memory snapshot='no' file='/m'/></domainsnapshot>", "only allowed"),
        ("<domainsnapshot><creationTime>soon</creationTime></domainsnapshot>", "creationTime"),
        ("<domainsnapshot><disks><disk snapshot='no'/></disks></domainsnapshot>", "without name"),
        (
            "<domainsnapshot><disks><disk name='vda' snapshot='maybe'/></disks></domainsnapshot>",
            "disk snapshot mode",
        ),
        (
            "<domainsnapshot><disks><disk name='vda' snapshot='internal'>"
            "<source file='/x'/></disk></disks></domainsnapshot>",
            "only makes sense",
        ),
        (
            "<domainsnapshot><disks><disk name='vda'><source file='rel/x'/></disk></disks>"
            "</domainsnapshot>",
            "absolute path",
        ),
    ],
)
def test_bad_documents_raise_xml_error(text: str, match: str) -> None:
    """Malformed or contradictory documents raise XMLError naming the problem."""
    with pytest.raises(XMLError, match=match):
        SnapshotXML.from_xml(text)


def test_bad_values_raise_usage_error() -> None:
    """Constructing contradictory values is a programmer error."""
    with pytest.raises(UsageError):
        SnapshotMemory(SnapshotMemoryMode.EXTERNAL)
    with pytest.raises(UsageError):
        SnapshotMemory(SnapshotMemoryMode.EXTERNAL, "relative")
    with pytest.raises(UsageError):
        SnapshotMemory(SnapshotMemoryMode.INTERNAL, "/m")
    with pytest.raises(UsageError):
        SnapshotDisk("vda", SnapshotDiskMode.NO, "/x")
    with pytest.raises(UsageError):
        SnapshotDisk("vda", type="nfs")
    with pytest.raises(UsageError):
        SnapshotDisk("")
    with pytest.raises(ValueError):
        SnapshotMemory("sometimes")  # type: ignore[arg-type]


def test_error_carries_line() -> None:
    """XMLError points at the offending line."""
    with pytest.raises(XMLError) as info:
        SnapshotXML.from_xml(
            "<domainsnapshot>\n<name>x</name>\n<memory snapshot='?'/>\n</domainsnapshot>"
        )
    assert info.value.line == 3


def test_entities_refused() -> None:
    """The hardened parser refuses entity declarations (no billion laughs)."""
    doc = '<!DOCTYPE d [<!ENTITY a "x">]><domainsnapshot><name>&a;</name></domainsnapshot>'
    with pytest.raises(XMLError):
        SnapshotXML.from_xml(doc)


# ---------------------------------------------------------------------------- properties

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff")
    | st.sampled_from("\t\n "),
    max_size=24,
)
_PATH = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
    min_size=1,
    max_size=30,
).map(lambda s: "/" + s)
_STATES = st.sampled_from(
    ["running", "blocked", "paused", "shutdown", "shutoff", "crashed", "disk-snapshot"]
)
_DISK_NAMES = st.from_regex(r"\A(vd|sd|hd|xvd)[a-z]{1,2}\Z") | _PATH


@st.composite
def _memory(draw: st.DrawFn) -> SnapshotMemory:
    mode = draw(st.sampled_from(SnapshotMemoryMode))
    file = draw(_PATH) if mode is SnapshotMemoryMode.EXTERNAL else None
    return SnapshotMemory(mode, file)


@st.composite
def _disk(draw: st.DrawFn, name: str) -> SnapshotDisk:
    mode = draw(st.sampled_from([None, *SnapshotDiskMode]))
    if mode in (None, SnapshotDiskMode.EXTERNAL):
        return SnapshotDisk(
            name,
            mode,
            draw(st.none() | _PATH),
            draw(st.none() | st.sampled_from(["qcow2", "qed", "vmdk", "qcow", "cow"])),
            draw(st.sampled_from(["file", "block"])),
        )
    return SnapshotDisk(name, mode)


@st.composite
def _disks(draw: st.DrawFn) -> tuple[SnapshotDisk, ...]:
    names = draw(st.lists(_DISK_NAMES, unique=True, max_size=4))
    return tuple(draw(_disk(n)) for n in names)


@st.composite
def _domain(draw: st.DrawFn) -> DomainXML:
    base = DomainXML.from_xml(DOMAIN)
    return attrs.evolve(
        base,
        name=draw(st.from_regex(r"\A[a-z][a-z0-9_-]{0,15}\Z")),
        description=draw(st.none() | st.from_regex(r"\A[a-z]{1,10}\Z")),
    )


_SNAPSHOTS = st.builds(
    SnapshotXML,
    name=st.none() | _TEXT,
    description=st.none() | _TEXT,
    state=st.none() | _STATES,
    creation_time=st.none() | st.integers(0, 2**40),
    parent=st.none() | _TEXT,
    memory=st.none() | _memory(),
    disks=_disks(),
    domain=st.none() | _domain(),
)


@settings(deadline=None)  # examples: the dev/ci profile (tests/conftest.py)
@given(_SNAPSHOTS)
def test_generated_documents_round_trip_and_validate(snap: SnapshotXML) -> None:
    """Any SnapshotXML serialises to schema-valid XML that parses back equal."""
    out = snap.to_xml()
    assert_valid(out, "domainsnapshot")
    back = SnapshotXML.from_xml(out)
    assert back == snap
    assert SnapshotXML.from_xml(back.to_xml()) == snap  # stable on a second pass


@settings(max_examples=60, deadline=None)
@given(_SNAPSHOTS)
def test_evolving_a_parsed_document_keeps_extras(other: SnapshotXML) -> None:
    """Rewriting every modelled field of a parsed document keeps the unmodelled cookie."""
    parsed = SnapshotXML.from_xml(EXTERNAL)
    changed = attrs.evolve(
        parsed,
        name=other.name,
        description=other.description,
        state=other.state,
        creation_time=other.creation_time,
        parent=other.parent,
        memory=other.memory,
        disks=other.disks,
        domain=other.domain,
    )
    out = changed.to_xml()
    assert_valid(out, "domainsnapshot")
    assert SnapshotXML.from_xml(out) == changed
    assert etree.fromstring(out).find("cookie/cpu/model").text == "qemu64"


# Minimal documents after libvirt's own snapshot test data (tests/qemudomainsnapshotxml2xml*):
# each validates against domainsnapshot.rng and must come back unchanged and valid.
NBD_OVERLAY = """<domainsnapshot>
  <name>n1</name>
  <disks>
    <disk name='vda' snapshot='external' type='network'>
      <source protocol='nbd'>
        <host name='nbd.example.org' port='10809'/>
      </source>
    </disk>
  </disks>
</domainsnapshot>"""

SECLABEL_ONLY = """<domainsnapshot>
  <name>s1</name>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <source>
        <seclabel model='dac' relabel='no'/>
      </source>
    </disk>
    <disk name='vdb'>
      <source>
        <seclabel model='dac' relabel='no'/>
      </source>
    </disk>
  </disks>
</domainsnapshot>"""

SAME_NAME_TWICE = """<domainsnapshot>
  <name>d1</name>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <source file='/images/a.overlay'>
        <seclabel model='dac' relabel='no'/>
      </source>
    </disk>
    <disk name='vda' snapshot='external' type='file'>
      <source file='/images/b.overlay'>
        <seclabel model='selinux' relabel='no'/>
      </source>
    </disk>
  </disks>
</domainsnapshot>"""


def _c14n(xml: str) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), method="c14n")


@pytest.mark.parametrize("doc", [NBD_OVERLAY, SECLABEL_ONLY, SAME_NAME_TWICE])
def test_schema_valid_overlay_documents_survive_a_round_trip(doc: str) -> None:
    """A network overlay without a name keeps its <source> (libvirt's schema requires it),
    a <source> holding only a <seclabel> is kept, and a second disk of the same name keeps
    its own element (seclabel included): each document comes back unchanged and valid."""
    assert_valid(doc, "domainsnapshot")
    snap = SnapshotXML.from_xml(doc)
    out = snap.to_xml()
    assert_valid(out, "domainsnapshot")
    assert _c14n(out) == _c14n(doc)
    assert SnapshotXML.from_xml(out) == snap


def test_dropping_a_named_overlay_still_drops_its_source() -> None:
    """Evolving a disk's overlay away (source=None, or another storage type) still removes
    the <source> that described the old file, so the result stays schema-valid."""
    snap = SnapshotXML.from_xml(EXTERNAL)
    vda = snap.disk("vda")
    for disk in (attrs.evolve(vda, source=None), attrs.evolve(vda, source=None, type="block")):
        out = attrs.evolve(snap, disks=(disk, snap.disk("vdb"))).to_xml()
        assert etree.fromstring(out.encode()).find("disks/disk/source") is None
        assert_valid(out, "domainsnapshot")


def test_memory_file_accepts_every_schema_valid_absolute_path() -> None:
    """A memory file path libvirt's schema accepts (absFilePath: '/…' or 'C:\\…') parses and
    round-trips; a relative path is still refused."""
    doc = "<domainsnapshot><memory snapshot='external' file='C:\\vm\\mem.save'/></domainsnapshot>"
    assert_valid(doc, "domainsnapshot")
    snap = SnapshotXML.from_xml(doc)
    assert snap.memory == SnapshotMemory(SnapshotMemoryMode.EXTERNAL, "C:\\vm\\mem.save")
    assert_valid(snap.to_xml(), "domainsnapshot")
    assert SnapshotXML.from_xml(snap.to_xml()) == snap
    with pytest.raises(XMLError, match="absolute path"):
        SnapshotXML.from_xml("<domainsnapshot><memory file='vm/mem.save'/></domainsnapshot>")
