"""Does the model fed a measured writable working set predict a program's pre-copy? (issue 23's
target: within 25 % of the total time). For every point of a scenario
(`scenarios/wss-programs.toml`: kvstore, stream, sort, matmul on process vCPUs), the guest is
booted, its WWS measured where it runs (`migbed wss`, `nodes.host.dirtymeter`), the model run
on the curve (`cluster.model.predict(wss=...)`) over the point's own migrate settings, and then
the same guest migrated by pre-copy for real (`migbed wss-check`).

The prediction is made twice: at the link's nominal speed (what an operator knows before
migrating) and at the throughput the migration's live rounds measured (what the report's
model block uses), so an error of the model's dirtying is told apart from a link that ran
slower than its setting on a loaded machine.
"""

import time
from dataclasses import replace

from cluster import model
from cluster.model.block import live_throughput, settings_inputs
from cluster.sweep.scenario import Scenario
from nodes.errors import MigbedError
from workloads.writableset import WssCurve

SOURCE, DESTINATION = "host-0", "host-1"
MEASURE_SECONDS = 2.0
WITHIN = 0.25


def predict_on_curve(curve: WssCurve, spec, settings, link: float | None,
                     warmup_seconds: float) -> dict:
    """The model's pre-copy on the measured curve, over `settings`, at `link` B/s."""
    pred = model.predict(guest_memory_bytes=spec.memory_bytes, page_size=curve.page_size,
                         workload=spec.workload, link_bytes_per_second=link,
                         rate_limit_bytes_per_second=settings.rate_limit_bytes_per_second,
                         wss=curve, warmup_seconds=warmup_seconds,
                         **settings_inputs(settings, spec.memory_bytes))
    return {"total_time_seconds": pred.total_time_seconds,
            "downtime_seconds": pred.downtime_seconds, "rounds": len(pred.rounds),
            "bytes_sent": pred.bytes_sent_total, "stop_code": pred.stop_code,
            "bandwidth_bytes_per_second": link}


def check_point(tb, scenario: Scenario, index: int, point: dict,
                measure_seconds: float = MEASURE_SECONDS) -> dict:
    """One program: measured, predicted, migrated; the errors of both predictions."""
    spec, settings = scenario.specs(point)
    name = f"wss-{index}-{point.get('pattern', spec.workload.pattern)}"
    spec = replace(spec, name=name)
    tb.create(SOURCE, spec)
    try:
        started = time.monotonic()
        time.sleep(scenario.warmup_seconds)
        curve = WssCurve.from_dict(tb.host(SOURCE).call("measure_wss", name, measure_seconds,
                                                        0.01, timeout=measure_seconds + 60))
        ran = time.monotonic() - started
        nominal = predict_on_curve(curve, spec, settings, settings.link_bytes_per_second, ran)
        report = tb.migrate(name, DESTINATION, settings)
    finally:
        try:
            tb.destroy(name)
        except MigbedError:
            pass
    measured_bw = live_throughput(report.rounds)
    at_measured = (predict_on_curve(curve, spec, settings, measured_bw, ran)
                   if measured_bw else None)
    took = report.total_time_seconds
    return {"point": point, "guest": name, "status": report.status,
            "wws_pages": curve.wws_pages, "rate_pages_per_second": curve.rate_pages_per_second,
            "ops_per_second": curve.ops_per_second,
            "regions": [[r.pages, r.rate_pages_per_second] for r in curve.regions],
            "measured": {"total_time_seconds": took, "downtime_seconds": report.downtime_seconds,
                         "rounds": len(report.rounds), "bytes_sent": report.bytes_sent_total,
                         "stop_code": report.stop_code,
                         "phase_seconds": dict(report.phase_seconds),
                         "live_throughput_bytes_per_second": measured_bw},
            "curve": curve.to_dict(),
            "nominal": {**nominal, "error": _error(nominal, took)},
            "at_measured_throughput": (None if at_measured is None
                                       else {**at_measured, "error": _error(at_measured, took)})}


def _error(pred: dict, took: float | None) -> float | None:
    return pred["total_time_seconds"] / took - 1 if took else None


def run_check(scenario: Scenario, tb, say=print,
              measure_seconds: float = MEASURE_SECONDS) -> dict:
    """Every point of `scenario`, and the tally within 25 %."""
    points = []
    for i, point in enumerate(scenario.points()):
        p = check_point(tb, scenario, i, point, measure_seconds)
        at = p["at_measured_throughput"]
        say(f"{point}: measured {p['measured']['total_time_seconds']:.2f} s "
            f"({p['measured']['rounds']} rounds, {p['measured']['stop_code']}); model "
            f"{p['nominal']['total_time_seconds']:.2f} s at the link "
            f"({_pct(p['nominal']['error'])}), "
            + (f"{at['total_time_seconds']:.2f} s at the measured throughput "
               f"({_pct(at['error'])})" if at else "no live round measured"))
        points.append(p)

    def within(key: str) -> int:
        return sum(1 for p in points if p[key] and p[key]["error"] is not None
                   and abs(p[key]["error"]) <= WITHIN)
    return {"scenario": scenario.name, "points": points, "point_count": len(points),
            "nominal_within_25_percent": within("nominal"),
            "measured_throughput_within_25_percent": within("at_measured_throughput")}


def _pct(err: float | None) -> str:
    return "-" if err is None else f"{err * 100:+.0f} %"
