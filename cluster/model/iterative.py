"""The iterative model: a pre-copy migration round by round in expected pages, decided by
migbed's own policy object through the sender's own switch-over arbiter
(`nodes.migration.decide.switchover`), so the engine and the model follow one rule set (see the
package docstring for the steps)."""

import math

from cluster.model import pagetypes
from cluster.model.continuous import ContinuousRun, layout
from cluster.model.hybrid import cut_round, missing_at_switch
from cluster.model.postcopy_model import (
    MissingRange,
    PostcopyPrediction,
    postcopy_phase,
)
from cluster.model.rounds import (
    PAGES_PER_RECORD,
    Guest,
    ModelPrediction,
    ModelRound,
    PreCopy,
    round_bytes,
)
from cluster.model.throttle_model import (
    DirtyLimitSpec,
    ModelDirtyLimit,
    ModelThrottle,
    ModelTimeouts,
    ThrottleSpec,
    model_throttle,
    running_share,
)
from cluster.model.workload import Region, access_regions, rate_of, regions, wss_regions
from nodes.errors import ConfigError
from nodes.migration.decide.downtimesteps import SwitchoverBudget
from nodes.migration.decide.policy import (
    Action,
    Decision,
    PrecopyPolicy,
    PrecopyStats,
    StopCode,
    policy_for,
)
from nodes.migration.decide.stall import StallSwitch, Watermark
from nodes.migration.decide.switchover import Arbiter, Moment
from nodes.migration.postcopy.trigger import SwitchRule
from nodes.migration.send.dirtysync import SyncLog
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve

_ROUND_GUARD = 100_000       # a policy that never stops would loop forever


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


def _stats(run: PreCopy, guest: Guest, rate: float) -> PrecopyStats:
    """What the sender tells the policy before the next round."""
    last = run.last
    measured = None
    if last is not None and last.duration_seconds > 0:
        measured = round_bytes(guest, last.pages_sent, last.zero_pages) / last.duration_seconds
    return PrecopyStats(
        iteration=len(run.rounds), dirty_count=round(run.dirty),
        total_written=round(run.total_written), guest_pages=guest.guest_pages,
        page_size=guest.page_size,
        last_round_pages_sent=round(last.pages_sent) if last else 0,
        last_round_pages_skipped=round(last.pages_skipped) if last else 0,
        last_round_seconds=last.duration_seconds if last else 0.0,
        measured_bytes_per_second=measured, nominal_bytes_per_second=rate,
        elapsed_seconds=run.elapsed)


def _stop(run: PreCopy, decision: Decision, pol: PrecopyPolicy, iteration: int) -> None:
    """Record how pre-copy ended."""
    run.stop_reason, run.stop_code = decision.reason, decision.stop_code
    if decision.action is Action.ABORT:
        run.aborted = True
        run.stop_reason = f"aborted: {decision.reason}" if decision.reason else "aborted"
    elif decision.stop_code is not None:
        run.converged = decision.stop_code.converged
    else:
        run.converged = iteration < pol.max_iterations


def _live_round(run: PreCopy, guest: Guest, pol: PrecopyPolicy, latency: float) -> None:
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
    run.sent_bytes += round_bytes(guest, sent, zero)
    if run.throttle is not None:
        run.throttle.period_closed(run.sync.synced(run.elapsed, round(dirtied), round(dirtied),
                                                   round(run.sent_bytes)), run.elapsed)
        run.throttle.tick(run.elapsed)
    run.rounds.append(ModelRound(index=len(run.rounds), pages_sent=sent, pages_skipped=skipped,
                                 pages_dirtied=dirtied, duration_seconds=duration,
                                 cpu_throttle_percentage=run.throttle.percentage
                                 if run.throttle is not None else 0, zero_pages=zero))


def _precopy(guest: Guest, arb: Arbiter, rate: float, latency: float,
             throttle: ModelThrottle | None, cut: float | None) -> PreCopy:
    """The live rounds, each after the arbiter said CONTINUE, until it says otherwise; a
    switch after `cut` seconds cuts the pass under way."""
    pol: PrecopyPolicy = arb.policy
    run = PreCopy(dirty=float(guest.guest_pages), throttle=throttle,
                   sync=SyncLog(guest.page_size, guest.guest_pages, 0.0))
    while True:
        stats = _stats(run, guest, rate)
        if len(run.rounds) >= _ROUND_GUARD:
            decision = Decision.stop(StopCode.MAX_ITERATIONS,
                                     f"model guard ({_ROUND_GUARD} rounds)")
        else:
            decision = arb.decide(Moment(stats, run.elapsed))   # between rounds here
        if decision.action is not Action.CONTINUE:
            _stop(run, decision, pol, stats.iteration)
            return run
        if cut is not None and run.elapsed + run.dirty * guest.seconds_per_page > cut:
            cut_round(run, guest, max(0.0, cut - run.elapsed))
            continue
        _live_round(run, guest, pol, latency)


def _continuous(guest: Guest, arb: Arbiter, spans: list,
                throttle: ModelThrottle | None) -> PreCopy:
    """Pre-copy under a policy that decides after every chunk (`continuous`)."""
    model = ContinuousRun(spans, arb, guest.seconds_per_page, guest.wire_per_page,
                          guest.page_size, guest.guest_pages, throttle, guest.zero_wire)
    decision = model.run()
    model.pause_sync()
    run = PreCopy(dirty=model.final_pages(), elapsed=model.now,
                   total_written=model.sent_pages, syncs=model.sync.count, throttle=throttle,
                   missing=[MissingRange(sp.lo, sp.hi,
                                         sp.ahead + sp.behind + sum(model._fresh(sp)))
                            for sp in model.spans])
    run.final_zero = model.final_zero_pages()
    run.rounds = [ModelRound(index=r["index"], pages_sent=r["pages_sent"], pages_skipped=0.0,
                             pages_dirtied=r["pages_dirtied"],
                             duration_seconds=r["end"] - r["start"],
                             cpu_throttle_percentage=r["cpu_throttle_percentage"],
                             zero_pages=r.get("zero_pages", 0.0)) for r in model.rounds]
    run.zero_pages = sum(r.zero_pages for r in run.rounds)
    _stop(run, decision, arb.policy, len(run.rounds))
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
            page_bytes: float | None = None, postcopy_after_rounds: int | None = None,
            postcopy_after_seconds: float | None = None,
            postcopy_bandwidth_bytes_per_second: float | None = None,
            switch_resume_seconds: float | None = None,
            wss: WssCurve | None = None,
            budget: SwitchoverBudget | None = None,
            switchover_on_stall_seconds: float | None = None) -> ModelPrediction:
    """Predict a pre-copy migration round by round, driving migbed's own policy object;
    with `postcopy_after_rounds` (0: pure post-copy) or `postcopy_after_seconds` a hybrid
    that switches to post-copy (`cluster.model.postcopy_model`), its push limited to
    `postcopy_bandwidth_bytes_per_second`.

    `link_bytes_per_second` is the link's speed (pass the *measured* throughput when the link
    is not shaped); `rate_limit_bytes_per_second` the policy's throttle, which applies to the
    live rounds only. Both None raises ConfigError: the model needs a bandwidth. A link of
    None with a rate limit makes the stop-and-copy transfer instantaneous.
    `dirty_rate_pages_per_second` overrides the workload's rate (needed for 'max').
    `latency_seconds` is added to every round, the stop-and-copy included.
    `policy_settings` go to the policy's factory (`policy_for`) beside the downtime limit.
    `auto_converge` or `dirty_limit` throttle the modelled guest on the engine's own rules
    (`cluster.model.throttle_model`); `completion_timeout` (the engine's `Timeouts`) ends the
    live rounds as the engine's does (between rounds under the xen policies).
    Zero pages (`pagetypes`) cost their pfn word only, unless `zero_page_detection` is
    none: a fresh guest (`workload.fill` zero) holds what its workload wrote in
    `warmup_seconds` of running before the migration, one with content none.
    `page_bytes` replaces what a normal page costs on the wire (its bytes and pfn word),
    for a run whose encoding (XBZRLE, compression) made it less.
    `wss`, a measured writable working set (`workloads.writableset`), replaces the
    workload's regions and rate: the model dirties what the guest was measured to dirty,
    and its zero pages are the share the curve's content sample found, when it has one.
    `budget` (stepped limits, switch-over bandwidth) and `switchover_on_stall_seconds` are
    the qemu policy's arbiter inputs, as the engine's.
    """
    _check(guest_memory_bytes, page_size, latency_seconds=latency_seconds,
           resume_seconds=resume_seconds, bytes_per_page_overhead=bytes_per_page_overhead,
           record_overhead_bytes=record_overhead_bytes)
    link, rate = _bandwidths(link_bytes_per_second, rate_limit_bytes_per_second)
    writes = (wss.rate_pages_per_second if wss is not None
              else rate_of(workload, dirty_rate_pages_per_second))
    guest, spans = _guest(guest_memory_bytes, page_size, workload, writes, rate,
                          bytes_per_page_overhead, record_overhead_bytes, page_bytes,
                          warmup_seconds, zero_page_detection, wss)
    pol: PrecopyPolicy = policy_for(policy, downtime_limit_seconds=downtime_limit_seconds,
                                    **(policy_settings or {}))
    throttle = model_throttle(auto_converge, dirty_limit, page_size,
                              sum(r.rate for r in guest.regions))
    arb = model_arbiter(pol, completion_timeout, postcopy_after_rounds, postcopy_after_seconds,
                        budget, switchover_on_stall_seconds)
    run = _live(guest, arb, spans, rate, latency_seconds, throttle, postcopy_after_seconds)
    switch = None
    if run.stop_code is StopCode.POSTCOPY:     # the switch, then the push
        switch = _switch(run, guest, workload if wss is None else wss, writes, page_size, link,
                         postcopy_bandwidth_bytes_per_second, latency_seconds,
                         resume_seconds if switch_resume_seconds is None
                         else switch_resume_seconds)
    return _prediction(policy, run, guest, switch, throttle, link, rate, latency_seconds,
                       resume_seconds)


def _bandwidths(link_bytes_per_second: float | None,
                rate_limit_bytes_per_second: float | None) -> tuple[float | None, float]:
    """(the link, the live rounds' rate: the link or the rate limit, the slower)."""
    link = _positive_or_none(link_bytes_per_second, "link speed")
    limit = _positive_or_none(rate_limit_bytes_per_second, "rate limit")
    if link is None and limit is None:
        raise ConfigError(
            "link speed and rate limit are both unlimited: the model needs a bandwidth; pass "
            "the measured throughput as link_bytes_per_second")
    return link, min(x for x in (link, limit) if x is not None)


def model_arbiter(pol: PrecopyPolicy, timeouts, after_rounds: int | None,
                  after_seconds: float | None, budget: SwitchoverBudget | None = None,
                  stall_seconds: float | None = None) -> Arbiter:
    """The sender's switch-over arbiter over the model's inputs: the policy, the completion
    timeout (the engine's `Timeouts`, None: none), with post-copy asked for the switch
    rule, and the qemu policy's budget and stall detection. No cancel, no adaptive rate:
    the model has neither."""
    switch = (SwitchRule(after_rounds, after_seconds)
              if after_rounds is not None or after_seconds is not None else None)
    stall = (StallSwitch(timeouts.low if timeouts is not None else Watermark(0.0),
                         stall_seconds) if stall_seconds is not None else None)
    return Arbiter(pol, switch=switch,
                   aids=ModelTimeouts(timeouts) if timeouts is not None else None,
                   budget=budget, stall=stall)


def _live(guest: Guest, arb: Arbiter, spans: list, rate: float, latency: float,
          throttle: ModelThrottle | None, cut: float | None) -> PreCopy:
    """The live rounds: chunk by chunk under a mid-pass policy, else pass by pass."""
    if arb.policy.mid_pass:
        return _continuous(guest, arb, spans, throttle)
    run = _precopy(guest, arb, rate, latency, throttle, cut)
    run.final_zero = guest.zero_at_start if not run.rounds else 0.0
    return run


def _switch(run, guest: Guest, workload: WorkloadSpec | WssCurve, writes: float,
            page_size: int,
            link: float | None, push_rate: float | None, latency_seconds: float,
            resume_seconds: float):
    """The post-copy phase after the live rounds `run` ended in a switch."""
    data_pages = guest.guest_pages - -(-guest.guest_pages // (page_size // 8))
    return postcopy_phase(
        rounds=len(run.rounds), switched_at_seconds=run.elapsed,
        missing=run.missing or missing_at_switch(run, guest, data_pages),
        access=(wss_regions(workload, data_pages) if isinstance(workload, WssCurve)
                else access_regions(workload, data_pages, writes)),
        data_pages=data_pages, guest_pages=guest.guest_pages, page_size=page_size,
        wire_per_page=guest.wire_per_page, link_bytes_per_second=link,
        postcopy_bytes_per_second=push_rate, latency_seconds=latency_seconds,
        resume_seconds=resume_seconds)


def _guest(guest_memory_bytes: int, page_size: int, workload: WorkloadSpec, writes: float,
           rate: float, page_overhead: float, record_overhead: float,
           page_bytes: float | None, warmup_seconds: float,
           zero_page_detection: str, wss: WssCurve | None = None) -> tuple[Guest, list]:
    """The guest as the model knows it before the first round, and its stretches of pages."""
    guest_pages = guest_memory_bytes // page_size
    data_pages = guest_pages - -(-guest_pages // (page_size // 8))
    wire_per_page = page_size + page_overhead + record_overhead / PAGES_PER_RECORD
    if page_bytes is not None:
        if not page_bytes > 0:
            raise ConfigError(f"page bytes must be positive, got {page_bytes!r}")
        wire_per_page = float(page_bytes)
    zero_wire = page_overhead + record_overhead / PAGES_PER_RECORD
    written = (regions(workload, data_pages, writes) if wss is None
               else wss_regions(wss, data_pages))
    spans = layout(written, data_pages, guest_pages)
    zeros = pagetypes.zero_at_start(spans, workload, data_pages, warmup_seconds,
                                    zero_page_detection, wss)
    for span, zero in zip(spans, zeros, strict=True):
        span.zero = zero
    first_seconds, first_zero = pagetypes.first_pass(spans, zeros, wire_per_page / rate,
                                                     zero_wire / rate)
    return Guest(guest_pages, page_size, written, wire_per_page, wire_per_page / rate,
                 zero_wire, first_seconds, first_zero, sum(zeros)), spans


def _prediction(policy: str, run: PreCopy, guest: Guest, switch: PostcopyPrediction | None,
                throttle, link: float | None, rate: float, latency: float,
                resume: float) -> ModelPrediction:
    rounds = list(run.rounds)
    final_pages, final_zero, downtime, tail = _ending(run, rounds, switch, link, guest,
                                                      latency, resume)
    pages_total = run.total_written + final_pages
    zero_total = run.zero_pages + final_zero
    return ModelPrediction(
        policy=policy, rounds=tuple(rounds), final_pages=final_pages,
        stop_reason=run.stop_reason,
        stop_code=None if run.aborted or run.stop_code is None else run.stop_code.value,
        total_time_seconds=run.elapsed + downtime + tail, downtime_seconds=downtime,
        pages_sent_total=pages_total,
        bytes_sent_total=round_bytes(guest, pages_total, zero_total),
        converged=run.converged, dirty_sync_count=run.syncs + (0 if run.aborted else 1),
        lambda_ratio=sum(r.rate for r in guest.regions) * guest.page_size / rate,
        bandwidth_bytes_per_second=rate,
        throttle_schedule=(tuple(throttle.schedule) if isinstance(throttle, ModelThrottle)
                           else ()),
        cpu_throttle_percentage=throttle.percentage if throttle is not None else 0,
        dirty_limit_schedule=(tuple(throttle.schedule)
                              if isinstance(throttle, ModelDirtyLimit) else ()),
        zero_pages=zero_total, postcopy=switch)

def _ending(run: PreCopy, rounds: list, switch: PostcopyPrediction | None,
            link: float | None, guest: Guest, latency: float,
            resume: float) -> tuple[float, float, float, float]:
    """(pages sent while paused or after the switch, the zero pages of them, downtime,
    seconds after it) of the migration's end, its last round appended to `rounds`."""
    if switch is not None:
        rounds.append(ModelRound(index=len(rounds), pages_sent=switch.discard_pages,
                                 pages_skipped=0.0, pages_dirtied=0.0,
                                 duration_seconds=switch.postcopy_seconds, final=True,
                                 postcopy=True))
        return switch.discard_pages, 0.0, switch.downtime_seconds, switch.postcopy_seconds
    if run.aborted:
        return 0.0, 0.0, 0.0, 0.0
    # stop-and-copy: the rest at the link's speed, the limit lifted
    final_zero = min(run.dirty, run.final_zero)
    transfer = 0.0 if link is None else round_bytes(guest, run.dirty, final_zero) / link
    rounds.append(ModelRound(index=len(rounds), pages_sent=run.dirty, pages_skipped=0.0,
                             pages_dirtied=0.0, duration_seconds=transfer + latency,
                             final=True, zero_pages=final_zero))
    return run.dirty, final_zero, transfer + latency + resume, 0.0
