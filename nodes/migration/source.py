"""The save side of a migration: the source's phases over the one page pipeline.

A migration algorithm is the list of phases it runs. Pre-copy (`PRECOPY`) is Xen's:

1. **setup**: the data channel opens; the guest switches P2M -> VP and log-dirty goes on
   before round 0 reads a single page; the image and domain headers, GUEST_INFO, the P2M
   frame list (once) and STATIC_DATA_END go out.
2. **precopy**: live rounds. Before each, the policy (`nodes.migration.policy`) decides on
   what the sender knows; round 0 sends every page, each later one CLEANs the bitmap and
   sends what it shows.
3. **stop-and-copy**: pause, final CLEAN, the rest at link speed (the rate limit is lifted),
   the vCPU context, END.
4. **handover** (`nodes.migration.handover`): libxl's READY / PERMISSION_TO_GO / RESULT.
5. **verify** (the frozen copy's digest) and **cleanup** (the copy destroyed), after the
   total time has ended.

Any failure before PERMISSION_TO_GO leaves the guest running here in its original mode
(`abort`); after it, the control plane settles what became of the guest.
Faults (`nodes.faults.source`) fire where the phases call `ctx.faults.at(...)`.
"""

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nodes.errors import (
    ConnectionLost,
    MigbedError,
    MigrationCancelled,
    MigrationError,
    ModeError,
)
from nodes.faults.source import SourceFaults
from nodes.faults.stats import FaultStats
from nodes.migration import records
from nodes.migration.channel import Ticket, connect
from nodes.migration.handover import MIGRATED_AWAY, SourceHandover
from nodes.migration.link import LinkSender, Pacer
from nodes.migration.pipeline import PagePipeline
from nodes.migration.policy import Action, Decision, PrecopyPolicy, PrecopyStats
from nodes.migration.progress import PhaseClock, Progress, RoundStats
from nodes.migration.reader import RecordReader
from nodes.migration.records import RecordType as RT
from nodes.migration.results import CANCELLED, COMPLETED, FAILED, SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.settings import MigrationSettings
from nodes.phase import Phase
from nodes.xen.domain import Domain, DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


def guest_info(hv: Hypervisor, dom: Domain, migration_id: str, workload: dict | None) -> dict:
    """GUEST_INFO: what the destination needs to reserve frames and check compatibility."""
    return {"migration_id": migration_id, "name": dom.name, "pages": dom.npages,
            "data_pages": dom.data_pages, "page_table_pages": len(dom.pt_pfns),
            "page_size": hv.page_size,
            "mode_before": dom.mode.value, "mode_during": Mode.VP.value,
            "arch": hv.profile.arch, "profile": hv.profile.name, "workload": workload}


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


@dataclass
class SourceContext:
    """What the source's phases share: the guest, its settings, the channel, the result."""

    hv: Hypervisor
    dom: Domain
    guest: str                     # the guest's name (the domain's until the hand-over)
    settings: MigrationSettings
    policy: PrecopyPolicy
    runtime: GuestRuntime
    progress: Progress
    cancel: threading.Event
    faults: SourceFaults
    ticket: Ticket
    shared_link: Pacer | None
    result: SourceResult
    clock: PhaseClock
    mode_before: Mode
    sock: socket.socket | None = None
    link: LinkSender | None = None
    reader: RecordReader | None = None
    pipeline: PagePipeline | None = None
    p2m_sent: np.ndarray | None = None
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rounds: list[RoundStats] = field(default_factory=list)
    pause_mono: float | None = None
    renamed: bool = False          # the copy here is `<name>--migratedaway`
    handed_over: bool = False      # PERMISSION_TO_GO went out: the guest is the destination's

    def send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.link.send([records.encode_record(rtype, fields)])

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled(f"migration of {self.guest} cancelled by the operator")

    def round_done(self, rnd: RoundStats) -> None:
        self.rounds.append(rnd)
        self.progress.round_done(rnd)


class SourcePhase(Protocol):
    phase: Phase

    def wanted(self, ctx: SourceContext) -> bool: ...

    def run(self, ctx: SourceContext) -> None: ...


class _Always:
    def wanted(self, ctx: SourceContext) -> bool:
        return True


class Setup(_Always):
    phase = Phase.SETUP

    def run(self, ctx: SourceContext) -> None:
        hv, dom, s = ctx.hv, ctx.dom, ctx.settings
        ctx.sock = connect(ctx.ticket, s.timeout_seconds)
        ctx.link = LinkSender(ctx.sock, s.link_bytes_per_second, s.latency_seconds,
                              s.rate_limit_bytes_per_second, ctx.shared_link)
        ctx.reader = RecordReader(ctx.sock.recv_into)
        ctx.pipeline = PagePipeline(hv, dom, ctx.link, ctx.progress)
        ctx.faults.attach(ctx.sock, ctx.link)
        ctx.faults.at(Phase.SETUP)
        # Shadow mode with log-dirty, before round 0 reads a single page.
        hv.set_mode(dom.name, Mode.VP)
        hv.shadow_op(dom.name, ShadowOp.ENABLE_LOGDIRTY)
        ctx.p2m_sent = dom.p2m.copy()
        ctx.link.send([records.encode_image_header(),
                       records.encode_domain_header(Mode.VP.value, hv.memory.page_shift)])
        ctx.send_record(RT.GUEST_INFO, guest_info(hv, dom, ctx.ticket.migration_id,
                                                  ctx.runtime.workload_spec(dom.name)))
        ctx.send_record(RT.P2M_FRAMES, {"mfns": ctx.p2m_sent.astype("<u8").tobytes()})
        ctx.send_record(RT.STATIC_DATA_END)
        ctx.pending = np.arange(dom.npages, dtype=np.int64)


class LiveRounds(_Always):
    """Pre-copy's live rounds, each decided by the policy before it starts."""

    phase = Phase.PRECOPY

    def run(self, ctx: SourceContext) -> None:
        while True:
            decision = self.decide(ctx)
            if decision.action is Action.ABORT:
                raise MigrationError(f"policy {ctx.policy.name} aborted: {decision.reason}")
            if decision.action is Action.STOP_AND_COPY:
                ctx.result.stop_reason = decision.reason
                ctx.result.stop_code = decision.stop_code.value if decision.stop_code else None
                drain(ctx)
                return
            rnd = self.live_round(ctx, len(ctx.rounds))
            ctx.check_cancel()
            after = ctx.settings.cancel_after_round
            if after is not None and rnd.index >= after:
                raise MigrationCancelled(
                    f"cancelled after round {rnd.index} as asked (--cancel-after-round)")

    def live_round(self, ctx: SourceContext, index: int) -> RoundStats:
        """Send what is pending while the guest runs; CLEAN the bitmap for the next round."""
        rnd = RoundStats(index=index)
        ctx.progress.round = index

        def between() -> None:
            ctx.check_cancel()
            ctx.faults.at(Phase.PRECOPY, index)

        start = time.monotonic()
        ctx.pipeline.send(ctx.pending, rnd, skip_redirtied=ctx.policy.skip_redirtied,
                          between=between)
        ctx.faults.at(Phase.PRECOPY, index)     # a round that sent nothing
        rnd.duration_seconds = time.monotonic() - start
        bitmap, _ = ctx.hv.shadow_op(ctx.dom.name, ShadowOp.CLEAN)
        ctx.pending = np.flatnonzero(bitmap)
        rnd.pages_dirtied = len(ctx.pending)
        ctx.round_done(rnd)
        return rnd

    def decide(self, ctx: SourceContext) -> Decision:
        stats = precopy_stats(ctx)
        p = ctx.progress
        p.dirty_pages = stats.dirty_count
        p.remaining_bytes = stats.pending_bytes
        # QEMU's expected-downtime: what is pending, at the throughput measured so far.
        bw = stats.measured_bytes_per_second or ctx.settings.link_bytes_per_second
        p.expected_downtime_seconds = stats.pending_bytes / bw if bw else None
        if stats.measured_bytes_per_second:
            p.throughput_bytes_per_second = stats.measured_bytes_per_second
        return ctx.policy.decide(stats)


def precopy_stats(ctx: SourceContext) -> PrecopyStats:
    """What the policy is told before a round (libxenguest's precopy_stats, and more)."""
    last = ctx.rounds[-1] if ctx.rounds else None
    measured = (last.bytes_sent / last.duration_seconds
                if last and last.duration_seconds > 0 else None)
    return PrecopyStats(
        iteration=len(ctx.rounds), dirty_count=len(ctx.pending),
        total_written=sum(r.pages_sent for r in ctx.rounds),
        guest_pages=ctx.dom.npages, page_size=ctx.hv.page_size,
        last_round_pages_sent=last.pages_sent if last else 0,
        last_round_pages_skipped=last.pages_skipped if last else 0,
        last_round_seconds=last.duration_seconds if last else 0.0,
        measured_bytes_per_second=measured,
        nominal_bytes_per_second=ctx.settings.nominal_bytes_per_second,
        elapsed_seconds=time.monotonic() - ctx.clock.t0)


class StopAndCopy(_Always):
    """Pause, final CLEAN, the rest at link speed, the vCPU context, END."""

    phase = Phase.STOP_AND_COPY

    def run(self, ctx: SourceContext) -> None:
        hv, dom = ctx.hv, ctx.dom
        with dom.lock:
            hv.pause(dom.name)
            ctx.result.pause_wall = time.time()
        ctx.pause_mono = time.monotonic()
        bitmap, _ = hv.shadow_op(dom.name, ShadowOp.CLEAN)
        # Pending from the last live round, or dirtied since: a mask, not np.union1d,
        # whose first call imports numpy.ma (17 ms measured, inside the downtime).
        final_mask = bitmap.astype(bool, copy=True)
        final_mask[ctx.pending] = True
        final = np.flatnonzero(final_mask).astype(np.int64)
        ctx.link.lift_rate_limit()
        rnd = RoundStats(index=len(ctx.rounds), final=True)
        ctx.pipeline.send(final, rnd)
        if not np.array_equal(dom.p2m, ctx.p2m_sent):
            raise MigrationError("the guest's P2M changed during the live loop; the stream "
                                 "would be corrupt")
        ctx.faults.at(Phase.STOP_AND_COPY)
        ctx.send_record(RT.VCPU_CONTEXT, ctx.runtime.vcpu_context(dom.name))
        ctx.send_record(RT.SOURCE_TIMING, {"pause_wall": ctx.result.pause_wall,
                                           "final_round_pages": len(final)})
        ctx.send_record(RT.ROUND_STATS, {"rounds": [r.to_dict() for r in ctx.rounds]})
        ctx.send_record(RT.END)
        ctx.link.flush(ctx.settings.timeout_seconds)
        rnd.duration_seconds = time.monotonic() - ctx.pause_mono
        ctx.round_done(rnd)


def drain(ctx: SourceContext) -> None:
    """Wait, the guest still running, until the destination has landed every page sent so
    far (SYNC, answered by SYNC_ACK): the sockets' buffers hold megabytes, and whatever is
    still in them when the guest pauses would be inside the downtime."""
    ctx.send_record(RT.SYNC)
    ctx.link.flush(ctx.settings.timeout_seconds)
    ctx.reader.expect(RT.SYNC_ACK)


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
                 algorithm: tuple[SourcePhase, ...] = PRECOPY):
        dom = check_migratable(hv, name)
        self.faults = SourceFaults(settings.faults, progress, cancel, settings.timeout_seconds,
                                   fault_stats)
        self.algorithm = algorithm
        self.ctx = SourceContext(
            hv=hv, dom=dom, guest=name, settings=settings, policy=settings.make_policy(), runtime=runtime,
            progress=progress, cancel=cancel, faults=self.faults, ticket=ticket,
            shared_link=shared_link, result=SourceResult(mode_before=dom.mode.value),
            clock=PhaseClock(time.monotonic()), mode_before=dom.mode)

    def run(self) -> SourceResult:
        """Migrate; returns the source's result. Never raises for migration errors."""
        ctx = self.ctx
        cpu0 = time.thread_time()
        ctx.dom.migrating = True
        try:
            for step in self.algorithm:
                if step.wanted(ctx):
                    ctx.progress.status = step.phase.value
                    step.run(ctx)
                    ctx.clock.end(step.phase)
            ctx.result.status = COMPLETED
        except BaseException as exc:  # noqa: BLE001 - every failure must leave the guest safe
            fail(ctx, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            close(ctx)
        return finish(ctx, cpu0)


def fail(ctx: SourceContext, exc: BaseException) -> None:
    """Record why the migration failed; before the hand-over, give the guest back."""
    r = ctx.result
    r.status = CANCELLED if isinstance(exc, MigrationCancelled) else FAILED
    r.error = describe(exc)
    r.connection_lost = isinstance(exc, ConnectionLost)
    r.stop_code = None
    if ctx.handed_over:
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
    ctx.dom.migrating = False
    if ctx.link is not None:
        ctx.link.close()
    if ctx.sock is not None:
        ctx.sock.close()
    ctx.progress.status = ctx.result.status


def finish(ctx: SourceContext, cpu0: float) -> SourceResult:
    r = ctx.result
    r.rounds = list(ctx.rounds)
    r.pages_sent_total = sum(x.pages_sent for x in ctx.rounds)
    r.bytes_sent_total = ctx.link.bytes_sent if ctx.link else 0
    # As QEMU's total-time: start to the guest running on the destination. What the source
    # does afterwards (migbed's verify, destroying its copy) is in the phases.
    end = ctx.clock.ended_at(Phase.HANDOVER)
    r.total_time_seconds = (end if end is not None else time.monotonic()) - ctx.clock.t0
    r.cpu_seconds = time.thread_time() - cpu0
    r.faults = list(ctx.faults.fired)
    r.phase_seconds = dict(ctx.clock.seconds)
    return r


def describe(exc: BaseException) -> str:
    if isinstance(exc, MigbedError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"connection to the destination failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
