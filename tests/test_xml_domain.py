"""DomainXML: parsing, round trips that keep unknown XML, hardened parser."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from statecapture import XMLError
from statecapture.xml import MAX_DOCUMENT_BYTES, BackingSource, Disk, DomainXML
from tests.schema import assert_valid

LIVE_XML = """<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <description>front end</description>
  <metadata><app:owner xmlns:app='http://example.org/app'>team-a</app:owner></metadata>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.overlay' index='3'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/web1.snap1'/>
        <backingStore type='file' index='1'>
          <format type='raw'/>
          <source file='/var/lib/libvirt/images/web1.base'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <iotune><total_bytes_sec>1000000</total_bytes_sec></iotune>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <watchdog model='i6300esb' action='reset'/>
  </devices>
</domain>
"""


def test_parses_disks_chain_and_agent() -> None:
    """Disks, their backing chains and the agent channel are read from live XML."""
    d = DomainXML.from_xml(LIVE_XML)
    assert d.name == "web1"
    assert d.uuid == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    assert d.type == "kvm"
    assert d.description == "front end"
    assert d.has_agent_channel
    vda = d.disk("vda")
    assert vda == Disk(
        target="vda",
        device="disk",
        bus="virtio",
        source="/var/lib/libvirt/images/web1.overlay",
        format="qcow2",
        type="file",
        backing=(
            BackingSource("/var/lib/libvirt/images/web1.snap1", "qcow2", 2, "file"),
            BackingSource("/var/lib/libvirt/images/web1.base", "raw", 1, "file"),
        ),
    )
    assert vda.chain == (
        "/var/lib/libvirt/images/web1.overlay",
        "/var/lib/libvirt/images/web1.snap1",
        "/var/lib/libvirt/images/web1.base",
    )
    assert d.disk("vdb").source == "/dev/vg0/data"
    assert d.disk("vdb").type == "block"
    cdrom = d.disk("sda")
    assert cdrom.device == "cdrom" and cdrom.readonly and cdrom.source is None
    assert [x.target for x in d.iter_disks()] == ["vda", "vdb"]
    with pytest.raises(KeyError):
        d.disk("vdz")


def test_round_trip_keeps_unknown_xml() -> None:
    """Elements and attributes statecapture does not model survive from_xml → to_xml."""
    d = DomainXML.from_xml(LIVE_XML)
    out = d.to_xml()
    root = etree.fromstring(out.encode())
    assert root.find("metadata")[0].text == "team-a"
    assert root.find("devices/watchdog").get("action") == "reset"
    assert root.find("devices/disk/iotune/total_bytes_sec").text == "1000000"
    assert root.find("devices/disk/driver").get("cache") == "none"
    assert DomainXML.from_xml(out) == d


def test_evolve_writes_modelled_fields_back() -> None:
    """Changing name and a disk's source/format via attrs.evolve changes only those."""
    d = DomainXML.from_xml(LIVE_XML)
    vda = attrs.evolve(d.disk("vda"), source="/new/web1.qcow2")
    new = attrs.evolve(
        d,
        name="web2",
        uuid=None,
        description=None,
        disks=(vda, *d.disks[1:]),
    )
    back = DomainXML.from_xml(new.to_xml())
    assert back.name == "web2"
    assert back.description is None
    assert back.disk("vda").source == "/new/web1.qcow2"
    assert back.disk("vdb") == d.disk("vdb")
    assert "watchdog" in new.to_xml()


def test_from_scratch_validates_against_libvirt_schema() -> None:
    """A DomainXML built without a raw document still serialises to schema-valid parts."""
    src = DomainXML.from_xml(
        "<domain type='qemu'><name>x</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices/></domain>"
    )
    d = attrs.evolve(src, disks=(Disk("vda", bus="virtio", source="/i/x.qcow2", format="qcow2"),))
    xml = d.to_xml()
    assert_valid(xml, "domain")
    assert DomainXML.from_xml(xml).disk("vda").format == "qcow2"


def test_malformed_xml_reports_line() -> None:
    """Malformed XML raises XMLError carrying the line of the problem."""
    with pytest.raises(XMLError) as info:
        DomainXML.from_xml("<domain>\n<name>x</name>\n<devices>\n</domain>")
    assert info.value.line == 4
    assert "line 4" in str(info.value)


def test_wrong_root_and_missing_name() -> None:
    """A document that is not a <domain>, or lacks a name, is an XMLError."""
    with pytest.raises(XMLError, match="domainsnapshot"):
        DomainXML.from_xml("<domainsnapshot/>")
    with pytest.raises(XMLError, match="without <name>"):
        DomainXML.from_xml("<domain type='kvm'><devices/></domain>")
    with pytest.raises(XMLError):
        DomainXML.from_xml(42)  # type: ignore[arg-type]


def test_entities_and_external_references_are_refused() -> None:
    """No entity expansion (billion laughs) and no external entity fetch."""
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        "<domain><name>&b;</name></domain>"
    )
    with pytest.raises(XMLError, match="entity"):
        DomainXML.from_xml(bomb)
    xxe = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<domain><name>&x;</name></domain>"
    )
    with pytest.raises(XMLError):
        DomainXML.from_xml(xxe)


def test_description_keeps_leading_and_trailing_whitespace() -> None:
    """A <description> survives parse and write exactly, whitespace and newlines included
    (libvirt stores it as given); the output stays schema-valid."""
    text = "\n  nightly backups\n  owner: team-a  \n"
    doc = (
        "<domain type='qemu'><name>x</name><description>"
        + text
        + "</description><memory>65536</memory><os><type>hvm</type></os><devices/></domain>"
    )
    d = DomainXML.from_xml(doc)
    assert d.description == text
    assert DomainXML.from_xml(d.to_xml()).description == text
    assert_valid(d.to_xml(), "domain")
    for value in ("  padded ", "   ", ""):
        evolved = attrs.evolve(d, description=value)
        assert DomainXML.from_xml(evolved.to_xml()).description == value


def _big_domain(size: int) -> str:
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/var/lib/libvirt/images/disk{i}.qcow2'/>"
        "<target dev='vd{i}' bus='virtio'/></disk>\n"
    )
    parts = ["<domain type='kvm'><name>big</name><devices>"]
    total = len(parts[0])
    i = 0
    while total < size:
        parts.append(disk.format(i=i))
        total += len(parts[-1])
        i += 1
    parts.append("</devices></domain>")
    return "".join(parts)


def test_oversized_documents_are_refused_before_parsing() -> None:
    """A document over MAX_DOCUMENT_BYTES (16 MiB; libvirt's remote protocol carries at most
    4 MiB) raises XMLError without being parsed (a 52 MB domain used to take 9 s and 1.3 GB);
    a 4 MiB domain with thousands of disks still parses."""
    big = _big_domain(MAX_DOCUMENT_BYTES + 1)
    for text in (big, big.encode()):
        with pytest.raises(XMLError, match="larger than"):
            DomainXML.from_xml(text)
    # Multi-byte characters count as bytes: a str under the limit in characters may be over.
    wide = "<domain><name>x</name><description>" + "\u00e9" * (MAX_DOCUMENT_BYTES // 2 + 1)
    with pytest.raises(XMLError, match="larger than"):
        DomainXML.from_xml(wide + "</description></domain>")
    ok = DomainXML.from_xml(_big_domain(4 * 1024 * 1024))
    assert len(ok.disks) > 9000


_names = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=20)
_paths = st.lists(_names, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p))


@settings(max_examples=60, deadline=None)
@given(
    name=_names,
    description=st.none() | _names,
    disks=st.lists(
        st.tuples(
            st.sampled_from(["vda", "vdb", "vdc", "sda"]),
            _paths,
            st.sampled_from(["qcow2", "raw"]),
        ),
        max_size=3,
        unique_by=lambda t: t[0],
    ),
)
def test_round_trip_property(name: str, description: str | None, disks: list) -> None:
    """from_xml(to_xml(x)) == x for generated definitions, and the output stays schema-valid."""
    base = DomainXML.from_xml(
        "<domain type='qemu'><name>seed</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices/></domain>"
    )
    d = attrs.evolve(
        base,
        name=name,
        description=description,
        disks=tuple(
            Disk(t, bus="virtio" if t.startswith("v") else "sata", source=p, format=f)
            for t, p, f in disks
        ),
    )
    xml = d.to_xml()
    assert DomainXML.from_xml(xml) == d
    assert_valid(xml, "domain")
