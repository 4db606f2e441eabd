"""The workload in the model: how many distinct pages a pattern dirties in a window.

Each pattern is one or more regions of data pages written at a rate; the hot set of a
hotset workload is sized by `workloads.patterns.hot_pages`, the very function the workload
itself uses, so model and guest agree on which pages are hot.
"""

import math
from dataclasses import dataclass

from nodes.errors import ConfigError
from workloads.patterns import hot_pages
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve, with_fit


@dataclass(frozen=True)
class Region:
    """A stretch of `pages` data pages written at `rate` page writes per second."""

    pages: float
    rate: float
    sequential: bool = False

    def distinct(self, seconds: float) -> float:
        """Expected distinct pages of this region written in `seconds`."""
        if self.pages <= 0 or self.rate <= 0 or seconds <= 0:
            return 0.0
        writes = self.rate * seconds
        if self.sequential:
            return min(writes, self.pages)
        return -self.pages * math.expm1(-writes / self.pages)


def rate_of(spec: WorkloadSpec, rate_pages_per_second: float | None) -> float:
    """The page-write rate to use: the caller's (measured) one, else the spec's."""
    if spec.pattern == "idle":
        return 0.0
    if rate_pages_per_second is None:
        if spec.unlimited:
            raise ConfigError(
                f"the {spec.pattern} workload runs at an unlimited rate ('max'), so the model "
                "cannot know how fast it dirties pages: pass the measured page-write rate "
                "(rate_pages_per_second / dirty_rate_pages_per_second)")
        return float(spec.rate_pages_per_second)
    rate = float(rate_pages_per_second)
    if not (rate >= 0 and math.isfinite(rate)):
        raise ConfigError(
            f"page-write rate must be a finite number >= 0 pages per second, got "
            f"{rate_pages_per_second!r}")
    return rate


def _mean_rate(spec: WorkloadSpec, rate: float) -> float:
    """Page writes per second averaged over a phased workload's busy/quiet cycle."""
    if spec.pattern != "phased":
        return rate
    cycle = spec.busy_seconds + spec.quiet_seconds
    return rate * (spec.busy_seconds + spec.quiet_seconds * spec.quiet_rate_fraction) / cycle


def regions(spec: WorkloadSpec, data_pages: int, rate: float) -> list[Region]:
    """The regions `spec` writes among `data_pages` at `rate` page writes per second."""
    if spec.pattern in ("idle", "scan") or data_pages <= 0 or rate <= 0:
        return []
    if spec.pattern == "sequential":
        return [Region(data_pages, rate, sequential=True)]
    if spec.pattern == "hotset":
        hot = hot_pages(spec, data_pages)
        cold = data_pages - hot
        if cold == 0:
            return [Region(hot, rate)]
        return [Region(hot, rate * spec.hot_share),
                Region(cold, rate * (1 - spec.hot_share))]
    # uniform, and phased (uniform writes at the cycle's mean rate)
    return [Region(data_pages, _mean_rate(spec, rate))]


def expected_distinct_pages(spec: WorkloadSpec, data_pages: int, seconds: float,
                            rate_pages_per_second: float | None = None) -> float:
    """Expected number of distinct pages `spec` dirties among `data_pages` in `seconds`.

    With w page writes per second over H = `data_pages` pages:

    - idle: 0.
    - uniform (uniformly random writes): H (1 - exp(-w t / H)), which tends to H, not w t.
    - hotset: the same per region: the hot set (`workloads.patterns.hot_pages`:
      ceil(`hot_fraction` x H), at least one page) at w x `hot_share`, the cold rest at
      w x (1 - `hot_share`).
    - sequential (a sweep over the pages): min(w t, H).
    - phased: uniform writes at the rate averaged over one busy/quiet cycle,
      w (busy + quiet x `quiet_rate_fraction`) / (busy + quiet). This is the cycle average,
      not the exact phase a window starts in: exact for windows spanning whole cycles, an
      approximation for shorter ones.

    `rate_pages_per_second` None uses the spec's rate. A spec at unlimited rate (0, 'max')
    needs the measured rate passed here, else ConfigError (a ValueError). An explicit rate is
    taken as measured: 0 means nothing was written.
    """
    if not seconds >= 0:
        raise ConfigError(f"seconds must be >= 0, got {seconds!r}")
    if data_pages < 0:
        raise ConfigError(f"data_pages must be >= 0, got {data_pages!r}")
    rate = rate_of(spec, rate_pages_per_second)
    return sum(r.distinct(seconds) for r in regions(spec, data_pages, rate))


def access_regions(spec: WorkloadSpec, data_pages: int, rate: float) -> list[Region]:
    """The regions `spec` touches (reads or writes) at `rate` pages per second: what a
    post-copy destination faults on. A writer touches what it writes; `scan` reads every
    data page in order and writes none."""
    if spec.pattern == "scan" and data_pages > 0 and rate > 0:
        return [Region(data_pages, rate, sequential=True)]
    return regions(spec, data_pages, rate)


def wss_regions(curve: WssCurve, data_pages: int) -> list[Region]:
    """The regions of a measured writable working set (`workloads.writableset`): its fit,
    scaled to `data_pages` when the model's guest is not the one measured. Used in place of
    the spec's regions (`predict(wss=...)`), so a program's dirtying is what it measured."""
    scale = data_pages / curve.data_pages
    fitted = curve.regions or with_fit(curve).regions
    return [Region(r.pages * scale, r.rate_pages_per_second, r.sequential)
            for r in fitted if r.pages > 0]
