"""The writable working set (Clark et al., NSDI 2005): how many distinct pages a guest dirties
in a window, for windows from 10 ms to 10 s. One curve format, read by `migbed wss`, the
analytic model (`migbed model --wss`) and `migbed advise`.

Why a curve and not a rate: pre-copy's rounds shrink only while the pages dirtied during a
round are fewer than the round sent, and that count is the WWS at the round's length, not
rate x length (a hot page written a thousand times is sent once). Clark et al. measured it
from the shadow page tables' dirty log; migbed measures it from the guest's dirty log the
same way (`nodes.host.dirtymeter`): log-dirty CLEANed every tick, one set of pfns per tick,
folded here into the mean distinct pages over every window of k ticks.

The model needs a curve at any length, and regions (pages written at a rate) to lay pages
out: `fit_regions` fits the curve with two regions, a hot one and the cold rest, by a
coarse-to-fine grid search in numpy. A region is written at random (D(t) = P (1 - exp(-r t /
P)), a hash table's or a hot set's writes) or by sweeps (D(t) = min(r t, P), STREAM's arrays,
a merge writing its output in order): random writes revisit pages before they cover the
region, a sweep covers it at its full rate, so at a window near P / r the two differ by a
third and a sweeping program fitted as random is predicted to dirty too few pages a round.
The random shape is taken unless a sweep fits clearly better (`_SWEEP_BETTER`). The hot
one's size is the WWS a `hotset` guest was given.

Pure numpy and plain values: no threads, no I/O besides the JSON text a caller reads.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from nodes.errors import ConfigError

FORMAT = "migbed-wss/1"
# Clark et al.'s range, in the 1-2-5 steps a log plot reads.
DEFAULT_WINDOWS_SECONDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
MAX_POINTS = 64                 # what a curve file may hold (a decoder bounds every length)
MAX_TEXT_BYTES = 1 << 20
_HOT_OVER_COLD = 2.0            # per-page rate ratio above which the fit's first region is hot
_SWEEP_BETTER = 0.5             # a shape with sweeps must leave at most this share of the error


@dataclass(frozen=True)
class FittedRegion:
    """A stretch of `pages` pages written uniformly at `rate_pages_per_second` writes/s."""

    pages: float
    rate_pages_per_second: float
    sequential: bool = False        # written by sweeps, not at random

    def distinct(self, seconds: float | np.ndarray) -> float | np.ndarray:
        if self.pages <= 0 or self.rate_pages_per_second <= 0:
            return 0.0 * np.asarray(seconds)
        if self.sequential:
            return np.minimum(self.rate_pages_per_second * np.asarray(seconds), self.pages)
        return -self.pages * np.expm1(-self.rate_pages_per_second * np.asarray(seconds)
                                      / self.pages)


@dataclass(frozen=True)
class WssCurve:
    """Mean (and largest) distinct pages dirtied in a window of each length, measured."""

    windows_seconds: tuple[float, ...]
    pages: tuple[float, ...]               # mean distinct pages over every window that long
    pages_max: tuple[float, ...]
    data_pages: int                        # pages the guest's workload may write
    guest_pages: int
    page_size: int = 4096
    tick_seconds: float = 0.01
    duration_seconds: float = 0.0
    writes_per_second: float | None = None  # the workload's own counters, same span
    ops_per_second: float | None = None     # a program's operations (its journal), same span
    zero_fraction: float | None = None      # of a sample of data pages at the end, zero
    guest: str = ""
    vcpu: str = ""
    dirty_log: str = ""                    # "emulated" | "kernel"
    regions: tuple[FittedRegion, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n = len(self.windows_seconds)
        if not 1 <= n <= MAX_POINTS or len(self.pages) != n or len(self.pages_max) != n:
            raise ConfigError(f"a WSS curve needs 1..{MAX_POINTS} windows, each with its "
                              "pages and pages_max")
        w = np.asarray(self.windows_seconds, dtype=float)
        p = np.asarray(self.pages + self.pages_max, dtype=float)
        if not (np.all(np.isfinite(w)) and np.all(w > 0) and np.all(np.diff(w) > 0)):
            raise ConfigError("a WSS curve's windows must be finite, > 0 and increasing")
        if not (np.all(np.isfinite(p)) and np.all(p >= 0)):
            raise ConfigError("a WSS curve's page counts must be finite and >= 0")
        if not 0 < self.data_pages <= self.guest_pages or self.page_size < 64:
            raise ConfigError("a WSS curve needs 0 < data_pages <= guest_pages and a page size")

    # -- what the curve says ---------------------------------------------------------------
    def distinct(self, seconds: float) -> float:
        """Distinct pages dirtied in `seconds`: the fit where there is one, else the curve
        interpolated (log time), 0 at 0 and flat past its last window."""
        if seconds <= 0:
            return 0.0
        if self.regions:
            return float(sum(r.distinct(seconds) for r in self.regions))
        w = np.log(np.asarray(self.windows_seconds))
        return float(np.interp(math.log(seconds), w, self.pages, left=0.0)
                     if seconds >= self.windows_seconds[0]
                     else self.pages[0] * seconds / self.windows_seconds[0])

    @property
    def wws_pages(self) -> float:
        """The writable working set: the fit's hot region when one is much hotter per page
        than the rest, else the pages dirtied in the longest window."""
        if len(self.regions) == 2:
            hot, cold = self.regions
            per_hot = hot.rate_pages_per_second / max(hot.pages, 1e-9)
            per_cold = cold.rate_pages_per_second / max(cold.pages, 1e-9)
            if per_hot > _HOT_OVER_COLD * per_cold:
                return hot.pages
        return self.pages[-1]

    @property
    def rate_pages_per_second(self) -> float:
        """Page writes per second the fit implies (what a set rate would be)."""
        if self.regions:
            return float(sum(r.rate_pages_per_second for r in self.regions))
        return self.pages[0] / self.windows_seconds[0]

    # -- the file ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        d["wws_pages"] = self.wws_pages
        d["wws_bytes"] = self.wws_pages * self.page_size
        d["rate_pages_per_second"] = self.rate_pages_per_second
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "WssCurve":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"not a WSS curve (want \"format\": \"{FORMAT}\", as "
                              "`migbed wss --json` writes)")
        try:
            regions = tuple(FittedRegion(float(r["pages"]), float(r["rate_pages_per_second"]),
                                         bool(r.get("sequential", False)))
                            for r in (data.get("regions") or ())[:4])
            writes = data.get("writes_per_second")
            ops = data.get("ops_per_second")
            zero = data.get("zero_fraction")
            return cls(
                windows_seconds=_floats(data["windows_seconds"]), pages=_floats(data["pages"]),
                pages_max=_floats(data["pages_max"]), data_pages=int(data["data_pages"]),
                guest_pages=int(data["guest_pages"]), page_size=int(data["page_size"]),
                tick_seconds=float(data.get("tick_seconds", 0.01)),
                duration_seconds=float(data.get("duration_seconds", 0.0)),
                writes_per_second=None if writes is None else float(writes),
                ops_per_second=None if ops is None else float(ops),
                zero_fraction=None if zero is None else float(zero),
                guest=str(data.get("guest", ""))[:256], vcpu=str(data.get("vcpu", ""))[:32],
                dirty_log=str(data.get("dirty_log", ""))[:32], regions=regions)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad WSS curve: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "WssCurve":
        if len(text) > MAX_TEXT_BYTES:
            raise ConfigError(f"a WSS curve file is at most {MAX_TEXT_BYTES} bytes")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"a WSS curve file must be JSON: {exc}") from None
        return cls.from_dict(data)


def _floats(values: object) -> tuple[float, ...]:
    if not isinstance(values, list | tuple) or len(values) > MAX_POINTS:
        raise ValueError(f"want a list of at most {MAX_POINTS} numbers")
    return tuple(float(v) for v in values)


def window_counts(ticks: Sequence[np.ndarray], npages: int,
                  max_ticks: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max) distinct pages over every run of k consecutive ticks, k = 1..max_ticks.

    `ticks[t]` holds the pfns dirtied in tick t. One pass: each page's last tick; at tick t
    the pages with age < k are those of the window of k ticks ending at t."""
    last = np.full(npages, -1, dtype=np.int64)
    sums = np.zeros(max_ticks)
    counts = np.zeros(max_ticks)
    maxes = np.zeros(max_ticks)
    touched = np.zeros(0, dtype=np.int64)
    for t, pfns in enumerate(ticks):
        pfns = np.asarray(pfns, dtype=np.int64)
        new = pfns[last[pfns] < 0]
        last[pfns] = t
        if len(new):
            touched = np.concatenate([touched, np.unique(new)])
        ages = t - last[touched]
        within = np.cumsum(np.bincount(ages[ages < max_ticks], minlength=max_ticks))
        k = min(t + 1, max_ticks)              # windows that fit in the ticks so far
        sums[:k] += within[:k]
        counts[:k] += 1
        maxes[:k] = np.maximum(maxes[:k], within[:k])
    mean = np.divide(sums, counts, out=np.zeros(max_ticks), where=counts > 0)
    return mean, maxes


def curve_from_ticks(ticks: Sequence[np.ndarray], tick_seconds: float, *, data_pages: int,
                     guest_pages: int, page_size: int,
                     windows_seconds: Sequence[float] = DEFAULT_WINDOWS_SECONDS,
                     **about: object) -> WssCurve:
    """The curve of a run of ticks `tick_seconds` long each (the measured mean), at the
    windows that fit in it (a window shorter than a tick is left out), with its fit."""
    if not ticks or not tick_seconds > 0:
        raise ConfigError("a WSS curve needs at least one tick of a positive length")
    n = len(ticks)
    ks = sorted({max(1, round(w / tick_seconds)) for w in windows_seconds
                 if w >= tick_seconds * 0.5 and round(w / tick_seconds) <= n})
    mean, maxes = window_counts(ticks, guest_pages, ks[-1])
    curve = WssCurve(windows_seconds=tuple(k * tick_seconds for k in ks),
                     pages=tuple(float(mean[k - 1]) for k in ks),
                     pages_max=tuple(float(maxes[k - 1]) for k in ks),
                     data_pages=data_pages, guest_pages=guest_pages, page_size=page_size,
                     tick_seconds=tick_seconds, duration_seconds=n * tick_seconds,
                     **about)  # type: ignore[arg-type]
    return with_fit(curve)


def with_fit(curve: WssCurve) -> WssCurve:
    """The curve with its two-region fit (`fit_regions`)."""
    from dataclasses import replace
    return replace(curve, regions=fit_regions(curve.windows_seconds, curve.pages,
                                              curve.data_pages))


def _distinct(pages: np.ndarray, rate: np.ndarray, t: np.ndarray, sweep: bool) -> np.ndarray:
    """Distinct pages of regions of `pages` written at `rate`, at random or by sweeps."""
    if sweep:
        return np.minimum(rate * t, pages)
    return np.where(pages > 0, -pages * np.expm1(-rate * t / np.maximum(pages, 1e-9)), 0.0)


def fit_regions(windows_seconds: Sequence[float], pages: Sequence[float],
                data_pages: int) -> tuple[FittedRegion, ...]:
    """Two regions, a hot one of P pages and the cold rest of `data_pages`, whose expected
    distinct pages best match the curve (least squares of the relative error): each shape
    (random or sweeps, per region) by a grid over (P, hot rate, cold rate) refined four
    times around its best; the all-random shape unless one with sweeps leaves at most
    `_SWEEP_BETTER` of its error."""
    t = np.asarray(windows_seconds, dtype=float)
    d = np.asarray(pages, dtype=float)
    if not np.any(d > 0):
        return ()
    fits = {shape: _fit_shape(t, d, data_pages, shape)
            for shape in ((False, False), (True, False), (False, True), (True, True))}
    best = min(fits, key=lambda shape: fits[shape][0])
    if fits[best][0] > _SWEEP_BETTER * fits[(False, False)][0]:
        best = (False, False)
    hot_pages, hot_rate, cold_rate = fits[best][1]
    return (FittedRegion(hot_pages, hot_rate, best[0]),
            FittedRegion(float(data_pages) - hot_pages, cold_rate, best[1]))


def _fit_shape(t: np.ndarray, d: np.ndarray, data_pages: int,
               shape: tuple[bool, bool]) -> tuple[float, list[float]]:
    """(error, [hot pages, hot rate, cold rate]) of the best fit of one shape."""
    weight = 1.0 / np.maximum(d, 1.0)
    top_rate = max(float(np.max(d / t)) * 4, 1.0)
    lo = np.log([1.0, top_rate / 1e6, top_rate / 1e6])
    hi = np.log([float(data_pages), top_rate, top_rate])
    best, error = [1.0, 1.0, 1.0], float("inf")
    for _ in range(5):
        axes = [np.exp(np.linspace(a, b, 28)) for a, b in zip(lo, hi, strict=True)]
        hot, rh, rc = np.meshgrid(*axes, indexing="ij")
        hot, rh, rc = (a[..., None] for a in (hot, rh, rc))
        fit = (_distinct(hot, rh, t, shape[0])
               + _distinct(data_pages - hot, rc, t, shape[1]))
        err = np.sum(((fit - d) * weight) ** 2, axis=-1)
        i = np.unravel_index(int(np.argmin(err)), err.shape)
        best, error = [float(axes[j][i[j]]) for j in range(3)], float(err[i])
        span = (hi - lo) / 27 * 3
        lo = np.maximum(np.log(best) - span, np.log([1.0, 1e-9, 1e-9]))
        hi = np.minimum(np.log(best) + span, np.log([float(data_pages), 1e12, 1e12]))
    return error, best
