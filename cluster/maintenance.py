"""A rolling maintenance: `batch` hosts at a time are drained (`cluster.drain`, under the
limits), restarted empty as fresh hosts (a new host actor, or a new host object in process,
with the same name, profile and memory: what patching and rebooting a machine gives), and
then each guest that left goes back to the host it came from (with `rebalance`, the guests
are instead spread so every host ends with about the same number). It goes on until every
host has had its turn, and says so as it goes.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.drain import drain, move_dict
from cluster.evacuate import Move, run_moves
from cluster.fleetstats import fleet_stats, summary_lines
from cluster.handles import LocalHost, RayHost
from cluster.scheduler import Limits
from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings


@dataclass
class MaintenanceReport:
    batches: list[list[str]] = field(default_factory=list)
    moves: list[dict] = field(default_factory=list)      # every move, out and back
    stayed: list[dict] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    total_time_seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def hosts(self) -> list[str]:
        return [h for b in self.batches for h in b]

    @property
    def ok(self) -> bool:
        return not self.stayed and all(m["status"] == "completed" for m in self.moves)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return {**asdict(self), "ok": self.ok}

    def table(self) -> str:
        head = (f"maintenance of {len(self.restarted)} hosts in {len(self.batches)} batches, "
                f"{self.total_time_seconds:.1f} s  [{'ok' if self.ok else 'INCOMPLETE'}]")
        lines = [head] + [f"  stays: {s['guest']} on {s['host']}: {s['reason']}"
                          for s in self.stayed]
        return "\n".join(lines + summary_lines(self.stats))


def restart_host(tb, name: str) -> None:
    """`name` restarts empty: a fresh host with its configuration (the old one is gone, as a
    rebooted machine's memory is). Its guests must have left."""
    old = tb.host(name)
    guests = [g["name"] for g in old.call("list_guests") if not g["dom0"]]
    if guests:
        raise ConfigError(f"{name} still runs {', '.join(guests)}: drain it first")
    config = next((c for c in tb.spec.host_configs() if c.name == name), None)
    if config is None:
        raise ConfigError(f"{name} is not in the cluster's spec; it cannot be restarted")
    if isinstance(old, LocalHost):
        from nodes.host.service import HostService
        old.service.kill()
        old.service.shutdown()
        tb.hosts[name] = LocalHost(HostService(config))
    else:
        import ray

        from cluster.launch.launcher import NAMESPACE
        from nodes.host.actor import start_host_actor
        node = old.call("node_id") if tb.spec.address else None
        old.kill()
        actor = start_host_actor(config, detached=tb.spec_detached, namespace=NAMESPACE,
                                 node_id=node)
        ray.get(actor.ping.remote(), timeout=120)
        tb.hosts[name] = RayHost(name, actor)
    tb.scheduler.call("forget_host", name)


def _batches(hosts: Sequence[str], batch: int, cluster: int) -> list[list[str]]:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--batch must be a whole number >= 1, got {batch!r}")
    if batch >= cluster:
        raise ConfigError(f"--batch {batch} leaves no host of the {cluster} to take the "
                          "guests; give a smaller batch")
    return [list(hosts[i:i + batch]) for i in range(0, len(hosts), batch)]


def maintenance(tb, batch: int = 1, limits: Limits | None = None,
                settings: MigrationSettings | None = None, rebalance: bool = False,
                hosts: Sequence[str] | None = None,
                on_event: Callable[[str, object], None] | None = None) -> MaintenanceReport:
    """Every host (or `hosts`) in turn, `batch` at a time (see the module docstring)."""
    limits = limits or Limits()
    settings = settings or MigrationSettings()
    order = list(hosts) if hosts else list(tb.hosts)
    for h in order:
        tb.host(h)                           # NoSuchHostError names the hosts there are
    report = MaintenanceReport(batches=_batches(order, batch, len(tb.hosts)))
    t0 = time.monotonic()
    try:
        for b in report.batches:
            if on_event is not None:
                on_event("batch", b)
            rep = drain(tb, b, limits=limits, settings=settings, on_event=on_event)
            report.moves += [move_dict(m, rep.reports) for m in rep.moves]
            report.stayed += rep.stayed
            if rep.stayed or any(m.status != "completed" for m in rep.moves):
                break                           # a host that did not empty is not restarted
            for h in b:
                restart_host(tb, h)
                report.restarted.append(h)
                if on_event is not None:
                    on_event("restarted", h)
            if not rebalance:
                back = [Move(m.guest, m.source, m.memory_bytes, source=m.destination)
                        for m in rep.moves]
                _run(tb, back, limits, settings, report, on_event)
        if rebalance and report.ok:
            _run(tb, rebalance_moves(tb), limits, settings, report, on_event)
    finally:
        report.total_time_seconds = time.monotonic() - t0
        report.stats = fleet_stats(report.moves, report.total_time_seconds)
    return report


def _run(tb, moves: list[Move], limits: Limits, settings: MigrationSettings,
         report: MaintenanceReport, on_event) -> None:
    reports: list[dict] = []
    run_moves(tb, moves, limits, settings, reports, on_event)
    report.moves += [move_dict(m, reports) for m in moves]


def rebalance_moves(tb) -> list[Move]:
    """Guests from the hosts with the most to those with the fewest, until no two hosts
    differ by more than one guest (where memory allows)."""
    guests = tb.guests()
    count = {h: 0 for h in tb.hosts}
    free = {}
    for h in tb.hosts:
        d = tb.host(h).call("describe")
        free[h] = d["frames"]["free"] * d["page_size"]
    on: dict[str, list[dict]] = {h: [] for h in tb.hosts}
    for g in guests:
        count[g["host"]] += 1
        on[g["host"]].append(g)
    moves = []
    while True:
        hi = max(count, key=lambda h: (count[h], h))
        lo = min(count, key=lambda h: (count[h], h))
        if count[hi] - count[lo] <= 1 or not on[hi]:
            return moves
        g = min(on[hi], key=lambda g: (g["memory_bytes"], g["name"]))
        if g["memory_bytes"] > free[lo]:
            return moves
        on[hi].remove(g)
        count[hi] -= 1
        count[lo] += 1
        free[lo] -= g["memory_bytes"]
        moves.append(Move(g["name"], lo, g["memory_bytes"], source=hi))
