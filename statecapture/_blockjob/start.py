"""Starting block jobs: ``start_commit``, ``start_pull``, ``start_copy`` (planned first), and
``running_jobs`` (adopting the jobs found running).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
from lxml import etree

from .. import _files
from .._host import writes_host_files
from ..errors import (
    CleanupError,
    InvalidStateError,
    NotFoundError,
    TargetExistsError,
    UsageError,
)
from ..xml._base import serialize
from .common import (
    _check_bandwidth,
    _disk_source,
    _disk_target,
    _expect,
    _live_disks,
    _port,
    _require_no_job,
    _resolve_disk,
)
from .job import BlockJob, BlockJobKind

if TYPE_CHECKING:
    from .._domain import Domain


_COPY_FORMATS: Final = ("qcow2", "raw")


def _start(
    dom: Domain,
    target: str,
    kind: BlockJobKind,
    action: Any,
    *,
    destination: Path | None = None,
    created: Path | None = None,
) -> BlockJob:
    exp = _expect(dom, target)  # BEFORE the job starts: no event can be missed
    try:
        action()
    except BaseException:
        exp.close()
        raise
    return BlockJob(dom, target, kind, destination, exp=exp, owned=True, created=created)


def _backed_disk(dom: Domain, disk: str, operation: str, verb: str) -> tuple[etree._Element, str]:
    """The running domain's live ``<disk>`` element ``disk`` and its target; refuses a disk
    without a backing image (nothing to ``verb``)."""
    dom._require_active(operation)
    el = _resolve_disk(dom, disk)
    target = _disk_target(el) or disk
    backing = el.find("backingStore")
    if backing is None or backing.get("type") is None:
        raise InvalidStateError(
            f"disk {target!r} of {dom.name!r} has no backing image: there is nothing to {verb}",
            operation=operation,
            domain_name=dom.name,
        )
    return el, target


# ----------------------------------------------------------------------------- commit


def start_commit(
    dom: Domain,
    disk: str,
    *,
    top: str | None = None,
    base: str | None = None,
    active: bool | None = None,
    shallow: bool = False,
    delete: bool = False,
    bandwidth: int | None = None,
) -> BlockJob:
    """Implementation of :meth:`Domain.block_commit`."""
    operation = "block commit"
    _check_bandwidth(bandwidth)
    for name, value in (("top", top), ("base", base)):
        if value is not None and (not isinstance(value, str) or not value):
            raise UsageError(f"{name} must be an image path or 'vda[N]', got {value!r}")
    if active is not None and not isinstance(active, bool):
        raise UsageError(f"active must be True, False or None, got {active!r}")
    el, target = _backed_disk(dom, disk, operation, "commit")
    src = el.find("source")
    active_index = src.get("index") if src is not None else None
    top_is_active = (
        top is None
        or top == _disk_source(el)
        or (active_index is not None and top == f"{target}[{active_index}]")
    )
    if active is None:
        active = top_is_active
    elif active != top_is_active:
        raise UsageError(
            f"active={active} but top {top!r} is {'' if top_is_active else 'not '}the active "
            f"layer of {target!r}; leave active=None to choose automatically"
        )
    _require_no_job(dom, target, operation)
    kind = BlockJobKind.ACTIVE_COMMIT if active else BlockJobKind.COMMIT
    return _start(
        dom,
        target,
        kind,
        lambda: _port(dom).block_commit(
            target,
            base=base,
            top=top,
            bandwidth=bandwidth,
            active=active,
            shallow=shallow,
            delete=delete,
        ),
    )


# ----------------------------------------------------------------------------- pull


def start_pull(dom: Domain, disk: str, *, bandwidth: int | None = None) -> BlockJob:
    """Implementation of :meth:`Domain.block_pull`."""
    operation = "block pull"
    _check_bandwidth(bandwidth)
    _el, target = _backed_disk(dom, disk, operation, "pull")
    _require_no_job(dom, target, operation)
    return _start(
        dom,
        target,
        BlockJobKind.PULL,
        lambda: _port(dom).block_pull(target, bandwidth=bandwidth),
    )


# ----------------------------------------------------------------------------- copy


@attrs.frozen
class _CopyPlan:
    target: str
    destination: Path
    format: str
    block: bool
    reuse_external: bool

    def xml(self) -> str:
        return destination_xml(self.destination, fmt=self.format, block=self.block)


def destination_xml(path: Path, *, fmt: str, block: bool = False) -> str:
    """The ``<disk>`` document naming a copy destination (for ``virDomainBlockCopy``)."""
    disk = etree.Element("disk", type="block" if block else "file")
    etree.SubElement(disk, "source", {"dev" if block else "file": str(path)})
    etree.SubElement(disk, "driver", type=fmt)
    return serialize(disk)


def _plan_copy(
    dom: Domain,
    disk: str,
    destination: str | os.PathLike[str],
    *,
    format: str,
    reuse_external: bool,
) -> _CopyPlan:
    """Check one copy request completely before anything changes."""
    if not isinstance(destination, str | os.PathLike) or not os.fspath(destination):
        raise UsageError(f"destination must be a path, got {destination!r}")
    if format not in _COPY_FORMATS:
        raise UsageError(f"format must be one of {', '.join(_COPY_FORMATS)}, got {format!r}")
    el = _resolve_disk(dom, disk)
    target = _disk_target(el) or disk
    dest = Path(os.path.abspath(os.fspath(destination)))
    current = _disk_source(el)
    if current is not None and os.path.abspath(current) == str(dest):
        raise UsageError(f"destination {dest} is the image disk {target!r} runs on")
    exists = _files.lexists(dest)
    if exists and not reuse_external:
        raise TargetExistsError(
            f"copy destination {dest} exists; pass reuse_external=True to copy into it",
            path=str(dest),
        )
    if not exists and reuse_external:
        raise NotFoundError(
            f"reuse_external=True but the destination {dest} does not exist",
            operation="block copy",
            domain_name=dom.name,
        )
    if not dest.parent.is_dir():
        raise NotFoundError(
            f"the directory of the copy destination {dest} does not exist",
            operation="block copy",
            domain_name=dom.name,
        )
    block = exists and stat.S_ISBLK(os.stat(dest).st_mode)
    if not block and writes_host_files(dom.connection):
        # libvirtd/QEMU open (and without reuse_external create) the destination by this
        # path, and the disk keeps it: no one else may plant or swap a name on the way.
        _files.require_trusted(dest.parent, staged=False, what=f"copy destination {dest}")
    return _CopyPlan(target, dest, format, block, reuse_external)


def _start_copy(
    dom: Domain,
    plan: _CopyPlan,
    *,
    shallow: bool,
    synchronous_writes: bool,
    bandwidth: int | None,
) -> BlockJob:
    # libvirt 9.0 refuses a copy on a persistent domain ("domain is not transient") unless
    # the job is transient: it is then not recovered after a daemon or domain restart.
    transient_job = dom.is_persistent
    job = _start(
        dom,
        plan.target,
        BlockJobKind.COPY,
        lambda: _port(dom).block_copy(
            plan.target,
            plan.xml(),
            bandwidth=bandwidth,
            shallow=shallow,
            reuse_external=plan.reuse_external,
            transient_job=transient_job,
            synchronous_writes=synchronous_writes,
        ),
        destination=plan.destination,
        created=None if plan.reuse_external else plan.destination,
    )
    if not plan.reuse_external:
        try:
            # libvirt created it; statecapture files are 0600 (raises when it cannot)
            _files.owner_only([plan.destination], what="copy destination")
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                job.abort()
            raise CleanupError(
                f"could not make the copy destination {plan.destination} owner-only: {exc}; "
                "the copy job was aborted"
            ) from exc
    return job


def start_copy(
    dom: Domain,
    disk: str,
    destination: str | os.PathLike[str],
    *,
    format: str = "qcow2",
    shallow: bool = False,
    reuse_external: bool = False,
    synchronous_writes: bool = False,
    bandwidth: int | None = None,
) -> BlockJob:
    """Implementation of :meth:`Domain.block_copy`."""
    operation = "block copy"
    _check_bandwidth(bandwidth)
    dom._require_active(operation)
    plan = _plan_copy(dom, disk, destination, format=format, reuse_external=reuse_external)
    _require_no_job(dom, plan.target, operation)
    return _start_copy(
        dom, plan, shallow=shallow, synchronous_writes=synchronous_writes, bandwidth=bandwidth
    )


# ----------------------------------------------------------------------------- listing


def running_jobs(dom: Domain) -> tuple[BlockJob, ...]:
    """Implementation of :meth:`Domain.block_jobs`."""
    if not dom.is_active:
        return ()
    jobs: list[BlockJob] = []
    for el in _live_disks(dom):
        target = _disk_target(el)
        if target is None or _disk_source(el) is None:
            continue
        exp = _expect(dom, target)  # before the query: a READY/end in between is kept
        try:
            info = _port(dom).block_job_info(target)
        except BaseException:
            exp.close()
            raise
        if info is None:
            exp.close()
            continue
        kind = BlockJobKind(info[0])
        destination: Path | None = None
        mirror = el.find("mirror")
        if kind is BlockJobKind.COPY and mirror is not None:
            mfile = mirror.get("file") or _disk_source(mirror)
            destination = Path(mfile) if mfile else None
        jobs.append(BlockJob(dom, target, kind, destination, exp=exp, owned=False))
    return tuple(jobs)
