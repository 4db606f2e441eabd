"""The cluster's migration scheduler: one queue of migrations, admitted under limits, and
the central allocator of their rates.

Every migration of a cluster goes through it (`cluster.schedclient.scheduled`): it is
submitted (queued), waits its turn, runs, and is finished. A migration starts once the
cluster's limits and its group's (a drain's, an evacuation's) all allow it: `max_parallel`
in all, `max_outbound_per_host` leaving one host, `max_inbound_per_host` arriving at one, as
KubeVirt's `parallelMigrationsPerCluster` and `parallelOutboundMigrationsPerNode` (its
defaults are the `kubevirt` preset). The queue is first come first served, but a migration
whose hosts are busy does not hold up one behind it whose hosts are free (no head-of-line
blocking, as KubeVirt's controller requeues). Whenever one starts or ends the rates of all
running ones are set again, max-min fair over the links they cross (`cluster.fairshare`),
and each sender is told its own (`push`). A queued migration can be cancelled: it never
starts, its guest stays where it is.

It is a plain thread-safe object; in a persistent cluster it runs as a named Ray actor (one
per cluster, `cluster.schedclient`), in a local or in-process testbed in the control plane's
own process.
"""

import collections
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cluster.fairshare import UNLIMITED, Topology, max_min_rates
from nodes.errors import ConfigError, MigrationError

MAX_LIMIT = 1024
QUEUED, RUNNING, CANCELLED = "queued", "running", "cancelled"
KEEP_ENDED = 4096       # ended entries kept for `migbed queue` and late reports


@dataclass(frozen=True)
class Limits:
    """How many migrations may run at once (None: no limit), and each one's own rate cap."""

    max_parallel: int | None = None
    max_outbound_per_host: int | None = None
    max_inbound_per_host: int | None = None
    rate_limit_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_parallel", "max_outbound_per_host", "max_inbound_per_host"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not 1 <= v <= MAX_LIMIT):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a whole number 1..{MAX_LIMIT}, got {v!r}")
        r = self.rate_limit_bytes_per_second
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not r > 0):
            raise ConfigError(f"--rate-limit must be a positive rate, got {r!r}")

    def merged(self, other: "Limits") -> "Limits":
        """These limits with each one `other` sets taking its place."""
        return replace(self, **{k: v for k, v in vars(other).items() if v is not None})

    def to_dict(self) -> dict:
        return dict(vars(self))


PRESETS = {"kubevirt": Limits(max_parallel=5, max_outbound_per_host=2),
           "none": Limits()}


def preset(name: str) -> Limits:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"no limits preset {name!r}; presets: {', '.join(PRESETS)}") from None


@dataclass
class Entry:
    """One migration in the queue, and what became of it (times are wall-clock seconds)."""

    id: str
    guest: str
    source: str
    destination: str
    group: str | None
    cap: float                      # its own cap: --bandwidth, --rate-limit (inf: none)
    link_cap: float                 # --bandwidth alone: what its sender paces at unasked
    links: list[str]
    state: str = QUEUED
    queued_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    rates: list = field(default_factory=list)     # [wall time, bytes/s (None: unlimited)]
    pushed: float | None = None                   # the rate its sender was last told

    def to_dict(self, topology: Topology | None = None, now: float | None = None) -> dict:
        d = {k: getattr(self, k) for k in ("id", "guest", "source", "destination", "group",
                                           "state", "queued_at", "started_at", "ended_at",
                                           "links")}
        d["rates"] = [[t, None if r == UNLIMITED else r] for t, r in self.rates]
        now = time.time() if now is None else now
        d["wait_seconds"] = (self.started_at or self.ended_at or now) - self.queued_at
        d["run_seconds"] = (None if self.started_at is None
                            else (self.ended_at or now) - self.started_at)
        if topology is not None:
            d["link_share"] = self.link_share(topology, now)
        return d

    def link_share(self, topology: Topology, now: float | None = None) -> dict:
        """Per link crossed: the time-weighted mean of the rate it was given over the
        link's capacity (None for an unlimited link)."""
        mean = self.mean_rate(now)
        out = {}
        for ln in self.links:
            cap = topology.capacity(ln)
            out[ln] = None if cap == UNLIMITED or mean is None else mean / cap
        return out

    def mean_rate(self, now: float | None = None) -> float | None:
        if not self.rates or self.started_at is None:
            return None
        end = self.ended_at or (time.time() if now is None else now)
        pts = self.rates + [[end, self.rates[-1][1]]]
        span = end - pts[0][0]
        if span <= 0 or any(r == UNLIMITED for _, r in self.rates):
            return None if self.rates[-1][1] == UNLIMITED else self.rates[-1][1]
        return sum((b[0] - a[0]) * a[1] for a, b in itertools.pairwise(pts)) / span


def schedule_lines(schedule: dict | None) -> list[str]:
    """A report's lines of its queue entry: the wait, the links crossed, the share of each."""
    if not schedule:
        return []
    shares = ", ".join(f"{ln} {v * 100:.0f}%" for ln, v in
                       (schedule.get("link_share") or {}).items() if v is not None)
    return [f"  queue: waited {schedule.get('wait_seconds') or 0:.2f} s as "
            f"{schedule.get('id')}; crossed {', '.join(schedule.get('links') or [])}"
            + (f"; share of capacity: {shares}" if shares else "")]


Push = Callable[[str, str, float | None], None]      # (source host, migration id, rate)


class MigrationScheduler:
    def __init__(self, topology: Topology | None = None, limits: Limits | None = None,
                 push: Push | None = None, clock: Callable[[], float] = time.time,
                 keep_ended: int | None = KEEP_ENDED):
        """`clock`: the wall clock, or a simulation's (`cluster.fleetsim`); `keep_ended`:
        how many ended entries to keep (None: all, as a simulation reads them back)."""
        self.topology = topology or Topology()
        self.limits = limits or Limits()
        self.push = push
        self.clock = clock
        self._keep = keep_ended
        self._groups: dict[str, Limits] = {}
        self._entries: dict[str, Entry] = {}
        self._queue: dict[str, None] = {}          # ids in order (a dict: O(1) removal)
        self._running: set[str] = set()
        self._ended: collections.deque = collections.deque()
        self._moving: dict[str, str] = {}          # guest -> its queued or running entry
        self._cond = threading.Condition()

    # -- configuration ----------------------------------------------------------------------
    def set_limits(self, limits: Limits) -> dict:
        with self._cond:
            self.limits = limits
            pushes = self._admit()
        self._send(pushes)
        return limits.to_dict()

    def set_topology(self, topology: Topology) -> None:
        with self._cond:
            self.topology = topology

    def forget_host(self, name: str) -> None:
        """`name` was restarted: a handle on its old self is stale (see RemoteScheduler)."""

    def open_group(self, limits: Limits | None = None, name: str | None = None) -> str:
        """A group of migrations with limits of its own on top of the cluster's (a drain)."""
        gid = name or f"g-{uuid.uuid4().hex[:8]}"
        with self._cond:
            self._groups[gid] = limits or Limits()
        return gid

    # -- a migration's life -----------------------------------------------------------------
    def submit(self, guest: str, source: str, destination: str, group: str | None = None,
               bandwidth: float | None = None, rate_limit: float | None = None,
               migration_id: str | None = None) -> str:
        """Queue a migration; returns its id. A guest queued or moving already is refused."""
        if source == destination:
            raise MigrationError(f"{guest} is already on {source}; pick another destination")
        with self._cond:
            if guest in self._moving:
                e = self._entries[self._moving[guest]]
                raise MigrationError(f"{guest} is already {e.state} for migration "
                                     f"({e.id}, {e.source} -> {e.destination})")
            if group is not None and group not in self._groups:
                raise ConfigError(f"no migration group {group!r}")
            caps = [c for c in (bandwidth, rate_limit, self._group_limits(group)
                                .rate_limit_bytes_per_second) if c]
            e = Entry(migration_id or uuid.uuid4().hex[:12], guest, source, destination,
                      group, float(min(caps)) if caps else UNLIMITED,
                      float(bandwidth) if bandwidth else UNLIMITED,
                      self.topology.links(source, destination), queued_at=self.clock())
            e.pushed = e.link_cap
            self._entries[e.id] = e
            self._queue[e.id] = None
            self._moving[guest] = e.id
            pushes = self._admit()
        self._send(pushes)
        return e.id

    def wait_turn(self, mid: str, timeout: float = 1.0) -> dict:
        """The entry once it has left the queue (started or cancelled), or as it is after
        `timeout` seconds (still queued: ask again)."""
        with self._cond:
            e = self._entry(mid)
            self._cond.wait_for(lambda: e.state != QUEUED, timeout)
            return e.to_dict(self.topology, self.clock())

    def finish(self, mid: str, status: str) -> dict:
        """The migration ended (`status`: its outcome); the queue moves on."""
        with self._cond:
            e = self._entry(mid)
            if e.state == RUNNING:
                self._running.discard(mid)
            elif e.state == QUEUED:
                del self._queue[mid]
            e.state, e.ended_at = str(status), self.clock()
            self._ended.append(mid)
            self._moving.pop(e.guest, None)
            pushes = self._admit()
            self._trim()
        self._send(pushes)
        return e.to_dict(self.topology, self.clock())

    def cancel(self, mid: str) -> dict:
        """Cancel a queued migration (it never starts; its guest stays). One already
        running or ended is left as it is: the answer's `state` says which."""
        with self._cond:
            e = self._entry(mid)
            if e.state == QUEUED:
                del self._queue[mid]
                e.state, e.ended_at = CANCELLED, self.clock()
                self._ended.append(mid)
                self._moving.pop(e.guest, None)
                self._cond.notify_all()
            return e.to_dict(self.topology, self.clock())

    def cancel_group(self, group: str) -> list[str]:
        """Cancel every queued migration of `group` (Ctrl-C of a drain); returns their ids."""
        with self._cond:
            ids = [m for m in self._queue if self._entries[m].group == group]
        return [m for m in ids if self.cancel(m)["state"] == CANCELLED]

    def entry(self, mid: str) -> dict:
        with self._cond:
            return self._entry(mid).to_dict(self.topology, self.clock())

    def entries(self, group: str | None = None) -> list[dict]:
        with self._cond:
            now = self.clock()
            return [e.to_dict(self.topology, now) for e in self._entries.values()
                    if group is None or e.group == group]

    def entries_running(self) -> list[Entry]:
        """The running entries themselves, by id (a simulation in this process reads the
        rates they were given)."""
        with self._cond:
            return sorted((self._entries[m] for m in self._running), key=lambda e: e.id)

    def status(self) -> dict:
        with self._cond:
            return {"limits": self.limits.to_dict(), "topology": self.topology.to_dict(),
                    "queued": len(self._queue), "running": len(self._running),
                    "entries": [e.to_dict(self.topology, self.clock())
                                for e in self._entries.values()
                                if e.state in (QUEUED, RUNNING)]}

    # -- admission and rates (under the lock) -----------------------------------------------
    def _entry(self, mid: str) -> Entry:
        try:
            return self._entries[mid]
        except KeyError:
            raise MigrationError(f"no migration {mid!r} in the scheduler's queue "
                                 "(`migbed queue` lists them)") from None

    def _group_limits(self, group: str | None) -> Limits:
        return self._groups.get(group, Limits()) if group else Limits()

    def _fits(self, e: Entry) -> bool:
        running = [self._entries[m] for m in self._running]
        scopes = [(self.limits, running)]
        if e.group:
            scopes.append((self._group_limits(e.group),
                           [r for r in running if r.group == e.group]))
        for lim, rs in scopes:
            if lim.max_parallel is not None and len(rs) >= lim.max_parallel:
                return False
            if lim.max_outbound_per_host is not None and sum(
                    r.source == e.source for r in rs) >= lim.max_outbound_per_host:
                return False
            if lim.max_inbound_per_host is not None and sum(
                    r.destination == e.destination for r in rs) >= lim.max_inbound_per_host:
                return False
        return True

    def _full(self) -> bool:
        """The cluster-wide limit is reached: nothing queued can start (no scan needed)."""
        return self.limits.max_parallel is not None and \
            len(self._running) >= self.limits.max_parallel

    def _admit(self) -> list[tuple[str, str, float | None]]:
        started = []
        for mid in self._queue:
            if self._full():
                break
            e = self._entries[mid]
            if self._fits(e):
                self._running.add(mid)
                e.state, e.started_at = RUNNING, self.clock()
                started.append(mid)
        for mid in started:
            del self._queue[mid]
        if started:
            self._cond.notify_all()
        return self._reallocate()

    def _reallocate(self) -> list[tuple[str, str, float | None]]:
        """Max-min fair rates for the running migrations; the senders whose rate changed."""
        running = [self._entries[m] for m in self._running]
        rates = max_min_rates({e.id: (e.links, e.cap) for e in running},
                              self.topology.capacity)
        now, pushes = self.clock(), []
        for e in running:
            rate = rates[e.id]
            if not e.rates or e.rates[-1][1] != rate:
                e.rates.append([now, rate])
            # Bound by its own cap: its sender's --bandwidth and --rate-limit do that.
            want = e.link_cap if rate >= e.cap * (1 - 1e-9) else rate
            if want != e.pushed:
                e.pushed = want
                pushes.append((e.source, e.id, None if want == UNLIMITED else want))
        return pushes

    def _send(self, pushes: list[tuple[str, str, float | None]]) -> None:
        if self.push is None:
            return
        for source, mid, rate in pushes:
            try:
                self.push(source, mid, rate)
            except Exception:  # noqa: BLE001 - a dead source: its migration ends anyway
                continue

    def _trim(self) -> None:
        while self._keep is not None and len(self._ended) > self._keep:
            self._entries.pop(self._ended.popleft(), None)
