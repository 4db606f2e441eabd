"""An analytic pre-copy model: predict a migbed migration (rounds, bytes, downtime) without running it.

The model follows migbed's sender step by step, in expected values:

- The guest has `guest_pages = memory / page_size` pages; the top `ceil(guest_pages /
  (page_size / 8))` are page-table pages the workload never writes, the rest (`data_pages`)
  are what the workload dirties.
- Before every live round the sender builds `PrecopyStats` and asks the *real* policy object
  (`nodes.migration.policy.policy_for`, as the sender builds it), so the stop rules are exactly
  migbed's. Before round 0 every
  guest page is dirty.
- CONTINUE: the dirty pages go at the effective rate `min(link, rate limit)`; the round lasts
  `wire bytes / rate + latency`; the pages the workload dirties meanwhile
  (`expected_distinct_pages`) are the next round's dirty count.
- Policies with `skip_redirtied` (xen-legacy) skip pages dirtied again before the sender
  reaches them: the skipped count is the expected overlap of the round's to-send set with the
  pages written between the round's start and the moment the sender gets to each page. Skipped
  pages are not sent (they stay dirty for the next round), which shortens the round; the
  round length and the skipped count are solved together.
- STOP_AND_COPY: the guest pauses and the remaining dirty pages go at the *link* speed (the
  rate limit is lifted for stop-and-copy, as QEMU does), plus `latency` and a fixed
  `resume_seconds` (T_resume): that is the downtime.
- A page on the wire costs `page_size + bytes_per_page_overhead` (the pfn word) plus a record
  header of `record_overhead_bytes` per 1024 pages.

`closed_form` gives Liu et al.'s (HPDC 2011) closed form for reference, and `compare` sets a
measured migbed report against a prediction.
"""

import math
from dataclasses import dataclass

from nodes.errors import ConfigError
from nodes.migration.policy import (
    Action,
    Decision,
    PrecopyPolicy,
    PrecopyStats,
    StopCode,
    policy_for,
)
from workloads.spec import WorkloadSpec

PAGES_PER_RECORD = 1024      # PAGE_DATA records carry up to 1024 pages (4 MiB)
_ROUND_GUARD = 100_000       # a policy that never stops would loop forever


# -- the workload: distinct pages dirtied in a window ------------------------------------

@dataclass(frozen=True)
class _Region:
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

    def mean_written_fraction(self, seconds: float) -> float:
        """Mean over u in [0, 1] of distinct(u * seconds) / pages.

        The chance that a page the sender reaches at a uniformly spread moment of a window of
        `seconds` has been written since the window opened (used for skipped pages).
        """
        if self.pages <= 0 or self.rate <= 0 or seconds <= 0:
            return 0.0
        a = self.rate * seconds / self.pages
        if self.sequential:
            # min(a u, 1) averaged over u: a / 2 up to a full sweep, then 1 - 1 / (2 a).
            return a / 2 if a <= 1 else 1 - 1 / (2 * a)
        if a < 1e-8:
            return a / 2
        # integral of 1 - exp(-a u) over [0, 1]
        return 1 + math.expm1(-a) / a


def _rate_of(spec: WorkloadSpec, rate_pages_per_second: float | None) -> float:
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


def _hot_pages(spec: WorkloadSpec, data_pages: int) -> int:
    """Pages in a hotset's writable working set: `hot_fraction` of the data pages, at least 1."""
    if data_pages <= 0:
        return 0
    return min(data_pages, max(1, round(spec.hot_fraction * data_pages)))


def _regions(spec: WorkloadSpec, data_pages: int, rate: float) -> list[_Region]:
    if spec.pattern == "idle" or data_pages <= 0 or rate <= 0:
        return []
    if spec.pattern == "sequential":
        return [_Region(data_pages, rate, sequential=True)]
    if spec.pattern == "hotset":
        hot = _hot_pages(spec, data_pages)
        cold = data_pages - hot
        if cold == 0:
            return [_Region(hot, rate)]
        return [_Region(hot, rate * spec.hot_share),
                _Region(cold, rate * (1 - spec.hot_share))]
    # uniform, and phased (uniform writes at the cycle's mean rate)
    return [_Region(data_pages, _mean_rate(spec, rate))]


def expected_distinct_pages(spec: WorkloadSpec, data_pages: int, seconds: float,
                            rate_pages_per_second: float | None = None) -> float:
    """Expected number of distinct pages `spec` dirties among `data_pages` in `seconds`.

    With w page writes per second over H = `data_pages` pages:

    - idle: 0.
    - uniform (uniformly random writes): H (1 - exp(-w t / H)), which tends to H, not w t.
    - hotset: the same per region: the hot set (`hot_fraction` of H, at least one page) at
      w x `hot_share`, the cold rest at w x (1 - `hot_share`).
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
    rate = _rate_of(spec, rate_pages_per_second)
    return sum(r.distinct(seconds) for r in _regions(spec, data_pages, rate))


# -- results ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRound:
    """One round, in expected pages. The stop-and-copy round is last, with `final` True."""

    index: int
    pages_sent: float
    pages_skipped: float
    pages_dirtied: float          # distinct pages written during the round: the next one's dirty
    duration_seconds: float
    final: bool = False

    def to_dict(self) -> dict:
        return {"index": self.index, "pages_sent": self.pages_sent,
                "pages_skipped": self.pages_skipped, "pages_dirtied": self.pages_dirtied,
                "duration_seconds": self.duration_seconds, "final": self.final}


@dataclass(frozen=True)
class ModelPrediction:
    policy: str
    rounds: tuple[ModelRound, ...]
    final_pages: float            # pages sent while paused
    stop_reason: str
    stop_code: str | None         # the policy's StopCode value (None: aborted)
    total_time_seconds: float     # first round to guest resumed, T_resume included
    downtime_seconds: float       # stop-and-copy at link speed + latency + T_resume
    pages_sent_total: float
    bytes_sent_total: float
    converged: bool               # stopped on the policy's own target, not a cap
    lambda_ratio: float           # D / R: dirty bytes per second over the effective bandwidth
    bandwidth_bytes_per_second: float   # effective live bandwidth, min(link, rate limit)

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.final)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "rounds": [r.to_dict() for r in self.rounds],
            "live_rounds": self.live_rounds,
            "final_pages": self.final_pages,
            "stop_reason": self.stop_reason,
            "stop_code": self.stop_code,
            "total_time_seconds": self.total_time_seconds,
            "downtime_seconds": self.downtime_seconds,
            "pages_sent_total": self.pages_sent_total,
            "bytes_sent_total": self.bytes_sent_total,
            "converged": self.converged,
            "lambda_ratio": self.lambda_ratio,
            "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
        }


# -- the iterative model -----------------------------------------------------------------

def _positive_or_none(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not value > 0:
        raise ConfigError(f"{what} must be > 0 bytes per second (None: unlimited), got {value!r}")
    return value


def _skip_solve(to_send: list[tuple[_Region, float]], pages: float, seconds_per_page: float,
                batch_pages: int = 1024) -> tuple[float, float]:
    """(pages skipped, send seconds) for a skipping round, solved together by bisection.

    Like Xen's `xc_domain_save` (and migbed's sender), the sender looks at the dirty bitmap
    once per batch of `batch_pages`, at the batch's start: a page is skipped when it was
    written between the round's start and its batch's start. So a round of one batch skips
    nothing. Skipping shortens the round, which lowers the skips.
    """
    nb = max(1, math.ceil(pages / batch_pages))

    def skipped(send_seconds: float) -> float:
        starts = [b * send_seconds / nb for b in range(nb)]
        return sum(n * sum(region.distinct(t) for t in starts) / (nb * region.pages)
                   for region, n in to_send if region.pages > 0)

    lo, hi = 0.0, pages * seconds_per_page
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid - (pages - skipped(mid)) * seconds_per_page < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
    send = (lo + hi) / 2
    return min(pages, skipped(send)), send


def predict(*, guest_memory_bytes: int, page_size: int = 4096, workload: WorkloadSpec,
            link_bytes_per_second: float | None,
            rate_limit_bytes_per_second: float | None = None,
            policy: str = "xen", downtime_limit_seconds: float = 0.3,
            latency_seconds: float = 0.0, resume_seconds: float = 0.0,
            dirty_rate_pages_per_second: float | None = None,
            bytes_per_page_overhead: float = 8.0, record_overhead_bytes: float = 32.0,
            policy_settings: dict | None = None) -> ModelPrediction:
    """Predict a pre-copy migration round by round, driving migbed's own policy object.

    `link_bytes_per_second` is the link's speed (pass the *measured* throughput when the link
    is not shaped); `rate_limit_bytes_per_second` the policy's throttle, which applies to the
    live rounds only. Both None raises ConfigError: the model needs a bandwidth. A link of
    None with a rate limit makes the stop-and-copy transfer instantaneous.
    `dirty_rate_pages_per_second` overrides the workload's rate (needed for 'max').
    `latency_seconds` is added to every round, the stop-and-copy included.
    `policy_settings` go to the policy's factory (`policy_for`) beside the downtime limit.
    """
    if page_size < 64 or page_size & (page_size - 1):
        raise ConfigError(f"page size must be a power of two >= 64, got {page_size!r}")
    if guest_memory_bytes < page_size or guest_memory_bytes % page_size:
        raise ConfigError(
            f"guest memory must be a positive multiple of the page size ({page_size}), "
            f"got {guest_memory_bytes!r}")
    link = _positive_or_none(link_bytes_per_second, "link speed")
    limit = _positive_or_none(rate_limit_bytes_per_second, "rate limit")
    if link is None and limit is None:
        raise ConfigError(
            "link speed and rate limit are both unlimited: the model needs a bandwidth; pass "
            "the measured throughput as link_bytes_per_second")
    for value, what in ((latency_seconds, "latency_seconds"), (resume_seconds, "resume_seconds"),
                        (bytes_per_page_overhead, "bytes_per_page_overhead"),
                        (record_overhead_bytes, "record_overhead_bytes")):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")

    rate = min(x for x in (link, limit) if x is not None)    # live rounds
    guest_pages = guest_memory_bytes // page_size
    table_pages = -(-guest_pages // (page_size // 8))
    data_pages = guest_pages - table_pages
    writes = _rate_of(workload, dirty_rate_pages_per_second)
    regions = _regions(workload, data_pages, writes)
    wire_per_page = page_size + bytes_per_page_overhead + record_overhead_bytes / PAGES_PER_RECORD
    seconds_per_page = wire_per_page / rate

    pol: PrecopyPolicy = policy_for(policy, downtime_limit_seconds=downtime_limit_seconds,
                                    **(policy_settings or {}))

    rounds: list[ModelRound] = []
    dirty = float(guest_pages)
    # per region, the pages of the next to-send set; None: every page (round 0)
    dirty_by_region: list[float] | None = None
    total_written = 0.0
    elapsed = 0.0
    last: ModelRound | None = None
    stop_reason = ""
    stop_code: StopCode | None = None
    converged = False
    aborted = False
    while True:
        measured = None
        if last is not None and last.duration_seconds > 0:
            measured = last.pages_sent * wire_per_page / last.duration_seconds
        stats = PrecopyStats(
            iteration=len(rounds), dirty_count=round(dirty), total_written=round(total_written),
            guest_pages=guest_pages, page_size=page_size,
            last_round_pages_sent=round(last.pages_sent) if last else 0,
            last_round_pages_skipped=round(last.pages_skipped) if last else 0,
            last_round_seconds=last.duration_seconds if last else 0.0,
            measured_bytes_per_second=measured, nominal_bytes_per_second=rate,
            elapsed_seconds=elapsed)
        if len(rounds) >= _ROUND_GUARD:
            decision = Decision.stop(StopCode.MAX_ITERATIONS,
                                     f"model guard ({_ROUND_GUARD} rounds)")
        else:
            decision = pol.decide(stats)
        if decision.action is not Action.CONTINUE:
            stop_reason = decision.reason
            stop_code = decision.stop_code
            if decision.action is Action.ABORT:
                aborted = True
                stop_reason = f"aborted: {decision.reason}" if decision.reason else "aborted"
            elif stop_code is not None:
                converged = stop_code.converged
            else:
                converged = stats.iteration < pol.max_iterations
            break

        skipped = 0.0
        send_seconds = dirty * seconds_per_page
        if pol.skip_redirtied and regions:
            if dirty_by_region is None:
                to_send = [(r, r.pages) for r in regions]
            else:
                to_send = list(zip(regions, dirty_by_region, strict=True))
            skipped, send_seconds = _skip_solve(to_send, dirty, seconds_per_page)
        sent = dirty - skipped
        duration = send_seconds + latency_seconds
        dirty_by_region = [r.distinct(duration) for r in regions]
        dirtied = sum(dirty_by_region)
        last = ModelRound(index=len(rounds), pages_sent=sent, pages_skipped=skipped,
                          pages_dirtied=dirtied, duration_seconds=duration)
        rounds.append(last)
        total_written += sent
        elapsed += duration
        dirty = dirtied

    if aborted:
        final_pages, downtime = 0.0, 0.0
    else:
        final_pages = dirty
        transfer = 0.0 if link is None else final_pages * wire_per_page / link
        final_round = transfer + latency_seconds
        downtime = final_round + resume_seconds
        rounds.append(ModelRound(index=len(rounds), pages_sent=final_pages, pages_skipped=0.0,
                                 pages_dirtied=0.0, duration_seconds=final_round, final=True))
    pages_total = total_written + final_pages
    dirty_bytes_per_second = sum(r.rate for r in regions) * page_size
    return ModelPrediction(
        policy=policy, rounds=tuple(rounds), final_pages=final_pages, stop_reason=stop_reason,
        stop_code=None if aborted or stop_code is None else stop_code.value,
        total_time_seconds=elapsed + downtime, downtime_seconds=downtime,
        pages_sent_total=pages_total, bytes_sent_total=pages_total * wire_per_page,
        converged=converged, lambda_ratio=dirty_bytes_per_second / rate,
        bandwidth_bytes_per_second=rate)


# -- reference and comparison ------------------------------------------------------------

def closed_form(v_mem_bytes: float, dirty_bytes_per_second: float,
                link_bytes_per_second: float, rounds: int) -> dict:
    """Liu et al.'s closed form: rounds 0..n-1 live, round n = `rounds` the stop-and-copy.

    lambda = D / R; V_i = V_mem lambda^i; V_mig = V_mem (1 - lambda^(n+1)) / (1 - lambda)
    (V_mem (n + 1) when lambda = 1); time = V_mig / R; downtime = V_n / R (no T_resume).
    """
    if not link_bytes_per_second > 0:
        raise ConfigError("closed form needs a link speed > 0")
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds!r}")
    lam = dirty_bytes_per_second / link_bytes_per_second
    volumes = [v_mem_bytes * lam**i for i in range(rounds + 1)]
    if lam == 1:
        v_mig = v_mem_bytes * (rounds + 1)
    else:
        v_mig = v_mem_bytes * (1 - lam ** (rounds + 1)) / (1 - lam)
    return {
        "lambda_ratio": lam,
        "rounds": rounds,
        "round_bytes": volumes,
        "bytes_sent_total": v_mig,
        "total_time_seconds": v_mig / link_bytes_per_second,
        "downtime_seconds": volumes[-1] / link_bytes_per_second,
    }


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or predicted == 0:
        return None
    return measured / predicted


def compare(measured_report: dict, prediction: ModelPrediction) -> dict:
    """Measured over predicted, for pages sent, live rounds, downtime and total time.

    `measured_report` has `rounds` (dicts with `pages_sent` and `final`), `pages_sent_total`,
    `downtime_seconds` and `total_time_seconds`. A ratio is None where the prediction is 0.
    `round_pages_sent_ratios` pairs the live rounds by index.
    """
    m_rounds = measured_report.get("rounds", [])
    m_live = [r for r in m_rounds if not r.get("final", False)]
    p_live = [r for r in prediction.rounds if not r.final]
    measured = {
        "pages_sent_total": measured_report.get("pages_sent_total"),
        "live_rounds": len(m_live),
        "downtime_seconds": measured_report.get("downtime_seconds"),
        "total_time_seconds": measured_report.get("total_time_seconds"),
    }
    predicted = {
        "pages_sent_total": prediction.pages_sent_total,
        "live_rounds": len(p_live),
        "downtime_seconds": prediction.downtime_seconds,
        "total_time_seconds": prediction.total_time_seconds,
    }
    return {
        "policy": prediction.policy,
        "measured": measured,
        "predicted": predicted,
        "pages_sent_ratio": _ratio(measured["pages_sent_total"], predicted["pages_sent_total"]),
        "rounds_ratio": _ratio(measured["live_rounds"], predicted["live_rounds"]),
        "downtime_ratio": _ratio(measured["downtime_seconds"], predicted["downtime_seconds"]),
        "total_time_ratio": _ratio(measured["total_time_seconds"],
                                   predicted["total_time_seconds"]),
        "round_pages_sent_ratios": [
            _ratio(m.get("pages_sent"), p.pages_sent) for m, p in zip(m_live, p_live, strict=False)],
    }


__all__ = ["ModelPrediction", "ModelRound", "closed_form", "compare",
           "expected_distinct_pages", "predict"]
