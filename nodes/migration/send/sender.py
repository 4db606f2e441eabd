"""The save side of a migration: the source's phases over the one page pipeline.

A migration algorithm is the list of phases it runs. Pre-copy (`PRECOPY`) is Xen's:

1. **setup**: the data channel opens; the guest switches P2M -> VP and log-dirty goes on
   before round 0 reads a single page; the image and domain headers, GUEST_INFO, the P2M
   frame list (once) and STATIC_DATA_END go out.
2. **precopy**: live rounds. Before each, the policy (`nodes.migration.decide.policy`) decides on
   what the sender knows; round 0 sends every page, each later one CLEANs the bitmap and
   sends what it shows.
3. **stop-and-copy**: pause, final CLEAN, the rest at link speed (the rate limit is lifted),
   the vCPU context, END.
4. **handover** (`nodes.migration.handover`): libxl's READY / PERMISSION_TO_GO / RESULT.
5. **verify** (the frozen copy's digest) and **cleanup** (the copy destroyed), after the
   total time has ended.

Any failure before PERMISSION_TO_GO leaves the guest running here in its original mode
(`abort`); after it, the control plane settles what became of the guest.
Faults (`nodes.faults.at_source`) fire where the phases call `ctx.faults.at(...)`.

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
    MigbedError,
    MigrationCancelled,
    MigrationError,
    ModeError,
    PeerAborted,
    PostcopyPaused,
)
from nodes.faults.at_source import SourceFaults
from nodes.faults.stats import FaultStats
from nodes.migration import clock
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.handover import MIGRATED_AWAY, SourceHandover
from nodes.migration.progress import PhaseClock, Progress, ProgressHistory, RoundStats
from nodes.migration.receive.reader import RecordReader
from nodes.migration.results import SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.dirtysync import SyncLog
from nodes.migration.send.link import Pacer
from nodes.migration.send.liverounds import LiveRounds
from nodes.migration.send.pipeline import PagePipeline
from nodes.migration.send.source_context import SourceContext, SourcePhase
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import records
from nodes.migration.wire.channel import Ticket, connect
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, Phase
from nodes.xen.domain import Domain, DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


def guest_info(hv: Hypervisor, dom: Domain, migration_id: str,
               workload: dict | None, vcpu: str = "thread", vcpus: int = 1) -> GuestInfo:
    """GUEST_INFO: what the destination needs to reserve frames and check compatibility,
    and to make the guest's vCPUs of the kind that ran them here."""
    return GuestInfo(migration_id=migration_id, name=dom.name, pages=dom.npages,
                     data_pages=dom.data_pages, page_table_pages=len(dom.pt_pfns),
                     page_size=hv.page_size, mode_before=dom.mode.value,
                     mode_during=Mode.VP.value, arch=hv.profile.arch, profile=hv.profile.name,
                     workload=workload, vcpu=vcpu, vcpus=vcpus)


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


class Setup(_Always):
    phase = Phase.SETUP

    def run(self, ctx: SourceContext) -> None:
        hv, dom, s = ctx.hv, ctx.dom, ctx.settings
        ctx.sock = connect(ctx.ticket, s.timeout_seconds)
        # A mid-pass policy keeps QEMU's rate limit itself, as a budget per 100 ms window.
        rate_limit = None if ctx.policy.mid_pass else s.rate_limit_bytes_per_second
        ctx.link = ctx.open_link(ctx.sock, rate_limit)
        ctx.reader = RecordReader(ctx.sock.recv_into)
        ctx.pipeline = PagePipeline.for_migration(hv, dom, ctx.link, ctx.progress, s,
                                                  ctx.ticket, lambda: ctx.sync.count)
        ctx.link = ctx.pipeline.link            # multifd: the channels stand in for it
        ctx.cursor = ctx.pipeline.cursor
        ctx.faults.attach(ctx.sock, ctx.link)
        ctx.faults.at(Phase.SETUP)
        # Shadow mode with log-dirty, before round 0 reads a single page.
        hv.set_mode(dom.name, Mode.VP)
        hv.shadow_op(dom.name, ShadowOp.ENABLE_LOGDIRTY)
        ctx.p2m_sent = dom.p2m.copy()
        ctx.link.send([records.encode_image_header(),
                       records.encode_domain_header(Mode.VP.value, hv.memory.page_shift)])
        ctx.send_record(RT.GUEST_INFO, guest_info(
            hv, dom, ctx.ticket.migration_id, ctx.runtime.workload_spec(dom.name),
            **ctx.runtime.vcpu_config(dom.name)).to_dict())
        ctx.send_record(RT.P2M_FRAMES, {"mfns": ctx.p2m_sent.astype("<u8").tobytes()})
        ctx.send_record(RT.STATIC_DATA_END)
        _measure_clock(ctx)
        ctx.sync = SyncLog(hv.page_size, dom.npages, time.monotonic(), ctx.link.bytes_sent)


def _measure_clock(ctx: SourceContext) -> None:
    """The destination's clock against this one's (`nodes.migration.clock`), while nothing
    else is in flight on the channel."""
    def send(fields: dict) -> None:
        ctx.send_record(RT.CLOCK_PROBE, fields)
        ctx.link.flush(ctx.settings.timeout_seconds)
    est = clock.measure(send, lambda: ctx.reader.expect(RT.CLOCK_REPLY).fields)
    ctx.result.clock_offset_seconds = est.offset_seconds
    ctx.result.clock_rtt_seconds = est.rtt_seconds


class StopAndCopy(_Always):
    """Pause, final CLEAN, the rest at link speed, the vCPU context, END."""

    phase = Phase.STOP_AND_COPY

    def run(self, ctx: SourceContext) -> None:
        hv, dom = ctx.hv, ctx.dom
        with dom.lock:
            hv.pause(dom.name)
            ctx.result.pause_wall = time.time()
        ctx.pause_mono = time.monotonic()
        ctx.sample("pause", now=ctx.pause_mono)
        ctx.result.precopy_bytes = ctx.link.bytes_sent
        # Still marked from the live rounds, or dirtied since: the cursor's mask, not
        # np.union1d, whose first call imports numpy.ma (17 ms measured, in the downtime).
        ctx.clean(ctx.pause_mono)
        final = np.flatnonzero(ctx.cursor.unsent).astype(np.int64)
        ctx.cursor.unsent[:] = False
        ctx.link.lift_rate_limit()
        rnd = RoundStats(index=len(ctx.rounds), final=True)
        ctx.pipeline.send(final, rnd, between=ctx.tick)
        if not np.array_equal(dom.p2m, ctx.p2m_sent):
            raise MigrationError("the guest's P2M changed during the live loop; the stream "
                                 "would be corrupt")
        ctx.faults.at(Phase.STOP_AND_COPY)
        ctx.send_record(RT.VCPU_CONTEXT, ctx.runtime.vcpu_context(dom.name))
        ctx.send_record(RT.SOURCE_TIMING, {
            "pause_wall": ctx.result.pause_wall, "final_round_pages": len(final),
            "clock_offset_seconds": ctx.result.clock_offset_seconds,
            "clock_rtt_seconds": ctx.result.clock_rtt_seconds})
        ctx.send_record(RT.ROUND_STATS, {"rounds": [r.to_dict() for r in ctx.rounds]})
        ctx.send_record(RT.END)
        ctx.link.flush(ctx.settings.timeout_seconds)
        rnd.duration_seconds = time.monotonic() - ctx.pause_mono
        ctx.round_done(rnd)


class Verify:
    """The frozen copy's digest, for the report's integrity check (after the total time)."""

    phase = Phase.VERIFY

    def wanted(self, ctx: SourceContext) -> bool:
        return ctx.settings.verify

    def run(self, ctx: SourceContext) -> None:
        ctx.result.source_digest = ctx.hv.canonical_digest(ctx.dom.name)


class Cleanup(_Always):
    """The guest runs on the destination: its vCPU and its copy here go."""

    phase = Phase.CLEANUP

    def run(self, ctx: SourceContext) -> None:
        ctx.runtime.stop_guest(ctx.guest)
        ctx.hv.destroy_domain(ctx.dom.name, force=True)


PRECOPY: tuple[SourcePhase, ...] = (Setup(), LiveRounds(), StopAndCopy(), SourceHandover(),
                                    Verify(), Cleanup())


class Sender:
    """The save side of one migration, run on a thread of the source host."""

    def __init__(self, hv: Hypervisor, name: str, ticket: Ticket, settings: MigrationSettings,
                 runtime: GuestRuntime, progress: Progress, cancel: threading.Event,
                 shared_link: Pacer | None = None, fault_stats: FaultStats | None = None,
                 algorithm: tuple[SourcePhase, ...] = PRECOPY, postcopy: object | None = None):
        dom = check_migratable(hv, name)
        self.faults = SourceFaults(settings.faults, progress, cancel, settings.timeout_seconds,
                                   fault_stats)
        self.algorithm = algorithm
        self.paused_at: int | None = None        # the phase a paused post-copy resumes
        self.cpu_seconds = 0.0
        self.ctx = SourceContext(
            hv=hv, dom=dom, guest=name, settings=settings, policy=settings.make_policy(), runtime=runtime,
            progress=progress, cancel=cancel, faults=self.faults, ticket=ticket,
            shared_link=shared_link, result=SourceResult(mode_before=dom.mode.value),
            clock=PhaseClock(time.monotonic()), mode_before=dom.mode, postcopy=postcopy)
        self.ctx.result.dirty_log = dom.logdirty.kind      # the kernel's, for a process guest
        vcpu = runtime.vcpu_config(name)
        self.ctx.result.vcpu, self.ctx.result.vcpus = vcpu["vcpu"], vcpu["vcpus"]
        self.ctx.history = ProgressHistory(self.ctx.clock.t0)
        self.faults.sample = lambda event: self.ctx.sample(event) if event else self.ctx.tick()
        progress.remaining_bytes = dom.npages * hv.page_size     # all of it, so far

    def run(self) -> SourceResult:
        """Migrate; returns the source's result. Never raises for migration errors."""
        self.ctx.dom.migrating = True
        return self._run_from(0)

    def resume(self) -> SourceResult:
        """A post-copy paused on a broken link: the operator says it is back (a cut link
        stays down until then); go on from the paused phase."""
        if self.paused_at is None:
            raise MigrationError(f"the migration of {self.ctx.guest} is not paused")
        self.faults.repair()
        self.ctx.result.error = None
        return self._run_from(self.paused_at)

    def _run_from(self, start: int) -> SourceResult:
        ctx = self.ctx
        cpu0 = time.thread_time()
        index, paused = start, False
        try:
            for index in range(start, len(self.algorithm)):
                step = self.algorithm[index]
                if step.wanted(ctx):
                    ctx.progress.status = step.phase.value
                    ctx.sample("phase")
                    step.run(ctx)
                    ctx.clock.end(step.phase)
            ctx.result.status = Outcome.COMPLETED
        except PostcopyPaused as exc:
            paused, self.paused_at = True, index
            ctx.result.status, ctx.result.error = Outcome.PAUSED, str(exc)
            ctx.progress.status = Outcome.PAUSED
        except BaseException as exc:  # noqa: BLE001 - every failure must leave the guest safe
            fail(ctx, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if not paused:
                self.paused_at = None
                close(ctx)
                ctx.sample("end")
        self.cpu_seconds += time.thread_time() - cpu0
        return finish(ctx, self.cpu_seconds)


def fail(ctx: SourceContext, exc: BaseException) -> None:
    """Record why the migration failed; before the hand-over, give the guest back."""
    r = ctx.result
    r.status = Outcome.CANCELLED if isinstance(exc, MigrationCancelled) else Outcome.FAILED
    r.error = describe(exc)
    r.connection_lost = isinstance(exc, ConnectionLost)
    r.stop_code = getattr(exc, "stop_code", None)    # an operator's timeout says which
    if r.stop_code:
        r.stop_reason = r.error
    pc = ctx.postcopy
    if pc is not None and pc.switched and isinstance(exc, PeerAborted) \
            and pc.resume_wall is None:
        pc.switched = False       # the destination gave up before it resumed the guest
    if pc is not None and pc.switched:
        # After the switch the guest is the destination's (or lost): nothing resumes here.
        pc.fail(ctx, r)
    elif ctx.handed_over:
        # PERMISSION_TO_GO went out: whether the destination resumed is for the control
        # plane to find out (`resolve_handover`); the copy stays paused here.
        r.handover_unknown = True
    else:
        abort(ctx, r.error)


def abort(ctx: SourceContext, error: str) -> None:
    """Before the hand-over: the guest keeps running on the source, as it was."""
    hv, name = ctx.hv, ctx.guest
    if ctx.link is not None:
        try:
            ctx.link.send([records.encode_record(RT.ABORT, {"error": error[:1000]})])
        except Exception:  # noqa: BLE001 - the peer may be gone; the abort is best effort
            pass
    if ctx.renamed:
        hv.rename_domain(name + MIGRATED_AWAY, name)
        ctx.renamed = False
    if ctx.dom.logdirty.enabled:
        hv.shadow_op(name, ShadowOp.OFF)
    hv.set_mode(name, ctx.mode_before)
    hv.unpause(name)
    if ctx.result.pause_wall:
        # Paused for stop-and-copy, then resumed here: that pause was downtime too.
        ctx.result.resume_wall = time.time()


def close(ctx: SourceContext) -> None:
    if ctx.convergence is not None:
        ctx.convergence.release()                    # the throttle goes, however it ended
    ctx.dom.migrating = False
    if ctx.link is not None:
        ctx.link.close()
    if ctx.sock is not None:
        ctx.sock.close()
    if ctx.postcopy is not None:      # its return-path reader ends with the socket
        ctx.postcopy.close()
    ctx.progress.status = ctx.result.status


def finish(ctx: SourceContext, cpu_seconds: float) -> SourceResult:
    r = ctx.result
    r.rounds = list(ctx.rounds)
    r.pages_sent_total = sum(x.pages_sent for x in ctx.rounds)
    r.bytes_sent_total = ctx.link.bytes_sent if ctx.link else 0
    r.downtime_bytes = r.bytes_sent_total - r.precopy_bytes if r.pause_wall else 0
    r.precopy_bytes = r.bytes_sent_total - r.downtime_bytes
    if ctx.postcopy is not None:
        ctx.postcopy.fill(ctx, r)
    # As QEMU's total-time: start to the guest running on the destination (post-copy: to
    # the destination having all of it). What the source does afterwards (migbed's verify,
    # destroying its copy) is in the phases.
    end = ctx.clock.ended_at(Phase.HANDOVER) or ctx.clock.ended_at(Phase.POSTCOPY)
    r.total_time_seconds = (end if end is not None else time.monotonic()) - ctx.clock.t0
    r.cpu_seconds = cpu_seconds
    r.faults = list(ctx.faults.fired)
    r.phase_seconds = dict(ctx.clock.seconds)
    r.dirty_sync_count = ctx.sync.count if ctx.sync is not None else 0
    r.progress_history = ctx.history.to_list() if ctx.history is not None else []
    r.wire = ctx.pipeline.wire_stats() if ctx.pipeline is not None else {}
    return r


def describe(exc: BaseException) -> str:
    if isinstance(exc, MigbedError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"connection to the destination failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
