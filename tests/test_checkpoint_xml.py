"""CheckpointXML: parsing libvirt's documents, round trips, schema validity, bad input."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from statecapture import UsageError, XMLError
from statecapture.xml import CheckpointDisk, CheckpointXML, DomainXML
from tests.schema import assert_valid

# As libvirt 9.0's QEMU driver prints it with VIR_DOMAIN_CHECKPOINT_XML_SIZE (plus one
# element and one attribute statecapture does not model).
QEMU_XML = """<domaincheckpoint>
  <name>c2</name>
  <parent>
    <name>c1</name>
  </parent>
  <description>  nightly
 run  </description>
  <creationTime>1795649463</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c2' size='1507328' future='x'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
  <vendor:tag xmlns:vendor='http://example.org/vendor'>keep me</vendor:tag>
  <domain type='qemu'>
    <name>guest</name>
    <uuid>90a32649-a48d-406d-8857-a5acdeef7f90</uuid>
    <memory unit='KiB'>262144</memory>
    <os><type arch='x86_64' machine='pc'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/images/d0.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</domaincheckpoint>
"""


def test_parses_libvirt_document() -> None:
    """Name, parent, description (exact), creation time, disks, sizes and domain are read."""
    cp = CheckpointXML.from_xml(QEMU_XML)
    assert cp.name == "c2"
    assert cp.parent == "c1"
    assert cp.description == "  nightly\n run  "
    assert cp.creation_time == 1795649463
    assert cp.disks == (
        CheckpointDisk("vda", "bitmap", "c2", 1507328),
        CheckpointDisk("vdb", "no"),
    )
    assert [d.name for d in cp.tracked_disks] == ["vda"]
    assert cp.sizes == {"vda": 1507328}
    assert cp.disk("vdb").tracked is False
    assert cp.domain is not None
    assert cp.domain.uuid == "90a32649-a48d-406d-8857-a5acdeef7f90"
    with pytest.raises(KeyError):
        cp.disk("vdz")


def test_round_trip_keeps_unknown_xml_and_validates() -> None:
    """Unmodelled elements and attributes survive; the output is schema-valid."""
    cp = CheckpointXML.from_xml(QEMU_XML)
    out = cp.to_xml()
    assert "keep me" in out
    assert 'future="x"' in out
    again = CheckpointXML.from_xml(out)
    assert again == cp
    assert_valid(_libvirt_only(out), "domaincheckpoint")


def _libvirt_only(xml: str) -> str:
    """The document without the parts the test added (the schema rightly rejects them)."""
    cp = CheckpointXML.from_xml(xml)
    root = cp.to_element()
    for el in root.iter("disk"):
        el.attrib.pop("future", None)
    for el in list(root):
        if el.tag.startswith("{"):
            root.remove(el)
    return etree.tostring(root, encoding="unicode")


def test_evolve_applies_modelled_fields() -> None:
    """Changed fields are written back; removed disks and the domain disappear."""
    cp = CheckpointXML.from_xml(QEMU_XML)
    changed = attrs.evolve(
        cp,
        name="c9",
        parent=None,
        description=None,
        disks=(CheckpointDisk("vda", "bitmap", "other"),),
        domain=None,
    )
    out = changed.to_xml()
    back = CheckpointXML.from_xml(out)
    assert back == changed
    assert "<parent>" not in out and "<domain " not in out and "vdb" not in out
    assert "size=" not in out  # the size attribute was dropped with the new disk value
    assert 'future="x"' in out  # ... but the unknown attribute of vda stays
    assert_valid(_libvirt_only(out), "domaincheckpoint")


def test_minimal_documents_validate() -> None:
    """What statecapture sends to create a checkpoint is valid for libvirt's schema."""
    assert_valid(CheckpointXML().to_xml(), "domaincheckpoint")
    cp = CheckpointXML(
        name="nightly-1",
        disks=(CheckpointDisk("vda", "bitmap"), CheckpointDisk("sda", "no")),
    )
    xml = cp.to_xml()
    assert_valid(xml, "domaincheckpoint")
    assert CheckpointXML.from_xml(xml) == cp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ".hidden"}, "not valid"),
        ({"name": "a/b"}, "not valid"),
        ({"parent": "bad name"}, "parent"),
        ({"creation_time": -1}, "creation_time"),
        ({"disks": (CheckpointDisk("vda"), CheckpointDisk("vda"))}, "more than once"),
    ],
)
def test_constructor_rejects_what_libvirt_rejects(kwargs: dict[str, object], match: str) -> None:
    """Invalid names and duplicate disks raise UsageError before any XML is written."""
    with pytest.raises(UsageError, match=match):
        CheckpointXML(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "needs a name"),
        ({"name": "vda", "checkpoint": "maybe"}, "'bitmap', 'no' or None"),
        ({"name": "vda", "checkpoint": "no", "bitmap": "b"}, "checkpoint='no'"),
        ({"name": "vda", "size": -5}, ">= 0"),
    ],
)
def test_disk_rejects_schema_violations(kwargs: dict[str, object], match: str) -> None:
    """A disk entry libvirt's schema forbids cannot be built."""
    with pytest.raises(UsageError, match=match):
        CheckpointDisk(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<domainsnapshot/>", "expected a <domaincheckpoint>"),
        ("<domaincheckpoint><name>ok</name>", "malformed"),
        ("<domaincheckpoint><creationTime>soon</creationTime></domaincheckpoint>", "number"),
        ("<domaincheckpoint><name>.x</name></domaincheckpoint>", "not valid"),
        (
            "<domaincheckpoint><disks><disk name='vda' size='big'/></disks></domaincheckpoint>",
            "size",
        ),
        (
            "<domaincheckpoint><disks><disk name='vda' checkpoint='no' bitmap='x'/>"
            "</disks></domaincheckpoint>",
            "checkpoint='no'",
        ),
    ],
)
def test_bad_documents_raise_xml_error(text: str, match: str) -> None:
    """Malformed or inconsistent documents raise XMLError (a ValueError)."""
    with pytest.raises(XMLError, match=match):
        CheckpointXML.from_xml(text)


# ----------------------------------------------------------------------------- property test

_names = st.from_regex(r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]{0,15}", fullmatch=True)
_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")) | st.sampled_from("\t\n"),
    max_size=30,
)
_targets = st.from_regex(r"vd[a-z]{1,2}", fullmatch=True)


@st.composite
def _disk(draw: st.DrawFn, name: str) -> CheckpointDisk:
    mode = draw(st.sampled_from([None, "bitmap", "no"]))
    if mode == "no":
        return CheckpointDisk(name, "no")
    return CheckpointDisk(
        name,
        mode,
        draw(st.none() | _names),
        draw(st.none() | st.integers(0, 2**62)),
    )


@st.composite
def _checkpoints(draw: st.DrawFn) -> CheckpointXML:
    targets = draw(st.lists(_targets, unique=True, max_size=4))
    return CheckpointXML(
        name=draw(st.none() | _names),
        parent=draw(st.none() | _names),
        description=draw(st.none() | _text),
        creation_time=draw(st.none() | st.integers(0, 2**62)),
        disks=tuple(draw(_disk(t)) for t in targets),
    )


@settings(deadline=None)  # examples: the dev/ci profile (tests/conftest.py)
@given(_checkpoints())
def test_round_trip_property(cp: CheckpointXML) -> None:
    """Any valid CheckpointXML survives to_xml → from_xml and validates against the schema."""
    xml = cp.to_xml()
    assert_valid(xml, "domaincheckpoint")
    back = CheckpointXML.from_xml(xml)
    assert back == cp
    # ... and a second round trip from the parsed document is stable too
    assert CheckpointXML.from_xml(back.to_xml()) == cp


@settings(max_examples=40, deadline=None)
@given(_checkpoints(), _checkpoints())
def test_evolve_property(base: CheckpointXML, new: CheckpointXML) -> None:
    """Evolving a parsed document into any other value writes exactly that value."""
    parsed = CheckpointXML.from_xml(base.to_xml())
    evolved = attrs.evolve(
        parsed,
        name=new.name,
        parent=new.parent,
        description=new.description,
        creation_time=new.creation_time,
        disks=new.disks,
    )
    xml = evolved.to_xml()
    assert_valid(xml, "domaincheckpoint")
    assert CheckpointXML.from_xml(xml) == new


def test_embedded_domain_is_a_domain_xml() -> None:
    """The stored <domain> is a DomainXML; replacing it writes the new one."""
    cp = CheckpointXML.from_xml(QEMU_XML)
    assert isinstance(cp.domain, DomainXML)
    renamed = attrs.evolve(cp, domain=attrs.evolve(cp.domain, name="guest2"))
    back = CheckpointXML.from_xml(renamed.to_xml())
    assert back.domain is not None and back.domain.name == "guest2"
    assert_valid(_libvirt_only(renamed.to_xml()), "domaincheckpoint")


class _CountingName(str):
    """A disk name that counts how often it is compared for equality."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        type(self).compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_duplicate_disk_check_is_linear() -> None:
    """The duplicate-disk check compares names a linear number of times (it was quadratic:
    40,000 disks took 11 s), and still names every duplicate."""
    n = 2000
    disks = tuple(CheckpointDisk(_CountingName(f"d{i}")) for i in range(n))
    _CountingName.compared = 0
    CheckpointXML(name="big", disks=disks)
    assert _CountingName.compared <= n
    dupes = (*disks, CheckpointDisk("d7"), CheckpointDisk("d3"), CheckpointDisk("d7"))
    with pytest.raises(UsageError, match="d3, d7 more than once"):
        CheckpointXML(name="big", disks=dupes)
    wide = CheckpointXML.from_xml(
        "<domaincheckpoint><disks>"
        + "".join(f"<disk name='vd{i}' checkpoint='bitmap'/>" for i in range(40_000))
        + "</disks></domaincheckpoint>"
    )
    assert len(wide.disks) == 40_000
