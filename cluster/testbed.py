"""The testbed: a running set of hosts, and everything a user does with them.

`Testbed.local(...)` starts a private local cluster (a context manager that tears it down);
`Testbed.attach()` joins the persistent cluster of `migbed up`; `Testbed.in_process(...)` runs
the same hosts as plain objects in this process, without Ray, for fast tests. The calls are
the same for all three: `create`, `destroy`, `list`, `migrate`, `host(name)`.
"""

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cluster.driver import recover_migration
from cluster.fairshare import Topology
from cluster.handles import LocalHost, RayHost
from cluster.launch import launcher, persistent
from cluster.launch.launcher import NAMESPACE, ClusterSpec, LocalRay
from cluster.report import MigrationReport
from cluster.schedclient import SchedulerHandle, cluster_scheduler, local_scheduler, scheduled
from nodes.errors import (
    ClusterError,
    DomainExistsError,
    MigrationError,
    NoSuchDomainError,
    NoSuchHostError,
)
from nodes.host.specs import GuestSpec
from nodes.migration.progress import Progress
from nodes.migration.settings import MigrationSettings
from nodes.phase import PausedEnd
from nodes.xen.hypervisor import check_guest_name

# Told of every `Testbed.local` as it starts (`started(tb)`) and closes (`closing(tb)`); see
# `observing`. `migbed demo --prometheus` points its Prometheus at the demo's hosts this way.
_local_observers: list = []


@contextmanager
def observing(observer) -> Iterator[None]:
    """Within the block, tell `observer` of every local testbed that starts or closes."""
    _local_observers.append(observer)
    try:
        yield
    finally:
        _local_observers.remove(observer)


def _find_actors(names: list[str]) -> dict:
    """name -> actor of every host that is there (one killed by `migbed fault kill` is not),
    looked up at once: each lookup is a round trip to Ray's GCS, and a command against 32
    hosts should not wait for 32 in a row."""
    import concurrent.futures

    import ray

    def find(name: str):
        try:
            return name, ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return name, None
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        return {n: a for n, a in pool.map(find, names) if a is not None}


class Testbed:
    def __init__(self, hosts: dict, owner: LocalRay | None = None,
                 topology: Topology | None = None, scheduler: SchedulerHandle | None = None):
        self.hosts = hosts
        self._owner = owner
        self.lost_hosts: dict = {}     # hosts killed by a fault: name -> handle
        self.topology = topology or Topology()
        # The cluster's one migration scheduler (`cluster.scheduler`): every migration goes
        # through it. A persistent cluster's is its actor; a testbed of this process, its own.
        self._scheduler = scheduler
        self._remote_scheduler = False       # attach: the cluster's actor, found on first use
        self._scheduler_lock = threading.Lock()
        # What the hosts were made from (a restart makes a host again from it), and whether
        # they outlive this process (`migbed up`'s detached actors).
        self.spec: ClusterSpec | None = None
        self.spec_detached = False

    @property
    def scheduler(self) -> SchedulerHandle:
        """The cluster's migration scheduler (made or found on first use: a command that
        moves nothing never pays for it)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = (cluster_scheduler(self.topology, NAMESPACE)
                                   if self._remote_scheduler
                                   else local_scheduler(self.hosts, self.topology))
            return self._scheduler

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def local(cls, spec: ClusterSpec | None = None,
              on_progress: Callable[[int, int], None] | None = None, **kwargs) -> "Testbed":
        """A private local Ray cluster, its hosts packed `spec.hosts_per_node` to a node (all
        on one by default); `close()` removes it all. `on_progress(k, n)`: k of n hosts up."""
        import time

        import ray
        spec = spec or ClusterSpec(**kwargs)
        deadline = time.monotonic() + launcher.startup_timeout_seconds(spec.hosts)
        owner = LocalRay(spec.host_names, spec.object_store_bytes,
                         hosts_per_node=spec.hosts_per_node)
        try:
            launcher.ray_init(owner.address)
            actors = launcher.start_hosts(spec, detached=False, deadline=deadline,
                                          on_up=on_progress)
        except BaseException:
            ray.shutdown()
            owner.shutdown()
            raise
        tb = cls({n: RayHost(n, a) for n, a in actors.items()}, owner, spec.topology())
        tb.spec = spec
        for observer in list(_local_observers):
            observer.started(tb)
        return tb

    @classmethod
    def attach(cls) -> "Testbed":
        """The persistent cluster started by `migbed up`."""
        state = persistent.read_state()
        if state is None:
            raise ClusterError("no migbed cluster is running; start one with `migbed up` "
                               "(e.g. `migbed up --hosts 3 --host-memory 1GiB`)")
        try:
            launcher.ray_init(state["address"])
            hosts = {n: RayHost(n, a) for n, a in _find_actors(state["hosts"]).items()}
            if not hosts:
                raise ValueError("no host answers")
            spec = ClusterSpec.from_dict(state["spec"]) if state.get("spec") else None
            topology = spec.topology() if spec is not None else Topology()
        except (ValueError, ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"the migbed cluster at {state['address']} does not answer "
                               f"({exc}); `migbed down` cleans up, then `migbed up`") from None
        tb = cls(hosts, topology=topology)
        tb._remote_scheduler = True
        tb.spec, tb.spec_detached = spec, True
        return tb

    @classmethod
    def in_process(cls, spec: ClusterSpec | None = None, **kwargs) -> "Testbed":
        """The same hosts as objects in this process (no Ray): for fast tests and benches."""
        from nodes.host.service import HostService
        spec = spec or ClusterSpec(**kwargs)
        tb = cls({c.name: LocalHost(HostService(c)) for c in spec.host_configs()},
                 topology=spec.topology())
        tb.spec = spec
        return tb

    def close(self) -> None:
        for h in list(self.hosts.values()) + list(self.lost_hosts.values()):
            if isinstance(h, LocalHost):
                h.service.shutdown()
        if self._owner is not None:
            import ray
            for observer in list(_local_observers):
                observer.closing(self)
            ray.shutdown()
            self._owner.shutdown()
            self._owner = None

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metrics ------------------------------------------------------------------------------
    def metrics_endpoints(self, timeout: float = 5.0) -> dict[str, str]:
        """host -> "address:port" of its Prometheus /metrics, for every host that answers
        and serves metrics (a dead host is left out)."""
        out = {}
        for name, h in self.hosts.items():
            try:
                endpoint = h.call("metrics_endpoint", timeout=timeout)
            except Exception:  # noqa: BLE001 - a dead host (any Ray error) has no endpoint
                continue
            if endpoint:
                out[name] = endpoint
        return out

    def write_sd_file(self, path: str | Path) -> Path:
        """Write (or rewrite, as hosts come and go) Prometheus's discovery file for the hosts."""
        from cluster.prometheus import write_sd_file
        return write_sd_file(path, self.metrics_endpoints())

    # -- lookup -------------------------------------------------------------------------------
    def host(self, name: str):
        try:
            return self.hosts[name]
        except KeyError:
            raise NoSuchHostError(f"no host named {name!r}; hosts: "
                                  f"{', '.join(self.hosts)}") from None

    def __getitem__(self, name: str):
        return self.host(name)

    def _on_every_host(self, method: str) -> list:
        """`method` called on every host at once (a rack of 32 answers in one round trip,
        not 32 in a row), the answers in the hosts' order."""
        from cluster.handles import DEFAULT_CALL_TIMEOUT_SECONDS
        if not any(isinstance(h, RayHost) for h in self.hosts.values()):
            return [h.call(method) for h in self.hosts.values()]   # in-process: no trip
        pending = [h.call_async(method) for h in self.hosts.values()]
        return [p.result(DEFAULT_CALL_TIMEOUT_SECONDS) for p in pending]

    def guests(self) -> list[dict]:
        return [g for guests in self._on_every_host("list_guests") for g in guests
                if not g["dom0"]]

    def where(self, guest: str) -> str:
        """The host a guest runs on."""
        for g in self.guests():
            if g["name"] == guest:
                return g["host"]
        raise NoSuchDomainError(f"no guest named {guest!r} in the cluster")

    # -- what users do ---------------------------------------------------------------------
    def list(self) -> dict:
        hosts = self._on_every_host("describe")
        guests = [g for guests in self._on_every_host("list_guests") for g in guests]
        return {"hosts": hosts, "guests": guests}

    def create(self, host: str, spec: GuestSpec | dict) -> dict:
        if isinstance(spec, dict):
            spec = GuestSpec.from_dict(spec)
        check_guest_name(spec.name)
        h = self.host(host)
        if any(g["name"] == spec.name for g in self.guests()):
            raise DomainExistsError(f"a guest named {spec.name!r} already exists in the "
                                    "cluster")
        return h.call("create_guest", spec)

    def destroy(self, guest: str) -> None:
        self.host(self.where(guest)).call("destroy_guest", guest)

    def migrate(self, guest: str, destination: str,
                settings: MigrationSettings | None = None,
                on_progress: Callable[[Progress], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                on_queued: Callable[[str], None] | None = None,
                application_after_seconds: float | None = None) -> MigrationReport:
        """Migrate `guest` to `destination` through the cluster's scheduler: it waits its
        turn under the cluster's limits (`on_queued(id)` if it has to wait), then runs; a
        program guest's report has its application block, read `application_after_seconds`
        (default 5 s: the brownout's span) after."""
        settings = settings or MigrationSettings()
        dst = self.host(destination)
        src = self.host(self.where(guest))
        if src.name == dst.name:
            raise MigrationError(f"{guest} already runs on {destination}; pick another host")
        report = scheduled(self.scheduler, src, dst, guest, settings,
                           on_progress=on_progress, should_cancel=should_cancel,
                           on_queued=on_queued,
                           application_after_seconds=application_after_seconds)
        self._forget_killed(report)
        return report

    # -- post-copy (`cluster.postcopy_control`, `cluster.driver.recover_migration`) --------------------
    def start_postcopy(self, guest: str) -> str:
        """Switch the running migration of `guest` to post-copy at its next decision (QEMU's
        migrate-start-postcopy); it must have been started with post-copy allowed."""
        for h in self.hosts.values():
            mid = h.call("migration_of", guest)
            if mid is not None:
                return h.call("start_postcopy", mid)
        raise MigrationError(f"no migration of {guest} is running; start one with "
                             "`migbed migrate GUEST DEST_HOST --postcopy-allowed`")

    def recover(self, guest: str,
                on_progress: Callable[[Progress], None] | None = None) -> MigrationReport:
        """Resume the paused post-copy migration of `guest` (its link is back); the report
        once it has completed (or paused again)."""
        for src in self.hosts.values():
            for paused in src.call("paused_migrations"):
                if paused["guest"] != guest:
                    continue
                dst = self._incoming_host(paused["migration_id"])
                if dst is None:
                    why = f"the destination of the paused post-copy of {guest} is gone"
                    src.call("settle_paused", paused["migration_id"], PausedEnd.LOST, why)
                    raise MigrationError(f"{why}: the guest is lost (neither host has all "
                                         f"of it); {src.name} has freed its stale copy")
                report = recover_migration(src, dst, paused, on_progress)
                self._forget_killed(report)
                return report
        raise MigrationError(f"no post-copy migration of {guest} is paused; "
                             "`migbed list` shows where it runs")

    def _incoming_host(self, migration_id: str):
        for h in self.hosts.values():
            try:
                if h.call("incoming_status", migration_id) is not None:
                    return h
            except ClusterError:
                continue
        return None

    def _forget_killed(self, report: MigrationReport) -> None:
        for f in report.faults:
            if f.get("killed_host") in self.hosts:
                self.lost_hosts[f["killed_host"]] = self.hosts.pop(f["killed_host"])

    def kill(self, host: str) -> None:
        """Fault injection: `host` dies now (its Ray actor is killed; an in-process host
        stops with its sockets shut). Its guests die with it; it leaves `hosts`."""
        h = self.host(host)
        h.kill()
        self.lost_hosts[host] = self.hosts.pop(host)

    def evacuate(self, host: "str | Sequence[str]", concurrency: int | None = 2,
                 settings: MigrationSettings | None = None, limits=None, on_event=None):
        """Move every guest off `host` (or off each of a list of hosts, together) to the
        others, by free memory, `concurrency` migrations at a time in all (see
        `cluster.evacuate`); returns an EvacuationReport."""
        from cluster.evacuate import evacuate
        return evacuate(self, host, concurrency, settings or MigrationSettings(), limits,
                        on_event)

    def drain(self, hosts: "Sequence[str]", **kwargs):
        """Every guest off `hosts`, by room and load, under limits (`cluster.drain.drain`:
        to, spread, limits, settings, on_event); returns a DrainReport with the fleet's
        statistics."""
        from cluster.drain import drain
        return drain(self, hosts, **kwargs)

    def maintenance(self, batch: int = 1, **kwargs):
        """A rolling maintenance of every host, `batch` at a time
        (`cluster.maintenance.maintenance`); returns a MaintenanceReport."""
        from cluster.maintenance import maintenance
        return maintenance(self, batch, **kwargs)
