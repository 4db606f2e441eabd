"""Pre-copy's live rounds: the guest runs while its pages go, until the policy stops it.

Two ways of deciding, as the two systems they model decide:

- **between passes** (`xen`, `xen-legacy`, and any policy without `mid_pass`), as
  libxenguest does: before each pass the policy sees `PrecopyStats`; a pass sends every page
  the cursor has marked (round 0: all of them), then CLEANs the bitmap to mark the next.
- **after every chunk of sending** (`qemu`), as QEMU's migration thread does: a chunk is at
  most 50 ms of sending, or less when the rate limit's budget for the current 100 ms window
  is spent (the sender then sleeps to the window's end). After each chunk the bandwidth
  window may close (threshold = bandwidth x downtime limit, 0 until the first one closes);
  when the pending estimate is below the threshold the bitmap is synced, and the migration
  completes when the pending pages (exact after a sync) are below it, or none are left. The
  switch can so come in the middle of a pass; that pass is a round like any other, with the
  pages it sent before the switch.

Either way the live rounds end with the stream drained (SYNC, SYNC_ACK): the guest pauses
only once the destination has landed every page sent live.

What ends the live rounds is decided by the switch-over arbiter (`nodes.migration.decide.switchover`,
built here by `arbiter_for`): the live rounds only ask it, at every decision point (`decide`),
between the batches of a pass (`within_pass`, `cuts_pass`) and at a pass's end
(`switch_after`), and act on its answer.

The convergence aids (`nodes.migration.decide.convergence`, made with the sender:
`SwitchOver.convergence`) ride along: the throttle trigger at the syncs that close a rate
period (`SourceContext.clean`), dirty-limit's period and the timeouts between batches
(`between_batches`), Xen's adaptive rate between passes. A timeout may end the live rounds
mid-pass: pausing the guest (stop-and-copy), switching to post-copy, or cancelling.
"""

import time

from nodes.errors import MigrationCancelled, MigrationError
from nodes.migration.decide import fixeddowntime, throttle
from nodes.migration.decide.adaptive import PacedRate
from nodes.migration.decide.downtimesteps import budget_of
from nodes.migration.decide.policy import Action, Decision, PrecopyStats, QemuPolicy
from nodes.migration.decide.stall import StallSwitch
from nodes.migration.decide.switchover import Arbiter, Moment
from nodes.migration.progress import RoundStats
from nodes.migration.send.source_context import PassUnderWay, SourceContext
from nodes.migration.wire.records import MAX_BATCH_PAGES
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Phase

MIN_BATCH_PAGES = 64     # QEMU looks at the clock every 64 pages
BATCH_SECONDS = 0.01     # a mid-pass policy's batches take about this long at the nominal rate


class LiveRounds:
    phase = Phase.PRECOPY

    def wanted(self, ctx: SourceContext) -> bool:
        return True

    def run(self, ctx: SourceContext) -> None:
        start_aids(ctx)
        run = continuous if ctx.switch.policy.mid_pass else per_pass
        decision = run(ctx, arbiter_for(ctx))
        ctx.switch.decision = decision
        r = ctx.session.result
        r.stop_reason = decision.reason
        r.stop_code = decision.stop_code.value if decision.stop_code else None
        r.downtime_limit_in_force_seconds = ctx.session.progress.downtime_limit_seconds
        drain(ctx)


def start_aids(ctx: SourceContext) -> None:
    """The convergence aids this migration asked for (made with the sender) start: the fixed
    downtime measured on this host pair when the qemu budget is to subtract it, Xen's
    adaptive rate on the link."""
    s, sw = ctx.session, ctx.switch
    if s.settings.subtract_fixed_downtime:
        fixed = fixeddowntime.measure(ctx.channel, s.settings.timeout_seconds,
                                      s.runtime.measured_fixed_downtime(s.ticket.host))
        if hasattr(sw.policy, "fixed_downtime_seconds"):
            sw.policy.fixed_downtime_seconds = fixed.seconds
        s.result.fixed_downtime = fixed.to_dict()
    if sw.convergence.adaptive is not None:
        ctx.channel.link.set_rate_limit(sw.convergence.adaptive.bytes_per_second)


def arbiter_for(ctx: SourceContext) -> Arbiter:
    """This migration's switch-over arbiter: the policy, the operator's cancel, the post-copy
    trigger when post-copy is allowed, the aids, (between passes) Xen's adaptive rate, which
    paces the link, and the qemu policy's budget (stepped limit, switch-over bandwidth) and
    stall detection, which shares the progress timeout's detector."""
    sw, s = ctx.switch, ctx.session
    rate = sw.convergence.adaptive
    paced = (PacedRate(rate, ctx.channel.link.set_rate_limit)
             if rate is not None and not sw.policy.mid_pass else None)
    stall = s.settings.switchover_on_stall_seconds
    return Arbiter(sw.policy, cancel=s.check_cancel, switch=sw.postcopy,
                   aids=sw.convergence, adaptive=paced,
                   budget=budget_of(s.settings, s.dom.npages * s.hv.page_size, s.clock.t0),
                   stall=(StallSwitch(sw.convergence.timeouts.low, stall)
                          if stall is not None else None))


# -- deciding between passes -------------------------------------------------------------------
def per_pass(ctx: SourceContext, arb: Arbiter) -> Decision:
    while True:
        decision = decide(ctx, arb, ctx.pages.cursor.pending_pages)
        if decision.action is not Action.CONTINUE:
            return decision
        rnd, aid = live_pass(ctx, arb, len(ctx.pages.rounds))
        if aid is not None:
            return aid
        ctx.session.check_cancel()
        after = ctx.session.settings.cancel_after_round
        if after is not None and rnd.index >= after:
            raise MigrationCancelled(
                f"cancelled after round {rnd.index} as asked (--cancel-after-round)")


def live_pass(ctx: SourceContext, arb: Arbiter,
              index: int) -> tuple[RoundStats, Decision | None]:
    """Send every marked page while the guest runs; CLEAN the bitmap for the next pass.
    An aid's decision (a timeout) ends the pass where it stands; it is returned beside."""
    s, pages = ctx.session, ctx.pages
    rnd = RoundStats(index=index)
    s.progress.round = index
    cursor = pages.cursor
    cursor.wrap()
    start = time.monotonic()
    aid = None
    while not cursor.at_end and aid is None:
        if arb.cuts_pass(time.monotonic() - s.clock.t0):
            break                       # the switch is asked for now: the pass ends here
        batch = cursor.take(MAX_BATCH_PAGES)
        if len(batch):
            pages.pipeline.send_batch(batch, rnd, ctx.switch.policy.skip_redirtied,
                                      left_pages=cursor.pending_pages)
        aid = between_batches(ctx, arb, index)
    if aid is None:
        s.faults.at(Phase.PRECOPY, index)     # a round that sent nothing
    rnd.duration_seconds = time.monotonic() - start
    if aid is None:
        ctx.clean(time.monotonic(), into=rnd)
    ctx.round_done(rnd)
    return rnd, aid


# -- deciding after every chunk (QEMU's migration thread) -------------------------------------
def continuous(ctx: SourceContext, arb: Arbiter) -> Decision:
    policy: QemuPolicy = ctx.switch.policy
    pages = ctx.pages
    cursor = pages.cursor
    policy.start(time.monotonic(), ctx.channel.link.bytes_sent)
    pages.current = PassUnderWay(RoundStats(index=0))
    batch = batch_pages(ctx)
    while True:
        estimate = cursor.pending_pages
        if policy.wants_exact(estimate * ctx.session.hv.page_size) or forced_sync_due(ctx):
            ctx.clean(time.monotonic())      # counted in the pass under way, or the last
        decision = decide(ctx, arb, cursor.pending_pages)
        if decision.action is not Action.CONTINUE:
            # A pass cut short is a round too, but not one a switch to post-copy ended before
            # it sent a page (as QEMU's, none was sent then): what its syncs found goes to
            # the round before it.
            if pages.current is not None:
                if pages.current.stats.pages_sent or decision.action is not Action.POSTCOPY:
                    end_pass(ctx)
                else:
                    unsent, pages.current = pages.current, None
                    ctx.dirtied(unsent.stats.pages_dirtied)
            return decision
        chunk(ctx, arb, batch)
        rate_limit(ctx)


def forced_sync_due(ctx: SourceContext) -> bool:
    """QEMU 9.2+: with auto-converge, a sync when none came for 5 s."""
    return throttle.forced_sync_due(ctx.session.settings.auto_converge, time.monotonic(),
                                    ctx.pages.sync.last_sync_at)


def chunk(ctx: SourceContext, arb: Arbiter, batch: int) -> None:
    """ram_save_iterate: send until 50 ms have passed, the window's budget is spent, or no
    page is marked; a pass that reaches the end of memory wraps to the next."""
    policy: QemuPolicy = ctx.switch.policy
    pages = ctx.pages
    cursor = pages.cursor
    t0 = time.monotonic()
    while True:
        if pages.current is None:
            if not cursor.pending_pages:
                return                           # all clean: nothing to send until a sync
            if len(pages.rounds) >= policy.max_iterations:
                return                           # no pass past the cap starts
            pages.current = PassUnderWay(RoundStats(index=len(pages.rounds)))
        index = pages.current.stats.index
        ctx.session.progress.round = index
        pfns = cursor.take(batch)
        if len(pfns):
            pages.pipeline.send_batch(pfns, pages.current.stats,
                                      left_pages=cursor.pending_pages)
        between_batches(ctx, arb, index)
        if cursor.at_end:
            ctx.session.faults.at(Phase.PRECOPY, index)
            end_pass(ctx)
            cursor.wrap()
            if arb.switch_after(len(pages.rounds)):
                return                           # a switch after N rounds: at this pass's end
        if time.monotonic() - t0 >= policy.CHUNK_SECONDS or rate_spent(ctx):
            return


def end_pass(ctx: SourceContext) -> None:
    p = ctx.pages.current
    p.stats.duration_seconds = time.monotonic() - p.start
    ctx.round_done(p.stats)
    ctx.pages.current = None
    after = ctx.session.settings.cancel_after_round
    if after is not None and p.stats.index >= after:
        raise MigrationCancelled(
            f"cancelled after round {p.stats.index} as asked (--cancel-after-round)")


def rate_spent(ctx: SourceContext) -> bool:
    """The rate limit's budget for the current window (limit x 100 ms) is used up."""
    limit = ctx.session.settings.rate_limit_bytes_per_second
    if limit is None:
        return False
    policy: QemuPolicy = ctx.switch.policy
    return ctx.channel.link.bytes_sent - policy.window_bytes >= limit * policy.WINDOW_SECONDS


def rate_limit(ctx: SourceContext) -> None:
    """migration_rate_limit: close the window if it is old enough; if the budget is spent,
    sleep to the window's end, and close it then."""
    policy: QemuPolicy = ctx.switch.policy
    close_window(ctx)
    if rate_spent(ctx):
        wait = policy.window_start + policy.WINDOW_SECONDS - time.monotonic()
        if wait > 0:
            ctx.idle(wait)
        ctx.session.check_cancel()
        close_window(ctx)


def close_window(ctx: SourceContext) -> None:
    policy: QemuPolicy = ctx.switch.policy
    sync = ctx.pages.sync
    if policy.window_closed(time.monotonic(), ctx.channel.link.bytes_sent,
                            sync.dirty_bytes_last_sync, sync.dirty_pages_per_second is not None):
        ctx.session.progress.throughput_bytes_per_second = \
            policy.bandwidth_bytes_per_second or 0.0


def batch_pages(ctx: SourceContext) -> int:
    """Pages per record: as many as take about 10 ms at the nominal rate (64 to 1024), so a
    slow link is looked at about as often as QEMU looks (every 64 pages)."""
    rate = ctx.session.settings.nominal_bytes_per_second
    if rate is None:
        return MAX_BATCH_PAGES
    pages = int(rate * BATCH_SECONDS // ctx.session.hv.page_size)
    return max(MIN_BATCH_PAGES, min(MAX_BATCH_PAGES, pages))


# -- both ---------------------------------------------------------------------------------------
def between_batches(ctx: SourceContext, arb: Arbiter, index: int) -> Decision | None:
    """Cancel, faults, and (deciding between passes) the arbiter's word on the pass under way
    (a timeout may end it)."""
    ctx.session.check_cancel()
    ctx.session.faults.at(Phase.PRECOPY, index)
    ctx.tick()
    return None if ctx.switch.policy.mid_pass else arb.within_pass(time.monotonic())


def decide(ctx: SourceContext, arb: Arbiter, pending_pages: int) -> Decision:
    """Ask the arbiter, with `pending_pages` exact (the remaining bytes QEMU and KubeVirt's
    progress watermark read); publish the progress it was asked on; raise for an abort, and
    for a policy's own switch that this migration does not allow."""
    policy = ctx.switch.policy
    stats = precopy_stats(ctx, pending_pages)
    p = ctx.session.progress
    p.remaining_bytes = stats.pending_bytes
    if not policy.mid_pass and stats.measured_bytes_per_second:
        p.throughput_bytes_per_second = stats.measured_bytes_per_second
    decision = arb.decide(Moment(stats, time.monotonic(), stats.pending_bytes,
                                 ctx.pages.rounds))
    p.expected_downtime_seconds = expected_downtime(ctx, stats)
    limit = getattr(policy, "downtime_limit_seconds", None)    # the qemu policy's only
    stepped = p.downtime_limit_seconds is not None and limit != p.downtime_limit_seconds
    p.downtime_limit_seconds = limit
    if stepped:
        ctx.sample("downtime-step")      # the timeline draws each step
    if decision.action is Action.POSTCOPY and ctx.switch.postcopy is None:
        raise MigrationError(f"policy {policy.name} would switch to post-copy "
                             f"({decision.reason}), which this migration does not allow: "
                             "start it with --postcopy-allowed")
    if decision.action is Action.ABORT:
        raise MigrationError(f"policy {policy.name} aborted: {decision.reason}")
    return decision


def expected_downtime(ctx: SourceContext, stats: PrecopyStats) -> float | None:
    """QEMU's expected-downtime for the qemu policy (its own rule); for the others, what is
    pending at the throughput measured so far."""
    policy = ctx.switch.policy
    if policy.mid_pass:
        return policy.expected_downtime_seconds
    bw = stats.measured_bytes_per_second or ctx.session.settings.link_bytes_per_second
    return stats.pending_bytes / bw if bw else None


def precopy_stats(ctx: SourceContext, pending_pages: int) -> PrecopyStats:
    """What the policy is told (libxenguest's precopy_stats, and more)."""
    s, rounds = ctx.session, ctx.pages.rounds
    last = rounds[-1] if rounds else None
    measured = (last.bytes_sent / last.duration_seconds
                if last and last.duration_seconds > 0 else None)
    return PrecopyStats(
        iteration=len(rounds), dirty_count=pending_pages,
        total_written=sum(r.pages_sent for r in rounds),
        guest_pages=s.dom.npages, page_size=s.hv.page_size,
        last_round_pages_sent=last.pages_sent if last else 0,
        last_round_pages_skipped=last.pages_skipped if last else 0,
        last_round_seconds=last.duration_seconds if last else 0.0,
        measured_bytes_per_second=measured,
        nominal_bytes_per_second=s.settings.nominal_bytes_per_second,
        elapsed_seconds=time.monotonic() - s.clock.t0)


def drain(ctx: SourceContext) -> None:
    """Wait, the guest still running, until the destination has landed every page sent so
    far (SYNC, answered by SYNC_ACK): the sockets' buffers hold megabytes, and whatever is
    still in them when the guest pauses would be inside the downtime."""
    ch = ctx.channel
    ch.send_record(RT.SYNC)
    ch.link.flush(ctx.session.settings.timeout_seconds)
    ch.reader.expect(RT.SYNC_ACK)
