"""Driving one migration between two hosts: the control plane, and the report.

The steps, each a call on a host handle (Ray actor calls in the cluster): check the guest on
the source; have the destination reserve frames and issue a ticket (nothing has moved if this
fails); start the source's sender, which streams straight to the destination over TCP;
poll progress; collect both sides; build the report. The data never passes through here.
"""

import uuid
from collections.abc import Callable

from cluster.model.block import model_block
from cluster.report import Integrity, MigrationReport
from cluster.settle import FaultControl
from nodes.errors import MigbedError, MigrationError
from nodes.migration.settings import MigrationSettings

POLL_SECONDS = 0.1
FIRST_POLL_SECONDS = 0.005   # progress polls start fast and back off to POLL_SECONDS


def new_migration_id() -> str:
    return uuid.uuid4().hex[:12]


def run_migration(src, dst, guest: str, settings: MigrationSettings,
                  on_progress: Callable[[dict], None] | None = None,
                  migration_id: str | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> MigrationReport:
    """Migrate `guest` from host handle `src` to `dst`. Raises for errors before anything
    moves (bad guest, no room, incompatible hosts); returns a report for everything after."""
    if src.name == dst.name:
        raise MigrationError(f"{guest} is already on {src.name}; pick another destination")
    mid = migration_id or new_migration_id()
    timeout = settings.timeout_seconds
    info = src.call("guest_info", guest, mid, timeout=timeout)
    ticket = dst.call("prepare_incoming", info, settings.to_dict(), timeout=timeout)
    pending = src.call_async("migrate_out", guest, ticket, settings.to_dict())
    control = FaultControl(src, dst, mid, guest, settings)
    cancelled = False
    poll = FIRST_POLL_SECONDS
    while not pending.done():
        if on_progress is not None or control.armed:
            try:
                p = src.call("migration_progress", mid, timeout=timeout)
            except MigbedError:
                p = None
            if p and on_progress is not None:
                on_progress(p)
            control.poll(p)      # carries out a host kill the sender waits for
        if should_cancel is not None and not cancelled and should_cancel():
            try:
                src.call("cancel_migration", mid, timeout=timeout)
            except MigbedError:
                pass
            cancelled = True
        pending.wait(poll)        # returns the moment the migration ends
        poll = FIRST_POLL_SECONDS if control.armed else min(2 * poll, POLL_SECONDS)
    # Both sides, whatever became of them (a dead host, an unanswered hand-over).
    source, dest = control.settle(pending, info)
    if on_progress is not None and source.get("rounds"):
        # The rounds that ended after the last poll (a short migration can end between two).
        on_progress({"migration_id": mid, "guest": guest, "status": source.get("status"),
                     "rounds": source["rounds"]})
    report = build_report(mid, guest, src.name, dst.name, info, settings, source, dest)
    control.annotate(report, source, dest)
    return report


def build_report(mid: str, guest: str, source_host: str, dest_host: str, info: dict,
                 settings: MigrationSettings, source: dict, dest: dict) -> MigrationReport:
    status = source["status"]
    error = source.get("error")
    if status == "completed" and dest.get("status") not in (None, "completed"):
        status, error = "failed", dest.get("error")
    downtime = None
    if source.get("pause_wall") and source.get("resume_wall"):
        downtime = source["resume_wall"] - source["pause_wall"]
    verified = None
    if settings.verify and status == "completed":
        verified = (source.get("source_digest") is not None
                    and source.get("source_digest") == source.get("destination_digest"))
    total = source.get("total_time_seconds", 0.0)
    report = MigrationReport(
        migration_id=mid, guest=guest, source=source_host, destination=dest_host,
        policy=settings.policy, status=status, error=error, profile=source.get("profile"),
        page_size=info["page_size"], guest_memory_bytes=info["pages"] * info["page_size"],
        link_bytes_per_second=settings.link_bytes_per_second,
        rate_limit_bytes_per_second=settings.rate_limit_bytes_per_second,
        latency_seconds=settings.latency_seconds,
        downtime_limit_seconds=settings.downtime_limit_seconds,
        modes={"before": info["mode_before"], "during": info["mode_during"],
               "after": dest.get("mode_after") if status == "completed" else info["mode_before"]},
        rounds=source.get("rounds", []), stop_reason=source.get("stop_reason"),
        total_time_seconds=total, downtime_seconds=downtime,
        downtime_source_seconds=source.get("downtime_source_seconds"),
        guest_observed_downtime_seconds=_guest_downtime(source, dest),
        pages_sent_total=source.get("pages_sent_total", 0),
        bytes_sent_total=source.get("bytes_sent_total", 0),
        throughput_bytes_per_second=(source.get("bytes_sent_total", 0) / total if total else 0.0),
        phase_seconds=source.get("phase_seconds", {}),
        cpu_seconds={"source": source.get("cpu_seconds"), "destination": dest.get("cpu_seconds")},
        integrity=Integrity(verified, source.get("source_digest"),
                            source.get("destination_digest")))
    report.model = model_block(report, info.get("workload"), settings)
    return report


def _guest_downtime(source: dict, dest: dict) -> float | None:
    """The longest stretch without guest progress: across the hand-over, or on the source."""
    across = dest.get("guest_observed_downtime_seconds")
    if across is None:
        return None
    return max(across, source.get("source_longest_gap_seconds") or 0.0)
