"""Running one task per domain across a fleet: on Dask distributed, or on a local thread pool.

The controller (the process calling :func:`backup`) never touches a guest: it submits one
*listing* task per host, then one task per selected domain, each pinned to the host's Dask
worker by the worker resource ``host:<name>`` and each needing one unit of it, so a worker
started with ``--resources host:hv1=2`` never runs more than two at once. The controller
itself also keeps at most ``per_host`` tasks of a host in flight, so the effective limit is
``min(per_host, the worker's resource)``. Results are small values; futures are released as
soon as they are collected, so the controller's memory does not grow with the fleet.

Inside a task (on the host): open the host's URI (cached per worker process; connection
errors before anything started are retried with backoff), look the domain up, and when an
earlier attempt left a journal on the domain (a worker killed mid-backup, a lost
connection) run :func:`statecapture.recover` first and go on only when it reports the
domain clean. A connection lost *during* the operation is retried the same way: recover
first, never blindly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConnectionLostError, StateCaptureError, UsageError
from .inventory import Host, Selector, check_inventory, check_selector, matches, repository_of
from .report import DomainResult, FleetProgress, FleetReport

if TYPE_CHECKING:
    from .._connection import Connection
    from .._domain import Domain

__all__ = ["backup", "prune", "verify"]

_current = threading.local()
"""Per task thread: ``domain`` (the name) while a task runs (read by fault-injection tests)."""

_conns: dict[str, Connection] = {}
_conns_lock = threading.Lock()
_DEFAULT_RETRIES: Final = 3
_DEFAULT_BACKOFF: Final = 1.0


# ============================================================================ on the host
def _connection(uri: str, *, fresh: bool = False) -> Connection:
    """This process's connection to ``uri`` (one per URI and process; reopened when closed)."""
    from .._connection import connect

    with _conns_lock:
        conn = _conns.get(uri)
        if conn is not None and (fresh or conn.closed or not _alive(conn)):
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
        if conn is None:
            conn = connect(uri)
            _conns[uri] = conn
        return conn


def _alive(conn: Connection) -> bool:
    try:
        return conn.port.is_alive()
    except Exception:
        return False


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionLostError | ConnectionError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _with_retries(uri: str, retries: int, backoff: float, fn: Callable[[Connection], Any]) -> Any:
    """Run ``fn(conn)``; a transient connection error is retried with a fresh connection."""
    for attempt in range(retries + 1):
        try:
            return fn(_connection(uri, fresh=attempt > 0))
        except Exception as exc:
            if not _transient(exc) or attempt == retries:
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def list_task(host: Host, select: Selector, retries: int, backoff: float) -> list[tuple[str, str]]:
    """On the host: ``(name, uuid)`` of every domain ``select`` picks, sorted by name."""

    def run(conn: Connection) -> list[tuple[str, str]]:
        return sorted((d.name, d.uuid) for d in conn.domains() if matches(select, host, d))

    out: list[tuple[str, str]] = _with_retries(host.uri, retries, backoff, run)
    return out


def domain_task(
    operation: str,
    host: Host,
    name: str,
    uuid: str,
    options: Mapping[str, Any],
    retries: int,
    backoff: float,
) -> DomainResult:
    """On the host: run ``operation`` on one domain; a :class:`DomainResult`, never raises
    (but for ``KeyboardInterrupt``/``SystemExit``)."""
    started = time.time()
    _current.domain = name
    recovered: list[str] = []
    attempts = 0
    try:
        for attempt in range(retries + 1):
            attempts = attempt + 1
            looked_up = False
            try:
                # Nothing has started before the lookup: _with_retries retries plainly.
                dom = _with_retries(host.uri, retries, backoff, lambda c: c.domain(uuid))
                looked_up = True
                if operation == "backup":
                    _recover_first(dom, recovered)
                return _finish(
                    _OPERATIONS[operation](host, dom, options),
                    host=host,
                    dom=dom,
                    operation=operation,
                    started=started,
                    attempts=attempts,
                    recovered=recovered,
                )
            except Exception as exc:
                if looked_up and _transient(exc) and attempt < retries:
                    # The operation may have begun: the next attempt reconnects and runs
                    # recover() before anything else (see _recover_first).
                    time.sleep(backoff * 2**attempt)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover
    except Exception as exc:
        return DomainResult(
            host=host.name,
            domain=name,
            domain_uuid=uuid,
            operation=operation,
            ok=False,
            started=started,
            ended=time.time(),
            error=_describe(exc),
            attempts=attempts,
            recovered=tuple(recovered),
        )
    finally:
        _current.domain = None


def _recover_first(dom: Domain, recovered: list[str]) -> None:
    """Recover an interrupted earlier run; refuse to go on unless the domain is clean."""
    from .._journal import read_journal
    from .._recover import recover

    journal = read_journal(dom)
    if journal is None or journal.is_backup_job:  # a plain job's: the backup settles it
        return
    report = recover(dom)
    recovered.extend(report.found)
    recovered.extend(f"did: {a}" for a in report.actions)
    if not report.clean:
        raise _NotRecovered(
            f"an interrupted earlier run on {dom.name!r} could not be recovered; not backing "
            f"up again: {'; '.join(report.errors) or 'see recover()'}"
        )


class _NotRecovered(StateCaptureError):
    """recover() did not leave the domain clean."""


def _finish(
    values: Mapping[str, Any],
    *,
    host: Host,
    dom: Domain,
    operation: str,
    started: float,
    attempts: int,
    recovered: list[str],
) -> DomainResult:
    return DomainResult(
        host=host.name,
        domain=dom.name,
        domain_uuid=dom.uuid,
        operation=operation,
        ok=bool(values.get("ok", True)),
        started=started,
        ended=time.time(),
        point=values.get("point"),
        bytes=int(values.get("bytes", 0)),
        frozen_for=values.get("frozen_for"),
        error=values.get("error"),
        attempts=attempts,
        recovered=tuple(recovered),
        notes=tuple(values.get("notes", ())),
    )


def _op_backup(host: Host, dom: Domain, options: Mapping[str, Any]) -> dict[str, Any]:
    repo = repository_of(host)
    point = repo.backup(dom, **options)
    return {
        "point": point.id,
        "bytes": point.bytes_copied,
        "frozen_for": point.frozen_for,
        "notes": (f"{point.kind.value}: {point.reason}", *point.notes),
    }


def _op_verify(host: Host, dom: Domain, options: Mapping[str, Any]) -> dict[str, Any]:
    repo = repository_of(host)
    points = repo.points(dom)
    if not points:
        return {"ok": False, "error": f"the repository {repo.path} has no point of {dom.name!r}"}
    parents = {p.parent for p in points if p.parent}
    heads = [p for p in points if p.id not in parents]  # each chain once, from its top
    read = 0
    problems: list[str] = []
    for head in heads:
        rep = repo.verify(head)
        read += rep.bytes_read
        problems.extend(str(d) for d in rep.differences)
        problems.extend(rep.errors)
    return {
        "ok": not problems,
        "point": points[0].id,
        "bytes": read,
        "error": "; ".join(problems[:5]) if problems else None,
        "notes": (f"{len(points)} points, {len(heads)} chains verified",),
    }


def _op_prune(host: Host, dom: Domain, options: Mapping[str, Any]) -> dict[str, Any]:
    repo = repository_of(host)
    rep = repo.prune(dom, **options)
    kept = rep.kept[-1].id if rep.kept else None
    return {
        "point": kept,
        "notes": (
            f"removed {len(rep.removed)}, kept {len(rep.kept)}",
            *(f"removed {p.id}" for p in rep.removed),
            *rep.notes,
        ),
    }


_OPERATIONS: Final[dict[str, Callable[[Host, Domain, Mapping[str, Any]], dict[str, Any]]]] = {
    "backup": _op_backup,
    "verify": _op_verify,
    "prune": _op_prune,
}


# ============================================================================ engines
class _ThreadEngine:
    """The default: a thread pool in this process (URIs opened here)."""

    def __init__(self, workers: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="statecapture-fleet"
        )

    def check_hosts(self, hosts: tuple[Host, ...]) -> dict[str, str]:
        return {}

    def submit(self, host: Host, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def wait(self, futures: Iterable[Any]) -> set[Any]:
        done, _ = concurrent.futures.wait(
            list(futures), return_when=concurrent.futures.FIRST_COMPLETED
        )
        return set(done)

    def result(self, future: Any) -> Any:
        return future.result()

    def cancel(self, futures: Iterable[Any]) -> None:
        for f in futures:
            f.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _DaskEngine:
    """Dask distributed: each task pinned to its host's worker by the resource ``host:<name>``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def check_hosts(self, hosts: tuple[Host, ...]) -> dict[str, str]:
        """Hosts no worker advertises (their tasks would wait forever) → why."""
        info = self.client.scheduler_info()
        offered: set[str] = set()
        for w in info.get("workers", {}).values():
            offered.update(k for k, v in (w.get("resources") or {}).items() if v and v >= 1)
        return {
            h.name: (
                f"no Dask worker advertises the resource {h.resource!r}: start one on the host "
                f"with `dask worker SCHEDULER --resources {h.resource}=2`"
            )
            for h in hosts
            if h.resource not in offered
        }

    def submit(self, host: Host, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, resources={host.resource: 1}, pure=False)

    def wait(self, futures: Iterable[Any]) -> set[Any]:
        from distributed import wait

        done, _ = wait(list(futures), return_when="FIRST_COMPLETED")  # type: ignore[no-untyped-call]
        return set(done)

    def result(self, future: Any) -> Any:
        return future.result()

    def cancel(self, futures: Iterable[Any]) -> None:
        futures = list(futures)
        if futures:
            with contextlib.suppress(Exception):
                self.client.cancel(futures)

    def close(self) -> None:
        pass


def _engine(client: Any, hosts: tuple[Host, ...], per_host: int) -> _ThreadEngine | _DaskEngine:
    if client is not None:
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise UsageError(
                "client= needs Dask distributed: pip install 'statecapture[fleet]'"
            ) from exc
        if not isinstance(client, Client):
            raise UsageError(f"client must be a distributed.Client, not {type(client).__name__}")
        return _DaskEngine(client)
    embeds = {h.uri for h in hosts if h.uri.startswith("qemu:///embed")}
    if len(embeds) > 1:
        raise UsageError(
            "without a Dask client every host's URI is opened in this process, and libvirt "
            f"allows one embedded QEMU root per process ({len(embeds)} given): pass "
            "client= with one worker per root"
        )
    return _ThreadEngine(max(1, min(64, per_host * max(1, len(hosts)))))


# ============================================================================ controller
def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


def _run(
    operation: str,
    inventory: Iterable[Host],
    *,
    select: Selector,
    per_host: int,
    client: Any,
    progress: Callable[[FleetProgress], None] | None,
    options: Mapping[str, Any],
    retries: int,
    backoff: float,
) -> FleetReport:
    hosts = check_inventory(inventory)
    check_selector(select)
    _check_int("per_host", per_host, 1)
    _check_int("retries", retries, 0)
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or backoff < 0:
        raise UsageError(f"backoff must be a number of seconds >= 0, not {backoff!r}")
    if progress is not None and not callable(progress):
        raise UsageError("progress must be a callable taking a FleetProgress")
    engine = _engine(client, hosts, per_host)
    started = time.time()
    results: list[DomainResult] = []
    queues: dict[str, deque[tuple[str, str]]] = {h.name: deque() for h in hosts}
    inflight: dict[Any, tuple[str, Host, str, str]] = {}
    busy: dict[str, int] = {h.name: 0 for h in hosts}
    counts = {"total": 0, "done": 0, "failed": 0}

    def record(result: DomainResult) -> None:
        results.append(result)
        counts["done"] += 1
        counts["failed"] += 0 if result.ok else 1
        if progress is not None:
            progress(FleetProgress(counts["done"], counts["total"], counts["failed"], result))

    def host_failed(host: Host, error: str) -> None:
        now = time.time()
        counts["total"] += 1
        record(DomainResult(host.name, "", "list", False, now, now, error=error))

    try:
        missing = engine.check_hosts(hosts)
        for h in hosts:
            if h.name in missing:
                host_failed(h, missing[h.name])
                continue
            fut = engine.submit(h, list_task, h, select, retries, backoff)
            inflight[fut] = ("list", h, "", "")
            busy[h.name] += 1
        while inflight:
            for fut in engine.wait(inflight):
                kind, h, name, uuid = inflight.pop(fut)
                busy[h.name] -= 1
                if kind == "list":
                    try:
                        found = engine.result(fut)
                    except Exception as exc:
                        host_failed(h, f"listing domains failed: {_describe(exc)}")
                        continue
                    queues[h.name].extend(found)
                    counts["total"] += len(found)
                else:
                    try:
                        res = engine.result(fut)
                    except Exception as exc:  # the engine lost the task (KilledWorker ...)
                        now = time.time()
                        res = DomainResult(
                            h.name, name, operation, False, now, now,
                            error=_describe(exc), domain_uuid=uuid,
                        )  # fmt: skip
                    record(res)
                del fut
            for h in hosts:  # top up each host to per_host tasks in flight
                q = queues[h.name]
                while q and busy[h.name] < per_host:
                    name, uuid = q.popleft()
                    fut = engine.submit(
                        h, domain_task, operation, h, name, uuid, options, retries, backoff
                    )
                    inflight[fut] = (operation, h, name, uuid)
                    busy[h.name] += 1
    except BaseException:
        engine.cancel(inflight)
        raise
    finally:
        engine.close()
    order = {h.name: i for i, h in enumerate(hosts)}
    results.sort(key=lambda r: (order.get(r.host, 0), r.domain, r.started))
    return FleetReport(operation, tuple(results), started, time.time())


def backup(
    inventory: Iterable[Host],
    *,
    select: Selector = None,
    per_host: int = 2,
    client: Any = None,
    progress: Callable[[FleetProgress], None] | None = None,
    mode: str = "pull",
    quiesce: bool | str = True,
    full: bool = False,
    max_frozen: float = 10.0,
    retries: int = _DEFAULT_RETRIES,
    backoff: float = _DEFAULT_BACKOFF,
) -> FleetReport:
    """Back up every selected domain of every host into that host's repository.

    One task per domain runs :meth:`Repository.backup` *on the host that owns the domain*
    (its NBD export is a local socket there), at most ``per_host`` at once per host. A
    failing domain is recorded in the :class:`FleetReport` and the others go on. Connection
    errors are retried (``retries`` times, ``backoff`` seconds doubling); a task whose
    backup may have begun first runs :func:`statecapture.recover` and goes on only when the
    domain is clean. ``client`` is a ``distributed.Client`` whose workers advertise
    ``host:<name>`` resources; ``None`` runs the tasks on a thread pool in this process
    (opening each host's URI here). ``mode``, ``quiesce``, ``full`` and ``max_frozen`` go
    to :meth:`Repository.backup`.
    """
    return _run(
        "backup",
        inventory,
        select=select,
        per_host=per_host,
        client=client,
        progress=progress,
        options={"mode": mode, "quiesce": quiesce, "full": full, "max_frozen": max_frozen},
        retries=retries,
        backoff=backoff,
    )


def verify(
    inventory: Iterable[Host],
    *,
    select: Selector = None,
    per_host: int = 2,
    client: Any = None,
    progress: Callable[[FleetProgress], None] | None = None,
    retries: int = _DEFAULT_RETRIES,
    backoff: float = _DEFAULT_BACKOFF,
) -> FleetReport:
    """Verify every point of every selected domain in its host's repository.

    Each chain is read once from its newest point (:meth:`Repository.verify`); a domain
    without any point fails. ``bytes`` in each result is the stored data read.
    """
    return _run(
        "verify",
        inventory,
        select=select,
        per_host=per_host,
        client=client,
        progress=progress,
        options={},
        retries=retries,
        backoff=backoff,
    )


def prune(
    inventory: Iterable[Host],
    *,
    select: Selector = None,
    keep_last: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    dry_run: bool = False,
    per_host: int = 2,
    client: Any = None,
    progress: Callable[[FleetProgress], None] | None = None,
    retries: int = _DEFAULT_RETRIES,
    backoff: float = _DEFAULT_BACKOFF,
) -> FleetReport:
    """Apply a retention policy (:meth:`Repository.prune`) to every selected domain."""
    if keep_last is None and keep_daily is None and keep_weekly is None:
        raise UsageError("prune needs at least one of keep_last, keep_daily, keep_weekly")
    return _run(
        "prune",
        inventory,
        select=select,
        per_host=per_host,
        client=client,
        progress=progress,
        options={
            "keep_last": keep_last,
            "keep_daily": keep_daily,
            "keep_weekly": keep_weekly,
            "dry_run": dry_run,
        },
        retries=retries,
        backoff=backoff,
    )
