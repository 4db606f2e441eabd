"""What `migbed wss` and `migbed dirtyrate` print and draw: the writable working set's curve
as a rich table and a log-log plot (matplotlib's Agg backend), and a dirty-rate series
(`--repeat N`) with its mean, spread and the guest's true rate beside each window."""

import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from rich.table import Table  # noqa: E402

from nodes.units import format_bytes  # noqa: E402
from workloads.writableset import WssCurve  # noqa: E402


def wss_table(curve: WssCurve) -> Table:
    """One row a window: distinct pages dirtied (mean, max), as bytes, the fit's value."""
    t = Table(title=f"writable working set of {curve.guest} ({curve.vcpu} vCPU, "
                    f"{curve.dirty_log} dirty log, {curve.duration_seconds:.2f} s at "
                    f"{curve.tick_seconds * 1000:.1f} ms ticks)")
    for name in ("window", "pages (mean)", "pages (max)", "bytes", "fit"):
        t.add_column(name, justify="right")
    for w, p, m in zip(curve.windows_seconds, curve.pages, curve.pages_max, strict=True):
        t.add_row(f"{w * 1000:.0f} ms" if w < 1 else f"{w:.2f} s", f"{p:.0f}", f"{m:.0f}",
                  format_bytes(p * curve.page_size), f"{curve.distinct(w):.0f}")
    return t


def wss_summary(curve: WssCurve) -> str:
    fit = ", ".join(f"{r.pages:.0f} pages at {r.rate_pages_per_second:.0f} writes/s"
                    + (" (sweeps)" if r.sequential else "") for r in curve.regions)
    writes = (f"; the guest's own counters: {curve.writes_per_second:.0f} writes/s"
              if curve.writes_per_second is not None else "")
    if curve.ops_per_second is not None:
        writes += f"; the program's operations: {curve.ops_per_second:.0f} ops/s"
    if curve.zero_fraction is not None:
        writes += f"; {curve.zero_fraction * 100:.0f} % of its data pages zero"

    return (f"WWS {curve.wws_pages:.0f} pages ({format_bytes(curve.wws_pages * curve.page_size)}"
            f") of {curve.data_pages} data pages; fit: {fit}{writes}")


def draw_wss(curves: list[WssCurve], path: str) -> None:
    """Pages dirtied against the window, log-log, each curve beside its fit."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        line, = ax.plot(c.windows_seconds, c.pages, "o-", label=f"{c.guest} (measured)")
        if c.regions:
            import numpy as np
            grid = np.geomspace(c.windows_seconds[0], c.windows_seconds[-1], 60)
            ax.plot(grid, [c.distinct(float(x)) for x in grid], "--", color=line.get_color(),
                    label=f"{c.guest} fit, WWS {c.wws_pages:.0f} pages")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("window (s)")
    ax.set_ylabel("distinct pages dirtied")
    ax.set_title("writable working set (Clark et al.)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dirtyrate_table(runs: list[dict]) -> Table:
    """One row a window: the estimate, the guest's true rate over it, the bias."""
    mode = runs[0]["mode"]
    truth_key = "true_writes_per_second" if mode == "dirty-ring" else "true_pages_per_second"
    t = Table(title=f"dirty rate of {runs[0]['guest']} by {mode} "
                    f"({runs[0]['vcpu']} vCPU, {runs[0]['window_seconds']:.2f} s windows)")
    for name in ("#", "MB/s", "pages/s", "true (counters)", "bias"):
        t.add_column(name, justify="right")
    for i, r in enumerate(runs):
        true = r[truth_key]
        t.add_row(str(i + 1), f"{r['bytes_per_second'] / 1e6:.2f}",
                  f"{r['pages_per_second']:.0f}", "-" if true is None else f"{true:.0f}",
                  _bias(r, truth_key))
        if r.get("vcpu_pages_per_second") and len(r["vcpu_pages_per_second"]) > 1:
            t.add_row("", "", " + ".join(f"{v:.0f}" for v in r["vcpu_pages_per_second"]),
                      "(per vCPU)", "")
    if len(runs) > 1:
        s = series_stats(runs)
        true, bias = s["mean_true_pages_per_second"], s["bias"]
        t.add_row("mean", f"{s['mean_bytes_per_second'] / 1e6:.2f}",
                  f"{s['mean_pages_per_second']:.0f} ± {s['stdev_pages_per_second']:.0f}",
                  "-" if true is None else f"{true:.0f}",
                  "-" if bias is None else f"{bias * 100:+.1f} %")
    return t


def _bias(run: dict, truth_key: str) -> str:
    true = run[truth_key]
    return f"{(run['pages_per_second'] / true - 1) * 100:+.1f} %" if true else "-"


def series_stats(runs: list[dict]) -> dict:
    """Mean and spread of a series of windows, and its bias against the true rate."""
    truth_key = ("true_writes_per_second" if runs[0]["mode"] == "dirty-ring"
                 else "true_pages_per_second")
    est = [r["pages_per_second"] for r in runs]
    true = [r[truth_key] for r in runs]
    mean = statistics.fmean(est)
    # A program guest has no per-page counters: no truth, no bias.
    mean_true = None if None in true else statistics.fmean(true)
    return {"mode": runs[0]["mode"], "window_count": len(runs),
            "mean_pages_per_second": mean,
            "median_pages_per_second": statistics.median(est),
            "mean_bytes_per_second": mean * runs[0]["page_size"],
            "stdev_pages_per_second": statistics.stdev(est) if len(est) > 1 else 0.0,
            "mean_true_pages_per_second": mean_true, "truth": truth_key,
            "bias": mean / mean_true - 1 if mean_true else None}


def advice_table(ranked: list) -> Table:
    """The advisor's candidates, best first (`cluster.advisor.Advice`)."""
    t = Table(title="advice: ranked by meeting the limits, bytes sent, total time")
    for name in ("#", "algorithm", "converges", "meets limits", "total", "downtime", "bytes",
                 "guest slowdown", "why not"):
        t.add_column(name, justify="left" if name in ("algorithm", "why not") else "right")
    for i, a in enumerate(ranked):
        t.add_row(str(i + 1), a.name, "yes" if a.converges else "no",
                  "yes" if a.meets_limits else "no", f"{a.total_time_seconds:.2f} s",
                  f"{a.downtime_seconds * 1000:.0f} ms", format_bytes(a.bytes_sent),
                  f"{a.slowdown * 100:.0f} %", a.why)
    return t
