"""What `migbed top` shows, as `xl top` and `virt-top` show hosts live: a frame made of two
snapshots of every host (`nodes.host.overview.snapshot`), because rates need two samples.

A frame holds the hosts (frames used and free, guests, migrations in and out), the guests
(mode, workload, page writes per second), the running migrations (phase, round, the bytes
still to send, throughput against the link, dirty rate, expected downtime; QEMU's
`cpu_throttle_percentage` and `postcopy_requests` once a migration's progress carries them),
and the last migrations that ended, their two sides (each host keeps its own summaries)
paired by migration id. The drawing is `cluster.console.top_renderables`.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodes.errors import ClusterError
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.testbed import Testbed

SNAPSHOT_TIMEOUT_SECONDS = 10.0
ONCE_GAP_SECONDS = 1.0          # `--once`: the two samples a second apart
RECENT_SHOWN = 10
# Progress fields of a running migration shown when an engine carries them (QEMU's names).
OPTIONAL_PROGRESS = (("cpu_throttle_percentage", "THROTTLE"),
                     ("postcopy_requests", "PC FAULTS"))

Snapshots = dict[str, dict | None]      # host -> its snapshot (None: it did not answer)


def take_snapshots(tb: "Testbed", timeout: float = SNAPSHOT_TIMEOUT_SECONDS) -> Snapshots:
    """Every host's snapshot, asked of all at once. No host answering is a ClusterError."""
    pending = {}
    for name, h in tb.hosts.items():
        try:
            pending[name] = h.call_async("snapshot")
        except Exception:  # noqa: BLE001 - a dead host is shown as such, not raised
            pending[name] = None
    out: Snapshots = {}
    for name, p in pending.items():
        try:
            out[name] = p.result(timeout) if p is not None else None
        except Exception:  # noqa: BLE001 - any Ray or host error: it did not answer
            out[name] = None
    if tb.hosts and not any(out.values()):
        raise ClusterError("no host of the migbed cluster answers; `migbed down` cleans up, "
                           "then `migbed up`")
    return out


@dataclass
class TopFrame:
    """One screen of `migbed top`: rows of dicts, rates over `interval_seconds`."""

    wall: float
    interval_seconds: float | None
    hosts: list[dict] = field(default_factory=list)
    guests: list[dict] = field(default_factory=list)
    running: list[dict] = field(default_factory=list)
    recent: list[dict] = field(default_factory=list)

    @property
    def optional_columns(self) -> list[tuple[str, str]]:
        """(progress field, heading) of the optional columns some running migration has."""
        return [(k, head) for k, head in OPTIONAL_PROGRESS
                if any(m.get(k) is not None for m in self.running)]


def build_frame(before: Snapshots | None, after: Snapshots) -> TopFrame:
    """The frame of `after`, with rates against `before` (None: no rates yet)."""
    up = {n: s for n, s in after.items() if s}
    walls = [s["wall"] for s in up.values()]
    frame = TopFrame(wall=max(walls) if walls else time.time(), interval_seconds=None)
    prior = {n: s for n, s in (before or {}).items() if s}
    if prior and up:
        frame.interval_seconds = frame.wall - max(s["wall"] for s in prior.values())
    frame.hosts = [_host_row(name, snap) for name, snap in after.items()]
    frame.guests = _guest_rows(prior, up)
    frame.running = _running_rows(prior, up)
    frame.recent = _recent_rows(up)
    return frame


def sample_frame(tb: "Testbed", gap_seconds: float = ONCE_GAP_SECONDS) -> TopFrame:
    """`--once`: two snapshots `gap_seconds` apart, one frame."""
    before = take_snapshots(tb)
    time.sleep(gap_seconds)
    return build_frame(before, take_snapshots(tb))


# -- rows -----------------------------------------------------------------------------------------
def _host_row(name: str, snap: dict | None) -> dict:
    if not snap:
        return {"name": name, "up": False}
    f = snap["frames"]
    return {"name": name, "up": True, "profile": snap["profile"], "frames_total": f["total"],
            "frames_used": f["used"], "frames_free": f["free"],
            "guests": len(snap["guests"]),
            "migrations_out": len(snap["outgoing"]),
            "migrations_in": len(snap["incoming"])}


def _guest_rows(prior: dict, up: dict) -> list[dict]:
    """Every guest, with its page writes per second since the last snapshot (a guest that
    moved in between is followed by name: its write counter travels with it)."""
    here = {(h, g["name"]): (g, s["wall"]) for h, s in prior.items() for g in s["guests"]}
    moved = {g["name"]: (g, s["wall"]) for s in prior.values() for g in s["guests"]
             if g["pages_written_total"] is not None}
    rows = []
    for host, snap in sorted(up.items()):
        for g in snap["guests"]:
            rate = None
            old = here.get((host, g["name"])) or moved.get(g["name"])
            if old and old[0]["pages_written_total"] is not None \
                    and g["pages_written_total"] is not None:
                dt = snap["wall"] - old[1]
                if dt > 0:
                    rate = max(0.0, (g["pages_written_total"] - old[0]["pages_written_total"])
                               / dt)
            rows.append({**g, "host": host, "writes_per_second": rate,
                         "app_ops_per_second": _ops_rate(old, g, snap["wall"])})
    return rows


def _ops_rate(old: tuple | None, g: dict, wall: float) -> float | None:
    """A program guest's operations per second since the last snapshot (None: no program,
    or no earlier snapshot of it)."""
    if not old or old[0].get("app_ops_total") is None or g.get("app_ops_total") is None:
        return None
    dt = wall - old[1]
    return max(0.0, (g["app_ops_total"] - old[0]["app_ops_total"]) / dt) if dt > 0 else None


def _running_rows(prior: dict, up: dict) -> list[dict]:
    """Each running migration, on its source, with its destination from the destination's
    incoming list and its throughput over the last interval."""
    destination = {m["migration_id"]: host for host, s in up.items() for m in s["incoming"]}
    before = {m["migration_id"]: (m, s["wall"]) for s in prior.values() for m in s["outgoing"]}
    rows = []
    for host, snap in sorted(up.items()):
        for m in snap["outgoing"]:
            row = {**m, "source": host, "destination": destination.get(m["migration_id"]),
                   "elapsed_seconds": max(0.0, snap["wall"] - m["started_wall"])}
            old = before.get(m["migration_id"])
            if old is not None and snap["wall"] > old[1]:
                row["throughput_bytes_per_second"] = max(0.0, (
                    m["bytes_sent_total"] - old[0]["bytes_sent_total"]) / (snap["wall"] - old[1]))
            rows.append(row)
    return rows


def _recent_rows(up: dict) -> list[dict]:
    """The migrations that ended, newest first: both sides' summaries paired by id."""
    pairs: dict[str, dict] = {}
    for snap in up.values():
        for e in snap["recent"]:
            pairs.setdefault(e["migration_id"], {})[e["side"]] = e
    rows = []
    for mid, sides in pairs.items():
        src, dst = sides.get("source"), sides.get("destination")
        first = src or dst
        status = src["status"] if src else dst["status"]
        if src and dst and status == Outcome.COMPLETED and dst["status"] != Outcome.COMPLETED:
            status = Outcome.FAILED          # as the report says: the destination failed
        rows.append({
            "migration_id": mid, "guest": first["guest"],
            "source": src["host"] if src else None,
            "destination": dst["host"] if dst else None, "status": status,
            "error": (src or {}).get("error") or (dst or {}).get("error"),
            "policy": (src or {}).get("policy"),
            "ended_wall": max(e["ended_wall"] for e in sides.values()),
            "total_time_seconds": (src or {}).get("total_time_seconds"),
            "downtime_seconds": (src or {}).get("downtime_seconds"),
            "guest_observed_downtime_seconds": (dst or {}).get(
                "guest_observed_downtime_seconds"),
            "live_rounds": (src or {}).get("live_rounds"),
            "verified": (src or {}).get("verified")})
    rows.sort(key=lambda r: r["ended_wall"], reverse=True)
    return rows[:RECENT_SHOWN]
