"""The iterative model: a pre-copy migration round by round in expected pages, decided by
migbed's own policy object (see the package docstring for the steps)."""

import math
from dataclasses import dataclass, field

from cluster.model.continuous import ContinuousRun, layout
from cluster.model.postcopy import (
    MissingRange,
    PostcopyPrediction,
    Switching,
    missing_at_switch,
    postcopy_phase,
)
from cluster.model.workload import Region, access_regions, rate_of, regions
from nodes.errors import ConfigError
from nodes.migration.policy import (
    Action,
    Decision,
    PrecopyPolicy,
    PrecopyStats,
    StopCode,
    policy_for,
)
from nodes.migration.postcopy.trigger import SwitchRule
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
    postcopy: bool = False        # the pages sent after a post-copy switch (then also final)

    def to_dict(self) -> dict:
        return {"index": self.index, "pages_sent": self.pages_sent,
                "pages_skipped": self.pages_skipped, "pages_dirtied": self.pages_dirtied,
                "duration_seconds": self.duration_seconds, "final": self.final,
                "postcopy": self.postcopy}


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
    postcopy: PostcopyPrediction | None = None   # the switch and the push (None: pre-copy)

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.final)

    @property
    def postcopy_requests(self) -> float:
        """The page requests the model expects (its faults; 0 without a switch), under the
        report's name."""
        return self.postcopy.expected_faults if self.postcopy is not None else 0.0

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
            "postcopy": self.postcopy.to_dict() if self.postcopy is not None else None,
        }


@dataclass(frozen=True)
class _Guest:
    """What the model knows of the guest and the wire before the first round."""

    guest_pages: int
    page_size: int
    regions: list[Region]
    wire_per_page: float          # bytes on the wire per page, record headers shared out
    seconds_per_page: float       # at the live rounds' rate


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
    missing: list[MissingRange] | None = None   # what a mid-pass switch leaves to send

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
        measured = last.pages_sent * guest.wire_per_page / last.duration_seconds
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


def _live_round(run: _PreCopy, guest: _Guest, pol: PrecopyPolicy, latency: float) -> None:
    """Send the dirty pages live (less those skipped) and count what the workload dirtied."""
    skipped = 0.0
    send_seconds = run.dirty * guest.seconds_per_page
    if pol.skip_redirtied and guest.regions:
        if run.dirty_by_region is None:
            to_send = [(r, r.pages) for r in guest.regions]
        else:
            to_send = list(zip(guest.regions, run.dirty_by_region, strict=True))
        skipped, send_seconds = _skip_solve(to_send, run.dirty, guest.seconds_per_page)
    sent = run.dirty - skipped
    duration = send_seconds + latency
    run.dirty_by_region = [r.distinct(duration) for r in guest.regions]
    dirtied = sum(run.dirty_by_region)
    run.rounds.append(ModelRound(index=len(run.rounds), pages_sent=sent, pages_skipped=skipped,
                                 pages_dirtied=dirtied, duration_seconds=duration))
    run.total_written += sent
    run.elapsed += duration
    run.dirty = dirtied
    run.syncs += 1                # the CLEAN that ends the round


def _precopy(guest: _Guest, pol: PrecopyPolicy, rate: float, latency: float) -> _PreCopy:
    """The live rounds, each after the policy said CONTINUE, until it says otherwise."""
    run = _PreCopy(dirty=float(guest.guest_pages))
    while True:
        stats = _stats(run, guest, rate)
        if len(run.rounds) >= _ROUND_GUARD:
            decision = Decision.stop(StopCode.MAX_ITERATIONS,
                                     f"model guard ({_ROUND_GUARD} rounds)")
        else:
            decision = pol.decide(stats)
        if decision.action is not Action.CONTINUE:
            _stop(run, decision, pol, stats.iteration)
            return run
        cut = getattr(pol, "cut_seconds", None)   # a switch after a time cuts the pass
        if cut is not None and run.elapsed + run.dirty * guest.seconds_per_page > cut:
            cut_round(run, guest, max(0.0, cut - run.elapsed))
            continue
        _live_round(run, guest, pol, latency)


def _continuous(guest: _Guest, pol: PrecopyPolicy, data_pages: int) -> _PreCopy:
    """Pre-copy under a policy that decides after every chunk (`continuous`)."""
    model = ContinuousRun(layout(guest.regions, data_pages, guest.guest_pages), pol,
                          guest.seconds_per_page, guest.wire_per_page, guest.page_size,
                          guest.guest_pages)
    decision = model.run()
    run = _PreCopy(dirty=model.final_pages(), elapsed=model.now,
                   total_written=model.sent_pages, syncs=model.sync.count,
                   missing=[MissingRange(sp.lo, sp.hi, sp.ahead + sp.behind + sum(model._fresh(sp)))
                            for sp in model.spans])
    run.rounds = [ModelRound(index=r["index"], pages_sent=r["pages_sent"], pages_skipped=0.0,
                             pages_dirtied=r["pages_dirtied"],
                             duration_seconds=r["end"] - r["start"]) for r in model.rounds]
    _stop(run, decision, pol, len(run.rounds))
    return run


def predict(*, guest_memory_bytes: int, page_size: int = 4096, workload: WorkloadSpec,
            link_bytes_per_second: float | None,
            rate_limit_bytes_per_second: float | None = None,
            policy: str = "xen", downtime_limit_seconds: float = 0.3,
            latency_seconds: float = 0.0, resume_seconds: float = 0.0,
            dirty_rate_pages_per_second: float | None = None,
            bytes_per_page_overhead: float = 8.0, record_overhead_bytes: float = 32.0,
            policy_settings: dict | None = None, postcopy_after_rounds: int | None = None,
            postcopy_after_seconds: float | None = None,
            postcopy_bandwidth_bytes_per_second: float | None = None,
            switch_resume_seconds: float | None = None) -> ModelPrediction:
    """Predict a pre-copy migration round by round, driving migbed's own policy object;
    with `postcopy_after_rounds` (0: pure post-copy) or `postcopy_after_seconds` a hybrid
    that switches to post-copy (`cluster.model.postcopy`), its push limited to
    `postcopy_bandwidth_bytes_per_second`.

    `link_bytes_per_second` is the link's speed (pass the *measured* throughput when the link
    is not shaped); `rate_limit_bytes_per_second` the policy's throttle, which applies to the
    live rounds only. Both None raises ConfigError: the model needs a bandwidth. A link of
    None with a rate limit makes the stop-and-copy transfer instantaneous.
    `dirty_rate_pages_per_second` overrides the workload's rate (needed for 'max').
    `latency_seconds` is added to every round, the stop-and-copy included.
    `policy_settings` go to the policy's factory (`policy_for`) beside the downtime limit.
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
    guest = _Guest(guest_pages, page_size,
                   regions(workload, data_pages, rate_of(workload, dirty_rate_pages_per_second)),
                   wire_per_page, wire_per_page / rate)
    pol: PrecopyPolicy = policy_for(policy, downtime_limit_seconds=downtime_limit_seconds,
                                    **(policy_settings or {}))
    if postcopy_after_rounds is not None or postcopy_after_seconds is not None:
        pol = Switching(pol, SwitchRule(postcopy_after_rounds, postcopy_after_seconds))
    if pol.mid_pass:
        run = _continuous(guest, pol, data_pages)
    else:
        run = _precopy(guest, pol, rate, latency_seconds)

    rounds = list(run.rounds)
    switch = None
    if run.stop_code is StopCode.POSTCOPY:     # the switch, then the push
        switch = postcopy_phase(
            rounds=len(rounds), switched_at_seconds=run.elapsed,
            missing=run.missing or missing_at_switch(run, guest, data_pages),
            access=access_regions(workload, data_pages,
                                  rate_of(workload, dirty_rate_pages_per_second)),
            data_pages=data_pages, guest_pages=guest_pages, page_size=page_size,
            wire_per_page=wire_per_page, link_bytes_per_second=link,
            postcopy_bytes_per_second=postcopy_bandwidth_bytes_per_second,
            latency_seconds=latency_seconds,
            resume_seconds=resume_seconds if switch_resume_seconds is None
            else switch_resume_seconds)
    final_pages, downtime, tail = _ending(run, rounds, switch, link, wire_per_page,
                                          latency_seconds, resume_seconds)
    pages_total = run.total_written + final_pages
    return ModelPrediction(
        policy=policy, rounds=tuple(rounds), final_pages=final_pages,
        stop_reason=run.stop_reason,
        stop_code=None if run.aborted or run.stop_code is None else run.stop_code.value,
        total_time_seconds=run.elapsed + downtime + tail, downtime_seconds=downtime,
        pages_sent_total=pages_total, bytes_sent_total=pages_total * wire_per_page,
        converged=run.converged, dirty_sync_count=run.syncs + (0 if run.aborted else 1),
        lambda_ratio=sum(r.rate for r in guest.regions) * page_size / rate,
        bandwidth_bytes_per_second=rate, postcopy=switch)


def _ending(run: _PreCopy, rounds: list, switch: PostcopyPrediction | None,
            link: float | None, wire_per_page: float, latency: float,
            resume: float) -> tuple[float, float, float]:
    """(pages sent while paused or after the switch, downtime, seconds after it) of the
    migration's end, its last round appended to `rounds`."""
    if switch is not None:
        rounds.append(ModelRound(index=len(rounds), pages_sent=switch.discard_pages,
                                 pages_skipped=0.0, pages_dirtied=0.0,
                                 duration_seconds=switch.postcopy_seconds, final=True,
                                 postcopy=True))
        return switch.discard_pages, switch.downtime_seconds, switch.postcopy_seconds
    if run.aborted:
        return 0.0, 0.0, 0.0
    # stop-and-copy: the rest at the link's speed, the limit lifted
    transfer = 0.0 if link is None else run.dirty * wire_per_page / link
    rounds.append(ModelRound(index=len(rounds), pages_sent=run.dirty, pages_skipped=0.0,
                             pages_dirtied=0.0, duration_seconds=transfer + latency,
                             final=True))
    return run.dirty, transfer + latency + resume, 0.0


# -- post-copy: the switch rule, and what a per-pass model leaves to send ---------------------
def cut_round(run: _PreCopy, guest: _Guest, seconds: float) -> None:
    """A pass cut short after `seconds` (a switch after a time, between records as the
    sender cuts it): its pages in pfn order until then; the rest, and what the guest dirtied
    meanwhile, are left to send."""
    data_pages = guest.guest_pages - -(-guest.guest_pages // (guest.page_size // 8))
    spans = layout(guest.regions, data_pages, guest.guest_pages)
    to_send = ([s.pages for s in spans] if run.dirty_by_region is None else
               [d for d in _region_values(spans, run.dirty_by_region)])
    sent = min(run.dirty, math.ceil(seconds / guest.seconds_per_page / PAGES_PER_RECORD)
               * PAGES_PER_RECORD)
    duration = sent * guest.seconds_per_page
    left, missing, dirtied_total = sent, [], 0.0
    for s, n in zip(spans, to_send, strict=True):
        unsent = n - min(n, left)
        left -= n - unsent
        dirtied = s.dirtied(duration)
        dirtied_total += dirtied
        fresh = dirtied * (1 - unsent / s.pages) if s.pages else 0.0
        missing.append(MissingRange(s.lo, s.hi, unsent + fresh))
    run.rounds.append(ModelRound(index=len(run.rounds), pages_sent=sent, pages_skipped=0.0,
                                 pages_dirtied=dirtied_total, duration_seconds=duration))
    run.total_written += sent
    run.elapsed += duration
    run.missing = missing
    run.dirty = sum(m.missing for m in missing)
    run.syncs += 1


def _region_values(spans: list, by_region: list[float]) -> list[float]:
    values = iter(by_region)
    return [next(values) if s.region is not None else 0.0 for s in spans]
