"""Does `migbed advise` pick what would have won? For every point of a scenario
(`scenarios/advise-check.toml`: dirty rates x bandwidths), the guest is booted and measured
and the advisor ranks the candidates (`cluster.advisor`); then each candidate migrates a fresh
copy of the same guest, and the measured reports are ranked by the same rule (those meeting
the limits first, then bytes sent, then total time). The check reports, per point, the
predicted and the measured winner, and the winner's predicted total time against its
measured one (`migbed advise-check`).
"""

import time
from dataclasses import replace

from cluster.advisor import TOLERANCE, Candidate, advise, candidates, rank, settings_for
from cluster.sweep.scenario import Scenario
from nodes.errors import MigbedError
from nodes.migration.decide.policy import StopCode
from nodes.phase import Outcome
from workloads.writableset import WssCurve

SOURCE, DESTINATION = "host-0", "host-1"
MEASURE_SECONDS = 1.0
POSTCOPY_FAMILY = ("post-copy", "hybrid")


def measured_verdict(report, limit_seconds: float) -> tuple[bool, str]:
    """(meets the limits, why not) of a migration that ran: completed, converged or
    switched to post-copy, its downtime within the limit."""
    if report.status != Outcome.COMPLETED:
        return False, f"{report.status}"
    code = StopCode(report.stop_code) if report.stop_code else None
    if code is not None and not code.converged and code is not StopCode.POSTCOPY:
        return False, f"stopped on {code.value}"
    if (report.downtime_seconds or 0.0) > limit_seconds * TOLERANCE:
        return False, f"downtime {report.downtime_seconds * 1000:.0f} ms"
    return True, ""


def _boot(tb, spec, warmup: float) -> None:
    tb.create(SOURCE, spec)
    time.sleep(warmup)


def _destroy(tb, name: str) -> None:
    try:
        tb.destroy(name)
    except MigbedError:
        pass


def check_point(tb, scenario: Scenario, index: int, point: dict) -> dict:
    """One point: the advice, then every candidate run for real, both ranked."""
    spec, base = scenario.specs(point)
    spec = replace(spec, name=f"advise-{index}")
    _boot(tb, spec, scenario.warmup_seconds)
    try:
        host = tb.host(SOURCE)
        curve = WssCurve.from_dict(host.call("measure_wss", spec.name, MEASURE_SECONDS, 0.01))
        content = host.call("sample_content", spec.name)
    finally:
        _destroy(tb, spec.name)
    ranked = advise(curve, content, base, spec.memory_bytes, spec.workload)
    runs = [_run(tb, scenario, spec, base, c, i) for i, c in enumerate(candidates(base))]
    measured = rank(runs, meets=lambda r: r["meets_limits"], sent=lambda r: r["bytes_sent"],
                    took=lambda r: r["total_time_seconds"])
    pre = precopy_winners(ranked, measured)
    predicted_best = ranked[0]
    measured_best = measured[0]
    same = next(r for r in runs if r["name"] == predicted_best.name)
    err = (predicted_best.total_time_seconds / same["total_time_seconds"] - 1
           if same["total_time_seconds"] else None)
    return {"point": point, "wws_pages": curve.wws_pages,
            "rate_pages_per_second": curve.rate_pages_per_second,
            "predicted_winner": predicted_best.name, "measured_winner": measured_best["name"],
            "agree": predicted_best.name == measured_best["name"],
            "winner_predicted_total_seconds": predicted_best.total_time_seconds,
            "winner_measured_total_seconds": same["total_time_seconds"],
            "total_time_error": err, **pre,
            "advice": [a.to_dict() for a in ranked], "measured": measured}


def precopy_winners(ranked: list, measured: list[dict]) -> dict:
    """The harder half of the check: the winner among the pre-copy candidates alone (post-copy
    sends every page once, so it wins on bytes wherever it is allowed)."""
    pre = [a.name for a in ranked if a.name not in POSTCOPY_FAMILY]
    got = [r["name"] for r in measured if r["name"] not in POSTCOPY_FAMILY]
    return {"precopy_predicted_winner": pre[0], "precopy_measured_winner": got[0],
            "precopy_agree": pre[0] == got[0]}


def _run(tb, scenario: Scenario, spec, base, cand: Candidate, i: int) -> dict:
    settings = settings_for(base, cand.overrides)
    guest = replace(spec, name=f"{spec.name}-{i}")
    _boot(tb, guest, scenario.warmup_seconds)
    try:
        report = tb.migrate(guest.name, DESTINATION, settings)
    finally:
        _destroy(tb, guest.name)
    ok, why = measured_verdict(report, settings.downtime_limit_seconds)
    return {"name": cand.name, "meets_limits": ok, "why": why,
            "bytes_sent": float(report.bytes_sent_total),
            "total_time_seconds": report.total_time_seconds,
            "downtime_seconds": report.downtime_seconds, "stop_code": report.stop_code}


def run_check(scenario: Scenario, tb, say=print) -> dict:
    """Every point of `scenario`, and the tally: winners agreeing, total time within 25 %."""
    points = []
    for i, point in enumerate(scenario.points()):
        p = check_point(tb, scenario, i, point)
        err = p["total_time_error"]
        say(f"point {i} {point}: predicted {p['predicted_winner']}, measured "
            f"{p['measured_winner']}" + (f", total time error {err * 100:+.0f} %"
                                         if err is not None else "")
            + f"; pre-copy alone: predicted {p['precopy_predicted_winner']}, measured "
              f"{p['precopy_measured_winner']}")
        points.append(p)
    agree = sum(p["agree"] for p in points)
    precopy_agree = sum(p["precopy_agree"] for p in points)
    within = sum(1 for p in points if p["total_time_error"] is not None
                 and abs(p["total_time_error"]) <= 0.25)
    return {"scenario": scenario.name, "points": points, "winners_agree": agree,
            "precopy_winners_agree": precopy_agree,
            "total_within_25_percent": within, "point_count": len(points)}
