"""Driving one migration between two hosts: the control plane, and the report.

The steps, each a call on a host handle (Ray actor calls in the cluster): check the guest on
the source; have the destination reserve frames and issue a ticket (nothing has moved if this
fails); start the source's sender, which streams straight to the destination over TCP;
poll progress; collect both sides; build the report. The data never passes through here.
"""

import uuid
from collections.abc import Callable

from cluster.report import MigrationReport
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
    settled = control.settle(pending, info)
    source = settled.source
    if on_progress is not None and source.rounds:
        # The rounds that ended after the last poll (a short migration can end between two).
        on_progress({"migration_id": mid, "guest": guest, "status": source.status,
                     "rounds": [r.to_dict() for r in source.rounds]})
    report = MigrationReport.build(mid, guest, src.name, dst.name, info, settings, settled)
    report.model = model_block(report, info.get("workload"), settings)
    return report


def live_throughput(rounds: list[dict]) -> float | None:
    """Bytes per second of the live rounds together, the rate pre-copy actually ran at;
    None when no live round sent anything."""
    live = [r for r in rounds if not r.get("final")]
    seconds = sum(r["duration_seconds"] for r in live)
    sent = sum(r["bytes_sent"] for r in live)
    return sent / seconds if seconds > 0 and sent > 0 else None


def model_block(report: MigrationReport, workload: dict | None, settings: MigrationSettings,
                resume_seconds: float = 0.0,
                dirty_rate_pages_per_second: float | None = None) -> dict:
    """The analytic model beside the measurement (`cluster.model`): predicted with the
    throughput this run measured as the bandwidth, and with the nominal link when the link or
    the rate limit is set. A model error never breaks a migration: it is stored instead.

    With a rate limit the measured throughput stands for the limit (live rounds) and the
    stop-and-copy goes at the nominal link speed (instantaneous if unlimited), as migbed
    lifts the limit for it. When no live round ran (a policy that stops before round 0) there
    is no live throughput: the prediction is the nominal one, on which the policy decided.
    `resume_seconds` is the model's fixed T_resume (0: the plain model; sweeps pass the
    downtime floor they measured).
    """
    from cluster.model import compare, predict
    from workloads.spec import WorkloadSpec
    block: dict = {"bandwidth_bytes_per_second": None, "bandwidth_basis": None,
                   "resume_seconds": resume_seconds,
                   "prediction": None, "comparison": None, "nominal": None, "error": None}
    try:
        spec = WorkloadSpec.from_dict(workload) if workload else WorkloadSpec()
        common = dict(
            guest_memory_bytes=report.guest_memory_bytes, page_size=report.page_size,
            workload=spec, policy=settings.policy,
            downtime_limit_seconds=settings.downtime_limit_seconds,
            latency_seconds=settings.latency_seconds, resume_seconds=resume_seconds,
            dirty_rate_pages_per_second=dirty_rate_pages_per_second,
            policy_settings=({"max_iterations": settings.max_iterations}
                             if settings.max_iterations is not None else None))
        measured_dict = report.to_dict()
        nominal = None
        if settings.nominal_bytes_per_second is not None:
            nominal = predict(link_bytes_per_second=settings.link_bytes_per_second,
                              rate_limit_bytes_per_second=settings.rate_limit_bytes_per_second,
                              **common)
            block["nominal"] = {
                "prediction": nominal.to_dict(),
                "comparison": (compare(measured_dict, nominal)
                               if report.status == "completed" else None)}
        measured = live_throughput(report.rounds)
        if measured is not None:
            block["bandwidth_basis"] = "measured: the live rounds' throughput"
            if settings.rate_limit_bytes_per_second is not None:
                pred = predict(link_bytes_per_second=settings.link_bytes_per_second,
                               rate_limit_bytes_per_second=measured, **common)
            else:
                pred = predict(link_bytes_per_second=measured, **common)
        elif nominal is not None:
            # No live round ran, so nothing was measured before the policy's first decision,
            # which it took on the nominal bandwidth: so must the model.
            block["bandwidth_basis"] = "nominal: no live round ran"
            measured, pred = nominal.bandwidth_bytes_per_second, nominal
        else:
            block["bandwidth_basis"] = "measured: the whole migration (no live round ran)"
            measured = report.throughput_bytes_per_second or None
            pred = predict(link_bytes_per_second=measured, **common) if measured else None
        block["bandwidth_bytes_per_second"] = measured
        if pred is not None:
            block["prediction"] = pred.to_dict()
            if report.status == "completed":
                block["comparison"] = compare(measured_dict, pred)
    except Exception as exc:  # noqa: BLE001 - the model must never break a migration
        block["error"] = f"{type(exc).__name__}: {exc}"
    return block
