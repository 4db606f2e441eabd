"""Planning past one machine: a drain simulated with the same scheduler, each migration's
duration, downtime and bytes from the analytic model (`cluster.model.predict`) instead of a
real run, so a drain of 1,000 hosts and 20,000 guests can be planned in seconds.

The fleet is `hosts` hosts in `racks` racks (`cluster.fairshare.Topology`), each with
`guests_per_host` guests; each guest's memory is the given size and its dirty rate the given
one scaled by a log-normal factor drawn from `seed` (so guests differ, and the same seed gives
the same plan); or the guests of a `create --from` file, each as its table says. The drained hosts' guests go, as `migbed drain` sends them, to the least
loaded other host (the racks round robin with `spread`). The run is event driven on a virtual
clock: the scheduler (`cluster.scheduler`, under the same limits) admits migrations and gives
each its max-min fair rate as it starts; the model predicts it at that rate; when its rate
changes (others start or end) what is left of it is stretched or shrunk by the ratio of the
rates (its downtime and bytes stay as predicted at the start: an approximation); its end is
an event, at which the queue moves on.
"""

import heapq
import math
import random
from dataclasses import dataclass, field, replace

from cluster.fairshare import UNLIMITED, Topology
from cluster.fleetstats import fleet_stats, summary_lines
from cluster.model import predict
from cluster.scheduler import Limits, MigrationScheduler
from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MAX_SIM_HOSTS = 100_000
MAX_SIM_GUESTS = 1_000_000
RATE_SPREAD = 0.5           # sigma of the log-normal factor on each guest's dirty rate


@dataclass
class SimFleet:
    hosts: int
    racks: int = 1
    guests_per_host: int = 4
    guest_memory_bytes: int = 1 << 30
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(
        "uniform", 5000, fill="random"))
    host_link_bytes_per_second: float | None = 1.25e9
    uplink_bytes_per_second: float | None = None
    seed: int = 0
    rate_spread: float = RATE_SPREAD    # 0: every guest dirties at the rate given
    # The guests, one by one ((host, GuestSpec), from a `create --from` file), in place of
    # `guests_per_host` alike.
    guests: tuple = ()

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= MAX_SIM_HOSTS:
            raise ConfigError(f"--hosts must be 1..{MAX_SIM_HOSTS}, got {self.hosts}")
        if not 0 <= self.guests_per_host or self.hosts * self.guests_per_host > MAX_SIM_GUESTS:
            raise ConfigError(f"--guests-per-host: at most {MAX_SIM_GUESTS} guests in all")
        if self.workload.unlimited:
            raise ConfigError("a simulation needs a dirty rate in page writes per second "
                              "(--dirty-rate N), not max")

    @property
    def names(self) -> list[str]:
        return [f"host-{i}" for i in range(self.hosts)]

    def topology(self) -> Topology:
        return Topology.striped(self.names, self.racks, self.host_link_bytes_per_second,
                                self.uplink_bytes_per_second)


def drained_hosts(fleet: SimFleet, topo: Topology, which: list[str]) -> list[str]:
    """Host names, `rack-K` for every host of rack K."""
    out: list[str] = []
    names = set(fleet.names)
    for w in which:
        if w.startswith("rack-") and w[5:].isdigit():
            hosts = topo.hosts_in(int(w[5:]))
            if not hosts:
                raise ConfigError(f"no rack {w}: racks are rack-0..rack-{fleet.racks - 1}")
            out.extend(hosts)
        elif w in names:
            out.append(w)
        else:
            raise ConfigError(f"no host {w!r} in the simulated fleet (host-0.."
                              f"host-{fleet.hosts - 1}, or rack-K)")
    if len(set(out)) == fleet.hosts:
        raise ConfigError("every host is drained: there is nowhere to go")
    return list(dict.fromkeys(out))


def guests_on(fleet: SimFleet) -> dict[str, list[tuple[str, int, WorkloadSpec, float]]]:
    """host -> its guests as (name, memory, workload, dirty rate): the file's, or
    `guests_per_host` alike, each rate drawn log-normal from the seed."""
    rng = random.Random(fleet.seed)
    out: dict[str, list] = {h: [] for h in fleet.names}
    if fleet.guests:
        for host, spec in fleet.guests:
            rate = spec.workload.rate_pages_per_second
            if spec.workload.unlimited:
                raise ConfigError(f"{spec.name}: a simulation needs a dirty rate in page "
                                  "writes per second, not max")
            out[host].append((spec.name, spec.memory_bytes, spec.workload, rate))
        return out
    sigma = fleet.rate_spread
    for h in fleet.names:
        for g in range(fleet.guests_per_host):
            rate = fleet.workload.rate_pages_per_second * math.exp(
                rng.gauss(0.0, sigma) - sigma ** 2 / 2)
            out[h].append((f"{h}-g{g}", fleet.guest_memory_bytes, fleet.workload, rate))
    return out


def plan(fleet: SimFleet, topo: Topology, drained: list[str],
         spread: bool) -> list[tuple[str, str, str, float, int, WorkloadSpec]]:
    """(guest, source, destination, dirty rate, memory, workload) for every guest of the
    drained hosts, each to the least loaded other host (round the racks with `spread`)."""
    gone = set(drained)
    on = guests_on(fleet)
    heap = [(len(on[h]), topo.rack_of(h) or 0, h) for h in fleet.names if h not in gone]
    heapq.heapify(heap)
    by_rack: dict[int, list] = {}
    if spread:
        for load, rack, h in heap:
            by_rack.setdefault(rack, []).append((load, h))
        for lst in by_rack.values():
            heapq.heapify(lst)
    racks = sorted(by_rack)
    moves = []
    k = 0
    for src in drained:
        for name, memory, workload, rate in on[src]:
            if spread:
                rack = racks[k % len(racks)]
                k += 1
                load, dst = heapq.heappop(by_rack[rack])
                heapq.heappush(by_rack[rack], (load + 1, dst))
            else:
                load, rack, dst = heapq.heappop(heap)
                heapq.heappush(heap, (load + 1, rack, dst))
            moves.append((name, src, dst, rate, memory, workload))
    return moves


@dataclass(frozen=True)
class Calibration:
    """What a real drain adds to the model's migrations: a fixed part of every downtime
    (T_resume: the hand-over's round trips, the resume) and a fixed cost of every migration
    (setup and cleanup, the control plane's calls), both as the real one measured them."""

    resume_seconds: float = 0.0
    overhead_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"resume_seconds": self.resume_seconds,
                "overhead_seconds": self.overhead_seconds}


def calibrate(fleet: "SimFleet", which: list[str], limits: Limits, real_stats: dict,
              settings: MigrationSettings | None = None, spread: bool = False) -> Calibration:
    """The calibration that brings the simulation of this drain to the real one's medians
    (`real_stats`: a real drain's fleet statistics): the downtime's p50 and the total time's
    p50 (what is left of each after the model's own part, never below zero)."""
    sim = simulate_drain(fleet, which, limits, settings, spread)["stats"]
    try:
        down = real_stats["downtime_seconds"]["p50"] - sim["downtime_seconds"]["p50"]
        total = real_stats["total_time_seconds"]["p50"] - sim["total_time_seconds"]["p50"]
    except (KeyError, TypeError):
        raise ConfigError("the real drain to calibrate from has no completed migration "
                          "(its stats lack downtime_seconds / total_time_seconds)") from None
    return Calibration(max(0.0, down), max(0.0, total - max(0.0, down)))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate_drain(fleet: SimFleet, which: list[str], limits: Limits,
                   settings: MigrationSettings | None = None, spread: bool = False,
                   calibration: Calibration | None = None) -> dict:
    """The simulated drain: its moves (each with a schedule entry on the virtual clock) and
    the fleet statistics. Deterministic for the fleet's seed."""
    settings = settings or MigrationSettings()
    cal = calibration or Calibration()
    topo = fleet.topology()
    drained = drained_hosts(fleet, topo, which)
    clock = _Clock()
    sched = MigrationScheduler(topo, limits, clock=clock, keep_ended=None)
    group = sched.open_group(Limits(), name="simulated")
    moves = plan(fleet, topo, drained, spread)
    ids = [sched.submit(g, s, d, group, settings.link_bytes_per_second,
                        settings.rate_limit_bytes_per_second, migration_id=f"sim-{k:07d}")
           for k, (g, s, d, *_) in enumerate(moves)]
    info = {mid: m for mid, m in zip(ids, moves, strict=True)}
    predicted: dict[str, object] = {}
    cache: dict[tuple, object] = {}
    events: list[tuple[float, int, str]] = []
    running: dict[str, list] = {}          # id -> [its end, its rate, version]

    def step() -> None:
        """Newly started migrations predicted at their rate; those whose rate changed
        re-timed: what is left of them goes at the new rate."""
        for e in sched.entries_running():
            rate = e.rates[-1][1] if e.rates else UNLIMITED
            r = running.get(e.id)
            if r is None:
                _, _, _, dirty, memory, workload = info[e.id]
                p = _predict(memory, workload, settings, dirty, rate, cache, cal)
                predicted[e.id] = p
                r = running[e.id] = [clock.now + p.total_time_seconds + cal.overhead_seconds,
                                     rate, 0]
            elif rate != r[1] and UNLIMITED not in (rate, r[1]):
                r[0] = clock.now + max(0.0, r[0] - clock.now) * r[1] / rate
                r[1], r[2] = rate, r[2] + 1
            else:
                continue
            heapq.heappush(events, (r[0], r[2], e.id))

    step()
    while events:
        when, version, mid = heapq.heappop(events)
        if running[mid][2] != version:
            continue                         # re-timed since: a later event stands for it
        clock.now = when
        sched.finish(mid, "completed")
        step()
    out = []
    for mid, (g, s, d, *_) in zip(ids, moves, strict=True):
        p, entry = predicted[mid], sched.entry(mid)
        out.append({"guest": g, "source": s, "destination": d, "status": "completed",
                    "downtime_seconds": p.downtime_seconds,
                    "total_time_seconds": entry["run_seconds"],
                    "bytes_sent": int(p.bytes_sent_total), "schedule": entry})
    stats = fleet_stats(out, clock.now)
    return {"simulated": True, "hosts": drained, "fleet": {
        "hosts": fleet.hosts, "racks": fleet.racks, "guests_per_host": fleet.guests_per_host,
        "guests_from_file": len(fleet.guests) or None,
        "guest_memory_bytes": fleet.guest_memory_bytes, "seed": fleet.seed,
        "host_link_bytes_per_second": fleet.host_link_bytes_per_second,
        "uplink_bytes_per_second": fleet.uplink_bytes_per_second},
        "limits": limits.to_dict(), "calibration": cal.to_dict(), "moves": out,
        "stats": stats}


def _predict(memory: int, workload: WorkloadSpec, settings: MigrationSettings,
             dirty_rate: float, rate: float, cache: dict, cal: Calibration):
    """The model's prediction at `rate` bytes/s (cached by rounded inputs: guests alike
    cost one prediction)."""
    if rate == UNLIMITED:
        raise ConfigError("a simulation needs a bandwidth: give --host-link, --uplink or "
                          "--bandwidth")
    key = (memory, replace(workload, seed=0), round(dirty_rate, -1), round(rate, -4))
    if key not in cache:
        cache[key] = predict(guest_memory_bytes=memory,
                             workload=workload, link_bytes_per_second=key[3],
                             dirty_rate_pages_per_second=key[2],
                             policy=settings.policy,
                             downtime_limit_seconds=settings.downtime_limit_seconds or 0.3,
                             latency_seconds=settings.latency_seconds,
                             resume_seconds=cal.resume_seconds)
    return cache[key]


def summary(result: dict) -> str:
    f = result["fleet"]
    head = (f"simulated drain of {len(result['hosts'])} hosts of {f['hosts']} ({f['racks']} "
            + (f"racks, {f['guests_from_file']} guests from a file" if f.get("guests_from_file")
               else f"racks, {f['guests_per_host']} guests each")
            + f", seed {f['seed']})")
    return "\n".join([head, *summary_lines(result["stats"])])
