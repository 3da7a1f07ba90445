"""Rich HTML views for Jupyter (``_repr_html_``). Pure formatting; no libvirt here."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connection import Connection
    from ._domain import Domain

__all__ = ["connection_html", "domain_html", "table"]


def table(headers: list[str], rows: list[list[str]], *, caption: str | None = None) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def domain_html(dom: Domain) -> str:
    definition = dom.definition
    rows = [
        [d.target, d.device, d.bus or "", d.source or "", d.format or "", str(len(d.backing))]
        for d in definition.disks
    ]
    agent = "channel defined" if definition.has_agent_channel else "no agent channel"
    return (
        f"<div><b>{escape(dom.name)}</b> <code>{escape(dom.uuid)}</code> — "
        f"{escape(dom.state.value)}, {escape(agent)}"
        + table(["target", "device", "bus", "source", "format", "backing layers"], rows)
        + "</div>"
    )


def connection_html(conn: Connection) -> str:
    if conn.closed:
        return f"<div>closed connection to <code>{escape(conn.uri)}</code></div>"
    v = conn.versions
    rows = [[d.name, d.state.value, str(len(d.disks))] for d in conn.domains()]
    return (
        f"<div><code>{escape(conn.uri)}</code> — {escape(v.driver)} driver, "
        f"libvirt {v.daemon}" + table(["domain", "state", "disks"], rows) + "</div>"
    )
