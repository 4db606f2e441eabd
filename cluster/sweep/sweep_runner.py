"""Running a sweep: every point of the grid `repeats` times on one cluster, from the first
host to the second, each run on a fresh guest, with the model beside every measurement.

Before the grid, the sweep measures the downtime floor of an idle guest of each size over
each link (what migbed adds to every downtime: hand-over, vCPU context, resume) and gives it
to the model as its fixed T_resume, so predicted downtimes are comparable with measured ones.
"""

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cluster.console import Steps, make_console
from cluster.reportparts import ModelBlock
from cluster.sweep.agreement import agreement_table, explain
from cluster.sweep.curves import model_curves
from cluster.sweep.outputs import SweepResult, write_outputs, write_plots, write_run
from cluster.sweep.scenario import MiB, Scenario
from cluster.sweep.text import ms, point_text, show
from nodes.errors import ConfigError, MigbedError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.testbed import Testbed

CALIBRATION_WARMUPS = 2          # the first migrations of a fresh testbed pay one-time costs
CALIBRATION_RUNS = 3             # (imports, first calls) of ~10 ms: not part of the floor

CalibrationKey = tuple[int, float, float | None, float | None]   # memory, latency, link, limit


def run_sweep(scenario: Scenario, output: str | Path | None = None, *, in_process: bool = False,
              plots: bool = True, testbed: "Testbed | None" = None, progress_out: IO[str] | None = None
              ) -> SweepResult:
    """Run every point of `scenario` `repeats` times on one cluster and write the results.
    `testbed`: use this one (needs the scenario's hosts); None starts one and closes it."""
    folder = Path(output) if output else Path("results") / (
        f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        (folder / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {folder}: {exc.strerror or exc}") from None
    own = None
    if testbed is None:
        own = testbed = _start_testbed(scenario, in_process, progress_out)
    try:
        calibration, rows = _run_grid(testbed, scenario, folder, progress_out)
    finally:
        if own is not None:
            own.close()
    agreement = agreement_table(scenario, rows)
    result = SweepResult(scenario, folder, rows, agreement,
                         {calibration_name(k): v for k, v in calibration.items()},
                         explain(scenario, rows, agreement, calibration))
    write_outputs(result)
    if plots:
        write_plots(result, model_curves(result, calibration))
    return result


def _start_testbed(scenario: Scenario, in_process: bool,
                   progress_out: IO[str] | None) -> "Testbed":
    from cluster.launch.launcher import ClusterSpec
    from cluster.testbed import Testbed
    spec = ClusterSpec(hosts=scenario.hosts, host_memory_bytes=scenario.host_memory_bytes,
                       hosts_per_node=scenario.hosts_per_node)
    where = "in-process hosts" if in_process else "a local Ray cluster"
    make_console(progress_out or sys.stderr).print(
        f"sweep {scenario.name}: starting {where} ({scenario.hosts} hosts of "
        f"{format_bytes(scenario.host_memory_bytes)})")
    return Testbed.in_process(spec) if in_process else Testbed.local(spec)


def _run_grid(tb: "Testbed", scenario: Scenario, folder: Path, progress_out: IO[str] | None
              ) -> tuple[dict, list[dict]]:
    """The downtime floors, then every run of every point, a progress step each."""
    if len(tb.hosts) < 2:
        raise ConfigError("a sweep needs a testbed of at least 2 hosts")
    src, dst = list(tb.hosts)[:2]
    points = scenario.points()
    keys = sorted({calibration_key(scenario, p) for p in points},
                  key=lambda k: tuple(-1 if v is None else v for v in k))
    calibration: dict[CalibrationKey, dict] = {}
    rows: list[dict] = []
    with Steps(len(keys) + len(points) * scenario.repeats, progress_out) as steps:
        for key in keys:
            calibration[key] = calibrate(tb, src, dst, scenario, key)
            steps.step(f"downtime floor, {calibration_name(key)}: "
                       f"{ms(calibration[key].get('floor_seconds'))}",
                       failed=calibration[key].get("floor_seconds") is None)
        for i, point in enumerate(points):
            for r in range(scenario.repeats):
                row = _run_one(tb, src, dst, scenario, i, point, r,
                               calibration[calibration_key(scenario, point)], folder)
                rows.append(row)
                steps.step(f"point {i} repeat {r}: {point_text(point)} -> {row['status']}"
                           + (f" ({row['error']})" if row["error"] else ""),
                           failed=row["status"] != Outcome.COMPLETED)
    return calibration, rows


# -- the downtime floor ------------------------------------------------------------------------
def calibration_name(key: CalibrationKey) -> str:
    memory, latency, link, limit = key
    return (f"idle {format_bytes(memory)} guest, link "
            f"{'unlimited' if link is None else format_bytes(link) + '/s'}"
            + (f", rate limit {format_bytes(limit)}/s" if limit else "")
            + f", latency {latency * 1000:g} ms")


def calibration_key(scenario: Scenario, point: dict) -> CalibrationKey:
    spec, settings = scenario.specs(point)
    return (spec.memory_bytes, settings.latency_seconds, settings.link_bytes_per_second,
            settings.rate_limit_bytes_per_second)


def calibrate(tb: "Testbed", src: str, dst: str, scenario: Scenario, key: CalibrationKey) -> dict:
    """The pre-copy downtime floor of this guest and link (`_floor`), and, when some point of
    the scenario may switch to post-copy, a post-copy switch's floor too (no hand-over round
    trip): the model takes that one as T_resume where it predicts a switch."""
    out = _floor(tb, src, dst, scenario, key, postcopy=False)
    if any(scenario.specs(p)[1].postcopy_planned for p in scenario.points()):
        switch = _floor(tb, src, dst, scenario, key, postcopy=True)
        out["switch_floor_seconds"] = switch["floor_seconds"]
        out["switch_resume_seconds"] = switch["resume_seconds"]
    return out


def _floor(tb: "Testbed", src: str, dst: str, scenario: Scenario, key: CalibrationKey,
           postcopy: bool) -> dict:
    """The downtime floor of an idle guest of this size over this link: the model's
    T_resume is the floor less the one latency the model already counts. The link matters:
    over an unlimited link the sender runs up to the socket buffers (8 MiB) ahead of the
    receiver, and the stop-and-copy waits behind that backlog (measured ~3 ms more)."""
    memory, latency, link, limit = key
    name = f"sweep-idle-{memory // MiB}m"
    floors: list[float] = []
    error = None
    try:
        tb.create(src, GuestSpec(name, memory, scenario.mode))
        where = src
        for i in range(CALIBRATION_WARMUPS + CALIBRATION_RUNS):
            where = dst if where == src else src
            rep = tb.migrate(name, where, MigrationSettings(
                link_bytes_per_second=link, rate_limit_bytes_per_second=limit,
                latency_seconds=latency, timeout_seconds=scenario.migration.timeout_seconds,
                postcopy_after_rounds=0 if postcopy else None))
            if rep.status != Outcome.COMPLETED or rep.downtime_seconds is None:
                error = rep.error
            elif i >= CALIBRATION_WARMUPS:
                floors.append(rep.downtime_seconds)
    except MigbedError as exc:
        error = str(exc)
    finally:
        _destroy(tb, name)
    if not floors:
        return {"floor_seconds": None, "resume_seconds": 0.0, "samples": [],
                "error": error or "no idle migration completed"}
    floor = statistics.median(floors)
    return {"floor_seconds": floor, "resume_seconds": max(0.0, floor - latency),
            "samples": floors, "spread_seconds": max(floors) - min(floors), "error": error}


def _destroy(tb: "Testbed", name: str) -> None:
    try:
        tb.destroy(name)
    except MigbedError:
        pass


# -- one run -----------------------------------------------------------------------------------
def _run_one(tb: "Testbed", src: str, dst: str, scenario: Scenario, index: int, point: dict, repeat: int,
             calib: dict, folder: Path) -> dict:
    """Boot the point's guest, let it warm up, migrate it, destroy it: one CSV row and one
    run file, whatever became of the migration."""
    from cluster.model.block import model_block
    spec, settings = scenario.specs(point, repeat)
    spec = replace(spec, name=f"sweep-{index}-{repeat}")
    row: dict = {"scenario": scenario.name, "point": index, "repeat": repeat}
    row.update({f"axis_{k}": show(v) for k, v in point.items()})
    row.update(status=Outcome.FAILED, error=None)
    report = achieved = None
    try:
        tb.create(src, spec)
        achieved = _achieved_rate(tb.host(src), spec.name, scenario.warmup_seconds)
        report = tb.migrate(spec.name, dst, settings)
        row["status"], row["error"] = report.status, report.error
    except Exception as exc:  # noqa: BLE001 - a failed run is a row, never dropped
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        _destroy(tb, spec.name)
    rate = achieved if spec.workload.unlimited else None
    model = (model_block(report, spec.workload.to_dict(), settings, calib["resume_seconds"],
                         rate, calib.get("switch_resume_seconds"))
             if report is not None else None)
    row.update(_row_fields(spec, settings, report, model, achieved))
    row["json"] = write_run(folder, index, repeat, {
        "scenario": scenario.to_dict(), "point": {k: show(v) for k, v in point.items()},
        "repeat": repeat, "status": row["status"], "error": row["error"],
        "calibration": calib, "achieved_dirty_rate_pages_per_second": achieved,
        "report": report.to_dict() if report is not None else None,
        "model": model.to_dict() if model is not None else None})
    return row


def _achieved_rate(host, name: str, warmup_seconds: float) -> float | None:
    """Page writes per second the guest made during its warm-up (what 'max' runs at)."""
    before, t0 = host.call("guest_status", name).get("pages_written_total", 0), time.monotonic()
    time.sleep(warmup_seconds)
    after = host.call("guest_status", name).get("pages_written_total", 0)
    elapsed = time.monotonic() - t0
    return (after - before) / elapsed if elapsed > 0 else None


def _row_fields(spec: GuestSpec, settings: MigrationSettings, report, model: ModelBlock | None,
                achieved: float | None) -> dict:
    wl = spec.workload
    out = {"policy": settings.policy, "guest_memory_bytes": spec.memory_bytes,
           "pattern": wl.pattern, "dirty_rate_pages_per_second": wl.rate_pages_per_second,
           "achieved_dirty_rate_pages_per_second": achieved,
           "hot_fraction": wl.hot_fraction, "hot_share": wl.hot_share,
           "link_bytes_per_second": settings.link_bytes_per_second,
           "rate_limit_bytes_per_second": settings.rate_limit_bytes_per_second,
           "latency_seconds": settings.latency_seconds,
           "postcopy_after_rounds": settings.postcopy_after_rounds,
           "postcopy_after_seconds": settings.postcopy_after_seconds,
           "postcopy_bandwidth_bytes_per_second": settings.postcopy_bandwidth_bytes_per_second,
           "postcopy_requests": report.postcopy_requests if report is not None else None,
           "switched_to_postcopy": report.postcopy is not None if report is not None else None}
    out.update(_measured(report, model))
    nominal = (model.nominal if model is not None else None) or {}
    out.update(_predicted("predicted", (model.prediction if model is not None else None) or {}))
    out.update(_predicted("nominal", nominal.get("prediction") or {}))
    cmp_ = (model.comparison if model is not None else None) or {}
    out.update({k: cmp_.get(k) for k in ("pages_sent_ratio", "rounds_ratio", "downtime_ratio",
                                         "total_time_ratio")})
    out["model_error"] = model.error if model is not None else None
    return out


_MEASURED = ("measured_throughput_bytes_per_second", "pages_sent_total", "live_rounds",
             "final_round_pages", "downtime_seconds", "guest_observed_downtime_seconds",
             "total_time_seconds", "stop_reason", "stop_code", "verified",
             "pages_skipped_total", "guest_slowdown", "guest_throttled_seconds",
             "cpu_throttle_percentage_max", "dirty_limit_throttle_seconds",
             "bytes_sent_total", "normal_pages", "zero_pages",
             "xbzrle_pages", "xbzrle_bytes", "compression_ratio",
             "measured_dirty_rate_pages_per_second", "app_ops_per_second_before",
             "app_ops_per_second_during", "app_latency_p99_seconds_before",
             "app_latency_p99_seconds_during", "brownout_seconds", "brownout_depth",
             "blackout_seconds", "app_invariants_ok")


def _measured(report, model: ModelBlock | None) -> dict:
    """The run's own figures (None for a run that never got a report)."""
    if report is None:
        return dict.fromkeys(_MEASURED)
    final = [r for r in report.rounds if r.get("final")]
    return {
        "measured_throughput_bytes_per_second": (
            model.bandwidth_bytes_per_second if model is not None else None),
        "pages_sent_total": report.pages_sent_total, "live_rounds": report.live_rounds,
        "final_round_pages": final[-1]["pages_sent"] if final else None,
        "downtime_seconds": report.downtime_seconds,
        "guest_observed_downtime_seconds": report.guest_observed_downtime_seconds,
        "total_time_seconds": report.total_time_seconds, "stop_reason": report.stop_reason,
        "stop_code": report.stop_code,
        "verified": report.integrity.verified,
        "pages_skipped_total": sum(r["pages_skipped"] for r in report.rounds),
        # the guest's cost, and what the convergence aids took of its vCPU
        "guest_slowdown": (report.guest_cost or {}).get("slowdown"),
        "guest_throttled_seconds": (report.guest_cost or {}).get("throttled_seconds"),
        # (no aid: no throttle, so 0)
        "cpu_throttle_percentage_max": (
            report.convergence.cpu_throttle_percentage_max if report.convergence else 0),
        "dirty_limit_throttle_seconds": (
            report.convergence.dirty_limit_throttle_seconds if report.convergence else 0.0),
        # what crossed the wire (`nodes.migration.wire.capabilities`)
        "bytes_sent_total": report.bytes_sent_total, "normal_pages": report.normal_pages,
        "zero_pages": report.zero_pages,
        "xbzrle_pages": report.xbzrle.pages if report.xbzrle else None,
        "xbzrle_bytes": report.xbzrle.bytes if report.xbzrle else None,
        "compression_ratio": report.multifd.compression_ratio if report.multifd else None,
        **_application(report)}


def _application(report) -> dict:
    """A program guest's columns: the dirty rate its live rounds measured, what its
    application felt (`cluster.appfeel`); None for a pattern workload's."""
    # Each round after the first sends what was dirtied while the one before it ran: the
    # pages they sent over the live rounds' time (None: post-copy, no round after round 0).
    rounds = [r for r in report.rounds if not r.get("postcopy")]
    live = sum(r["duration_seconds"] for r in rounds if not r.get("final"))
    resent = sum(r["pages_sent"] for r in rounds[1:])
    out = {"measured_dirty_rate_pages_per_second": (
        resent / live if live > 0 and len(rounds) > 1 else None)}
    a = report.application
    out.update({"app_ops_per_second_before": a.before.get("ops_per_second") if a else None,
                "app_ops_per_second_during": a.during.get("ops_per_second") if a else None,
                "app_latency_p99_seconds_before": (
                    a.before.get("latency_p99_seconds") if a else None),
                "app_latency_p99_seconds_during": (
                    a.during.get("latency_p99_seconds") if a else None),
                "brownout_seconds": a.brownout_seconds if a else None,
                "brownout_depth": a.brownout_depth if a else None,
                "blackout_seconds": a.blackout_seconds if a else None,
                "app_invariants_ok": a.invariants_ok if a else None})
    return out


def _predicted(prefix: str, pred: dict) -> dict:
    """A prediction's figures, as `predicted_*` (at the measured throughput) or `nominal_*`."""
    return {
        f"{prefix}_pages_sent_total": pred.get("pages_sent_total"),
        f"{prefix}_live_rounds": pred.get("live_rounds"),
        f"{prefix}_final_pages": pred.get("final_pages"),
        f"{prefix}_downtime_seconds": pred.get("downtime_seconds"),
        f"{prefix}_total_time_seconds": pred.get("total_time_seconds"),
        f"{prefix}_stop_reason": pred.get("stop_reason"),
        f"{prefix}_stop_code": pred.get("stop_code"),
        f"{prefix}_converged": pred.get("converged"),
        f"{prefix}_lambda_ratio": pred.get("lambda_ratio"),
        f"{prefix}_pages_skipped_total": (sum(r["pages_skipped"] for r in pred["rounds"])
                                          if pred else None),
        f"{prefix}_last_live_round_pages": _last_live(pred),
        f"{prefix}_expected_faults": (pred.get("postcopy") or {}).get("expected_faults")}


def _last_live(pred: dict) -> float | None:
    """Pages the last live round of a prediction sent and skipped (what xen-legacy tests)."""
    live = [r for r in (pred or {}).get("rounds", []) if not r["final"]]
    return live[-1]["pages_sent"] + live[-1]["pages_skipped"] if live else None
