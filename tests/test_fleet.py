"""statecapture.fleet: many hosts and domains, one task per domain, on Dask or a thread pool.

Fast tier: libvirt's test driver, one private test-driver URI per "host", shut-off domains
(backed up with qemu-img, for real). Real tier: a Dask ``LocalCluster`` with two worker
processes, each standing for a host with its own embedded QEMU root and two real guests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import statecapture
from statecapture import fleet
from statecapture._connection import is_remote_uri
from statecapture.errors import UsageError

QEMU_IMG = shutil.which("qemu-img")


def _domain(name: str, image: Path, labels: dict[str, str] | None = None) -> str:
    meta = ""
    if labels:
        items = "".join(f"<sl:label name='{k}'>{v}</sl:label>" for k, v in labels.items())
        meta = f"<metadata><sl:labels xmlns:sl='{fleet.LABELS_NS}'>{items}</sl:labels></metadata>"
    return f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>
  <memory>8192</memory>{meta}<test:runstate>5</test:runstate>
  <os><type>hvm</type></os><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
  </devices></domain>"""


def _host(
    tmp: Path,
    name: str,
    domains: dict[str, dict[str, str] | None],
    *,
    missing: frozenset[str] = frozenset(),
) -> fleet.Host:
    """A test-driver 'host': its node XML with shut-off domains, qcow2 disks, a repository."""
    d = tmp / name
    d.mkdir()
    parts = []
    for dom, labels in domains.items():
        image = d / f"{dom}.qcow2"
        if dom not in missing:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True
            )
        parts.append(_domain(dom, image, labels))
    node = d / "node.xml"
    node.write_text("<node>" + "".join(parts) + "</node>")
    repo = statecapture.Repository.create(d / "repo")
    return fleet.Host(name, f"test://{node}", repository=repo, labels={"site": name})


def _max_overlap(results: list[fleet.DomainResult]) -> int:
    edges = sorted([(r.started, 1) for r in results] + [(r.ended, -1) for r in results])
    level = peak = 0
    for _t, step in edges:
        level += step
        peak = max(peak, level)
    return peak


# ============================================================================ fast tier
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")


@needs_qemu_img
def test_thread_pool_backs_up_each_domain_and_isolates_a_failure(tmp_path: Path) -> None:
    """With ``client=None`` every selected domain of every host gets one point in its own
    host's repository; a domain whose backup fails is recorded and the others go on."""
    a = _host(tmp_path, "a", {"web-1": None, "web-2": None, "db-1": None})
    b = _host(tmp_path, "b", {"web-3": None, "web-bad": None}, missing={"web-bad"})
    seen: list[fleet.FleetProgress] = []
    report = fleet.backup([a, b], select="web-*", per_host=2, progress=seen.append)
    assert not report.ok
    by = {(r.host, r.domain): r for r in report.results}
    assert set(by) == {("a", "web-1"), ("a", "web-2"), ("b", "web-3"), ("b", "web-bad")}
    assert by[("b", "web-bad")].ok is False
    assert by[("b", "web-bad")].error
    for key in [("a", "web-1"), ("a", "web-2"), ("b", "web-3")]:
        r = by[key]
        assert r.ok, r.error
        assert r.point is not None
        assert r.started <= r.ended
        host = a if r.host == "a" else b
        assert statecapture.Repository(host.repository).point(r.point).domain == r.domain
    assert [p.domain for p in statecapture.Repository(b.repository).points()] == ["web-3"]
    assert len(seen) == 4
    assert seen[-1].done == 4
    assert seen[-1].failed == 1
    t = report.totals()
    assert (t["domains"], t["ok"], t["failed"]) == (4, 3, 1)
    doc = json.loads(report.dumps())
    assert doc["ok"] is False
    assert {r["domain"] for r in doc["results"]} == {"web-1", "web-2", "web-3", "web-bad"}
    assert "web-bad" in report._repr_html_()


@needs_qemu_img
def test_thread_pool_respects_per_host(tmp_path: Path) -> None:
    """``per_host=1`` never runs two tasks of one host at once (recorded start/end times);
    verify and prune run over the same inventory."""
    a = _host(tmp_path, "a", {f"vm-{i}": None for i in range(3)})
    b = _host(tmp_path, "b", {f"vm-{i}": None for i in range(3)})
    report = fleet.backup([a, b], per_host=1)
    assert report.ok, str(report)
    for h in ("a", "b"):
        assert _max_overlap(list(report.for_host(h))) == 1
    second = fleet.backup([a, b], per_host=2)
    assert second.ok
    v = fleet.verify([a, b])
    assert v.ok, str(v)
    assert len(v.results) == 6
    assert all(r.bytes >= 0 for r in v.results)
    p = fleet.prune([a, b], keep_last=1)
    assert p.ok, str(p)
    for h in (a, b):
        repo = statecapture.Repository(h.repository)
        assert len(repo.points()) == 3  # one per domain
    assert {r.point for r in p.results} == {r.point for r in second.results}


@needs_qemu_img
def test_select_by_labels_and_callable(tmp_path: Path) -> None:
    """Domains are picked by labels stored in their metadata, or by a callable that gets
    the Host and the Domain."""
    a = _host(
        tmp_path,
        "a",
        {"x": {"tier": "web"}, "y": {"tier": "db"}, "z": None},
    )
    r1 = fleet.backup([a], select={"tier": "web"})
    assert [r.domain for r in r1.results] == ["x"]
    r2 = fleet.backup([a], select=lambda host, dom: host.labels["site"] == "a" and dom.name > "x")
    assert [r.domain for r in r2.results] == ["y", "z"]
    r3 = fleet.backup([a], select=["y", "z*"])
    assert [r.domain for r in r3.results] == ["y", "z"]


def test_labels_round_trip(test_domain: statecapture.Domain) -> None:
    """set_labels stores labels in the domain's metadata; labels() reads them; {} removes."""
    assert dict(fleet.labels(test_domain)) == {}
    fleet.set_labels(test_domain, {"tier": "web", "team": "a&b"})
    assert dict(fleet.labels(test_domain)) == {"team": "a&b", "tier": "web"}
    fleet.set_labels(test_domain, {})
    assert dict(fleet.labels(test_domain)) == {}


def test_bad_input_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Bad inventories, selectors and limits raise UsageError; two embedded roots cannot
    share the in-process default."""
    h = fleet.Host("a", "test:///default", repository=tmp_path)
    with pytest.raises(UsageError, match="twice"):
        fleet.backup([h, h])
    with pytest.raises(UsageError, match="sequence of Host"):
        fleet.backup(h)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="select"):
        fleet.backup([h], select=42)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="per_host"):
        fleet.backup([h], per_host=0)
    with pytest.raises(UsageError, match="host name"):
        fleet.Host("a b", "test:///default", repository=tmp_path)
    with pytest.raises(UsageError, match="URI"):
        fleet.Host("a", "nope", repository=tmp_path)
    with pytest.raises(UsageError, match="one embedded QEMU root per process"):
        fleet.backup(
            [
                fleet.Host("a", "qemu:///embed?root=/tmp/x1", repository=tmp_path),
                fleet.Host("b", "qemu:///embed?root=/tmp/x2", repository=tmp_path),
            ]
        )
    with pytest.raises(UsageError, match="keep_last"):
        fleet.prune([h])
    with pytest.raises(UsageError, match=r"distributed\.Client"):
        fleet.backup([h], client=object())


def test_host_pickles() -> None:
    """A Host travels to Dask workers (pickle) unchanged."""
    import pickle

    h = fleet.Host("hv1", "qemu+ssh://root@hv1/system", repository="/b", labels={"r": "1"})
    assert pickle.loads(pickle.dumps(h)) == h
    assert h.resource == "host:hv1"


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu:///embed?root=/tmp/r", False),
        ("qemu+unix:///system", False),
        ("test:///default", False),
        ("qemu+ssh://root@hv1/system", True),
        ("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k", True),
        ("qemu+tls://hv1/system", True),
        ("qemu+tcp://hv1/system", True),
        ("qemu://hv1/system", True),
    ],
)
def test_is_remote_uri(uri: str, remote: bool) -> None:
    """Remote transports (ssh, tls, tcp, a host name) are told apart from local URIs."""
    assert is_remote_uri(uri) is remote


def test_no_worker_for_a_host_is_reported(tmp_path: Path) -> None:
    """On Dask, a host no worker advertises fails as a whole (no task waits forever); the
    other hosts go on."""
    distributed = pytest.importorskip("distributed")
    import dask

    if QEMU_IMG is None:
        pytest.skip("needs qemu-img")
    a = _host(tmp_path, "a", {"vm-1": None, "vm-2": None, "vm-3": None})
    ghost = fleet.Host("ghost", "test:///default", repository=a.repository)
    with (
        dask.config.set({"temporary-directory": str(tmp_path)}),
        distributed.LocalCluster(
            n_workers=0, processes=False, dashboard_address=None, local_directory=str(tmp_path)
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        cluster.worker_spec["a"] = {
            "cls": distributed.Worker,
            "options": {"nthreads": 4, "resources": {"host:a": 1}},
        }
        cluster.sync(cluster._correct_state)
        client.wait_for_workers(1)
        report = fleet.backup([a, ghost], client=client, per_host=3)
    bad = [r for r in report.results if not r.ok]
    assert [(r.host, r.domain) for r in bad] == [("ghost", "")]
    assert "host:ghost" in (bad[0].error or "")
    good = list(report.for_host("a"))
    assert len(good) == 3
    assert all(r.ok for r in good), str(report)
    # The worker advertises host:a=1, so even with per_host=3 only one ran at a time.
    assert _max_overlap(good) == 1


# ============================================================================ real tier
ROOT = Path(__file__).resolve().parent.parent


class _Fleet:
    def __init__(self, client: Any, hosts: list[fleet.Host], guests: dict[str, list[str]]):
        self.client = client
        self.hosts = hosts
        self.guests = guests  # host name -> guest names

    def on(self, host: str, fn: Any, *args: Any) -> Any:
        return self.client.submit(fn, *args, resources={f"host:{host}": 1}, pure=False).result(
            timeout=600
        )

    def run_on(self, host: str, fn: Any, *args: Any) -> Any:
        """Run on the host's worker directly (not as a task: no resource needed)."""
        for addr, w in self.client.scheduler_info()["workers"].items():
            if f"host:{host}" in (w.get("resources") or {}):
                return self.client.run(fn, *args, workers=[addr])[addr]
        raise AssertionError(f"no worker for {host}")

    def uri(self, host: str) -> str:
        return next(h.uri for h in self.hosts if h.name == host)

    def repo(self, host: str) -> statecapture.Repository:
        return statecapture.Repository(next(h.repository for h in self.hosts if h.name == host))


@pytest.fixture(scope="module")
def dask_fleet() -> Iterator[_Fleet]:
    """Two Dask worker processes (nannies: a killed worker is restarted), each standing for
    a host with its own embedded QEMU root and two running guests."""
    distributed = pytest.importorskip("distributed")
    from statecapture.testing.kit import ensure_kit
    from tests import _fleet_worker as fw
    from tests._isolation import make_embed_root

    ensure_kit()
    old_pp = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old_pp) if p)
    work = Path(tempfile.mkdtemp(prefix="sc-fleet-"))
    old_tmp = os.environ.get("DASK_TEMPORARY_DIRECTORY")
    os.environ["DASK_TEMPORARY_DIRECTORY"] = str(work / "dask")
    import dask

    dask_cfg = dask.config.set({"temporary-directory": str(work / "dask")})
    roots = {h: make_embed_root(prefix=f"scf{h}-") for h in ("a", "b")}
    hosts = []
    for h in ("a", "b"):
        (work / h).mkdir()
        statecapture.Repository.create(work / h / "repo")
        hosts.append(fleet.Host(h, f"qemu:///embed?root={roots[h]}", repository=work / h / "repo"))
    guests = {h: [f"sc-{os.getpid()}-{h}{i}" for i in (1, 2)] for h in ("a", "b")}
    cluster = distributed.LocalCluster(
        n_workers=0,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
        local_directory=str(work / "dask"),
    )
    client = distributed.Client(cluster)
    try:
        for h in ("a", "b"):
            cluster.worker_spec[f"host-{h}"] = {
                "cls": distributed.Nanny,
                "options": {
                    "nthreads": 2,
                    "resources": {f"host:{h}": 2},
                    "memory_limit": 0,
                    "dashboard": False,
                    "local_directory": str(work / "dask"),
                },
            }
        cluster.sync(cluster._correct_state)
        client.wait_for_workers(2, timeout=120)
        f = _Fleet(client, hosts, guests)
        boots = [
            client.submit(
                fw.boot,
                f.uri(h),
                str(work / h),
                guests[h],
                resources={f"host:{h}": 1},
                pure=False,
            )
            for h in ("a", "b")
        ]
        for fut in boots:
            fut.result(timeout=900)
        yield f
    finally:
        for h in ("a", "b"):
            try:
                client.submit(
                    fw.teardown, f"qemu:///embed?root={roots[h]}",
                    resources={f"host:{h}": 1}, pure=False,
                ).result(timeout=120)  # fmt: skip
            except Exception:
                subprocess.run(
                    [sys.executable, "-c", "import sys; from tests import _fleet_worker as w;"
                     " w.teardown(sys.argv[1])", f"qemu:///embed?root={roots[h]}"],
                    cwd=ROOT, timeout=120, check=False,
                )  # fmt: skip
        client.close()
        cluster.close()
        dask_cfg.__exit__(None, None, None)
        for var, value in (("PYTHONPATH", old_pp), ("DASK_TEMPORARY_DIRECTORY", old_tmp)):
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        shutil.rmtree(work, ignore_errors=True)
        for r in roots.values():
            shutil.rmtree(r, ignore_errors=True)


@pytest.mark.qemu
@pytest.mark.timeout(1500)
def test_dask_backup_one_point_per_guest_and_failure_isolated(dask_fleet: _Fleet) -> None:
    """On two Dask workers (two hosts, two real guests each) fleet.backup makes one point
    per guest in its host's repository, never runs more than ``per_host`` backups of a host
    at once, and a fault injected into one guest's backup leaves the other three points
    intact and that guest without job, journal or frozen filesystem."""
    from tests import _fleet_worker as fw

    f = dask_fleet
    first = fleet.backup(f.hosts, client=f.client, per_host=1)
    assert first.ok, str(first)
    assert sorted(r.domain for r in first.results) == sorted(f.guests["a"] + f.guests["b"])
    for h in ("a", "b"):
        res = list(first.for_host(h))
        assert _max_overlap(res) == 1  # per_host=1: strictly one after the other
        repo = f.repo(h)
        assert sorted(p.domain for p in repo.points()) == sorted(f.guests[h])
        for r in res:
            assert repo.point(r.point).domain == r.domain
            assert r.bytes > 0
            assert r.frozen_for is not None

    victim = f.guests["a"][0]
    f.run_on("a", fw.install_fault, victim, "mid:transfer", "raise")
    try:
        second = fleet.backup(f.hosts, client=f.client, per_host=2)
    finally:
        f.run_on("a", fw.clear_fault)
    failed = second.failed
    assert [r.domain for r in failed] == [victim]
    assert "injected fault" in (failed[0].error or "")
    for r in second.succeeded:
        repo = f.repo(r.host)
        p = repo.point(r.point)
        assert p.kind.value == "incremental"
    for h in ("a", "b"):
        assert _max_overlap(list(second.for_host(h))) <= 2
        assert f.repo(h).verify().ok
    assert len(f.repo("a").points(victim)) == 1  # no half point
    left = f.on("a", fw.state, f.uri("a"), victim)
    assert left["job"] is False
    assert left["journal"] is False
    assert left["frozen"] == "thawed"


@pytest.mark.qemu
@pytest.mark.timeout(1500)
def test_dask_worker_killed_mid_backup_recovers_before_rerun(dask_fleet: _Fleet) -> None:
    """A worker SIGKILLed mid-backup (guest frozen, backup job started) is restarted by its
    nanny; Dask re-runs the task on that host, which first runs recover() (thaw, end the
    job) and then backs up: the repository holds no half point and the guest ends with no
    job and no frozen filesystem."""
    from tests import _fleet_worker as fw

    f = dask_fleet
    victim = f.guests["a"][1]
    repo = f.repo("a")
    before = len(repo.points(victim))
    pid = f.run_on("a", fw.install_fault, victim, "in:begin:captured", "kill")
    report = fleet.backup(f.hosts, select=victim, client=f.client, per_host=1)
    assert report.ok, str(report)
    (r,) = report.results
    assert r.host == "a"
    assert r.domain == victim
    assert r.recovered, "the re-run did not recover() first"
    assert any("did:" in line for line in r.recovered)
    left = f.on("a", fw.state, f.uri("a"), victim)
    assert left["pid"] != pid  # a new worker process ran it
    assert left["job"] is False
    assert left["journal"] is False
    assert left["frozen"] == "thawed"
    points = repo.points(victim)
    assert len(points) == before + 1
    assert points[0].id == r.point
    assert repo.check().ok
    assert repo.verify().ok
    assert points[0].checkpoint in left["checkpoints"]
    assert set(left["checkpoints"]) <= {p.checkpoint for p in points}


@needs_qemu_img
def test_transient_errors_are_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that fails before anything started is retried (with backoff) and the
    task succeeds; a connection lost during the backup is retried only through a new
    attempt, which would run recover() first when a journal were left."""
    from statecapture import _journal
    from statecapture.errors import ConnectionLostError
    from statecapture.fleet import run as fleet_run

    a = _host(tmp_path, "a", {"vm-1": None})
    real = fleet_run._connection
    calls = {"connect": 0, "lost": 0}

    def flaky(uri: str, *, fresh: bool = False) -> statecapture.Connection:
        calls["connect"] += 1
        if calls["connect"] in (2, 3):  # the listing's connection works; the task's fails twice
            raise ConnectionLostError("injected: connection refused", operation="connect")
        return real(uri, fresh=fresh)

    def lose_once(name: str) -> None:
        if name == "repo:backup:cleaned" and calls["lost"] == 0:
            calls["lost"] += 1
            raise ConnectionLostError("injected: connection lost mid-backup", operation="x")

    monkeypatch.setattr(fleet_run, "_connection", flaky)
    monkeypatch.setattr(_journal, "_fault_hook", lose_once)
    report = fleet.backup([a], backoff=0.01)
    assert report.ok, str(report)
    (r,) = report.results
    assert r.attempts == 2  # one re-run after the lost connection
    assert calls["lost"] == 1
    assert calls["connect"] >= 4
    assert len(statecapture.Repository(a.repository).points()) == 1


@needs_qemu_img
def test_non_transient_errors_are_not_retried(tmp_path: Path) -> None:
    """A failure that is not a lost connection is recorded once, not retried."""
    a = _host(tmp_path, "a", {"vm-bad": None}, missing=frozenset({"vm-bad"}))
    report = fleet.backup([a], backoff=0.01)
    (r,) = report.results
    assert not r.ok
    assert r.attempts == 1
