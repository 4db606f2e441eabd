"""Host evacuation: every guest off one host or several (a rack), onto the others, several
migrations at a time.

The plan: the guests that can move (running, not P==M, no DMA device, not already migrating),
largest first across all the evacuated hosts, each to the host not being evacuated with the
most free memory once the plan's earlier choices are taken off (first-fit decreasing on free
frames, so concurrent migrations never ask one destination for more than it has). A guest
that cannot move, or fits nowhere, stays and the report says why.

The run: every move queued at once in the cluster's scheduler (`cluster.scheduler`), as one
group whose limits are the run's (`concurrency` is its `max_parallel`; the cluster's own
limits apply too), each an ordinary verified `run_migration` once its turn comes. Those leaving one host all go through its one outgoing
link: with `link_shared` set (always, here) its concurrent senders share it, taking turns
batch by batch, so each gets an equal share of the link's speed (`nodes.link.Pacer`).
"""

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from cluster.scheduler import Limits
from nodes.errors import ConfigError, MigbedError
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome
from nodes.units import format_bytes

MAX_CONCURRENCY = 64
MAX_WAITING = 256      # threads waiting in the queue at once (each holds one move)


@dataclass
class Move:
    guest: str
    destination: str
    memory_bytes: int
    source: str = ""
    status: str = "planned"            # planned, completed, failed, cancelled, refused
    verified: bool | None = None
    guest_host: str | None = None
    error: str | None = None
    downtime_seconds: float | None = None
    total_time_seconds: float | None = None
    throughput_bytes_per_second: float | None = None
    migration_id: str | None = None
    bytes_sent: int | None = None
    schedule: dict | None = None       # its scheduler entry: queued, started, ended, links

    def record(self, r) -> None:
        """What its migration's report `r` says of it."""
        self.status, self.error = r.status, r.error
        self.verified = r.integrity.verified
        self.guest_host = r.guest_host
        self.downtime_seconds = r.downtime_seconds
        self.total_time_seconds = r.total_time_seconds
        self.throughput_bytes_per_second = r.throughput_bytes_per_second
        self.bytes_sent = r.bytes_sent_total
        self.schedule = r.schedule


@dataclass
class EvacuationReport:
    hosts: list[str]
    concurrency: int
    moves: list[Move] = field(default_factory=list)
    stayed: list[dict] = field(default_factory=list)     # {"guest", "host", "reason"}
    total_time_seconds: float = 0.0
    reports: list[dict] = field(default_factory=list)    # every migration's full report

    @property
    def host(self) -> str:
        """The evacuated hosts, as one label."""
        return ", ".join(self.hosts)

    @property
    def ok(self) -> bool:
        """Every guest moved, and every move completed and verified (unless not checked)."""
        return not self.stayed and all(
            m.status == Outcome.COMPLETED and m.verified is not False for m in self.moves)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        lines = [f"evacuation of {self.host}: {len(self.moves)} guests, {self.concurrency} at "
                 f"a time, {self.total_time_seconds:.2f} s  [{'ok' if self.ok else 'INCOMPLETE'}]",
                 "  GUEST            MEMORY      FROM       TO         STATUS     VERIFIED  "
                 "DOWNTIME   THROUGHPUT"]
        for m in self.moves:
            down = "-" if m.downtime_seconds is None else f"{m.downtime_seconds * 1000:.1f} ms"
            rate = ("-" if not m.throughput_bytes_per_second
                    else f"{format_bytes(m.throughput_bytes_per_second)}/s")
            lines.append(f"  {m.guest:<16} {format_bytes(m.memory_bytes):>9}   {m.source:<10} "
                         f"{m.destination:<10} {m.status:<10} {str(m.verified):<9} "
                         f"{down:>9}  {rate}" + (f"  {m.error}" if m.error else ""))
        for s in self.stayed:
            lines.append(f"  {s['guest']:<16} stays: {s['reason']}")
        return "\n".join(lines)


def plan_evacuation(tb, host: str | list[str]) -> tuple[list[Move], list[dict]]:
    """Which guest goes where (by free memory), and which stay and why. Moves nothing.
    `host`: one host, or a list of hosts evacuated together (none is a destination)."""
    hosts = [host] if isinstance(host, str) else list(host)
    if not hosts or len(set(hosts)) != len(hosts):
        raise ConfigError(f"name each host to evacuate once, got {hosts!r}")
    for h in hosts:
        tb.host(h)                           # NoSuchHostError names the hosts there are
    others = [n for n in tb.hosts if n not in hosts]
    if not others:
        which = "is the only host" if len(hosts) == 1 else "are all the hosts"
        raise ConfigError(f"{', '.join(hosts)} {which}: there is nowhere to evacuate to")
    free: dict[str, int] = {}
    page_size: dict[str, int] = {}
    for n in others:
        d = tb.host(n).call("describe")
        free[n] = d["frames"]["free"]
        page_size[n] = d["page_size"]
    moves: list[Move] = []
    movable, stayed = movable_guests(tb, hosts)
    for h, g in movable:
        best = max(others, key=lambda n: (free[n] * page_size[n], n))
        pages = g["memory_bytes"] // page_size[best]
        if pages > free[best]:
            stayed.append({"guest": g["name"], "host": h, "reason": (
                f"no host has room: it needs {format_bytes(g['memory_bytes'])}, the most "
                f"free is {format_bytes(free[best] * page_size[best])} on {best}")})
            continue
        free[best] -= pages
        moves.append(Move(g["name"], best, g["memory_bytes"], source=h))
    return moves, stayed


def movable_guests(tb, hosts: list[str]) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The guests on `hosts` (host, guest) that can move, largest first (the hardest to
    place), and those that cannot, each with its reason: what an evacuation and a drain
    place."""
    movable, stayed = [], []
    guests = [(h, g) for h in hosts for g in tb.host(h).call("list_guests") if not g["dom0"]]
    for h, g in sorted(guests, key=lambda hg: (-hg[1]["memory_bytes"], hg[1]["name"])):
        try:
            tb.host(h).call("check_migratable", g["name"])
        except MigbedError as exc:
            stayed.append({"guest": g["name"], "host": h, "reason": str(exc)})
            continue
        movable.append((h, g))
    return movable, stayed


def evacuate(tb, host: str | list[str], concurrency: int | None = 2,
             settings: MigrationSettings | None = None,
             limits: Limits | None = None,
             on_event: Callable[[str, Move], None] | None = None) -> EvacuationReport:
    """Move every guest off `host` (one, or a list evacuated together), `concurrency`
    migrations at a time in all (`limits.max_parallel`; the two are one setting); see the
    module docstring."""
    limits = group_limits(concurrency, limits)
    settings = replace(settings or MigrationSettings(), link_shared=True)
    hosts = [host] if isinstance(host, str) else list(host)
    moves, stayed = plan_evacuation(tb, hosts)
    report = EvacuationReport(hosts, limits.max_parallel or len(moves), moves, stayed)
    t0 = time.monotonic()
    run_moves(tb, moves, limits, settings, report.reports, on_event)
    report.total_time_seconds = time.monotonic() - t0
    return report


def group_limits(concurrency: int | None, limits: Limits | None) -> Limits:
    """A run's own limits: `limits`, its `max_parallel` given by `concurrency` (the
    evacuation's older name for it) when it sets none."""
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(
            concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY):
        raise ConfigError(f"concurrency must be 1..{MAX_CONCURRENCY}, got {concurrency!r}")
    limits = limits or Limits()
    if limits.max_parallel is None and concurrency is not None:
        limits = replace(limits, max_parallel=concurrency)
    return limits


def run_moves(tb, moves: list[Move], limits: Limits, settings: MigrationSettings,
              reports: list[dict],
              on_event: Callable[[str, Move], None] | None = None) -> None:
    """Every move through the cluster's scheduler, as one group under `limits`: all are
    queued at once, each waits its turn on a thread of its own. `on_event(what, move)`:
    "started" and "ended" as they happen. Ctrl-C cancels the moves not started yet, lets
    those running end, then re-raises."""
    from cluster.schedclient import QueuedMigrationCancelled, run_submitted, submit
    sched = tb.scheduler
    group = sched.call("open_group", limits)
    for m in moves:
        try:
            m.migration_id = submit(sched, tb.host(m.source), tb.host(m.destination),
                                    m.guest, settings, group)
        except MigbedError as exc:
            m.status, m.error, m.guest_host = "refused", str(exc), m.source

    def one(move: Move) -> None:
        if move.migration_id is None:
            return
        try:
            src, dst = tb.host(move.source), tb.host(move.destination)
            if on_event is not None:
                on_event("queued", move)
            r = run_submitted(sched, move.migration_id, src, dst, move.guest, settings,
                              on_start=None if on_event is None
                              else lambda _entry: on_event("started", move))
        except QueuedMigrationCancelled as exc:
            move.status, move.error, move.guest_host = "cancelled", str(exc), move.source
        except MigbedError as exc:     # refused before anything moved: the guest stays
            move.status, move.error, move.guest_host = "refused", str(exc), move.source
        else:
            move.record(r)
            reports.append(r.to_dict())
        if on_event is not None:
            on_event("ended", move)

    workers = max(1, min(len(moves), MAX_WAITING))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="evacuate") as pool:
        try:
            concurrent.futures.wait([pool.submit(one, m) for m in moves])
        except KeyboardInterrupt:
            sched.call("cancel_group", group)
            _wait_idle(sched, group)          # the running ones end; the rest never start
            raise


def _wait_idle(sched, group: str) -> None:
    """Until none of `group` is queued or running, as the scheduler (not the thread pool,
    which a Ctrl-C may have caught starting a thread) knows."""
    while any(e["state"] in ("queued", "running") for e in sched.call("entries", group)):
        time.sleep(0.05)

