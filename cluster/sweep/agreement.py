"""How far measurement and model agree at each point of a sweep, and why they differ where
they differ by more than `AGREEMENT_TOLERANCE`: each explanation is one the runs themselves
support, from investigations of disagreements seen in the ready scenarios (README,
"Benchmarks, sweeps and the analytic model")."""

import statistics
from dataclasses import dataclass

from cluster.sweep.scenario import Scenario
from cluster.sweep.text import count, ms, point_text, show
from nodes.errors import ConfigError
from nodes.migration.decide.policy import StopCode
from nodes.phase import Outcome

AGREEMENT_TOLERANCE = 0.2       # measured/predicted outside 1 +- this is flagged
JITTER_FLOOR_SECONDS = 0.001     # downtimes closer than this are equal (the vCPU ticks at 1 ms)
_CAPS = {c.value for c in StopCode    # max-iterations, max-factor (a switch is not a cap)
         if not c.converged and c is not StopCode.POSTCOPY}
METRICS = (("pages_sent", "pages_sent_total", "predicted_pages_sent_total"),
           ("rounds", "live_rounds", "predicted_live_rounds"),
           ("downtime", "downtime_seconds", "predicted_downtime_seconds"),
           ("faults", "postcopy_requests", "predicted_expected_faults"))   # post-copy only


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def agreement_table(scenario: Scenario, rows: list[dict]) -> list[dict]:
    """Per point: medians of measured and predicted (model at the measured throughput) and
    their ratio, for pages sent, live rounds and downtime; `flags` names the metrics off by
    more than AGREEMENT_TOLERANCE."""
    out = []
    for i, point in enumerate(scenario.points()):
        runs = [r for r in rows if r["point"] == i]
        done = [r for r in runs if r["status"] == Outcome.COMPLETED]
        entry = {"point": i, "axes": {k: show(v) for k, v in point.items()},
                 "runs": len(runs), "completed": len(done), "flags": []}
        for metric, mkey, pkey in METRICS:
            m = median([r[mkey] for r in done])
            p = median([r[pkey] for r in done])
            ratio = m / p if m is not None and p else (1.0 if m == p == 0 else None)
            entry[metric] = {"measured": m, "predicted": p, "ratio": ratio}
            if ratio is None and m is not None and p == 0 and m > 0:
                entry["flags"].append(metric)
            elif ratio is not None and abs(ratio - 1) > AGREEMENT_TOLERANCE:
                entry["flags"].append(metric)
        out.append(entry)
    return out


def explain(scenario: Scenario, rows: list[dict], agreement: list[dict],
            calibration: dict) -> list[str]:
    """Why each flagged point differs, from what the runs themselves show."""
    notes = []
    for entry in agreement:
        if entry["completed"] < entry["runs"]:
            errs = {r["error"] for r in rows if r["point"] == entry["point"]
                    and r["status"] != Outcome.COMPLETED}
            notes.append(f"point {entry['point']}: {entry['runs'] - entry['completed']} of "
                         f"{entry['runs']} runs failed ({'; '.join(sorted(map(str, errs)))})")
        if not entry["flags"]:
            continue
        runs = [r for r in rows
                if r["point"] == entry["point"] and r["status"] == Outcome.COMPLETED]
        evidence = _Evidence.of(entry, runs, scenario, calibration)
        for metric in entry["flags"]:
            notes.append(f"point {entry['point']} ({point_text(entry['axes'])}) {metric} "
                         f"x{_ratio_text(entry[metric]['ratio'])}: {_why(metric, evidence)}")
    return notes


def _ratio_text(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


@dataclass(frozen=True)
class Stops:
    """How pre-copy ended in the runs of a point (or in the model): the reasons people read
    and the machine-readable stop codes (`nodes.migration.decide.policy.StopCode` values)."""

    reasons: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()

    @classmethod
    def of(cls, runs: list[dict], prefix: str = "") -> "Stops":
        return cls(tuple(sorted({r[f"{prefix}stop_reason"] for r in runs
                                 if r.get(f"{prefix}stop_reason")})),
                   tuple(sorted({r[f"{prefix}stop_code"] for r in runs
                                 if r.get(f"{prefix}stop_code")})))

    @property
    def on_cap(self) -> bool:
        """Whether pre-copy ended on a policy's cap (rounds or volume), not its threshold."""
        return any(c in _CAPS for c in self.codes)

    def text(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class _Evidence:
    """What the completed runs of one flagged point show, measured beside predicted."""

    entry: dict
    policy: str
    final_m: float | None
    final_p: float | None
    skipped_m: float | None
    skipped_p: float | None
    stops_m: Stops
    stops_p: Stops
    lam: float | None
    near: str                 # the model's last live round and final round, as text
    spread: float | None      # of the idle downtime floor
    dirty_limit_slept: float | None = None   # seconds dirty-limit slept the vCPU (median)
    encoded: str = ""         # how the runs' pages were encoded (XBZRLE, compression)
    unlimited_link: bool = False

    @classmethod
    def of(cls, entry: dict, runs: list[dict], scenario: Scenario,
           calibration: dict) -> "_Evidence":
        def med(key: str) -> float | None:
            return median([r[key] for r in runs])
        final_p, last_p = med("predicted_final_pages"), med("predicted_last_live_round_pages")
        near = (f" (the model's last live round moved {last_p:.0f} pages, its final round "
                f"{final_p:.0f})" if last_p is not None and final_p is not None else "")
        return cls(entry, runs[0]["policy"] if runs else scenario.migration.policy,
                   med("final_round_pages"), final_p, med("pages_skipped_total"),
                   med("predicted_pages_skipped_total"), Stops.of(runs),
                   Stops.of(runs, "predicted_"), med("predicted_lambda_ratio"), near,
                   median([c.get("spread_seconds") for c in calibration.values()]),
                   med("dirty_limit_throttle_seconds"), _encoded(runs),
                   bool(runs) and runs[0].get("link_bytes_per_second") is None)

    @property
    def rounds(self) -> tuple[float | None, float | None]:
        return self.entry["rounds"]["measured"], self.entry["rounds"]["predicted"]


def _encoded(runs: list[dict]) -> str:
    deltas = median([r.get("xbzrle_pages") for r in runs])
    ratio = median([r.get("compression_ratio") for r in runs])
    if deltas:
        return f"{deltas:.0f} pages went as XBZRLE deltas"
    if ratio and ratio > 1.05:
        return f"the channels compressed pages {ratio:.2f}x"
    return ""


def _why(metric: str, ev: _Evidence) -> str:
    """The first explanation the runs support."""
    rounds_m, rounds_p = ev.rounds
    if ev.dirty_limit_slept:
        return (f"dirty-limit slept the guest's vCPU {ev.dirty_limit_slept:.1f} s, and the "
                f"model does not follow dirty-limit: it predicts the unthrottled guest "
                f"({count(rounds_m)} live rounds measured vs {count(rounds_p)} predicted)")
    if ev.encoded and metric in ("rounds", "downtime") and rounds_m != rounds_p:
        return (f"{ev.encoded}: the model counts every page at the run's mean bytes per page, "
                f"where the encoding differs pass by pass (the first pass goes whole, later "
                f"ones as deltas or compressed by what they hold), so the rounds cost "
                f"otherwise than the mean says; {count(rounds_m)} live rounds measured vs "
                f"{count(rounds_p)} predicted, the runs stopped on '{ev.stops_m.text()}', "
                f"the model on '{ev.stops_p.text()}'")
    if (_skips(ev.policy) and ev.skipped_p is not None and ev.skipped_m is not None
            and ev.skipped_p > 1.1 * ev.skipped_m + 20):
        return _model_skips_too_much(ev)
    if metric == "downtime":
        return _downtime(ev)
    if metric == "faults":
        return _faults(ev)
    if metric == "rounds" or rounds_m != rounds_p:
        return (f"{count(rounds_m)} live rounds measured vs {count(rounds_p)} predicted"
                + _stop_reason(ev.stops_m, ev.stops_p, ev.policy, rounds_m, rounds_p, ev.lam,
                               ev.near))
    return ("the same number of rounds sent different volumes: the pages dirtied per round "
            "differ from the expected distinct pages (round_pages_sent_ratios in the run "
            "JSON show which round)")


def _faults(ev: _Evidence) -> str:
    m, p = ev.entry["faults"]["measured"], ev.entry["faults"]["predicted"]
    return (f"{count(m)} page requests measured vs {count(p)} faults predicted: the model "
            "pushes in pfn order at the expected request rate, while the push jumps after "
            "each request and the vCPU touches pages in batches, so a sweep running about as "
            "fast as the push catches it at every push record, and a post-copy of a few tens "
            "of milliseconds turns on the first batches (the run JSON's fault_latency_seconds "
            "and blocktime_seconds show them)")


def _model_skips_too_much(ev: _Evidence) -> str:
    rounds_m, rounds_p = ev.rounds
    return (f"a bug in the model, not in migbed: the model lets the sender skip a page "
            f"re-dirtied at any moment before it reaches it ({ev.skipped_p:.0f} pages "
            f"skipped), while migbed, like Xen's xc_domain_save, PEEKs the dirty bitmap "
            f"once per 1024-page batch ({ev.skipped_m:.0f} skipped; a round shorter than "
            f"one batch skips nothing). So migbed sends more per round and reaches "
            f"{ev.policy}'s cap after {count(rounds_m)} live rounds, not {count(rounds_p)}, "
            f"with {count(ev.final_m)} pages left for the final round, not "
            f"{count(ev.final_p)}. A model that skips per batch reproduces these runs")


def _downtime(ev: _Evidence) -> str:
    rounds_m, rounds_p = ev.rounds
    m, p = ev.entry["downtime"]["measured"], ev.entry["downtime"]["predicted"]
    jitter = max(2 * (ev.spread or 0.0), JITTER_FLOOR_SECONDS)
    if m is not None and p is not None and abs(m - p) <= jitter:
        return (f"a real effect of small numbers: {ms(m)} measured vs {ms(p)} "
                f"predicted differ by less than the jitter of the fixed hand-over cost "
                f"({ms(jitter)}: twice the spread of the idle downtime floor, at least "
                f"the vCPU's 1 ms tick), which is most of either; the final round is "
                f"{count(ev.final_m)} pages measured, {count(ev.final_p)} predicted")
    if StopCode.POSTCOPY.value in ev.stops_m.codes:
        return (f"the post-copy switch took {ms(m)} where the model expects {ms(p)}: it "
                f"moves no page ({count(ev.final_m)} were left to push after it), so its "
                "pause, last sync and records ran slower than the idle floor measured (a "
                "loaded host)")
    if (ev.final_m is not None and ev.final_p
            and abs(ev.final_m / ev.final_p - 1) > AGREEMENT_TOLERANCE):
        return (f"the final round holds {count(ev.final_m)} pages measured vs "
                f"{count(ev.final_p)} predicted"
                + _stop_reason(ev.stops_m, ev.stops_p, ev.policy, rounds_m, rounds_p, ev.lam,
                               ev.near))
    if ev.unlimited_link:
        return (f"the stop-and-copy of {count(ev.final_m)} pages took {ms(m)} where the model "
                f"expects {ms(p)}: over an unlimited link the model knows no speed for it "
                "(the rate limit it lifts is the only one it has), while migbed sends and "
                "hashes them at the machine's own speed")
    return (f"the stop-and-copy of {count(ev.final_m)} pages took {ms(m)} where the model "
            f"expects {ms(p)}: the pause, final CLEAN and hand-over ran slower than "
            "the idle floor measured (a loaded host)")


def _skips(policy: str) -> bool:
    """Whether a policy skips pages re-dirtied during a round (xen-legacy does)."""
    from nodes.migration.decide.policy import make_policy
    try:
        return make_policy(policy).skip_redirtied
    except (ConfigError, TypeError):
        return False


def _stop_reason(stops_m: Stops, stops_p: Stops, policy: str, rounds_m, rounds_p,
                 lam: float | None, near: str = "") -> str:
    """What the way pre-copy stopped, in the runs and in the model, says of a difference."""
    if stops_m.codes and stops_p.codes and stops_m.codes != stops_p.codes \
            and not (stops_m.on_cap and stops_p.on_cap):
        return (f"; the runs stopped on '{stops_m.text()}', the model on "
                f"'{stops_p.text()}'")
    if lam is not None and lam >= 1 and (stops_m.on_cap or stops_p.on_cap):
        return (f"; lambda = {lam:.2f} >= 1: no convergence, both stop on {policy}'s cap, "
                "and how much is left then depends on how fast the dirty set saturates")
    if stops_m.reasons != stops_p.reasons:
        return (f"; the runs stopped on '{stops_m.text()}', the model on "
                f"'{stops_p.text()}'")
    if rounds_m is not None and rounds_p is not None and abs(rounds_m - rounds_p) <= 1:
        return (f"; both stop on '{stops_m.text()}', one round apart: near {policy}'s "
                f"threshold{near} the expected dirty count and the random one measured cross "
                "it in neighbouring rounds (a real effect the expected-value model leaves "
                "out)")
    return ""
