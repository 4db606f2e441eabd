"""Post-copy and hybrid in the model: the switch, the push, and the faults, in expected pages.

The live rounds run as in pre-copy, decided by the policy and the same switch rule as the
sender's (`nodes.migration.postcopy.trigger.prefer`: after N rounds, after a time, at the
policy's own POSTCOPY). At the switch the pages still to send (the discard set: the pages
dirtied since they were sent, every page for pure post-copy) are missing on the destination.

- downtime: the switch alone: the discard bitmap and the vCPU context over the link, its
  latency, the fixed `resume_seconds` (T_resume). No page moves while the guest is paused.
- the push sends the missing pages in pfn order at min(link, post-copy bandwidth); a page the
  guest touches before the push reaches it is a fault, fetched at once at the link's speed,
  beside the push (whose own limit it does not use): the post-copy lasts the longer of the
  two.
- expected faults, per stretch of pfns the guest touches at a per-page rate lambda (random
  patterns: uniform, hotset, phased): the push reaches the k-th missing page of the stretch
  at t_k, and the guest touched it before with probability 1 - exp(-lambda t_k); summed, the
  integral of that over the stretch's push window. Faulted pages leave the push, which ends
  sooner and lowers the faults: solved as a fixed point.
- a sweep (sequential, scan) at a pages per second from wherever it is: after its first
  batch faults, the push continues after the requested pages and stays ahead while it is
  faster than the guest (a batch or two of faults); slower, every page the guest reaches is a
  fault, and requests and push share the missing pages in the ratio of their rates. In a
  hybrid the missing pages of a sweep are those it has just written, behind it: no faults.

The push's own jumps after each request (it continues after the requested page) reorder it
for random patterns; the model keeps pfn order there, which favours no page.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.model.continuous import layout
from cluster.model.workload import Region
from nodes.migration.policy import Decision, PrecopyPolicy, PrecopyStats
from nodes.migration.postcopy.trigger import SwitchRule, prefer

if TYPE_CHECKING:
    from cluster.model.iterative import _Guest, _PreCopy

VCPU_TICK_SECONDS = 0.001       # a vCPU's batch covers about this long of its rate
FIXED_POINT_STEPS = 30


@dataclass(frozen=True)
class MissingRange:
    """Pages [lo, hi) of which `missing` are still to send at the switch."""

    lo: float
    hi: float
    missing: float


@dataclass(frozen=True)
class PostcopyPrediction:
    switched_after_rounds: int
    switched_at_seconds: float
    discard_pages: float
    downtime_seconds: float       # the switch: pause to the guest running on the destination
    postcopy_seconds: float       # resume to the last page landed
    expected_faults: float        # pages the guest touches before the push reaches them
    push_bytes_per_second: float

    def to_dict(self) -> dict:
        return {"switched_after_rounds": self.switched_after_rounds,
                "switched_at_seconds": self.switched_at_seconds,
                "discard_pages": self.discard_pages,
                "downtime_seconds": self.downtime_seconds,
                "postcopy_seconds": self.postcopy_seconds,
                "expected_faults": self.expected_faults,
                "push_bytes_per_second": self.push_bytes_per_second}


def access_layout(access: list[Region], data_pages: int) -> list[tuple[float, float, Region]]:
    """The pfn ranges the guest touches, in order (as the workload lays its regions out)."""
    out, at = [], 0.0
    for r in access:
        out.append((at, at + r.pages, r))
        at += r.pages
    return [x for x in out if x[0] < data_pages]


def expected_faults(missing: list[MissingRange], access: list[Region], data_pages: int,
                    push_pages_per_second: float, pure: bool) -> float:
    """Faults of a push at `push_pages_per_second` over `missing` (see the module
    docstring); `pure`: every page is missing (no live round ran)."""
    layout = access_layout(access, data_pages)
    total = sum(m.missing for m in missing)
    if total <= 0 or not layout or push_pages_per_second <= 0:
        return 0.0
    faults = 0.0
    for _ in range(FIXED_POINT_STEPS):
        # requested pages leave the push: it covers the rest sooner
        rate = push_pages_per_second * total / max(total - faults, 1e-9)
        new = _faults_at(missing, layout, rate, pure)
        new = min(new, total)
        if abs(new - faults) < 1e-6 * max(1.0, total):
            faults = new
            break
        faults = 0.5 * (faults + new)
    return faults


def _faults_at(missing: list[MissingRange], layout: list, rate: float, pure: bool) -> float:
    t = 0.0
    faults = 0.0
    for m in missing:
        if m.missing <= 0:
            continue
        window = m.missing / rate
        region = next((r for lo, hi, r in layout if lo <= m.lo < hi), None)
        if region is not None and region.rate > 0:
            if region.sequential:
                faults += _sweep_faults(m, region, rate, pure)
            else:
                lam = region.rate / region.pages
                faults += m.missing - rate / lam * (math.exp(-lam * t) - math.exp(
                    -lam * (t + window)))
        t += window
    return faults


def _sweep_faults(m: MissingRange, region: Region, rate: float, pure: bool) -> float:
    if not pure:
        return 0.0                # a hybrid's missing pages are behind the sweep
    batch = max(1.0, region.rate * VCPU_TICK_SECONDS)
    if region.rate < rate:
        return min(m.missing, batch * (1 + region.rate / rate))
    return m.missing * region.rate / (region.rate + rate)


def postcopy_phase(*, rounds: int, switched_at_seconds: float, missing: list[MissingRange],
                   access: list[Region], data_pages: int, guest_pages: int, page_size: int,
                   wire_per_page: float, link_bytes_per_second: float | None,
                   postcopy_bytes_per_second: float | None, latency_seconds: float,
                   resume_seconds: float) -> PostcopyPrediction:
    """The switch and the push after `rounds` live rounds (see the module docstring)."""
    discard = sum(m.missing for m in missing)
    rates = [r for r in (link_bytes_per_second, postcopy_bytes_per_second) if r]
    push = min(rates) if rates else float("inf")
    bitmap_bytes = guest_pages / 8 + page_size          # the discard set, the vCPU context
    on_link = bitmap_bytes / link_bytes_per_second if link_bytes_per_second else 0.0
    downtime = on_link + latency_seconds + resume_seconds
    faults = (expected_faults(missing, access, data_pages, push / wire_per_page, rounds == 0)
              if math.isfinite(push) else 0.0)
    pushed = (discard - faults) * wire_per_page / push if math.isfinite(push) else 0.0
    fetched = faults * wire_per_page / link_bytes_per_second if link_bytes_per_second else 0.0
    return PostcopyPrediction(
        switched_after_rounds=rounds, switched_at_seconds=switched_at_seconds,
        discard_pages=discard, downtime_seconds=downtime,
        postcopy_seconds=max(pushed, fetched) + 2 * latency_seconds, expected_faults=faults,
        push_bytes_per_second=push if math.isfinite(push) else 0.0)


# -- the model's live rounds under the switch rule ------------------------------------------
class Switching:
    """The policy as a sender with post-copy allowed runs it: its decision, or the switch
    (`nodes.migration.postcopy.trigger.prefer`, the sender's own rule)."""

    def __init__(self, policy: PrecopyPolicy, rule: SwitchRule):
        self._policy = policy
        self.rule = rule
        self.cut_seconds = rule.after_seconds

    def __getattr__(self, name: str):
        return getattr(self._policy, name)

    def decide(self, stats: PrecopyStats) -> Decision:
        return prefer(self.rule, self._policy.decide(stats), stats)


def missing_at_switch(run: "_PreCopy", guest: "_Guest", data_pages: int) -> list[MissingRange]:
    """The discard set after the per-pass rounds: every page if none ran, else what the
    last round's writes dirtied (as it would have been sent next)."""
    spans = layout(guest.regions, data_pages, guest.guest_pages)
    if not run.rounds:
        return [MissingRange(s.lo, s.hi, s.pages) for s in spans]
    dirty = iter(run.dirty_by_region or [0.0] * len(guest.regions))
    return [MissingRange(s.lo, s.hi, next(dirty) if s.region is not None else 0.0)
            for s in spans]
