"""The model's curves on the sweep's plots: downtime, total time and pages sent along the x
axis, one curve per series, predicted between the swept values as well as at them."""

import math

from cluster.model.block import settings_inputs
from cluster.sweep.agreement import median
from cluster.sweep.outputs import SweepResult
from cluster.sweep.scenario import Scenario
from cluster.sweep.text import point_text, show
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome

CURVE_POINTS = 40
CURVE_KEYS = ("downtime_seconds", "total_time_seconds", "pages_sent_total", "bytes_sent_total",
              "postcopy_requests")


def curve_xs(scenario: Scenario) -> list:
    """Where along x to predict: CURVE_POINTS spread over a numeric axis (geometrically when
    it spans more than 8x), else the axis's own values."""
    values = dict(scenario.axes)[scenario.x]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not (numeric and len(values) > 1):
        return list(values)
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 8:
        xs = [lo * (hi / lo) ** (k / (CURVE_POINTS - 1)) for k in range(CURVE_POINTS)]
    else:
        xs = [lo + (hi - lo) * k / (CURVE_POINTS - 1) for k in range(CURVE_POINTS)]
    return sorted({int(round(v)) for v in xs}) if isinstance(values[0], int) else xs


def model_curves(result: SweepResult, calibration: dict) -> list[dict]:
    """The model's downtime and total time along the x axis, one curve per series (every
    combination of the other axes), at the nominal bandwidth where the link is set, else at
    the series' median measured throughput."""
    sc = result.scenario
    if sc.x is None:
        return []
    xs = curve_xs(sc)
    curves = []
    for series in sc.series():
        runs = [r for r in result.rows if r["status"] == Outcome.COMPLETED
                and all(r.get(f"axis_{k}") == show(v) for k, v in series.items())]
        throughput = median([r["measured_throughput_bytes_per_second"] for r in runs])
        achieved = median([r["achieved_dirty_rate_pages_per_second"] for r in runs])
        ys: dict[str, list] = {k: [] for k in CURVE_KEYS}
        for xv in xs:
            pred = _predict(sc, {**series, sc.x: xv}, calibration, throughput, achieved)
            for k in CURVE_KEYS:
                ys[k].append(None if pred is None else getattr(pred, k))
        curves.append({"series": series, "label": point_text(series) or "model", "x": xs,
                       **ys})
    return curves


def _predict(sc: Scenario, point: dict, calibration: dict, throughput: float | None,
             achieved: float | None):
    """The model at one point of a curve; None where it cannot predict."""
    from cluster.model import predict
    try:
        spec, settings = sc.specs(point)
    except ConfigError:         # between the swept values (a cache size not a power of two)
        return None
    calib = calibration.get((spec.memory_bytes, settings.latency_seconds,
                             settings.link_bytes_per_second,
                             settings.rate_limit_bytes_per_second))
    if calib is None:     # x sweeps a calibrated setting: take the nearest floor
        calib = _nearest_calibration(calibration, spec, settings)
    link, limit = settings.link_bytes_per_second, settings.rate_limit_bytes_per_second
    if link is None and limit is None:
        link = throughput
    try:
        return predict(
            guest_memory_bytes=spec.memory_bytes, workload=spec.workload,
            link_bytes_per_second=link, rate_limit_bytes_per_second=limit,
            resume_seconds=calib.get("resume_seconds", 0.0),
            switch_resume_seconds=calib.get("switch_resume_seconds"),
            dirty_rate_pages_per_second=achieved if spec.workload.unlimited else None,
            warmup_seconds=sc.warmup_seconds,
            **settings_inputs(settings, spec.memory_bytes))
    except (ConfigError, ValueError):
        return None


def _nearest_calibration(calibration: dict, spec: GuestSpec,
                         settings: MigrationSettings) -> dict:
    """The calibration of the closest guest size and link, for model curves between the
    swept values."""
    def distance(key: tuple) -> tuple:
        memory, latency, link, limit = key
        return (abs(math.log(memory / spec.memory_bytes)), abs(latency - settings.latency_seconds),
                abs(math.log((link or 1e12) / (settings.link_bytes_per_second or 1e12))),
                abs(math.log((limit or 1e12) / (settings.rate_limit_bytes_per_second or 1e12))))
    if not calibration:
        return {}
    return calibration[min(calibration, key=distance)]
