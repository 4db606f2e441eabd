"""What a sweep leaves in its folder: one JSON per run, `sweep.csv` of every run (failed
ones included, never dropped), `summary.json` and `summary.txt` (the agreement table and its
explanations), the scenario as TOML, and the plots."""

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cluster.sweep.agreement import AGREEMENT_TOLERANCE
from cluster.sweep.scenario import Scenario
from cluster.sweep.text import count, ms, point_text
from nodes.phase import Outcome

CSV_NAME = "sweep.csv"


@dataclass
class SweepResult:
    scenario: Scenario
    folder: Path
    rows: list[dict]
    agreement: list[dict]
    calibration: dict
    explanations: list[str]

    @property
    def failed_runs(self) -> int:
        return sum(1 for r in self.rows if r["status"] != Outcome.COMPLETED)

    def summary_text(self) -> str:
        return summary_text(self)


def summary_text(result: SweepResult) -> str:
    sc = result.scenario
    lines = [f"sweep {sc.name}: {len(result.rows)} runs over {sc.point_count} points, "
             f"{result.failed_runs} failed" + (f" ({sc.description})" if sc.description else ""),
             ""]
    for key, c in result.calibration.items():
        spread = c.get("spread_seconds")
        lines.append(f"downtime floor ({key}): {ms(c.get('floor_seconds'))}"
                     + (f", spread {ms(spread)}" if spread is not None else "")
                     + f" -> model T_resume {ms(c.get('resume_seconds'))}"
                     + (f"; a post-copy switch's {ms(c.get('switch_floor_seconds'))} -> "
                        f"{ms(c.get('switch_resume_seconds'))}"
                        if "switch_floor_seconds" in c else "")
                     + (f" ({c['error']})" if c.get("error") else ""))
    lines += ["", "agreement: measured / predicted (model at the measured throughput)",
              f"{'point':>5}  {'axes':<44} {'pages sent':>16} {'live rounds':>16} "
              f"{'downtime':>22}" + (f" {'faults':>16}" if _postcopy(result) else "")]
    for e in result.agreement:
        ps, rn, dt, fl = e["pages_sent"], e["rounds"], e["downtime"], e.get("faults")
        flag = "  <-- " + ",".join(e["flags"]) if e["flags"] else ""
        faults = (f" {count(fl['measured']):>6}/{count(fl['predicted']):<6}"
                  f"{_ratio(fl['ratio']):>4}" if fl and _postcopy(result) else "")
        lines.append(
            f"{e['point']:>5}  {point_text(e['axes'])[:44]:<44} "
            f"{count(ps['measured']):>6}/{count(ps['predicted']):<6}{_ratio(ps['ratio']):>4} "
            f"{count(rn['measured']):>6}/{count(rn['predicted']):<6}{_ratio(rn['ratio']):>4} "
            f"{_msn(dt['measured']):>8}/{_msn(dt['predicted']):<8}{_ratio(dt['ratio']):>5}"
            f"{faults}{flag}")
    flagged = sum(1 for e in result.agreement if e["flags"])
    lines += ["", f"{flagged} of {len(result.agreement)} points differ by more than "
              f"{AGREEMENT_TOLERANCE:.0%} somewhere" + (":" if result.explanations else "")]
    lines += [f"- {n}" for n in result.explanations]
    lines += cost_lines(result.rows)
    return "\n".join(lines)


def cost_lines(rows: list[dict]) -> list[str]:
    """Total time, downtime and the guest's slowdown side by side, run by run: what an
    operator trades against each other when choosing an aid."""
    lines = ["", "the guest's cost: total time, downtime, slowdown (1 - write rate during / "
             "before), highest throttle",
             f"{'point':>5}  {'axes':<44} {'status':<10} {'stop':<18} {'total':>9} "
             f"{'downtime':>9} {'slowdown':>8} {'throttle':>8}"]
    for r in rows:
        axes = {k[5:]: v for k, v in r.items() if k.startswith("axis_")}
        slow = r.get("guest_slowdown")
        lines.append(
            f"{r['point']:>5}  {point_text(axes)[:44]:<44} {r['status']:<10} "
            f"{str(r.get('stop_code') or '-'):<18} {_msn(r.get('total_time_seconds')):>9} "
            f"{_msn(r.get('downtime_seconds')):>9} "
            f"{'-' if slow is None else f'{slow * 100:.0f} %':>8} "
            f"{r.get('cpu_throttle_percentage_max') or 0:>6} %")
    return lines


def _postcopy(result: SweepResult) -> bool:
    """Whether any run of the sweep switched to post-copy (its table then shows faults)."""
    return any(r.get("switched_to_postcopy") for r in result.rows)


def _msn(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}ms"


def _ratio(v) -> str:
    return "  -" if v is None else f" {v:.2f}"


def json_default(o: object) -> None:
    """Non-finite floats as null; anything else JSON cannot hold is an error."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


def write_run(folder: Path, index: int, repeat: int, doc: dict) -> str:
    """One run's JSON (its scenario, point, report and model block); returns its path
    within the folder, for the CSV's `json` column."""
    run_file = folder / "runs" / f"point{index:03d}-repeat{repeat}.json"
    run_file.write_text(json.dumps(doc, indent=2, default=json_default))
    return str(run_file.relative_to(folder))


def write_outputs(result: SweepResult) -> None:
    """Everything but the run files and the plots, once every run is done."""
    folder = result.folder
    columns: list[str] = []
    for row in result.rows:
        columns += [k for k in row if k not in columns]
    with open(folder / CSV_NAME, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in result.rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    summary = {"scenario": result.scenario.to_dict(), "calibration": result.calibration,
               "agreement": result.agreement, "explanations": result.explanations,
               "runs": len(result.rows), "failed_runs": result.failed_runs}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    (folder / "summary.txt").write_text(summary_text(result) + "\n")
    (folder / "scenario.toml").write_text(result.scenario.to_toml())


def write_plots(result: SweepResult, curves: list[dict]) -> None:
    """The plots, with the model's `curves` (`curves.model_curves`, which reads a
    `SweepResult` and so is computed by the caller, not imported here)."""
    from cluster.sweep.plots import draw_all
    draw_all(result.scenario, result.rows, curves, _rounds_for_plot(result), result.folder)


def _rounds_for_plot(result: SweepResult) -> dict | None:
    """Measured and predicted pages per round of the scenario's chosen point (first run
    that completed)."""
    i = result.scenario.rounds_point
    for row in result.rows:
        if row["point"] == i and row["status"] == Outcome.COMPLETED:
            doc = json.loads((result.folder / row["json"]).read_text())
            pred = ((doc.get("model") or {}).get("prediction") or {}).get("rounds", [])
            return {"point": i, "axes": point_text(result.scenario.points()[i]),
                    "measured": [r["pages_sent"] for r in doc["report"]["rounds"]],
                    "predicted": [r["pages_sent"] for r in pred]}
    return None
