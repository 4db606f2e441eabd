"""Fleet statistics of many migrations (a drain, a maintenance, a sweep): what operators
tune by. Downtime (the hypervisor's blackout, `downtime_seconds`) as a distribution (p50,
p95, p99, max, as Google reports its fleet's), the total time per migration, the wait in the
queue, the bytes, and the whole run's span; brownout when the program workloads' application
block is in the reports (`brownout_of`, the hook). As a summary, JSON, a plot (downtime
distribution, migrations over time) and Prometheus text (the node exporter's textfile
format, or any scrape).
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nodes.units import format_bytes

QUANTILES = (0.5, 0.95, 0.99)


def brownout_of(report: dict) -> float | None:
    """The guest's brownout in one migration's report: the application block's (the program
    workloads put it there), None when the guest ran no program."""
    app = report.get("application") if isinstance(report, dict) else None
    if not isinstance(app, dict):
        return None
    value = app.get("brownout_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def distribution(values: Iterable[float | None]) -> dict | None:
    """p50 / p95 / p99 / max / mean / count of the values that are known (None: none)."""
    xs = np.array([v for v in values if v is not None], dtype=float)
    if xs.size == 0:
        return None
    out = {f"p{int(q * 100)}": float(np.quantile(xs, q)) for q in QUANTILES}
    out.update(max=float(xs.max()), mean=float(xs.mean()), count=int(xs.size))
    return out


def fleet_stats(moves: Sequence[dict], span_seconds: float | None = None) -> dict:
    """The statistics of `moves` (each a dict with status, downtime_seconds,
    total_time_seconds, bytes_sent, schedule and, if known, brownout_seconds)."""
    by_status: dict[str, int] = {}
    for m in moves:
        by_status[str(m.get("status"))] = by_status.get(str(m.get("status")), 0) + 1
    done = [m for m in moves if m.get("status") == "completed"]
    sched = [m["schedule"] for m in moves if m.get("schedule")]
    starts = [s["queued_at"] for s in sched]
    ends = [s["ended_at"] for s in sched if s.get("ended_at")]
    if span_seconds is None and starts and ends:
        span_seconds = max(ends) - min(starts)
    return {
        "migrations": len(moves), "by_status": by_status,
        "downtime_seconds": distribution(m.get("downtime_seconds") for m in done),
        "total_time_seconds": distribution(m.get("total_time_seconds") for m in done),
        "wait_seconds": distribution(s.get("wait_seconds") for s in sched),
        "bytes_sent": distribution(m.get("bytes_sent") for m in done),
        "bytes_sent_total": int(sum(m.get("bytes_sent") or 0 for m in done)),
        "brownout_seconds": distribution(m.get("brownout_seconds") for m in done),
        "span_seconds": span_seconds,
        "peak_parallel": peak_parallel(sched),
    }


def peak_parallel(entries: Sequence[dict]) -> int:
    """The most migrations running at one moment, from their start and end times."""
    events = sorted([(e["started_at"], 1) for e in entries if e.get("started_at")]
                    + [(e["ended_at"], -1) for e in entries
                       if e.get("started_at") and e.get("ended_at")],
                    key=lambda ev: (ev[0], ev[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def _ms(d: dict | None) -> str:
    if not d:
        return "-"
    return (f"p50 {d['p50'] * 1000:.1f} ms, p95 {d['p95'] * 1000:.1f} ms, "
            f"p99 {d['p99'] * 1000:.1f} ms, max {d['max'] * 1000:.1f} ms")


def _s(d: dict | None) -> str:
    if not d:
        return "-"
    return f"p50 {d['p50']:.2f} s, p95 {d['p95']:.2f} s, p99 {d['p99']:.2f} s, max " \
           f"{d['max']:.2f} s"


def summary_lines(stats: dict) -> list[str]:
    """The fleet summary, a few lines for a human."""
    st = ", ".join(f"{n} {k}" for k, n in sorted(stats["by_status"].items()))
    span = stats.get("span_seconds")
    lines = [f"fleet: {stats['migrations']} migrations ({st or 'none'})"
             + (f" in {span:.2f} s" if span is not None else "")
             + f", at most {stats['peak_parallel']} at once",
             f"  downtime   {_ms(stats['downtime_seconds'])}",
             f"  total time {_s(stats['total_time_seconds'])}",
             f"  queue wait {_s(stats['wait_seconds'])}",
             f"  bytes      {format_bytes(stats['bytes_sent_total'])} in all"]
    if stats.get("brownout_seconds"):
        lines.append(f"  brownout   {_s(stats['brownout_seconds'])}")
    return lines


def prometheus_text(stats: dict, run: str = "drain") -> str:
    """The statistics as Prometheus metrics (textfile format), labelled by `run`."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    reg = CollectorRegistry()
    for key in ("downtime_seconds", "total_time_seconds", "wait_seconds", "bytes_sent",
                "brownout_seconds"):
        d = stats.get(key)
        if not d:
            continue
        g = Gauge(f"migbed_fleet_{key}", f"fleet {key.replace('_', ' ')} by quantile",
                  ["run", "quantile"], registry=reg)
        for q in QUANTILES:
            g.labels(run, str(q)).set(d[f"p{int(q * 100)}"])
        g.labels(run, "1").set(d["max"])
    count = Gauge("migbed_fleet_migrations", "migrations of the run by status",
                  ["run", "status"], registry=reg)
    for status, n in stats["by_status"].items():
        count.labels(run, status).set(n)
    Gauge("migbed_fleet_span_seconds", "the run's span, first queued to last ended",
          ["run"], registry=reg).labels(run).set(stats.get("span_seconds") or 0.0)
    return generate_latest(reg).decode()


def draw_fleet(moves: Sequence[dict], path: str | Path, title: str = "fleet") -> Path:
    """Two panels: the downtime distribution, and the migrations over time (each a bar from
    its start to its end, its wait in the queue paler before it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    downs = [m["downtime_seconds"] * 1000 for m in moves
             if m.get("status") == "completed" and m.get("downtime_seconds") is not None]
    if downs:
        ax1.hist(downs, bins=min(40, max(5, len(downs) // 2)), color="tab:blue")
        for q, style in zip(QUANTILES, (":", "--", "-"), strict=True):
            ax1.axvline(float(np.quantile(downs, q)), color="k", linestyle=style,
                        label=f"p{int(q * 100)}")
        ax1.legend()
    ax1.set_xlabel("downtime (ms)")
    ax1.set_ylabel("migrations")
    ax1.set_title("downtime distribution")
    sched = sorted((m["schedule"] for m in moves if m.get("schedule")
                    and m["schedule"].get("started_at")), key=lambda s: s["started_at"])
    if sched:
        t0 = min(s["queued_at"] for s in sched)
        for i, s in enumerate(sched):
            end = s.get("ended_at") or s["started_at"]
            ax2.barh(i, s["started_at"] - s["queued_at"], left=s["queued_at"] - t0,
                     color="0.85")
            ax2.barh(i, end - s["started_at"], left=s["started_at"] - t0, color="tab:green")
    ax2.set_xlabel("seconds since the first was queued")
    ax2.set_ylabel("migration (by start)")
    ax2.set_title("migrations over time (grey: waiting)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
