"""What a trace says about its program: the dirty rate over time, the writable working set
curve, and the content figures (`migbed trace info`, and the replay's fidelity check).

Why here, beside the format: the same figures are computed on a recording and on a replay's
kernel log, so both sides must use one definition. The writable working set curve is
`workloads.writableset`'s, the project's one (Clark et al.'s: for a window of w seconds, the
mean number of distinct pages written in every window of that length, sliding by whole
intervals, with its two-region fit), as `migbed wss` measures it and `model --wss` reads it.
The fidelity check's pages per interval (`distinct_per_window`) are by the clock.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from workloads.tracefile import Trace
from workloads.writableset import WssCurve, curve_from_ticks

# The content figures: the trace's sampled pages, as zero-page detection, compression and
# XBZRLE see them.


@dataclass(frozen=True)
class ContentFigures:
    sampled_pages: int
    zero_fraction: float                 # sampled pages that were all zero
    compression_ratio: float             # page bytes / zstd-compressed bytes, non-zero pages
    xbzrle_samples: int                  # samples with an earlier sample of the same page
    xbzrle_delta_bytes: float            # mean XBZRLE encoding of the change, those samples
    xbzrle_overflow_fraction: float      # of those, changes too big to encode (sent whole)

    def to_dict(self) -> dict:
        return asdict(self)


def content_figures(trace: Trace) -> ContentFigures:
    s, page = trace.samples, trace.page_size
    if not len(s):
        return ContentFigures(0, 0.0, 1.0, 0, 0.0, 0.0)
    zero = s["zero"].astype(bool)
    nz = s[~zero]
    ratio = (len(nz) * page / max(int(nz["compressed_bytes"].sum()), 1)) if len(nz) else 1.0
    d = s["delta_bytes"][s["delta_bytes"] >= 0].astype(np.int64)
    over = int((d > page).sum())
    return ContentFigures(len(s), float(zero.mean()), float(ratio), len(d),
                          float(np.minimum(d, page).mean()) if len(d) else 0.0,
                          over / len(d) if len(d) else 0.0)


def rate_series(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(interval end times in seconds, pages written per second in each interval)."""
    t = trace.times_seconds
    widths = np.diff(t, prepend=0.0)
    widths[widths <= 0] = trace.interval_seconds
    return t, trace.counts / widths


def rate_by_bins(trace: Trace, bins: int = 20) -> tuple[float, list[float]]:
    """(bin seconds, page writes per second in each) over `bins` equal spans of the trace:
    the dirty rate over time in a line of text."""
    span = max(trace.duration_seconds, trace.interval_seconds)
    width = span / bins
    at = np.clip((trace.times_seconds / width - 1e-9).astype(np.int64), 0, bins - 1)
    writes = np.bincount(at, weights=trace.counts.astype(np.float64), minlength=bins)
    return width, (writes / width).tolist()


def window_seconds(trace: Trace) -> list[float]:
    """The WSS curve's windows: the interval, doubled, up to the trace's length."""
    n = max(int(math.log2(max(trace.duration_seconds / trace.interval_seconds, 1))) + 1, 1)
    return [trace.interval_seconds * (1 << k) for k in range(n)]


def distinct_per_window(trace: Trace, window: float) -> np.ndarray:
    """Distinct pages written in each window [k w, (k+1) w) of the trace's time, an interval
    counted in the window its end falls in (so a recorder or a replay that scanned late is
    judged by the clock, not by its scan count)."""
    n_bins = max(int(math.ceil(trace.duration_seconds / window - 1e-9)), 1)
    bins = np.minimum((trace.times_seconds / window - 1e-9).astype(np.int64), n_bins - 1)
    bins = np.maximum(bins, 0)
    keys = np.repeat(bins, trace.counts) * (int(trace.header["region_pages"]) + 1) + trace.pages
    per_bin = sorted_unique(keys) // (int(trace.header["region_pages"]) + 1)
    return np.bincount(per_bin, minlength=n_bins)[:n_bins]


def wss_curve(trace: Trace, windows: list[float] | None = None) -> list[tuple[float, float]]:
    """[(window seconds, mean distinct pages written in such a window)]: the writable
    working set of `workloads.writableset`, the one curve `migbed wss` and `advise` use
    (sliding windows of whole intervals by the clock), at `windows` (default: the interval,
    doubled, up to the trace's length)."""
    windows = window_seconds(trace) if windows is None else windows
    curve = wss_of_trace(trace, windows)
    return list(zip(curve.windows_seconds, curve.pages, strict=True))


def ticks_by_clock(trace: Trace) -> list[np.ndarray]:
    """The trace as ticks of one interval each, by the clock (an interval's pages in the tick
    its end falls in; two late scans in one tick are merged), its pages compacted: what
    `workloads.writableset.curve_from_ticks` reads."""
    w = trace.interval_seconds
    n_bins = max(int(math.ceil(trace.duration_seconds / w - 1e-9)), 1)
    bins = np.clip((trace.times_seconds / w - 1e-9).astype(np.int64), 0, n_bins - 1)
    compacted = np.searchsorted(sorted_unique(trace.pages), trace.pages)
    per_page_bin = np.repeat(bins, trace.counts)
    order = np.argsort(per_page_bin, kind="stable")
    cuts = np.searchsorted(per_page_bin[order], np.arange(n_bins + 1))
    return [sorted_unique(compacted[order[cuts[b]:cuts[b + 1]]]) for b in range(n_bins)]


def wss_of_trace(trace: Trace, windows: list[float] | None = None) -> "WssCurve":
    """The trace's writable working set in the curve format `migbed wss` writes and
    `migbed model --wss` reads (sliding windows of whole ticks, with its two-region fit)."""
    pages = max(distinct_pages(trace), 1)
    given = {} if windows is None else {"windows_seconds": windows}
    return curve_from_ticks(ticks_by_clock(trace), trace.interval_seconds, data_pages=pages,
                            guest_pages=pages, page_size=trace.page_size,
                            guest=f"trace of {trace.header['program']}", dirty_log="kernel",
                            **given)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by a sort (numpy's hash-based unique is many times slower on millions)."""
    v = np.sort(values)
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


def distinct_pages(trace: Trace) -> int:
    return len(sorted_unique(trace.pages))


def summary(trace: Trace) -> dict:
    """Everything `trace info` prints, as plain values."""
    h = trace.header
    t, rate = rate_series(trace)
    return {
        "program": h["program"], "argv": h["argv"], "machine": h["machine"],
        "recorded_at": h["recorded_at"], "ended": h["ended"], "children": h["children"],
        "interval_seconds": trace.interval_seconds,
        "duration_seconds": trace.duration_seconds, "intervals": len(trace.counts),
        "page_size": trace.page_size, "page_writes": int(trace.counts.sum()),
        "pages_touched": distinct_pages(trace),
        "dirty_rate_pages_per_second": {
            "mean": float(trace.counts.sum() / max(trace.duration_seconds, 1e-9)),
            "peak": float(rate.max()) if len(rate) else 0.0},
        "dirty_rate_over_time": dict(zip(("bin_seconds", "pages_per_second"),
                                         rate_by_bins(trace), strict=True)),
        "wss_curve": [{"window_seconds": w, "pages": p} for w, p in wss_curve(trace)],
        "content": content_figures(trace).to_dict(),
    }
