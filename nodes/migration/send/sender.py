"""The save side of a migration: the source's phases over the one page pipeline.

A migration algorithm is the list of phases it runs. Pre-copy (`PRECOPY`) is Xen's:

1. **setup** (`nodes.migration.send.opening`): the data channel opens; the guest switches
   P2M -> VP and log-dirty goes on before round 0 reads a single page; the image and domain
   headers, GUEST_INFO, the P2M frame list (once) and STATIC_DATA_END go out.
2. **precopy**: live rounds. Before each, the policy (`nodes.migration.decide.policy`) decides on
   what the sender knows; round 0 sends every page, each later one CLEANs the bitmap and
   sends what it shows.
3. **stop-and-copy**: pause, final CLEAN, the rest at link speed (the rate limit is lifted),
   the vCPU context, END.
4. **handover** (`nodes.migration.handover`): libxl's READY / PERMISSION_TO_GO / RESULT.
5. **verify** (the frozen copy's digest) and **cleanup** (the copy destroyed), after the
   total time has ended.

Any failure before PERMISSION_TO_GO leaves the guest running here in its original mode
(`Sender.abort`); after it, the control plane settles what became of the guest.
Faults (`nodes.faults.at_source`) fire where the phases call `ctx.session.faults.at(...)`.

The phases run against one `SourceContext` (`nodes.migration.send.source_context`), whose
parts are split by owner; the sender holds the session and the switch-over from its start.
Post-copy (`nodes.migration.postcopy`) is another list of phases over the same context; after
its switch a broken link that does not come back pauses the migration (`PostcopyPaused`): the
sender returns a `postcopy-paused` result, keeps its state, and `resume` goes on from the
paused phase once the operator says the link is back.
"""

import threading
import time

import numpy as np

from nodes.errors import (
    ConnectionLost,
    MigrationCancelled,
    MigrationError,
    ModeError,
    PeerAborted,
    PostcopyPaused,
    describe_failure,
)
from nodes.faults.at_source import SourceFaults
from nodes.faults.stats import FaultStats
from nodes.migration.decide.convergence import Convergence
from nodes.migration.handover import MIGRATED_AWAY, SourceHandover
from nodes.migration.progress import PhaseClock, Progress, RoundStats
from nodes.migration.results import SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.link import Pacer
from nodes.migration.send.liverounds import LiveRounds
from nodes.migration.send.opening import Setup, open_context, send_abort
from nodes.migration.send.source_context import (
    PostcopyState,
    Session,
    SourceContext,
    SourcePhase,
    SwitchOver,
)
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire.channel import Ticket
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, Phase
from nodes.xen.domain import Domain, DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


def check_migratable(hv: Hypervisor, name: str) -> Domain:
    """The source-side checks made before anything moves."""
    dom = hv.guest(name)
    if dom.mode is Mode.PEQM:
        raise ModeError(f"{name} is a P==M guest: its physical addresses are this host's "
                        "machine frames, so it cannot move")
    if dom.dma:
        raise ModeError(f"{name} has a DMA device: it cannot enter VP (shadow) mode, so its "
                        "writes cannot be logged and it cannot be live-migrated")
    if dom.migrating:
        raise MigrationError(f"{name} is already migrating")
    if dom.state is not DomainState.RUNNING:
        raise MigrationError(f"{name} is {dom.state.value}; only a running guest is migrated")
    return dom


class _Always:
    def wanted(self, ctx: SourceContext) -> bool:
        return True


class StopAndCopy(_Always):
    """Pause, final CLEAN, the rest at link speed, the vCPU context, END."""

    phase = Phase.STOP_AND_COPY

    def run(self, ctx: SourceContext) -> None:
        s, pages, link = ctx.session, ctx.pages, ctx.channel.link
        hv, dom, r = s.hv, s.dom, s.result
        with dom.lock:
            hv.pause(dom.name)
            r.pause_wall = time.time()
        paused = ctx.handover.pause_mono = time.monotonic()
        ctx.sample("pause", now=paused)
        r.precopy_bytes = link.bytes_sent
        # Still marked from the live rounds, or dirtied since: the cursor's mask, not
        # np.union1d, whose first call imports numpy.ma (17 ms measured, in the downtime).
        ctx.clean(paused)
        final = np.flatnonzero(pages.cursor.unsent).astype(np.int64)
        pages.cursor.unsent[:] = False
        link.lift_rate_limit()
        rnd = RoundStats(index=len(pages.rounds), final=True)
        pages.pipeline.send(final, rnd, between=ctx.tick)
        if not np.array_equal(dom.p2m, pages.p2m_sent):
            raise MigrationError("the guest's P2M changed during the live loop; the stream "
                                 "would be corrupt")
        s.faults.at(Phase.STOP_AND_COPY)
        ctx.send_record(RT.VCPU_CONTEXT, s.runtime.vcpu_context(dom.name))
        ctx.send_record(RT.SOURCE_TIMING, {
            "pause_wall": r.pause_wall, "final_round_pages": len(final),
            "clock_offset_seconds": r.clock_offset_seconds,
            "clock_rtt_seconds": r.clock_rtt_seconds})
        ctx.send_record(RT.ROUND_STATS, {"rounds": [x.to_dict() for x in pages.rounds]})
        ctx.send_record(RT.END)
        link.flush(s.settings.timeout_seconds)
        rnd.duration_seconds = time.monotonic() - paused
        ctx.round_done(rnd)


class Verify:
    """The frozen copy's digest, for the report's integrity check (after the total time)."""

    phase = Phase.VERIFY

    def wanted(self, ctx: SourceContext) -> bool:
        return ctx.session.settings.verify

    def run(self, ctx: SourceContext) -> None:
        s = ctx.session
        s.result.source_digest = s.hv.canonical_digest(s.dom.name)


class Cleanup(_Always):
    """The guest runs on the destination: its vCPU and its copy here go."""

    phase = Phase.CLEANUP

    def run(self, ctx: SourceContext) -> None:
        s = ctx.session
        s.runtime.stop_guest(s.guest)
        s.hv.destroy_domain(s.dom.name, force=True)


PRECOPY: tuple[SourcePhase, ...] = (Setup(), LiveRounds(), StopAndCopy(), SourceHandover(),
                                    Verify(), Cleanup())


class Sender:
    """The save side of one migration, run on a thread of the source host. It holds the
    session and the switch-over from the start, and the context once setup has opened the
    channel (`ctx`, None before): how it ends depends on how far it got."""

    def __init__(self, hv: Hypervisor, name: str, ticket: Ticket, settings: MigrationSettings,
                 runtime: GuestRuntime, progress: Progress, cancel: threading.Event,
                 shared_link: Pacer | None = None, fault_stats: FaultStats | None = None,
                 algorithm: tuple[SourcePhase, ...] = PRECOPY,
                 postcopy: PostcopyState | None = None):
        dom = check_migratable(hv, name)
        self.faults = SourceFaults(settings.faults, progress, cancel, settings.timeout_seconds,
                                   fault_stats)
        self.algorithm = algorithm
        self.paused_at: int | None = None        # the phase a paused post-copy resumes
        self.cpu_seconds = 0.0
        self.session = Session(
            hv=hv, dom=dom, guest=name, settings=settings, runtime=runtime, progress=progress,
            cancel=cancel, faults=self.faults, ticket=ticket, shared_link=shared_link,
            result=SourceResult(mode_before=dom.mode.value),
            clock=PhaseClock(time.monotonic()), mode_before=dom.mode)
        result = self.session.result
        result.dirty_log = dom.logdirty.kind      # the kernel's, for a process guest
        vcpu = runtime.vcpu_config(name)
        result.vcpu, result.vcpus = vcpu["vcpu"], vcpu["vcpus"]
        page_size = hv.page_size
        self.switch = SwitchOver(
            settings.make_policy(), Convergence(settings, runtime, name, page_size,
                                                dom.npages * page_size, progress,
                                                self.session.clock.t0), postcopy)
        self.ctx: SourceContext | None = None
        self.faults.sample = self._fault_sample
        progress.remaining_bytes = dom.npages * page_size     # all of it, so far

    def _now(self) -> Session | SourceContext:
        """Who samples the progress: the context once made, the session before."""
        return self.ctx if self.ctx is not None else self.session

    def _fault_sample(self, event: str | None) -> None:
        if event:
            self._now().sample(event)
        else:
            self._now().tick()

    def run(self) -> SourceResult:
        """Migrate; returns the source's result. Never raises for migration errors."""
        self.session.dom.migrating = True
        return self._run_from(0)

    def resume(self) -> SourceResult:
        """A post-copy paused on a broken link: the operator says it is back (a cut link
        stays down until then); go on from the paused phase."""
        if self.paused_at is None:
            raise MigrationError(f"the migration of {self.session.guest} is not paused")
        self.faults.repair()
        self.session.result.error = None
        return self._run_from(self.paused_at)

    def _run_from(self, start: int) -> SourceResult:
        s = self.session
        cpu0 = time.thread_time()
        index, paused = start, False
        try:
            for index in range(start, len(self.algorithm)):
                step = self.algorithm[index]
                if self.ctx is None or step.wanted(self.ctx):
                    s.progress.status = step.phase.value
                    self._now().sample("phase")
                    if self.ctx is None:          # setup opens the channel first
                        self.ctx = open_context(s, self.switch)
                    step.run(self.ctx)
                    s.clock.end(step.phase)
            s.result.status = Outcome.COMPLETED
        except PostcopyPaused as exc:
            paused, self.paused_at = True, index
            s.result.status, s.result.error = Outcome.PAUSED, str(exc)
            s.progress.status = Outcome.PAUSED
        except BaseException as exc:  # noqa: BLE001 - every failure must leave the guest safe
            self.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if not paused:
                self.paused_at = None
                self.close()
                self._now().sample("end")
        self.cpu_seconds += time.thread_time() - cpu0
        return self.finish()

    def fail(self, exc: BaseException) -> None:
        """Record why the migration failed; before the hand-over, give the guest back."""
        r, ctx = self.session.result, self.ctx
        r.status = Outcome.CANCELLED if isinstance(exc, MigrationCancelled) else Outcome.FAILED
        r.error = describe_failure(exc, "the destination")
        r.connection_lost = isinstance(exc, ConnectionLost)
        r.stop_code = getattr(exc, "stop_code", None)    # an operator's timeout says which
        if r.stop_code:
            r.stop_reason = r.error
        pc = self.switch.postcopy
        if pc is not None and pc.switched and isinstance(exc, PeerAborted) \
                and pc.resume_wall is None:
            pc.switched = False       # the destination gave up before it resumed the guest
        if pc is not None and pc.switched:
            # After the switch the guest is the destination's (or lost): nothing resumes here.
            pc.fail(self.session, r)
        elif ctx is not None and ctx.handover.handed_over:
            # PERMISSION_TO_GO went out: whether the destination resumed is for the control
            # plane to find out (`resolve_handover`); the copy stays paused here.
            r.handover_unknown = True
        else:
            self.abort(r.error)

    def abort(self, error: str) -> None:
        """Before the hand-over: the guest keeps running on the source, as it was."""
        s, ctx = self.session, self.ctx
        hv, name = s.hv, s.guest
        if ctx is not None and not ctx.channel.dropped:
            send_abort(ctx.channel.link, error)
        if ctx is not None and ctx.handover.renamed:
            hv.rename_domain(name + MIGRATED_AWAY, name)
            ctx.handover.renamed = False
        if s.dom.logdirty.enabled:
            hv.shadow_op(name, ShadowOp.OFF)
        hv.set_mode(name, s.mode_before)
        hv.unpause(name)
        if s.result.pause_wall:
            # Paused for stop-and-copy, then resumed here: that pause was downtime too.
            s.result.resume_wall = time.time()

    def close(self) -> None:
        s = self.session
        self.switch.convergence.release()            # the throttle goes, however it ended
        s.dom.migrating = False
        if self.ctx is not None:
            self.ctx.channel.close()
        if self.switch.postcopy is not None:         # its return-path reader ends with the socket
            self.switch.postcopy.close()
        s.progress.status = s.result.status

    def finish(self) -> SourceResult:
        s, ctx = self.session, self.ctx
        r = s.result
        rounds = ctx.pages.rounds if ctx is not None else []
        r.rounds = list(rounds)
        r.pages_sent_total = sum(x.pages_sent for x in rounds)
        r.bytes_sent_total = link_bytes = ctx.channel.bytes_sent if ctx is not None else 0
        r.downtime_bytes = r.bytes_sent_total - r.precopy_bytes if r.pause_wall else 0
        r.precopy_bytes = r.bytes_sent_total - r.downtime_bytes
        if self.switch.postcopy is not None:
            self.switch.postcopy.fill(r, link_bytes)
        # As QEMU's total-time: start to the guest running on the destination (post-copy: to
        # the destination having all of it). What the source does afterwards (migbed's verify,
        # destroying its copy) is in the phases.
        end = s.clock.ended_at(Phase.HANDOVER) or s.clock.ended_at(Phase.POSTCOPY)
        r.total_time_seconds = (end if end is not None else time.monotonic()) - s.clock.t0
        r.cpu_seconds = self.cpu_seconds
        r.faults = list(s.faults.fired)
        r.phase_seconds = dict(s.clock.seconds)
        r.dirty_sync_count = ctx.pages.sync.count if ctx is not None else 0
        r.progress_history = s.history.to_list()
        r.wire = ctx.pages.pipeline.wire_stats() if ctx is not None else {}
        return r
