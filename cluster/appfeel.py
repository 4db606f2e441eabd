"""What a program guest's application felt through a migration: the report's `application`
block (`ApplicationBlock`), from the log the guest keeps in its own memory (`workloads.applog`)
and read from wherever it runs after the migration (`guest_application` of its host).

Why after: the log travels with the guest, so the destination's copy holds before, during and
after on the guest's own clock; the control plane waits until `AFTER_SECONDS` past the end
(the brownout's span, `workloads.brownout`) and reads it once. The walls are the control
plane's `time.time()` at the migration's start and end, on the hosts' clock (one machine, or
hosts whose clocks agree to well within a 10 ms bin).
"""

import time

import numpy as np

from cluster.reportparts import ApplicationBlock
from nodes.errors import MigbedError
from workloads.applog import BIN_NS, WINDOW_NS
from workloads.brownout import (
    AFTER_SECONDS,
    BASELINE_SECONDS,
    blackout,
    brownout,
    percentile,
    phase_figures,
)

SAMPLE_SECONDS = WINDOW_NS / 1e9


def merged(logs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vCPUs' logs as one: (bins (k, 2) of index and ops, windows (k, 4), hist (k, B)),
    rows of one index summed."""
    bins = np.concatenate([np.asarray(g["bins"])[:, :2] for g in logs]) if logs else \
        np.zeros((0, 2), np.int64)
    wins = np.concatenate([np.asarray(g["windows"]) for g in logs])
    hist = np.concatenate([np.asarray(g["hist"]) for g in logs])
    if len(logs) > 1 and len(wins):
        idx, inv = np.unique(wins[:, 0], return_inverse=True)
        w = np.zeros((len(idx), wins.shape[1]), np.int64)
        h = np.zeros((len(idx), hist.shape[1]), np.int64)
        np.add.at(w, inv, wins)
        np.add.at(h, inv, hist)
        w[:, 0] = idx
        w[:, 3] = 0                                  # the longest latency: not summed
        wins, hist = w, h
    return bins, wins, hist


def intervals(log: dict) -> np.ndarray:
    """A vCPU's bins as (first completion, last completion, longest gap inside), seconds."""
    b = np.asarray(log["bins"], np.int64)
    base = b[:, 0] * BIN_NS
    return np.stack([(base + b[:, 2]) / 1e9, (base + b[:, 3]) / 1e9, b[:, 4] / 1e9], axis=1)


def application_block(view: dict, start_wall: float, end_wall: float,
                      after_seconds: float = AFTER_SECONDS) -> ApplicationBlock:
    """The block from a guest's `guest_application` answer (`nodes.host.appview`) and the
    migration's start and end walls."""
    logs = view["logs"]
    bins, wins, hist = merged(logs)
    out = brownout(bins[:, 0], bins[:, 1], start_wall, end_wall, after_seconds)
    base = out["baseline_ops_per_bin"]
    block = ApplicationBlock(
        program=view["program"], vcpus=int(view["vcpus"]), start_wall=start_wall,
        end_wall=end_wall, after_seconds=after_seconds,
        baseline_ops_per_second=base / out["bin_seconds"] if base else None,
        before=phase_figures(wins, hist, start_wall - BASELINE_SECONDS, start_wall),
        during=phase_figures(wins, hist, start_wall, end_wall),
        after=phase_figures(wins, hist, end_wall, end_wall + after_seconds),
        brownout_seconds=out["brownout_seconds"], brownout_depth=out["brownout_depth"],
        brownout_worst=out["brownout_worst"],
        blackout_seconds=blackout([intervals(g) for g in logs], start_wall,
                                  end_wall + after_seconds),
        invariants_ok=bool(view["ok"]), invariants=list(view["checks"]),
        samples=samples(wins, hist, start_wall, end_wall + after_seconds))
    return block


def samples(wins: np.ndarray, hist: np.ndarray, start_wall: float, end_wall: float) -> list:
    """Every 100 ms window from `BASELINE_SECONDS` before the start to `end_wall`: its time
    from the start, ops per second and latency p50 / p99."""
    lo = int((start_wall - BASELINE_SECONDS) * 1e9) // WINDOW_NS
    hi = int(end_wall * 1e9) // WINDOW_NS + 1
    at = {int(w): i for i, w in enumerate(wins[:, 0])}
    out = []
    for w in range(lo, hi):
        i = at.get(w)
        ops = int(wins[i, 1]) if i is not None else 0
        out.append({"t_seconds": round(w * SAMPLE_SECONDS - start_wall, 4),
                    "ops_per_second": ops / SAMPLE_SECONDS,
                    "latency_p50_seconds": percentile(hist[i], 0.5) if i is not None else None,
                    "latency_p99_seconds": percentile(hist[i], 0.99) if i is not None else None})
    return out


def annotate_history(history: list[dict], block: ApplicationBlock,
                     pause_wall: float | None) -> None:
    """Put the application's ops per second and p99 beside each `progress_history` sample:
    the one of the 100 ms window its time falls in (its time on the wall clock by the pause
    sample, else by the migration's start)."""
    at_pause = next((s["t_seconds"] for s in history if s.get("event") == "pause"), None)
    t0 = pause_wall - at_pause if pause_wall and at_pause is not None else block.start_wall
    by_w = {round((s["t_seconds"] + block.start_wall) / SAMPLE_SECONDS): s
            for s in block.samples}
    for s in history:
        win = by_w.get(int((t0 + s["t_seconds"]) * 1e9) // WINDOW_NS)
        s["app_ops_per_second"] = win["ops_per_second"] if win else None
        s["app_latency_p99_seconds"] = win["latency_p99_seconds"] if win else None


def attach_application(report, host, start_wall: float, end_wall: float,
                       pause_wall: float | None, after_seconds: float = AFTER_SECONDS) -> None:
    """Wait until `after_seconds` past the end, read the guest's log where it runs and put
    the block in `report` (an error in the block rather than a failed migration)."""
    wait = end_wall + after_seconds - time.time()
    if wait > 0:
        time.sleep(wait)
    try:
        view = host.call("guest_application", report.guest)
    except MigbedError as exc:
        report.application = ApplicationBlock(start_wall=start_wall, end_wall=end_wall,
                                              error=str(exc))
        return
    a = report.application = application_block(view, start_wall, end_wall, after_seconds)
    annotate_history(report.progress_history, a, pause_wall)
    try:                                   # the host's Prometheus metrics show it too
        host.call("guest_application", report.guest, {
            "policy": report.policy, "brownout_seconds": a.brownout_seconds,
            "blackout_seconds": a.blackout_seconds})
    except MigbedError:
        pass


def application_lines(report) -> list[str]:
    """The report's lines for its application block (none without one)."""
    a = report.application
    if a is None:
        return []
    if a.error:
        return [f"  application: not read ({a.error})"]

    def phase(p: dict) -> str:
        rate = p.get("ops_per_second")
        p99 = p.get("latency_p99_seconds")
        return (f"{rate:,.0f} ops/s" if rate is not None else "-") + (
            f" p50 {_us(p.get('latency_p50_seconds'))} p99 {_us(p99)}")
    held = {True: "hold", False: "FAIL", None: "-"}[a.invariants_ok]
    return [
        f"  application ({a.program}): before {phase(a.before)}; during {phase(a.during)}; "
        f"after {phase(a.after)}",
        f"  brownout {_s(a.brownout_seconds)} (depth {_pct(a.brownout_depth)}, worst bin "
        f"{_pct(a.brownout_worst)}), blackout {_s(a.blackout_seconds)}; its invariants "
        f"{held}" + ("" if a.invariants_ok is not False else ": " + "; ".join(
            c["detail"] for c in a.invariants if not c["ok"]))]


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f} us"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"
