"""The source's side of post-copy: the switch and the push, two phases over the same page
pipeline as pre-copy's.

- **switch** (`Switch`): pause; the last bitmap sync; the discard set (every page dirtied
  since it was sent, or never sent: the cursor's marks) as a bitmap; the vCPU context; RUN.
  From RUN on the guest is the destination's: nothing resumes it here. QEMU's downtime is
  this phase (stop until the package is sent); libvirt's runs on to the destination's resume,
  which its POSTCOPY_RESUMED tells.
- **postcopy** (`PostcopyPush`): the pages of the discard set, each once. Requested pages
  (the return path's REQ_PAGES, read by a thread: `returnpath.RequestReader`) go first, at the
  link's speed; a requested page already sent is skipped; the push then continues after the
  last requested page, so its neighbours follow. The push itself is paced by the post-copy
  bandwidth (QEMU's max-postcopy-bandwidth), a wait that any request cuts short. END, then
  the destination's RESULT once it has every page. With `--postcopy-preempt` the requested
  pages go instead on a connection of their own (`preempt`), opened at the switch, by a
  thread of their own, ahead of the push; the push and it share the cursor under a lock.

A broken link after the switch (an I/O error, or no progress for the timeout) pauses the
migration: the source reconnects by itself for the timeout (`recovery`), else the phase
raises `PostcopyPaused` and the sender waits, its state kept, for `migrate-recover`.

`POSTCOPY` is the algorithm of every migration that allows post-copy: pre-copy's phases, of
which stop-and-copy and handover run only when pre-copy finished without a switch.
"""

import time
from typing import cast

import numpy as np

from nodes.errors import (
    GuestLost,
    MigbedError,
    MigrationError,
    PeerAborted,
    PostcopyPaused,
)
from nodes.migration.decide.policy import Action
from nodes.migration.handover import MIGRATED_AWAY, SourceHandover
from nodes.migration.postcopy import nativefault, recovery
from nodes.migration.postcopy.preempt import PreemptSender
from nodes.migration.postcopy.state import PostcopySource
from nodes.migration.progress import RoundStats
from nodes.migration.results import SourceResult
from nodes.migration.send.liverounds import LiveRounds
from nodes.migration.send.opening import Setup
from nodes.migration.send.sender import (
    PRECOPY,
    Cleanup,
    Sender,
    StopAndCopy,
    Verify,
)
from nodes.migration.send.source_context import SourceContext, SourcePhase
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import pagesets, records
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, PausedEnd, Phase

PUSH_BATCH_SECONDS = 0.01    # a push record takes about this long: requests wait behind one
MIN_PUSH_PAGES, MAX_PUSH_PAGES = 64, records.MAX_BATCH_PAGES


def switched(ctx: SourceContext) -> bool:
    return ctx.switch.postcopy is not None and ctx.switch.decision.action is Action.POSTCOPY


def state(ctx: SourceContext) -> PostcopySource:
    """Post-copy's state, as the post-copy phases (run only when it is allowed) know it."""
    return cast(PostcopySource, ctx.switch.postcopy)


class PrecopyOnly:
    """A phase of pre-copy's ending (stop-and-copy, handover), skipped after a switch."""

    def __init__(self, inner: SourcePhase):
        self.inner = inner
        self.phase = inner.phase

    def wanted(self, ctx: SourceContext) -> bool:
        return not switched(ctx) and self.inner.wanted(ctx)

    def run(self, ctx: SourceContext) -> None:
        self.inner.run(ctx)


class Switch:
    """Pause, last sync, the discard set, the vCPU context, RUN (see the module docstring)."""

    phase = Phase.SWITCH

    def wanted(self, ctx: SourceContext) -> bool:
        return switched(ctx)

    def run(self, ctx: SourceContext) -> None:
        s, pages, pc, link = ctx.session, ctx.pages, state(ctx), ctx.channel.link
        hv, dom, r = s.hv, s.dom, s.result
        with dom.lock:
            hv.pause(dom.name)
            r.pause_wall = time.time()
        paused = ctx.handover.pause_mono = time.monotonic()
        pc.precopy_bytes = link.bytes_sent
        ctx.clean(paused)                              # the last bitmap sync
        link.lift_rate_limit()
        if not np.array_equal(dom.p2m, pages.p2m_sent):
            raise MigrationError("the guest's P2M changed during the live loop; the stream "
                                 "would be corrupt")
        hv.rename_domain(s.guest, s.guest + MIGRATED_AWAY)
        ctx.handover.renamed = True
        ctx.send_record(RT.POSTCOPY_DISCARD,        # encoded now, before any push
                        {"bitmap": pagesets.encode_bitmap(pages.cursor.unsent)})
        ctx.send_record(RT.VCPU_CONTEXT, s.runtime.vcpu_context(s.guest))
        ctx.send_record(RT.SOURCE_TIMING, {
            "pause_wall": r.pause_wall, "final_round_pages": 0,
            "clock_offset_seconds": r.clock_offset_seconds,
            "clock_rtt_seconds": r.clock_rtt_seconds})
        ctx.send_record(RT.ROUND_STATS, {"rounds": [x.to_dict() for x in pages.rounds]})
        pc.switched = True                             # nothing resumes it here from now on
        pages.pipeline.after_switch = True             # QEMU: no XBZRLE in post-copy
        pc.round = RoundStats(index=len(pages.rounds), final=True, postcopy=True)
        pc.switched_at_seconds = paused - s.clock.t0
        try:
            # The native fault channel where it applies (with preempt, it is that channel),
            # else the preempt channel if asked for: accepted by the destination at RUN.
            native = nativefault.open_source(ctx, pc)
            if s.settings.postcopy_preempt and not native:
                pc.preempt = PreemptSender(ctx, pc)
            ctx.send_record(RT.POSTCOPY_RUN, {"native_faults": True} if native else None)
            link.flush(s.settings.timeout_seconds)
        except MigbedError as exc:                     # the push recovers the link
            pc.broke(exc)
            return
        pc.downtime_qemu_seconds = time.monotonic() - paused
        pc.downtime_bytes = link.bytes_sent - pc.precopy_bytes
        pc.start_reader(ctx.channel, dom.npages)


class PostcopyPush:
    """Requested pages first, then the push, until every page of the discard set has gone;
    END; RESULT. A broken link is recovered, or pauses the migration."""

    phase = Phase.POSTCOPY

    def wanted(self, ctx: SourceContext) -> bool:
        return switched(ctx)

    def run(self, ctx: SourceContext) -> None:
        pc, r = state(ctx), ctx.session.result
        timeout = ctx.session.settings.timeout_seconds
        if pc.paused and not recovery.reconnect(ctx, pc, timeout):
            raise recovery.still_paused(ctx, pc, timeout)
        while True:
            try:
                push(ctx, pc)
                break
            except (PeerAborted, GuestLost, PostcopyPaused):
                raise
            except (MigbedError, OSError) as exc:     # the link broke: recover it
                pc.broke(exc)
                if not recovery.reconnect(ctx, pc, timeout):
                    pc.paused = True
                    raise recovery.still_paused(ctx, pc, timeout) from None
        paused = ctx.handover.pause_mono
        rnd = pc.round
        pc.close_preempt()                    # its pages and bytes are the round's too
        rnd.pages_sent += pc.preempt_pages
        rnd.bytes_sent += pc.preempt_bytes
        rnd.pages_sent += pc.native_pages     # the native fault channel's, likewise
        rnd.bytes_sent += pc.native_bytes
        rnd.duration_seconds = time.monotonic() - paused
        ctx.round_done(rnd)
        r.destination_digest = pc.result["digest"]
        if pc.resume_wall is None:
            pc.resume_wall = pc.result["resume_wall"]
        if pc.resume_seen is not None:   # pause to the destination's RESUMED, seen here
            r.downtime_source_seconds = pc.resume_seen - paused


def push(ctx: SourceContext, pc: PostcopySource) -> None:
    s = ctx.session
    pc.serve_from(lambda: serve(ctx, pc))     # the reader serves requests while we wait
    try:
        push_all(ctx, pc)
    finally:
        pc.serve_from(None)                   # from here on, this thread alone sends
    if pc.preempt is not None:           # nothing of it still on its way before END
        pc.preempt.finish(s.settings.timeout_seconds)
    if pc.native is not None:            # END on the fault channel too (no page after it)
        pc.native.finish()
    ctx.send_record(RT.END)
    ctx.channel.link.flush(s.settings.timeout_seconds)
    result = pc.wait_result(s.settings.timeout_seconds)
    serve(ctx, pc)                       # requests that crossed END: all sent already
    if not result["ok"]:
        raise GuestLost(f"the destination could not complete the post-copy: "
                        f"{result['error']}")


def push_all(ctx: SourceContext, pc: PostcopySource) -> None:
    """Requests first, then push records at the push's pace, until every page has gone;
    each send under the data channel's lock (the reader may be serving a request)."""
    s, pages = ctx.session, ctx.pages
    cursor, rnd = pages.cursor, pc.round
    batch = push_batch_pages(ctx)
    fired = False
    while True:
        pc.raise_if_broken()
        with pc.send_lock:
            serve(ctx, pc)
        if not cursor.pending_pages:
            break
        if pc.wait_push():
            continue                     # a request came first: it goes before the push
        with pc.send_lock:
            with pc.cursor_lock:          # the preempt channel takes requested pages from it
                if cursor.at_end:
                    cursor.wrap()
                pfns = cursor.take(batch)
            if not len(pfns):
                continue
            start = time.monotonic()
            nbytes = pages.pipeline.send_batch(pfns, rnd, left_pages=cursor.pending_pages)
        pc.pages_pushed += len(pfns)
        pc.pushed(nbytes, start)
        if not fired:
            fired = True
            s.faults.at(Phase.POSTCOPY)
    if not fired:
        s.faults.at(Phase.POSTCOPY)


def serve(ctx: SourceContext, pc: PostcopySource) -> None:
    """The requested pages, before anything else, at the link's speed; pages already sent
    are skipped; the push continues after the last page asked for."""
    pages = ctx.pages
    for pfns in pc.take_requests():
        with pc.cursor_lock:
            wanted = pages.cursor.take_these(pfns)
            pc.requests_already_sent += len(pfns) - len(wanted)
            pc.pages_requested += len(wanted)
            if len(wanted):
                pages.cursor.seek(int(wanted[-1]) + 1)
        if len(wanted):
            pages.pipeline.send(wanted, pc.round)


def push_batch_pages(ctx: SourceContext) -> int:
    """Pages per push record: about 10 ms of the push's rate (64 to 1024), so a request
    waits behind little."""
    s = ctx.session
    rates = [r for r in (s.settings.link_bytes_per_second,
                         s.settings.postcopy_bandwidth_bytes_per_second) if r]
    if not rates:
        return MAX_PUSH_PAGES
    pages = int(min(rates) * PUSH_BATCH_SECONDS // s.hv.page_size)
    return max(MIN_PUSH_PAGES, min(MAX_PUSH_PAGES, pages))


def settle_paused(sender: Sender, outcome: PausedEnd, why: str) -> SourceResult:
    """End a paused post-copy as the control plane found its destination (see
    `nodes.host.postcopy.PostcopyControl.settle_paused`)."""
    ctx, r = sender.ctx, sender.session.result
    if sender.paused_at is None or ctx is None:
        raise MigrationError(f"the migration of {sender.session.guest} is not paused")
    pc = state(ctx)
    try:
        if outcome == PausedEnd.COMPLETED:           # the destination has it all: RESULT was lost
            for step in (Verify(), Cleanup()):
                if step.wanted(ctx):
                    step.run(ctx)
                    sender.session.clock.end(step.phase)
            r.status, r.error = Outcome.COMPLETED, None
        elif outcome == PausedEnd.RESUME:            # the destination never ran the guest
            pc.switched = False
            r.status, r.error = Outcome.FAILED, why
            sender.abort(why)
        elif outcome == PausedEnd.LOST:
            r.status, r.error = Outcome.FAILED, why
            pc.fail(sender.session, r)
        else:
            raise MigrationError(f"unknown outcome {outcome!r} for a paused post-copy")
    finally:
        sender.paused_at = None
        sender.close()
    return sender.finish()


POSTCOPY: tuple[SourcePhase, ...] = (
    Setup(), LiveRounds(), PrecopyOnly(StopAndCopy()), PrecopyOnly(SourceHandover()),
    Switch(), PostcopyPush(), Verify(), Cleanup())



def plan(settings: MigrationSettings) -> tuple[tuple[SourcePhase, ...], PostcopySource | None]:
    """The algorithm a migration with these settings runs, and its post-copy state."""
    if not settings.postcopy_allowed:
        return PRECOPY, None
    return POSTCOPY, PostcopySource(settings)


__all__ = ["POSTCOPY", "PostcopySource", "plan", "settle_paused"]
