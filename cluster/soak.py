"""The soak: many consecutive small migrations around a ring of hosts, with busy guests.

Guests start spread over the hosts; migration k moves guest k mod G to the next host of the
ring. Every migration must complete and be verified. Afterwards the frame accounting of
every host must be exact (used frames = the frames its domains own, and, once the soak's
guests are destroyed, every count back where it was), and the resident memory of every host
process is reported: at the start, after a warm-up (the first migrations allocate buffers
that are then reused) and at the end, so its growth shows whether anything accumulates per
migration.
"""

import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from cluster.driver import run_migration
from nodes.errors import ConfigError, MigbedError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome
from nodes.units import format_bytes
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
MAX_ERRORS_KEPT = 20
SCRAPE_SECONDS = 0.5


class ScrapeProbe:
    """Scrapes every host's /metrics every `interval` seconds while a block runs, as
    Prometheus would, and counts the answers: the metrics must keep answering under load."""

    def __init__(self, endpoints: dict[str, str], interval: float = SCRAPE_SECONDS):
        self.endpoints = endpoints
        self.interval = interval
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scrape-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for host, ep in self.endpoints.items():
                try:
                    with urllib.request.urlopen(f"http://{ep}/metrics", timeout=5) as resp:
                        good = resp.status == 200 and b"migbed_host_frames" in resp.read()
                    if not good:
                        raise ValueError("bad exposition")
                    self.ok += 1
                except Exception as exc:  # noqa: BLE001 - counted; the caller judges
                    if len(self.failures) < MAX_ERRORS_KEPT:
                        self.failures.append(f"{host}: {exc}")
            self._stop.wait(self.interval)

    def __enter__(self) -> "ScrapeProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass(frozen=True)
class SoakOptions:
    migrations: int = 1000
    guests: int = 3
    guest_memory_bytes: int = 4 * MiB
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec("hotset", 5000))
    settings: MigrationSettings = field(default_factory=MigrationSettings)
    # Migrations before the memory baseline: None, a quarter of them. The C allocator of a
    # host process keeps freed receive buffers per thread, so its RSS climbs for the first
    # few hundred migrations (measured: flat from ~500 on, over 3,000) before it levels off.
    warmup_migrations: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("migrations", 1), ("guests", 1), ("warmup_migrations", 0)):
            v = getattr(self, name)
            if v is None and name == "warmup_migrations":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"soak {name} must be a whole number >= {low}, got {v!r}")
        if self.guest_memory_bytes <= 0:
            raise ConfigError(f"soak guest memory must be positive, got "
                              f"{self.guest_memory_bytes}")


@dataclass
class SoakResult:
    migrations: int = 0
    completed: int = 0
    verified: int = 0
    errors: list[str] = field(default_factory=list)
    guests_lost: int = 0
    total_time_seconds: float = 0.0
    downtime_seconds: dict = field(default_factory=dict)      # median, p99, max
    frames_exact: dict = field(default_factory=dict)          # host -> bool, after the soak
    frames_restored: dict = field(default_factory=dict)       # host -> bool, guests destroyed
    rss_bytes: dict = field(default_factory=dict)             # pid -> start/warm/end bytes
    rss_growth_bytes: int = 0          # largest end - after-warm-up over host processes
    rss_growth_from_start_bytes: int = 0
    # The same without the hosts' frame arenas: what would show a per-migration leak.
    other_rss_growth_bytes: int = 0
    metrics_scrapes_ok: int = 0
    metrics_scrape_failures: list[str] = field(default_factory=list)

    warmup_migrations: int = 0

    @property
    def ok(self) -> bool:
        return (self.completed == self.verified == self.migrations and not self.guests_lost
                and all(self.frames_exact.values()) and all(self.frames_restored.values())
                and not self.metrics_scrape_failures)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        d = self.downtime_seconds
        ms = (lambda s: "-" if s is None else f"{s * 1000:.1f} ms")  # noqa: E731
        lines = [
            f"soak: {self.migrations} migrations in {self.total_time_seconds:.1f} s "
            f"({self.migrations / self.total_time_seconds if self.total_time_seconds else 0:.1f}"
            f"/s)  [{'ok' if self.ok else 'FAILED'}]",
            f"  completed {self.completed}, verified {self.verified}, guests lost "
            f"{self.guests_lost}, errors {len(self.errors)}",
            f"  downtime median {ms(d.get('median'))}, p99 {ms(d.get('p99'))}, max "
            f"{ms(d.get('max'))}",
            f"  frames exact on every host: {all(self.frames_exact.values())}; back to the "
            f"start after the guests went: {all(self.frames_restored.values())}",
        ]
        for pid, r in self.rss_bytes.items():
            lines.append(f"  process {pid} ({', '.join(r['hosts'])}): RSS "
                         f"{format_bytes(r['start'])} -> {format_bytes(r['after_warmup'])} "
                         f"(warm) -> {format_bytes(r['end'])}; without the frame arena "
                         f"{format_bytes(r['other_start'])} -> "
                         f"{format_bytes(r['other_after_warmup'])} -> "
                         f"{format_bytes(r['other_end'])}")
        lines.append(f"  RSS growth after the {self.warmup_migrations} warm-up migrations: "
                     f"{format_bytes(self.rss_growth_bytes)} "
                     f"(from the start: {format_bytes(self.rss_growth_from_start_bytes)}); "
                     f"without the frame arenas (frames touched once stay resident): "
                     f"{format_bytes(self.other_rss_growth_bytes)}")
        lines.append(f"  /metrics scrapes during the soak: {self.metrics_scrapes_ok} answered, "
                     f"{len(self.metrics_scrape_failures)} failed")
        lines += [f"  error: {e}" for e in self.errors[:5]]
        return "\n".join(lines)


def _rss(tb) -> dict[int, dict]:
    """pid -> resident bytes of the process, of its hosts' frame arenas, and of the rest."""
    out: dict[int, dict] = {}
    for name, h in tb.hosts.items():
        st = h.call("process_stats")
        entry = out.setdefault(st["pid"], {"rss": st["rss_bytes"], "arena": 0, "hosts": []})
        entry["arena"] += st["arena_rss_bytes"]
        entry["hosts"].append(name)
    for entry in out.values():
        entry["other"] = entry["rss"] - entry["arena"]
    return out


def _frames_exact(tb) -> dict[str, bool]:
    out = {}
    for name, h in tb.hosts.items():
        c = h.call("frame_counts")
        out[name] = (c["used"] == sum(h.call("guest_frames").values())
                     and c["free"] + c["used"] + c["reserved"] == c["total"])
    return out


def run_soak(tb, opts: SoakOptions,
             on_step: Callable[[int, object], None] | None = None) -> SoakResult:
    """Run the soak on testbed `tb` (two hosts at least); see the module docstring."""
    hosts = list(tb.hosts)
    if len(hosts) < 2:
        raise ConfigError("a soak needs at least 2 hosts around its ring")
    res = SoakResult()
    warmup = (opts.migrations // 4 if opts.warmup_migrations is None
              else min(opts.warmup_migrations, opts.migrations))
    res.warmup_migrations = warmup
    before = {n: h.call("frame_counts") for n, h in tb.hosts.items()}
    start_rss = warm_rss = end_rss = _rss(tb)
    downtimes: list[float] = []
    where = _boot_guests(tb, hosts, opts)
    names = list(where)
    try:
        with ScrapeProbe(tb.metrics_endpoints()) as probe:
            t0 = time.monotonic()
            for k in range(opts.migrations):
                if k == warmup:
                    warm_rss = _rss(tb)
                alive = [g for g in names if g in where]
                if not alive:
                    break
                r = _ring_step(tb, hosts, where, alive[k % len(alive)], k, opts, res)
                if r is not None:
                    if r.downtime_seconds is not None and r.status == Outcome.COMPLETED:
                        downtimes.append(r.downtime_seconds)
                    if on_step is not None:
                        on_step(k, r)
            res.total_time_seconds = time.monotonic() - t0
        res.metrics_scrapes_ok, res.metrics_scrape_failures = probe.ok, probe.failures
        end_rss = _rss(tb)
        res.frames_exact = _frames_exact(tb)
    finally:
        for g, i in where.items():
            try:
                tb.host(hosts[i]).call("destroy_guest", g)
            except MigbedError:
                pass
    res.frames_restored = {n: h.call("frame_counts") == before[n] for n, h in tb.hosts.items()}
    _memory_growth(res, start_rss, warm_rss, end_rss)
    if downtimes:
        ds = sorted(downtimes)
        res.downtime_seconds = {"median": statistics.median(ds),
                                "p99": ds[min(len(ds) - 1, int(0.99 * len(ds)))],
                                "max": ds[-1]}
    return res


def _boot_guests(tb, hosts: list[str], opts: SoakOptions) -> dict[str, int]:
    """The soak's guests, spread around the ring: guest -> index of its host."""
    tag = uuid.uuid4().hex[:6]
    where: dict[str, int] = {}
    for i in range(opts.guests):
        g = f"soak-{tag}-{i}"
        wl = replace(opts.workload, seed=opts.workload.seed + i)
        tb.host(hosts[i % len(hosts)]).call(
            "create_guest", GuestSpec(g, opts.guest_memory_bytes, workload=wl))
        where[g] = i % len(hosts)
    return where


def _ring_step(tb, hosts: list[str], where: dict[str, int], g: str, k: int,
               opts: SoakOptions, res: SoakResult):
    """Migration `k`: guest `g` one host on around the ring, checked and counted; the
    report, or None if the migration was refused before anything moved."""
    src, dst = hosts[where[g]], hosts[(where[g] + 1) % len(hosts)]
    res.migrations += 1
    try:
        r = run_migration(tb.host(src), tb.host(dst), g, opts.settings)
    except MigbedError as exc:
        _keep(res, f"#{k} {g} {src}->{dst}: refused: {exc}")
        return None
    if r.status == Outcome.COMPLETED:
        res.completed += 1
        if r.integrity.verified:
            res.verified += 1
    if r.status != Outcome.COMPLETED or not r.integrity.verified:
        _keep(res, f"#{k} {g} {src}->{dst}: {r.status} ({r.error}), verified "
                   f"{r.integrity.verified}")
    if r.guest_lost or r.guest_host is None:
        res.guests_lost += 1
        del where[g]
    else:
        where[g] = hosts.index(r.guest_host)
    return r


def _memory_growth(res: SoakResult, start: dict, warm: dict, end: dict) -> None:
    """Each host process's resident memory at the start, after the warm-up and at the end;
    the growth after the warm-up is the figure the soak checks."""
    for pid, s in start.items():
        w = warm.get(pid, s)
        e = end.get(pid, w)
        res.rss_bytes[pid] = {"hosts": s["hosts"], "start": s["rss"],
                              "after_warmup": w["rss"], "end": e["rss"],
                              "other_start": s["other"], "other_after_warmup": w["other"],
                              "other_end": e["other"]}
    if res.rss_bytes:
        rs = res.rss_bytes.values()
        res.rss_growth_bytes = max(r["end"] - r["after_warmup"] for r in rs)
        res.rss_growth_from_start_bytes = max(r["end"] - r["start"] for r in rs)
        res.other_rss_growth_bytes = max(r["other_end"] - r["other_after_warmup"] for r in rs)


def _keep(res: SoakResult, error: str) -> None:
    if len(res.errors) < MAX_ERRORS_KEPT:
        res.errors.append(error)
