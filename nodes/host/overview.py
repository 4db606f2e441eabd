"""What a live view (`migbed top`, run in a process of its own) reads of a host, in one call:
its frames, its guests and their write counters, the migrations running through it both ways,
and the summaries of its recent migrations (`RecentMigrations`).

A host keeps the summary of each migration it took part in, as source or as destination, in
a bounded list, so a `top` started after a migration ended still shows how it went. Each side
says only what it saw; the view pairs the two by migration id.
"""

import collections
import threading
import time
from typing import TYPE_CHECKING, Protocol

from nodes.host.hostview import HostView
from nodes.host.metrics import HostMetrics
from nodes.phase import Outcome

if TYPE_CHECKING:
    from nodes.migration.receive.receiver import Receiver
    from nodes.migration.results import DestinationResult, SourceResult
    from nodes.migration.settings import MigrationSettings

KEEP_RECENT_MIGRATIONS = 32     # summaries per host and side: a soak must not grow the host


class RecentMigrations:
    """The summaries of this host's last migrations, as source and as destination."""

    def __init__(self, keep: int = KEEP_RECENT_MIGRATIONS):
        self._entries: collections.deque = collections.deque(maxlen=2 * keep)
        self._keep = keep
        self._lock = threading.Lock()

    def source_ended(self, host: str, migration_id: str, guest: str,
                     settings: "MigrationSettings", result: "SourceResult") -> None:
        downtime = (result.resume_wall - result.pause_wall
                    if result.pause_wall and result.resume_wall else None)
        verified = (result.source_digest == result.destination_digest
                    if result.source_digest and result.destination_digest else None)
        self._add({"migration_id": migration_id, "side": "source", "host": host,
                   "guest": guest, "status": result.status, "error": result.error,
                   "policy": settings.policy, "ended_wall": time.time(),
                   "total_time_seconds": result.total_time_seconds,
                   "downtime_seconds": downtime, "live_rounds": sum(
                       1 for r in result.rounds if not r.final),
                   "bytes_sent_total": result.bytes_sent_total, "verified": verified})

    def destination_ended(self, host: str, migration_id: str, receiver: "Receiver",
                          result: "DestinationResult | None") -> None:
        self._add({"migration_id": migration_id, "side": "destination", "host": host,
                   "guest": receiver.name, "ended_wall": time.time(),
                   "status": result.status if result is not None else receiver.status,
                   "error": result.error if result is not None else None,
                   "guest_observed_downtime_seconds": (
                       result.guest_observed_downtime_seconds if result is not None else None),
                   "bytes_received": receiver.bytes_received})

    def handover_resolved(self, guest: str, resumed_there: bool) -> None:
        """The control plane settled a hand-over whose RESULT never came: the guest's last
        migration from here completed after all if the destination had resumed it."""
        with self._lock:
            for e in reversed(self._entries):
                if e["side"] == "source" and e["guest"] == guest:
                    if resumed_there:
                        e.update(status=Outcome.COMPLETED, error=None)
                    e["note"] = ("hand-over unanswered: the destination had resumed the guest"
                                 if resumed_there else "hand-over unanswered: the guest "
                                 "resumed here")
                    return

    def _add(self, entry: dict) -> None:
        with self._lock:
            self._entries.append(entry)
            for side in ("source", "destination"):
                mine = [e for e in self._entries if e["side"] == side]
                for old in mine[:max(0, len(mine) - self._keep)]:
                    self._entries.remove(old)

    def list(self) -> list[dict]:
        """Oldest first."""
        with self._lock:
            return [dict(e) for e in self._entries]


class TopHost(HostView, Protocol):
    """What the snapshot reads of a host beyond its `HostView`: its recent migrations and
    its metrics' running ones (`nodes.host.service.HostService` satisfies it)."""

    recent: RecentMigrations
    metrics: HostMetrics


def snapshot(host: TopHost) -> dict:
    """Everything `migbed top` shows of this host, read at one moment (no guest memory is
    walked and no guest's lock is taken: counters the host keeps anyway)."""
    hv = host.hv
    guests = []
    for dom in list(hv.domains.values()):
        if dom.is_dom0 or "--" in dom.name:     # the toolstack, a hand-over's paused copy
            continue
        spec = host.workloads.get(dom.name)
        vcpu = host.vcpus.get(dom.name)
        guests.append({"name": dom.name, "mode": dom.mode.value, "state": dom.state.value,
                       "memory_bytes": dom.memory_bytes, "migrating": dom.migrating,
                       "workload": spec.pattern if spec else None,
                       "pages_written_total": vcpu.pages_written_total if vcpu else None,
                       # a program guest's completed operations (`workloads.program`)
                       "app_ops_total": (vcpu.progress_pages if vcpu and spec
                                         and spec.is_program else None)})
    return {"name": host.name, "wall": time.time(), "monotonic": time.monotonic(),
            "profile": hv.profile.name, "frames": hv.allocator.counts(),
            "guests": guests, "outgoing": _outgoing(host), "incoming": _incoming(host),
            "recent": host.recent.list()}


def _outgoing(host: TopHost) -> list[dict]:
    m = host.metrics
    with m.lock:
        running = list(m.outgoing.items())
    out = []
    for mid, o in running:
        p = o.progress
        dom = _domain(host, o.guest)
        d = {k: v for k, v in p.to_dict().items() if k != "rounds"}
        d.update(migration_id=mid, policy=o.settings.policy,
                 link_bytes_per_second=o.settings.link_bytes_per_second,
                 rate_limit_bytes_per_second=o.settings.rate_limit_bytes_per_second,
                 guest_memory_bytes=dom.memory_bytes if dom is not None else None,
                 live_rounds_done=sum(1 for r in p.rounds if not r.get("final")))
        out.append(d)
    return out


def _domain(host: HostView, name: str):
    """The migrating guest's domain, under its name or, during the hand-over, its copy's."""
    for dom in list(host.hv.domains.values()):
        if dom.name in (name, name + "--migratedaway"):
            return dom
    return None


def _incoming(host: HostView) -> list[dict]:
    out = []
    for mid, recv in list(host.incoming.items()):
        if recv.done.is_set():
            continue
        out.append({"migration_id": mid, "guest": recv.name, "status": recv.status,
                    "pages_received": recv.landing.pages_received,
                    "bytes_received": recv.bytes_received})
    return out
