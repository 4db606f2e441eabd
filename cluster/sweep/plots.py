"""The sweep's plots (PNG, matplotlib's Agg backend: no display needed).

- downtime.png, total_time.png, pages_sent.png, bytes_sent.png (and faults.png when some run
  switched to post-copy: its page requests beside the model's expected faults): the metric
  against the swept x axis, one colour per series (each combination of the other axes):
  measured medians with min-max error bars, and the model's curve (dashed) in the same colour.
- rounds.png: pages sent per round of one chosen point, measured bars beside the model's.
- compare-<axis>.png, for each axis that is an algorithm or an option of the migration (its
  values names or switches, not quantities: policy today; post-copy, auto-converge,
  compression as they come): the timelines of one run per value, at the chosen point's
  other values, on one figure (`cluster.timeline`).

Only drawing happens here; the numbers come from the runner and `curves`.
"""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from cluster.sweep.text import human, point_text, show  # noqa: E402
from nodes.phase import Outcome, Phase  # noqa: E402

if TYPE_CHECKING:
    from cluster.sweep.scenario import Scenario

METRICS = (("downtime_seconds", "downtime (ms)", 1000.0, "downtime.png"),
           ("total_time_seconds", "total migration time (s)", 1.0, "total_time.png"),
           ("pages_sent_total", "pages sent", 1.0, "pages_sent.png"),
           ("bytes_sent_total", "bytes on the wire (MiB)", 1.0 / (1 << 20), "bytes_sent.png"),
           # drawn when some run switched to post-copy
           ("postcopy_requests", "post-copy page requests (faults)", 1.0, "faults.png"))


@dataclass(frozen=True)
class _XAxis:
    """The swept axis on the plots' x axis: its values, and where each one is drawn."""

    name: str
    values: list
    numeric: bool
    scale: float
    label: str

    def pos(self, value: float | str) -> float:
        return value / self.scale if self.numeric else float(self.values.index(value))


def draw_all(scenario: "Scenario", rows: list[dict], curves: list[dict], rounds: dict | None,
             folder: Path) -> list[Path]:
    """Every plot of a sweep into `folder`; returns the files written."""
    from cluster.sweep.knobs import KNOBS
    written = []
    if scenario.x is not None:
        knob = KNOBS[scenario.x]
        values = list(dict(scenario.axes)[scenario.x])
        x = _XAxis(scenario.x, values, all(isinstance(v, int | float) and not isinstance(v, bool)
                                           for v in values), knob.scale, knob.label)
        switched = any(r.get("switched_to_postcopy") for r in rows)
        for key, label, scale, name in METRICS:
            if key == "postcopy_requests" and not switched:
                continue
            path = folder / name
            _metric_plot(scenario.name, rows, curves, scenario.series(), key, label, scale, x,
                         path)
            written.append(path)
    if rounds is not None:
        path = folder / "rounds.png"
        _rounds_plot(rounds, scenario.name, path)
        written.append(path)
    for axis in comparison_axes(scenario):
        path = _comparison_plot(scenario, rows, axis, folder)
        if path is not None:
            written.append(path)
    return written


def comparison_axes(scenario: "Scenario") -> list[str]:
    """The axes that choose an algorithm or option of the migration: a migration knob whose
    values are names or switches (a policy, post-copy on or off), not quantities."""
    from cluster.sweep.knobs import KNOBS
    return [name for name, values in scenario.axes
            if KNOBS[name].section == "migration" and len(values) > 1
            and any(isinstance(v, str | bool) for v in values)]


def _comparison_plot(scenario: "Scenario", rows: list[dict], axis: str,
                     folder: Path) -> Path | None:
    """One run per value of `axis` (its first completed repeat), the other axes at the
    scenario's chosen point, as timelines on one figure; None if no such run completed."""
    from cluster.report import MigrationReport
    from cluster.timeline import draw_timeline
    points = scenario.points()
    reference = points[scenario.rounds_point]
    reports, labels = [], []
    for value in dict(scenario.axes)[axis]:
        index = points.index({**reference, axis: value})
        row = next((r for r in rows if r["point"] == index and r["status"] == Outcome.COMPLETED),
                   None)
        if row is None:
            continue
        doc = json.loads((folder / row["json"]).read_text())
        reports.append(MigrationReport.from_dict(doc["report"]))
        labels.append(f"{axis} = {human(axis, value)}")
    if not reports:
        return None
    others = {k: v for k, v in reference.items() if k != axis}
    path = folder / f"compare-{axis}.png"
    draw_timeline(reports, path, labels, f"{scenario.name}: {axis} compared at "
                  f"{point_text(others)}")
    return path


def _metric_plot(name: str, rows: list[dict], curves: list[dict], series_list: list[dict],
                 key: str, label: str, scale: float, x: _XAxis, path: Path) -> None:
    many = len(series_list) > 2
    fig, ax = plt.subplots(figsize=(11.0 if many else 7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, series in enumerate(series_list):
        curve = next((c for c in curves if c["series"] == series), None)
        _draw_series(ax, rows, curve, series, key, scale, x, colours[n % len(colours)])
    if not x.numeric:
        ax.set_xticks(range(len(x.values)), [human(x.name, v) for v in x.values])
    elif len(x.values) > 1 and min(x.values) > 0 and max(x.values) / min(x.values) > 8:
        ax.set_xscale("log")
    ax.set_xlabel(x.label)
    ax.set_ylabel(label)
    ax.set_title(f"{name}: {label} (median, min-max; dashed: model)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if many:      # outside, on the right: six series would cover the points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.005, "model: at the nominal link speed; at the measured throughput where "
             "the link is unlimited; T_resume = the idle downtime floor measured", fontsize=6,
             alpha=0.7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_series(ax, rows: list[dict], curve: dict | None, series: dict, key: str,
                 scale: float, x: _XAxis, colour) -> None:
    """One series: measured medians with min-max bars, failed runs, the model's curve."""
    tag = ", ".join(f"{k}={human(k, v)}" for k, v in series.items()) or "all runs"
    xs, med, lo, hi = [], [], [], []
    failed_x = []
    for xv in x.values:
        match = [r for r in rows if r.get(f"axis_{x.name}") == show(xv)
                 and all(r.get(f"axis_{k}") == show(v) for k, v in series.items())]
        vals = [r[key] for r in match if r["status"] == Outcome.COMPLETED and r[key] is not None]
        if any(r["status"] != Outcome.COMPLETED for r in match):
            failed_x.append(x.pos(xv))
        if not vals:
            continue
        m = statistics.median(vals)
        xs.append(x.pos(xv))
        med.append(m * scale)
        lo.append((m - min(vals)) * scale)
        hi.append((max(vals) - m) * scale)
    if xs:
        ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", color=colour, capsize=3,
                    label=f"measured: {tag}")
    if failed_x:
        ax.plot(failed_x, [0] * len(failed_x), "x", color=colour, markersize=9,
                label=f"failed runs: {tag}")
    if curve is not None:
        pts = [(x.pos(v), y * scale) for v, y in zip(curve["x"], curve[key], strict=True)
               if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if x.numeric else "_",
                    color=colour, markersize=16, alpha=0.8, label=f"model: {tag}")


def _rounds_plot(rounds: dict, name: str, path: Path) -> None:
    """Live rounds by index, then both final rounds side by side in one last slot."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    m, p = rounds["measured"], rounds["predicted"]
    live_m, live_p = m[:-1], p[:-1]
    n = max(len(live_m), len(live_p))
    w = 0.4
    for values, live, shift, label, alpha in ((m, live_m, -w / 2, "measured", 1.0),
                                              (p, live_p, w / 2, "model", 0.7)):
        if values:
            xs = [i + shift for i in range(len(live))] + [n + shift]
            ax.bar(xs, [*live, values[-1]], width=w, label=label, alpha=alpha)
    ax.set_xticks(range(n + 1), [*(str(i) for i in range(n)), "final"])
    values = [v for v in m + p if v > 0]
    if values and max(values) > 20 * min(values):      # rounds shrinking by decades
        ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel(f"live round, then the {Phase.STOP_AND_COPY}")
    ax.set_ylabel("pages sent")
    ax.set_title(f"{name}: pages per round, point {rounds['point']} ({rounds['axes']})",
                 fontsize=9)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
