"""The model's prediction beside a measurement: the `model` block every migration report
(and every sweep run) carries, predicted at the throughput the run itself measured."""

from typing import TYPE_CHECKING

from cluster import model  # the public functions, looked up when called
from cluster.reportparts import ModelBlock
from nodes.migration.decide.downtimesteps import budget_of
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.report import MigrationReport


def live_throughput(rounds: list[dict]) -> float | None:
    """Bytes per second of the live rounds together, the rate pre-copy actually ran at;
    None when no live round sent anything."""
    live = [r for r in rounds if not r.get("final")]
    seconds = sum(r["duration_seconds"] for r in live)
    sent = sum(r["bytes_sent"] for r in live)
    return sent / seconds if seconds > 0 and sent > 0 else None


def measured_page_bytes(report: "MigrationReport") -> float | None:
    """Bytes a page sent whole cost on the wire, when XBZRLE or compression made it less than
    the page (the model counts pages, not their encodings: it takes the run's measure, as
    it takes its throughput); None otherwise."""
    m = report.multifd
    if report.xbzrle is None and not (m and m.compression_ratio):
        return None
    pages = report.pages_sent_total - report.zero_pages
    return (report.bytes_sent_total - 8 * report.zero_pages) / pages if pages > 0 else None


def model_block(report: "MigrationReport", workload: dict | None, settings: MigrationSettings,
                resume_seconds: float = 0.0,
                dirty_rate_pages_per_second: float | None = None,
                fixed_downtime: dict | None = None,
                switch_resume_seconds: float | None = None) -> ModelBlock:
    """The analytic model beside the measurement of `report` (a `MigrationReport`):
    predicted with the throughput this run measured as the bandwidth, and with the nominal
    link when the link or the rate limit is set. A model error never breaks a migration: it
    is stored instead.

    With a rate limit the measured throughput stands for the limit (live rounds) and the
    stop-and-copy goes at the nominal link speed (instantaneous if unlimited), as migbed
    lifts the limit for it. When no live round ran (a policy that stops before round 0) there
    is no live throughput: the prediction is the nominal one, on which the policy decided.
    `resume_seconds` is the model's fixed T_resume (0: the plain model; sweeps pass the
    downtime floor they measured). `fixed_downtime` is what the source measured for this
    host pair and its qemu budget subtracted (`subtract_fixed_downtime`); the model's policy
    subtracts the same; `switch_resume_seconds` that of a
    post-copy switch (no hand-over round trip; None: the same).
    """
    block = ModelBlock(resume_seconds=resume_seconds, fixed_downtime=fixed_downtime)
    try:
        common = _model_inputs(report, workload, settings, resume_seconds,
                               dirty_rate_pages_per_second, fixed_downtime)
        common["switch_resume_seconds"] = switch_resume_seconds
        measured_dict = report.to_dict()
        completed = report.status == Outcome.COMPLETED
        nominal = None
        if settings.nominal_bytes_per_second is not None:
            nominal = model.predict(
                link_bytes_per_second=settings.link_bytes_per_second,
                rate_limit_bytes_per_second=settings.rate_limit_bytes_per_second, **common)
            block.nominal = {
                "prediction": nominal.to_dict(),
                "comparison": model.compare(measured_dict, nominal) if completed else None}
        basis, bandwidth, pred = _at_measured_throughput(report, settings, nominal, common)
        block.bandwidth_basis, block.bandwidth_bytes_per_second = basis, bandwidth
        if pred is not None:
            block.prediction = pred.to_dict()
            if completed:
                block.comparison = model.compare(measured_dict, pred)
    except Exception as exc:  # noqa: BLE001 - the model must never break a migration
        block.error = f"{type(exc).__name__}: {exc}"
    return block


def _model_inputs(report: "MigrationReport", workload: dict | None, settings: MigrationSettings,
                  resume_seconds: float, dirty_rate: float | None,
                  fixed_downtime: dict | None = None) -> dict:
    """The model's arguments that do not depend on the bandwidth it is given."""
    from workloads.spec import WorkloadSpec
    return dict(
        warmup_seconds=report.workload_running_seconds,
        page_bytes=measured_page_bytes(report),
        guest_memory_bytes=report.guest_memory_bytes, page_size=report.page_size,
        workload=WorkloadSpec.from_dict(workload) if workload else WorkloadSpec(),
        resume_seconds=resume_seconds, dirty_rate_pages_per_second=dirty_rate,
        **settings_inputs(settings, report.guest_memory_bytes, fixed_downtime,
                          _measured_push(report, settings)))


def settings_inputs(settings: MigrationSettings, guest_memory_bytes: int,
                    fixed_downtime: dict | None = None,
                    measured_push: float | None = None) -> dict:
    """The model's arguments a migration's settings decide (policy, limits, the convergence
    aids, zero pages, post-copy), one way for a report's model block, a sweep's curve and
    `migbed model`."""
    from cluster.model.throttle_model import DirtyLimitSpec, ThrottleSpec, timeouts_from
    return dict(
        policy=settings.policy, downtime_limit_seconds=settings.downtime_limit_seconds,
        latency_seconds=settings.latency_seconds,
        policy_settings=policy_settings_of(settings, fixed_downtime),
        auto_converge=ThrottleSpec.from_settings(settings),
        dirty_limit=DirtyLimitSpec.from_settings(settings),
        completion_timeout=timeouts_from(settings, guest_memory_bytes),
        zero_page_detection=settings.zero_page_detection,
        budget=budget_of(settings, guest_memory_bytes, 0.0),
        switchover_on_stall_seconds=settings.switchover_on_stall_seconds,
        **postcopy_inputs(settings, measured_push))


def policy_settings_of(settings: MigrationSettings, fixed_downtime: dict | None) -> dict:
    """What the model's policy is built with beside the downtime limit: the round cap, and
    the fixed downtime the engine's budget subtracted."""
    out: dict = {}
    if settings.max_iterations is not None:
        out["max_iterations"] = settings.max_iterations
    if settings.subtract_fixed_downtime and fixed_downtime:
        out["fixed_downtime_seconds"] = fixed_downtime["seconds"]
    return out


def _measured_push(report: "MigrationReport", settings: MigrationSettings) -> float | None:
    """Over an unlimited link with an unlimited push, the push the run measured (its bytes
    after the switch over the post-copy phase): else the model's would take no time."""
    seconds = report.phase_seconds.get("postcopy")
    if (report.postcopy is None or settings.link_bytes_per_second is not None
            or settings.postcopy_bandwidth_bytes_per_second is not None or not seconds):
        return None
    return report.postcopy_bytes / seconds or None


def postcopy_inputs(settings: MigrationSettings, measured_push: float | None = None) -> dict:
    """The model's post-copy arguments from a migration's settings (a switch the operator
    asks for while it runs is not foreseen)."""
    return {"postcopy_after_rounds": settings.postcopy_after_rounds,
            "postcopy_after_seconds": settings.postcopy_after_seconds,
            "postcopy_bandwidth_bytes_per_second": (settings.postcopy_bandwidth_bytes_per_second
                                                    or measured_push)}


def _at_measured_throughput(report: "MigrationReport", settings: MigrationSettings, nominal, common: dict):
    """(basis, bandwidth, prediction) at the throughput the run measured."""
    measured = live_throughput(report.rounds)
    if measured is not None:
        if settings.rate_limit_bytes_per_second is not None:
            pred = model.predict(link_bytes_per_second=settings.link_bytes_per_second,
                                 rate_limit_bytes_per_second=measured, **common)
        else:
            pred = model.predict(link_bytes_per_second=measured, **common)
        return "measured: the live rounds' throughput", measured, pred
    if nominal is not None:
        # No live round ran, so nothing was measured before the policy's first decision,
        # which it took on the nominal bandwidth: so must the model.
        return "nominal: no live round ran", nominal.bandwidth_bytes_per_second, nominal
    measured = report.throughput_bytes_per_second or None
    pred = model.predict(link_bytes_per_second=measured, **common) if measured else None
    return "measured: the whole migration (no live round ran)", measured, pred
