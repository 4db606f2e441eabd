"""Blackout and brownout: the project's one definition (issue 23; the fleet uses it too).

- Operations are counted in 10 ms bins (`workloads.applog.BIN_NS`).
- The baseline is the median bin of the `BASELINE_SECONDS` (2 s) before the migration starts.
- Brownout is the time in bins below `BROWNOUT_FRACTION` (90 %) of the baseline, from the
  start until `AFTER_SECONDS` (5 s) after the end; its depth is how far below the baseline
  those bins were on average (1 - their mean / baseline; 1: nothing completed), and the
  worst bin's.
- Blackout is the longest gap between two completed operations in that same span (the
  span's edges bound it too: a guest that completes nothing in it blacks out all of it).

`downtime_seconds` stays the hypervisor's pause-to-resume; these are what the application
felt, computed from its own log (`workloads.applog`). Everything here is pure arithmetic on
arrays, so tests give it synthetic series.
"""

import numpy as np

from workloads.applog import BIN_NS, BUCKETS, WINDOW_NS, bucket_seconds

BASELINE_SECONDS = 2.0
AFTER_SECONDS = 5.0
BROWNOUT_FRACTION = 0.9
BIN_SECONDS = BIN_NS / 1e9


def bin_counts(bin_index: np.ndarray, ops: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Ops per bin for bins lo..hi-1 (bins absent from the log count 0; one index given
    twice, by two vCPUs, adds)."""
    out = np.zeros(max(hi - lo, 0), np.int64)
    keep = (bin_index >= lo) & (bin_index < hi)
    np.add.at(out, bin_index[keep] - lo, ops[keep])
    return out


def brownout(bin_index: np.ndarray, ops: np.ndarray, start_wall: float, end_wall: float,
             after_seconds: float = AFTER_SECONDS) -> dict:
    """The brownout of a migration from `start_wall` to `end_wall` (module docstring)."""
    b0 = int(start_wall * 1e9) // BIN_NS
    nb = round(BASELINE_SECONDS / BIN_SECONDS)
    b1 = int((end_wall + after_seconds) * 1e9) // BIN_NS + 1
    before = bin_counts(bin_index, ops, b0 - nb, b0)
    span = bin_counts(bin_index, ops, b0, b1)
    base = float(np.median(before)) if len(before) else 0.0
    out = {"baseline_ops_per_bin": base, "bin_seconds": BIN_SECONDS,
           "brownout_seconds": None, "brownout_depth": None, "brownout_worst": None}
    if base <= 0:
        return out                    # nothing ran before: no baseline to fall below
    low = span < BROWNOUT_FRACTION * base
    out["brownout_seconds"] = float(low.sum()) * BIN_SECONDS
    if low.any():
        out["brownout_depth"] = 1.0 - float(span[low].mean()) / base
        out["brownout_worst"] = 1.0 - float(span[low].min()) / base
    else:
        out["brownout_depth"] = out["brownout_worst"] = 0.0
    return out


def blackout(intervals: list[np.ndarray], lo_wall: float, hi_wall: float) -> float:
    """The longest gap between two completed operations in [lo_wall, hi_wall].

    `intervals`: one (k, 3) float array per vCPU of (first completion, last completion,
    longest gap inside) per bin, walls in seconds. With one vCPU the gaps inside a bin
    count; with several, a gap inside one vCPU's bin may be covered by another's, so only
    the gaps between the union of their busy stretches count."""
    rows = [r for r in intervals if len(r)]
    if not rows:
        return max(0.0, hi_wall - lo_wall)
    iv = np.concatenate(rows)
    iv = iv[(iv[:, 1] >= lo_wall) & (iv[:, 0] <= hi_wall)]
    if not len(iv):
        return max(0.0, hi_wall - lo_wall)
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    reach = np.maximum.accumulate(iv[:, 1])
    gaps = iv[1:, 0] - reach[:-1]
    edges = [max(0.0, float(iv[0, 0]) - lo_wall), max(0.0, hi_wall - float(reach[-1]))]
    inner = [float(iv[:, 2].max())] if len(rows) == 1 else []
    return float(max([*edges, *inner, float(gaps.max()) if len(gaps) else 0.0]))


def percentile(hist: np.ndarray, q: float) -> float | None:
    """The `q` quantile (0..1) of a latency histogram (`workloads.applog` buckets), seconds."""
    hist = np.asarray(hist, np.int64)
    total = int(hist.sum())
    if total == 0:
        return None
    k = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return float(bucket_seconds(min(k, BUCKETS - 1)))


def phase_figures(windows: np.ndarray, hist: np.ndarray, lo_wall: float,
                  hi_wall: float) -> dict:
    """Ops per second and latency p50 / p99 over the windows inside [lo_wall, hi_wall)."""
    wlo, whi = int(lo_wall * 1e9) // WINDOW_NS, int(hi_wall * 1e9) // WINDOW_NS
    keep = (windows[:, 0] >= wlo) & (windows[:, 0] < whi) if len(windows) else np.zeros(0, bool)
    span = (whi - wlo) * WINDOW_NS / 1e9
    ops = int(windows[keep, 1].sum()) if len(windows) else 0
    h = hist[keep].sum(axis=0) if keep.any() else np.zeros(BUCKETS, np.int64)
    return {"seconds": span, "ops": ops,
            "ops_per_second": ops / span if span > 0 else None,
            "latency_p50_seconds": percentile(h, 0.5),
            "latency_p99_seconds": percentile(h, 0.99)}
