"""Hardened XML parsing shared by every document model (no libvirt here)."""

from __future__ import annotations

from typing import Final

from lxml import etree

from ..errors import XMLError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "XMLInput",
    "line_of",
    "parse",
    "serialize",
    "set_child_text",
    "text_of",
]

XMLInput = str | bytes

#: The largest document :func:`parse` accepts, in bytes of UTF-8 (16 MiB). Larger input
#: raises :class:`~statecapture.XMLError` before any parsing. libvirt's remote protocol
#: carries at most 4 MiB in one XML string, so no daemon hands out more; parsing costs
#: about 25 times the document's size in memory (a 52 MB domain took 1.3 GB and 9 s).
MAX_DOCUMENT_BYTES: Final = 16 * 1024 * 1024

#: No network, no DTD loading, no entity expansion, no huge trees: documents we parse may
#: come from a daemon we do not control or from files a user hands us.
_PARSER: Final = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=False,
)


def parse(text: XMLInput, *, expected_root: str | None = None) -> etree._Element:
    """Parse ``text`` into an element, raising :class:`XMLError` with the line on failure.

    Documents larger than :data:`MAX_DOCUMENT_BYTES` are refused with :class:`XMLError`.
    """
    if isinstance(text, str):
        # A str encodes to at least one byte per character: refuse before copying it.
        _check_size(len(text))
        data = text.encode("utf-8")
    elif isinstance(text, bytes):
        data = text
    else:
        raise XMLError(f"expected XML text (str or bytes), got {type(text).__name__}")
    _check_size(len(data))
    if b"<!ENTITY" in data:
        raise XMLError("XML entity declarations are not accepted")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if isinstance(exc.lineno, int) else None
        raise XMLError(f"malformed XML: {exc.msg}", line=line) from exc
    if root is None:  # pragma: no cover - lxml raises for empty input
        raise XMLError("empty XML document")
    if expected_root is not None and root.tag != expected_root:
        raise XMLError(
            f"expected a <{expected_root}> document, got <{root.tag}>",
            line=line_of(root),
        )
    return root


def _check_size(size: int) -> None:
    if size > MAX_DOCUMENT_BYTES:
        raise XMLError(
            f"XML document of {size} bytes is larger than the {MAX_DOCUMENT_BYTES} bytes "
            "statecapture parses (libvirt's remote protocol carries at most 4 MiB)"
        )


def serialize(root: etree._Element) -> str:
    """Serialise an element as a pretty-printed unicode string without XML declaration."""
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")


def line_of(el: etree._Element) -> int | None:
    """The source line of ``el`` when known."""
    line = el.sourceline
    return line if isinstance(line, int) else None


def text_of(el: etree._Element | None) -> str | None:
    """Stripped text of ``el`` or ``None``."""
    if el is None or el.text is None:
        return None
    value = el.text.strip()
    return value or None


def set_child_text(parent: etree._Element, tag: str, value: str | None) -> None:
    """Set (or remove, for ``None``) the text of the first child ``tag`` of ``parent``."""
    child = parent.find(tag)
    if value is None:
        if child is not None:
            parent.remove(child)
        return
    if child is None:
        child = etree.SubElement(parent, tag)
    child.text = value
