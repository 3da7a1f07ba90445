"""Validate generated XML against libvirt's own RelaxNG schemas."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

SCHEMA_DIRS = (Path("/usr/share/libvirt/schemas"), Path("/usr/local/share/libvirt/schemas"))


@functools.cache
def schema(name: str) -> etree.RelaxNG:
    """libvirt's schema ``name`` (``domain``, ``domainsnapshot``, ``domaincheckpoint``,
    ``domainbackup``)."""
    for d in SCHEMA_DIRS:
        path = d / f"{name}.rng"
        if path.exists():
            return etree.RelaxNG(etree.parse(str(path)))
    raise FileNotFoundError(f"libvirt schema {name}.rng not found in {SCHEMA_DIRS}")


def assert_valid(xml: str, name: str) -> None:
    """Fail with libvirt's schema error log when ``xml`` does not validate."""
    rng = schema(name)
    doc = etree.fromstring(xml.encode())
    if not rng.validate(doc):
        raise AssertionError(f"XML does not validate against {name}.rng:\n{rng.error_log}\n{xml}")
