"""What a real drain adds to the model's migrations, measured from one (or a few) real drains,
for `drain --simulate` (`cluster.fleetsim`).

The analytic model prices a migration's data: its rounds at the rate it is given, and the
last dirty pages sent while the guest is paused. A real migration also pays fixed costs the
model leaves out: in its downtime the pause and resume, the hand-over's round trips, the
stop-and-copy's own bookkeeping; in its total time setup, verification and cleanup. On a real
cluster these are not one number. Measured on this 2-core machine (8 in-process hosts, one
migration at a time, the same guest and rate): the fixed downtime ran 5-50 ms around a median
of 19 ms, and with two migrations at once its median doubled, as the second migration's
threads took the cores (and, in one process, the interpreter) the first one's hand-over
waited for. So the calibration holds three things:

- the fixed downtime and the fixed cost of a migration alone (`resume_seconds`,
  `overhead_seconds`: the fit's value at one migration running);
- how they grow with the migrations running at once (`contention`, `overhead_contention`:
  each further migration adds that fraction of the alone value, a line fitted through the
  median at each count seen; 0 when the real drains ran at one count only);
- the spread of the fixed downtime about its median (`downtime_spread`: its quantiles, as
  multiples of the alone value, measured on the migrations that ran alone all along: one
  that ended alone after sharing the machine carries the sharing's cost), the tail of a
  loaded machine. The spread adds to the growth, it is not scaled by it: a migration's fixed
  downtime is alone x (growth factor + its spread - 1). Scaled (the tail doubling with the
  median at two at once), the simulated p99 at two at once came out 1.17-1.81x three real
  sweeps'; added, 0.67-1.32x over four, while the median grows as fitted: the tail is the machine's
  hiccups (a thread waiting out another's time slice), which do not grow with the work.

The count is every migration of the calibrated cluster running when a migration ends (its
own included): the in-process cluster's hosts share one machine's CPUs, so that is what
contends there. A simulated fleet larger than the calibration's cluster is taken as several
such machines (`hosts` hosts each), its migrations spread evenly over them: only that share
of the migrations at once contends with one (`machine_share`). How a fleet of real machines
contends, one host to a machine, this calibration made on one machine does not know.

A simulated migration takes its quantile of the spread from a seeded draw (`spread_draws`,
stratified: over N migrations every N-th part of the distribution is drawn once, in a seeded
order), so a seed gives one plan and even a small drain carries the calibrated tail.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPREAD_POINTS = 21          # quantiles kept of the fixed downtime's spread (0, 5, ..., 100 %)
MIN_ALONE = 3               # migrations that ran alone, enough to take the spread from them


@dataclass(frozen=True)
class Calibration:
    """What a real drain adds to the model's migrations (see the module docstring)."""

    resume_seconds: float = 0.0
    overhead_seconds: float = 0.0
    contention: float = 0.0             # fixed downtime: + this x alone, per further one
    overhead_contention: float = 0.0    # fixed cost of a migration: the same
    downtime_spread: tuple[float, ...] = ()   # quantiles 0..1 of (fixed downtime / alone)
    hosts: int = 0                      # of the real drains' cluster, its one machine (0: ?)

    def factor(self, running: int, of_overhead: bool = False, share: float = 1.0) -> float:
        """How much the fixed part grows with `running` migrations at once (itself in), of
        which `share` run on the one machine it contends on (see `machine_share`)."""
        c = self.overhead_contention if of_overhead else self.contention
        return 1.0 + c * max(0, running - 1) * share

    def machine_share(self, fleet_hosts: int) -> float:
        """The share of a simulated fleet's migrations that contend on one machine: the
        calibration's machine held `hosts` hosts, so a fleet of more hosts is taken as more
        such machines, its migrations spread over them evenly."""
        return min(1.0, self.hosts / fleet_hosts) if self.hosts and fleet_hosts else 1.0

    def fixed_downtime(self, u: float, running: int, share: float = 1.0) -> float:
        """A migration's fixed downtime at quantile `u` of the spread, with `running` at
        once (`share` of them on its machine): alone x (growth + spread - 1), never < 0."""
        return max(0.0, self.resume_seconds * (self.factor(running, share=share)
                                               + self.spread_at(u) - 1.0))

    def spread_at(self, u: float) -> float:
        """The multiple of the alone fixed downtime at quantile `u` (1.0: no spread)."""
        if not self.downtime_spread:
            return 1.0
        grid = np.linspace(0.0, 1.0, len(self.downtime_spread))
        return float(np.interp(u, grid, self.downtime_spread))

    def to_dict(self) -> dict:
        return {"resume_seconds": self.resume_seconds,
                "overhead_seconds": self.overhead_seconds,
                "contention": self.contention,
                "overhead_contention": self.overhead_contention,
                "downtime_spread": list(self.downtime_spread), "hosts": self.hosts}


def spread_draws(count: int, seed: int) -> list[float]:
    """`count` quantiles in 0..1, one in each N-th of the range, in a seeded order."""
    rng = random.Random(f"fleet-calibration-{seed}")
    order = list(range(count))
    rng.shuffle(order)
    return [(k + rng.random()) / count for k in order]


def running_at_ends(schedules: Sequence[dict]) -> list[int]:
    """For each schedule entry, how many of `schedules` ran when it ended (itself included)."""
    spans = [(s["started_at"], s["ended_at"]) for s in schedules]
    return [sum(1 for a, b in spans if a < end <= b) or 1 for _, end in spans]


def ran_alone(schedules: Sequence[dict]) -> list[bool]:
    """For each schedule entry, whether no other of `schedules` ran at any time it ran."""
    spans = [(s["started_at"], s["ended_at"]) for s in schedules]
    return [not any(a < end and b > start for j, (a, b) in enumerate(spans) if j != i)
            for i, (start, end) in enumerate(spans)]


def _line(counts: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """(value alone, growth per further migration as a fraction of it): a line through the
    median value at each count (weighted by how many had it), the alone value its intercept
    at one; no growth when one count was seen or the fit falls."""
    levels = sorted(set(counts))
    meds = [float(np.median([v for c, v in zip(counts, values, strict=True) if c == n]))
            for n in levels]
    weights = [sum(1 for c in counts if c == n) for n in levels]
    overall = float(np.median(values))
    if len(levels) < 2:
        return overall, 0.0
    slope, intercept = np.polyfit(np.array(levels) - 1.0, meds, 1, w=np.sqrt(weights))
    if slope <= 0 or intercept <= 0:
        return overall, 0.0
    return float(intercept), float(slope / intercept)


def fit_calibration(downtime_residuals: Sequence[float], overhead_residuals: Sequence[float],
                    running: Sequence[int], hosts: int = 0,
                    lone: Sequence[bool] | None = None) -> Calibration:
    """The calibration from real migrations: for each, what its downtime and its run time
    had beyond the model's at its rate (never below zero), how many ran when it ended, and
    whether it ran alone all along (`lone`; None: when one ran at its end); `hosts`,
    how many hosts the real cluster had (on its one machine)."""
    down = [max(0.0, float(d)) for d in downtime_residuals]
    over = [max(0.0, float(o)) for o in overhead_residuals]
    alone, growth = _line(running, down)
    over_alone, over_growth = _line(running, over)
    cal = Calibration(alone, over_alone, growth, over_growth, hosts=hosts)
    if alone <= 0:
        return cal
    if lone is None:
        lone = [n == 1 for n in running]
    alone_ones = [d for d, a in zip(down, lone, strict=True) if a]
    if len(alone_ones) >= MIN_ALONE:
        shape = [d / alone for d in alone_ones]
    else:                  # none ran alone: each less its growth, as if it had
        shape = [(d - alone * (cal.factor(n) - 1)) / alone
                 for d, n in zip(down, running, strict=True)]
    q = np.quantile(shape, np.linspace(0.0, 1.0, SPREAD_POINTS))
    return Calibration(alone, over_alone, growth, over_growth,
                       tuple(round(float(x), 4) for x in q), hosts)
