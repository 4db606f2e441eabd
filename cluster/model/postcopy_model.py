"""Post-copy and hybrid in the model: the switch, the push, and the faults, in expected pages.

The live rounds run as in pre-copy, decided by the sender's own switch-over arbiter
(`nodes.migration.decide.switchover`) with the same switch rule as the sender's
(`nodes.migration.postcopy.trigger.SwitchRule`: after N rounds, after a time; or the policy's
own POSTCOPY). At the switch the pages still to send (the discard set: the pages
dirtied since they were sent, every page for pure post-copy) are missing on the destination.

- downtime: the switch alone: the discard bitmap and the vCPU context over the link, its
  latency, the fixed `resume_seconds` (T_resume). No page moves while the guest is paused.
- the push sends the missing pages in pfn order at the post-copy bandwidth, and a page the
  guest touches before the push reaches it is a fault, fetched at once at the link's speed.
  Requests and push share the link, the requests first: the push goes at
  min(post-copy bandwidth, link - the request rate).
- expected faults, as an expected-value integration over time (`simulate`): each stretch of
  missing pfns is touched at a per-page rate lambda (random patterns: uniform, hotset,
  phased), so a page still ahead of the push is untouched with probability exp(-lambda t);
  the requests come at lambda x the missing pages ahead, and the push front skips the pages
  they fetched. The post-copy ends when the front has passed every missing page.
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

from cluster.model.workload import Region

VCPU_TICK_SECONDS = 0.001       # a vCPU's batch covers about this long of its rate
SIMULATION_STEPS = 2000         # time steps over the push of every missing page


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


def simulate(missing: list[MissingRange], access: list[Region], data_pages: int,
             push_pages_per_second: float, link_pages_per_second: float | None,
             pure: bool) -> tuple[float, float]:
    """(expected faults, seconds until every missing page is present) of the push over
    `missing` (see the module docstring); `pure`: every page is missing (no live round)."""
    stretches, faults = _stretches(missing, access, data_pages, push_pages_per_second, pure)
    total = sum(x[0] for x in stretches)
    link = link_pages_per_second or math.inf
    push_cap = min(push_pages_per_second, link)
    if total <= 0 or not math.isfinite(push_cap):
        return min(faults, total), 0.0
    dt = total / push_cap / SIMULATION_STEPS
    t, front, backlog = 0.0, 0, 0.0
    for _ in range(100 * SIMULATION_STEPS):
        ahead = [(m - passed) * math.exp(-lam * t) for m, lam, passed, _ in stretches]
        requests = sum(x[1] * a for x, a in zip(stretches, ahead, strict=True)) * dt
        for x in stretches:                 # a sweep outrunning the push asks for each page
            took = min(x[3] * dt, x[0] - x[2])
            x[2] += took
            requests += took
        faults += requests
        backlog += requests                 # requested pages wait for the link, first
        fetched = min(backlog, link * dt)
        backlog -= fetched
        front = _advance(stretches, front, min(push_pages_per_second * dt,
                                               max(0.0, link * dt - fetched)), t)
        t += dt
        if (front >= len(stretches) or sum(ahead) < 0.5) and backlog < 0.5:
            break
    return min(faults, total), t


def _stretches(missing: list[MissingRange], access: list[Region], data_pages: int,
               push: float, pure: bool) -> tuple[list[list[float]], float]:
    """[missing at the switch, lambda, passed by the push, sweep rate] per missing range,
    and the faults of sweeps the push outruns (a batch or two)."""
    lay = access_layout(access, data_pages)
    out, faults = [], 0.0
    for m in missing:
        if m.missing <= 0:
            continue
        region = next((r for lo, hi, r in lay if lo <= m.lo < hi), None)
        lam = sweep = 0.0
        if region is not None and region.rate > 0 and not region.sequential:
            lam = region.rate / region.pages
        elif region is not None and region.rate > 0:
            late = _late_share(m, region, push, pure)
            if region.rate < push:
                faults += late * min(m.missing, max(1.0, region.rate * VCPU_TICK_SECONDS)
                                     * (1 + region.rate / push))
            else:
                sweep = late * region.rate
        out.append([m.missing, lam, 0.0, sweep])
    return out, faults


def _late_share(m: MissingRange, region: Region, push: float, pure: bool) -> float:
    """How much of a sweep's missing stretch it reaches before the push has sent it: all of
    it when every page is missing (or its dirty band covers all its pages); in a hybrid, the
    band it has just written is behind it, and faults only if the push has not finished it
    by the time the sweep wraps round to it."""
    band = m.missing
    if pure or band >= 0.99 * region.pages:
        return 1.0
    wrap = (region.pages - band) / region.rate
    return max(0.0, 1.0 - wrap * push / band)


def _advance(stretches: list[list[float]], front: int, push: float, t: float) -> int:
    """The push front moves `push` pages on, skipping the pages requests fetched."""
    while push > 0 and front < len(stretches):
        m, lam, passed, _ = stretches[front]
        still = math.exp(-lam * t)
        room = (m - passed) * still
        if push < room:
            stretches[front][2] += push / still
            return front
        push -= room
        stretches[front][2] = m
        front += 1
    return front


def postcopy_phase(*, rounds: int, switched_at_seconds: float, missing: list[MissingRange],
                   access: list[Region], data_pages: int, guest_pages: int, page_size: int,
                   wire_per_page: float, link_bytes_per_second: float | None,
                   postcopy_bytes_per_second: float | None, latency_seconds: float,
                   resume_seconds: float) -> PostcopyPrediction:
    """The switch and the push after `rounds` live rounds (see the module docstring)."""
    discard = sum(m.missing for m in missing)
    push = min(r for r in (link_bytes_per_second, postcopy_bytes_per_second, math.inf) if r)
    bitmap_bytes = guest_pages / 8 + page_size          # the discard set, the vCPU context
    on_link = bitmap_bytes / link_bytes_per_second if link_bytes_per_second else 0.0
    downtime = on_link + latency_seconds + resume_seconds
    link_pages = link_bytes_per_second / wire_per_page if link_bytes_per_second else None
    faults, seconds = simulate(missing, access, data_pages, push / wire_per_page, link_pages,
                               rounds == 0)
    return PostcopyPrediction(
        switched_after_rounds=rounds, switched_at_seconds=switched_at_seconds,
        discard_pages=discard, downtime_seconds=downtime,
        postcopy_seconds=seconds + 2 * latency_seconds, expected_faults=faults,
        push_bytes_per_second=push if math.isfinite(push) else 0.0)


