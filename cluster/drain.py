"""Draining hosts: every guest off them (to maintain or retire them), each to a destination
picked by room and load, all through the cluster's scheduler under the run's limits, with the
fleet's statistics at the end.

The plan: largest guest first (first-fit decreasing, so a big one still finds room), each to
the candidate (`--to`, else every host not drained) that has room for it, the fewest guests
(those there and those the plan sent), then the most free memory. With `spread` a drained
rack's guests go round the other racks: the rack that has received the fewest from this drain
comes first, so one rack's guests do not all land in one rack (and one failure domain).
A guest that cannot move, or fits nowhere, stays and the report says why.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cluster.evacuate import EvacuationReport, Move, movable_guests, run_moves
from cluster.fleetstats import fleet_stats, summary_lines
from cluster.scheduler import Limits
from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings
from nodes.units import format_bytes


@dataclass
class DrainReport(EvacuationReport):
    destinations: list[str] = field(default_factory=list)
    limits: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def table(self) -> str:
        return super().table().replace("evacuation of", "drain of", 1) + "\n" + \
            "\n".join(summary_lines(self.stats))


def _candidates(tb, hosts: list[str], to: Sequence[str] | None) -> list[str]:
    if not hosts or len(set(hosts)) != len(hosts):
        raise ConfigError(f"name each host to drain once, got {hosts!r}")
    for h in [*hosts, *(to or ())]:
        tb.host(h)                           # NoSuchHostError names the hosts there are
    if to:
        both = sorted(set(to) & set(hosts))
        if both:
            raise ConfigError(f"{', '.join(both)} is drained and a destination (--to) at once")
        return list(dict.fromkeys(to))
    others = [n for n in tb.hosts if n not in hosts]
    if not others:
        raise ConfigError(f"{', '.join(hosts)}: every host is drained, there is nowhere to go")
    return others


def plan_drain(tb, hosts: Sequence[str], to: Sequence[str] | None = None,
               spread: bool = False) -> tuple[list[Move], list[dict]]:
    """Which guest goes where, and which stay and why (see the module docstring)."""
    hosts = list(hosts)
    cands = _candidates(tb, hosts, to)
    free, psize, load = {}, {}, {}
    for n in cands:
        d = tb.host(n).call("describe")
        free[n], psize[n] = d["frames"]["free"], d["page_size"]
        load[n] = sum(not g["dom0"] for g in tb.host(n).call("list_guests"))
    rack_got: dict = {}
    moves = []
    movable, stayed = movable_guests(tb, hosts)
    for h, g in movable:
        room = [n for n in cands if g["memory_bytes"] // psize[n] <= free[n]]
        if not room:
            most = max(cands, key=lambda n: free[n] * psize[n])
            stayed.append({"guest": g["name"], "host": h, "reason": (
                f"no host has room: it needs {format_bytes(g['memory_bytes'])}, the most "
                f"free is {format_bytes(free[most] * psize[most])} on {most}")})
            continue
        src_rack = tb.topology.rack_of(h)

        def score(n: str, src_rack=src_rack) -> tuple:
            spread_key = (rack_got.get((src_rack, tb.topology.rack_of(n)), 0),) \
                if spread else ()
            return (*spread_key, load[n], -free[n] * psize[n], n)
        best = min(room, key=score)
        free[best] -= g["memory_bytes"] // psize[best]
        load[best] += 1
        key = (src_rack, tb.topology.rack_of(best))
        rack_got[key] = rack_got.get(key, 0) + 1
        moves.append(Move(g["name"], best, g["memory_bytes"], source=h))
    return moves, stayed


def drain(tb, hosts: Sequence[str], to: Sequence[str] | None = None, spread: bool = False,
          limits: Limits | None = None, settings: MigrationSettings | None = None,
          on_event: Callable[[str, Move], None] | None = None) -> DrainReport:
    """Drain `hosts` (see the module docstring); the report has every move and the fleet's
    statistics. A host that dies meanwhile fails only its own moves."""
    limits = limits or Limits()
    settings = replace(settings or MigrationSettings(), link_shared=True)
    moves, stayed = plan_drain(tb, hosts, to, spread)
    report = DrainReport(list(hosts), limits.max_parallel or len(moves), moves, stayed,
                         destinations=sorted({m.destination for m in moves}),
                         limits=limits.to_dict())
    t0 = time.monotonic()
    try:
        run_moves(tb, moves, limits, settings, report.reports, on_event)
    finally:
        report.total_time_seconds = time.monotonic() - t0
        report.stats = fleet_stats([move_dict(m, report.reports) for m in moves],
                                   report.total_time_seconds)
    return report


def move_dict(m: Move, reports: list[dict]) -> dict:
    """A move as the fleet statistics read it, its brownout from its report if any."""
    from cluster.fleetstats import brownout_of
    d = {k: getattr(m, k) for k in ("guest", "source", "destination", "status",
                                    "downtime_seconds", "total_time_seconds", "bytes_sent",
                                    "schedule")}
    rep = next((r for r in reports if r.get("migration_id") == m.migration_id), None)
    d["brownout_seconds"] = brownout_of(rep) if rep else None
    return d
