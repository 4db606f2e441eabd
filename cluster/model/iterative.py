"""The iterative model: a pre-copy migration round by round in expected pages, decided by
migbed's own policy object (see the package docstring for the steps)."""

import math
from dataclasses import dataclass, field

from cluster.model import pagetypes
from cluster.model.continuous import ContinuousRun, layout
from cluster.model.throttle import (
    DirtyLimitSpec,
    ModelDirtyLimit,
    ModelThrottle,
    ThrottleSpec,
    model_throttle,
    running_share,
    timeout_decision,
)
from cluster.model.workload import Region, rate_of, regions
from nodes.errors import ConfigError
from nodes.migration.dirtysync import SyncLog
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


@dataclass(frozen=True)
class ModelRound:
    """One round, in expected pages. The stop-and-copy round is last, with `final` True."""

    index: int
    pages_sent: float
    pages_skipped: float
    pages_dirtied: float          # distinct pages written during the round: the next one's dirty
    duration_seconds: float
    final: bool = False
    cpu_throttle_percentage: int = 0      # auto-converge's throttle as the round ended
    zero_pages: float = 0.0       # of pages_sent, zero pages (a pfn word each)

    def to_dict(self) -> dict:
        return {"index": self.index, "pages_sent": self.pages_sent,
                "pages_skipped": self.pages_skipped, "pages_dirtied": self.pages_dirtied,
                "duration_seconds": self.duration_seconds, "final": self.final,
                "cpu_throttle_percentage": self.cpu_throttle_percentage,
                "zero_pages": self.zero_pages}


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
    dirty_sync_count: int         # bitmap syncs, setup's and stop-and-copy's included
    lambda_ratio: float           # D / R: dirty bytes per second over the effective bandwidth
    bandwidth_bytes_per_second: float   # effective live bandwidth, min(link, rate limit)
    # Auto-converge: (seconds, percentage) at each throttle step, and the throttle at the end.
    throttle_schedule: tuple = ()
    cpu_throttle_percentage: int = 0
    # Dirty-limit: (seconds, sleep per full ring in us) at each adjustment.
    dirty_limit_schedule: tuple = ()
    zero_pages: float = 0.0       # of pages_sent_total, zero pages

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
            "dirty_sync_count": self.dirty_sync_count,
            "lambda_ratio": self.lambda_ratio,
            "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
            "throttle_schedule": [list(x) for x in self.throttle_schedule],
            "cpu_throttle_percentage": self.cpu_throttle_percentage,
            "dirty_limit_schedule": [list(x) for x in self.dirty_limit_schedule],
            "zero_pages": self.zero_pages,
        }


@dataclass(frozen=True)
class _Guest:
    """What the model knows of the guest and the wire before the first round."""

    guest_pages: int
    page_size: int
    regions: list[Region]
    wire_per_page: float          # bytes on the wire per page, record headers shared out
    seconds_per_page: float       # at the live rounds' rate
    zero_wire: float = 0.0        # bytes on the wire per zero page
    first_pass_seconds: float = 0.0   # round 0 (every page), its zero pages cheap
    first_pass_zero: float = 0.0      # zero pages round 0 sends (`pagetypes`)
    zero_at_start: float = 0.0        # zero pages before anything is sent


@dataclass
class _PreCopy:
    """The live rounds so far, and how they ended."""

    dirty: float
    rounds: list[ModelRound] = field(default_factory=list)
    dirty_by_region: list[float] | None = None   # the next to-send set; None: every page
    total_written: float = 0.0
    elapsed: float = 0.0
    stop_reason: str = ""
    stop_code: StopCode | None = None
    converged: bool = False
    aborted: bool = False
    syncs: int = 1                # bitmap syncs so far, setup's included (dirty-sync-count)
    throttle: ModelThrottle | None = None
    sync: object | None = None    # the engine's SyncLog, for the throttle's periods
    sent_bytes: float = 0.0
    zero_pages: float = 0.0       # zero pages sent so far
    final_zero: float = 0.0       # zero pages left for the stop-and-copy

    @property
    def last(self) -> ModelRound | None:
        return self.rounds[-1] if self.rounds else None


def _positive_or_none(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not value > 0:
        raise ConfigError(f"{what} must be > 0 bytes per second (None: unlimited), got {value!r}")
    return value


def _check(guest_memory_bytes: int, page_size: int, **finite: float) -> None:
    if page_size < 64 or page_size & (page_size - 1):
        raise ConfigError(f"page size must be a power of two >= 64, got {page_size!r}")
    if guest_memory_bytes < page_size or guest_memory_bytes % page_size:
        raise ConfigError(
            f"guest memory must be a positive multiple of the page size ({page_size}), "
            f"got {guest_memory_bytes!r}")
    for what, value in finite.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")


def _skip_solve(to_send: list[tuple[Region, float]], pages: float, seconds_per_page: float,
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


def _stats(run: _PreCopy, guest: _Guest, rate: float) -> PrecopyStats:
    """What the sender tells the policy before the next round."""
    last = run.last
    measured = None
    if last is not None and last.duration_seconds > 0:
        measured = _round_bytes(guest, last.pages_sent, last.zero_pages) / last.duration_seconds
    return PrecopyStats(
        iteration=len(run.rounds), dirty_count=round(run.dirty),
        total_written=round(run.total_written), guest_pages=guest.guest_pages,
        page_size=guest.page_size,
        last_round_pages_sent=round(last.pages_sent) if last else 0,
        last_round_pages_skipped=round(last.pages_skipped) if last else 0,
        last_round_seconds=last.duration_seconds if last else 0.0,
        measured_bytes_per_second=measured, nominal_bytes_per_second=rate,
        elapsed_seconds=run.elapsed)


def _stop(run: _PreCopy, decision: Decision, pol: PrecopyPolicy, iteration: int) -> None:
    """Record how pre-copy ended."""
    run.stop_reason, run.stop_code = decision.reason, decision.stop_code
    if decision.action is Action.ABORT:
        run.aborted = True
        run.stop_reason = f"aborted: {decision.reason}" if decision.reason else "aborted"
    elif decision.stop_code is not None:
        run.converged = decision.stop_code.converged
    else:
        run.converged = iteration < pol.max_iterations


def _round_bytes(guest: _Guest, pages: float, zero: float) -> float:
    return (pages - zero) * guest.wire_per_page + zero * guest.zero_wire


def _live_round(run: _PreCopy, guest: _Guest, pol: PrecopyPolicy, latency: float) -> None:
    """Send the dirty pages live (less those skipped) and count what the workload dirtied.
    The first round sends every page, the zero ones among them cheaply (`pagetypes`)."""
    skipped = 0.0
    first = not run.rounds
    spp = guest.first_pass_seconds / run.dirty if first and run.dirty else guest.seconds_per_page
    send_seconds = run.dirty * spp
    if pol.skip_redirtied and guest.regions:
        if run.dirty_by_region is None:
            to_send = [(r, r.pages) for r in guest.regions]
        else:
            to_send = list(zip(guest.regions, run.dirty_by_region, strict=True))
        skipped, send_seconds = _skip_solve(to_send, run.dirty, spp)
    sent = run.dirty - skipped
    zero = guest.first_pass_zero * sent / run.dirty if first and run.dirty else 0.0
    duration = send_seconds + latency
    running = duration * running_share(run.throttle)     # throttled time writes nothing
    run.dirty_by_region = [r.distinct(running) for r in guest.regions]
    dirtied = sum(run.dirty_by_region)
    run.total_written += sent
    run.zero_pages += zero
    run.elapsed += duration
    run.dirty = dirtied
    run.syncs += 1                # the CLEAN that ends the round
    run.sent_bytes += _round_bytes(guest, sent, zero)
    if run.throttle is not None:
        run.throttle.period_closed(run.sync.synced(run.elapsed, round(dirtied), round(dirtied),
                                                   round(run.sent_bytes)), run.elapsed)
        run.throttle.tick(run.elapsed)
    run.rounds.append(ModelRound(index=len(run.rounds), pages_sent=sent, pages_skipped=skipped,
                                 pages_dirtied=dirtied, duration_seconds=duration,
                                 cpu_throttle_percentage=run.throttle.percentage
                                 if run.throttle is not None else 0, zero_pages=zero))


def _precopy(guest: _Guest, pol: PrecopyPolicy, rate: float, latency: float,
             throttle: ModelThrottle | None, timeouts=None) -> _PreCopy:
    """The live rounds, each after the policy said CONTINUE, until it says otherwise."""
    run = _PreCopy(dirty=float(guest.guest_pages), throttle=throttle,
                   sync=SyncLog(guest.page_size, guest.guest_pages, 0.0))
    while True:
        stats = _stats(run, guest, rate)
        if len(run.rounds) >= _ROUND_GUARD:
            decision = Decision.stop(StopCode.MAX_ITERATIONS,
                                     f"model guard ({_ROUND_GUARD} rounds)")
        else:
            decision = pol.decide(stats)
        if decision.action is Action.CONTINUE:      # checked between rounds here
            decision = timeout_decision(timeouts, run.elapsed) or decision
        if decision.action is not Action.CONTINUE:
            _stop(run, decision, pol, stats.iteration)
            return run
        _live_round(run, guest, pol, latency)


def _continuous(guest: _Guest, pol: PrecopyPolicy, spans: list,
                throttle: ModelThrottle | None, timeouts=None) -> _PreCopy:
    """Pre-copy under a policy that decides after every chunk (`continuous`)."""
    model = ContinuousRun(spans, pol, guest.seconds_per_page, guest.wire_per_page,
                          guest.page_size, guest.guest_pages, throttle, timeouts,
                          guest.zero_wire)
    decision = model.run()
    run = _PreCopy(dirty=model.final_pages(), elapsed=model.now,
                   total_written=model.sent_pages, syncs=model.sync.count, throttle=throttle)
    run.final_zero = model.final_zero_pages()
    run.rounds = [ModelRound(index=r["index"], pages_sent=r["pages_sent"], pages_skipped=0.0,
                             pages_dirtied=r["pages_dirtied"],
                             duration_seconds=r["end"] - r["start"],
                             cpu_throttle_percentage=r["cpu_throttle_percentage"],
                             zero_pages=r.get("zero_pages", 0.0)) for r in model.rounds]
    run.zero_pages = sum(r.zero_pages for r in run.rounds)
    _stop(run, decision, pol, len(run.rounds))
    return run


def predict(*, guest_memory_bytes: int, page_size: int = 4096, workload: WorkloadSpec,
            link_bytes_per_second: float | None,
            rate_limit_bytes_per_second: float | None = None,
            policy: str = "xen", downtime_limit_seconds: float = 0.3,
            latency_seconds: float = 0.0, resume_seconds: float = 0.0,
            dirty_rate_pages_per_second: float | None = None,
            bytes_per_page_overhead: float = 8.0, record_overhead_bytes: float = 32.0,
            policy_settings: dict | None = None,
            auto_converge: ThrottleSpec | None = None,
            dirty_limit: DirtyLimitSpec | None = None,
            completion_timeout=None, warmup_seconds: float = 0.0,
            zero_page_detection: str = "multifd",
            page_bytes: float | None = None) -> ModelPrediction:
    """Predict a pre-copy migration round by round, driving migbed's own policy object.

    `link_bytes_per_second` is the link's speed (pass the *measured* throughput when the link
    is not shaped); `rate_limit_bytes_per_second` the policy's throttle, which applies to the
    live rounds only. Both None raises ConfigError: the model needs a bandwidth. A link of
    None with a rate limit makes the stop-and-copy transfer instantaneous.
    `dirty_rate_pages_per_second` overrides the workload's rate (needed for 'max').
    `latency_seconds` is added to every round, the stop-and-copy included.
    `policy_settings` go to the policy's factory (`policy_for`) beside the downtime limit.
    `auto_converge` or `dirty_limit` throttle the modelled guest on the engine's own rules
    (`cluster.model.throttle`); `completion_timeout` (the engine's `Timeouts`) ends the
    live rounds as the engine's does (between rounds under the xen policies).
    Zero pages (`pagetypes`) cost their pfn word only, unless `zero_page_detection` is
    none: a fresh guest (`workload.fill` zero) holds what its workload wrote in
    `warmup_seconds` of running before the migration, one with content none.
    `page_bytes` replaces what a normal page costs on the wire (its bytes and pfn word),
    for a run whose encoding (XBZRLE, compression) made it less.
    """
    _check(guest_memory_bytes, page_size, latency_seconds=latency_seconds,
           resume_seconds=resume_seconds, bytes_per_page_overhead=bytes_per_page_overhead,
           record_overhead_bytes=record_overhead_bytes)
    link = _positive_or_none(link_bytes_per_second, "link speed")
    limit = _positive_or_none(rate_limit_bytes_per_second, "rate limit")
    if link is None and limit is None:
        raise ConfigError(
            "link speed and rate limit are both unlimited: the model needs a bandwidth; pass "
            "the measured throughput as link_bytes_per_second")
    rate = min(x for x in (link, limit) if x is not None)    # live rounds
    guest_pages = guest_memory_bytes // page_size
    data_pages = guest_pages - -(-guest_pages // (page_size // 8))
    wire_per_page = page_size + bytes_per_page_overhead + record_overhead_bytes / PAGES_PER_RECORD
    if page_bytes is not None:
        if not page_bytes > 0:
            raise ConfigError(f"page bytes must be positive, got {page_bytes!r}")
        wire_per_page = float(page_bytes)
    zero_wire = bytes_per_page_overhead + record_overhead_bytes / PAGES_PER_RECORD
    written = regions(workload, data_pages, rate_of(workload, dirty_rate_pages_per_second))
    spans = layout(written, data_pages, guest_pages)
    zeros = pagetypes.zero_at_start(spans, workload, data_pages, warmup_seconds,
                                    zero_page_detection)
    for span, zero in zip(spans, zeros, strict=True):
        span.zero = zero
    first_seconds, first_zero = pagetypes.first_pass(spans, zeros, wire_per_page / rate,
                                                     zero_wire / rate)
    guest = _Guest(guest_pages, page_size, written, wire_per_page, wire_per_page / rate,
                   zero_wire, first_seconds, first_zero, sum(zeros))
    pol: PrecopyPolicy = policy_for(policy, downtime_limit_seconds=downtime_limit_seconds,
                                    **(policy_settings or {}))
    throttle = model_throttle(auto_converge, dirty_limit, page_size,
                         sum(r.rate for r in guest.regions))
    if pol.mid_pass:
        run = _continuous(guest, pol, spans, throttle, completion_timeout)
    else:
        run = _precopy(guest, pol, rate, latency_seconds, throttle, completion_timeout)
        run.final_zero = guest.zero_at_start if not run.rounds else 0.0

    rounds = list(run.rounds)
    final_pages, final_zero, downtime = 0.0, 0.0, 0.0
    if not run.aborted:     # stop-and-copy: the rest at the link's speed, the limit lifted
        final_pages, final_zero = run.dirty, min(run.dirty, run.final_zero)
        transfer = 0.0 if link is None else _round_bytes(guest, final_pages, final_zero) / link
        downtime = transfer + latency_seconds + resume_seconds
        rounds.append(ModelRound(index=len(rounds), pages_sent=final_pages, pages_skipped=0.0,
                                 pages_dirtied=0.0, duration_seconds=transfer + latency_seconds,
                                 final=True, zero_pages=final_zero))
    pages_total = run.total_written + final_pages
    zero_total = run.zero_pages + final_zero
    return ModelPrediction(
        policy=policy, rounds=tuple(rounds), final_pages=final_pages,
        stop_reason=run.stop_reason,
        stop_code=None if run.aborted or run.stop_code is None else run.stop_code.value,
        total_time_seconds=run.elapsed + downtime, downtime_seconds=downtime,
        pages_sent_total=pages_total,
        bytes_sent_total=_round_bytes(guest, pages_total, zero_total),
        converged=run.converged, dirty_sync_count=run.syncs + (0 if run.aborted else 1),
        lambda_ratio=sum(r.rate for r in guest.regions) * page_size / rate,
        bandwidth_bytes_per_second=rate,
        throttle_schedule=(tuple(throttle.schedule) if isinstance(throttle, ModelThrottle)
                           else ()),
        cpu_throttle_percentage=throttle.percentage if throttle is not None else 0,
        dirty_limit_schedule=(tuple(throttle.schedule)
                              if isinstance(throttle, ModelDirtyLimit) else ()),
        zero_pages=zero_total)
