"""What the source's phases share (`SourceContext`) and what a phase is (`SourcePhase`).

A migration algorithm is a tuple of phases run in order against one context. Its fields are
grouped by who owns them: the session (the guest, its settings and policy, the ticket, the
result being built: set once, at the start), the channel (socket, link, reader: opened at
setup, again at a post-copy reconnect), the pages (the pipeline, which pages still go
(`cursor`), the bitmap syncs (`sync`), the rounds done, the pass under way: the live rounds'),
the switch-over (the aids, how the live rounds ended, post-copy's state) and the hand-over.

The parts that live in modules importing this one are typed by the `Protocol`s below (what
the phases ask of them), so no import turns back here.
"""

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nodes.errors import MigrationCancelled
from nodes.faults.at_source import SourceFaults
from nodes.migration.decide.policy import Decision, PrecopyPolicy, PrecopyStats
from nodes.migration.progress import PhaseClock, Progress, ProgressHistory, RoundStats
from nodes.migration.receive.reader import RecordReader
from nodes.migration.results import SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.dirtysync import SyncLog, SyncPeriod
from nodes.migration.send.link import LinkSender, Pacer
from nodes.migration.send.pipeline import PagePipeline, PassCursor
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import records
from nodes.migration.wire.channel import Ticket
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Phase
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


class PassUnderWay(Protocol):
    """The pass under way in continuous mode (`nodes.migration.send.liverounds`)."""

    stats: RoundStats
    start: float                   # monotonic


class ConvergenceAids(Protocol):
    """What the phases ask of the convergence aids (`nodes.migration.decide.convergence.Convergence`)."""

    def period_closed(self, period: SyncPeriod, now: float) -> None: ...

    def tick(self, now: float, remaining_bytes: int | None) -> Decision | None: ...

    def round_done(self, rnd: RoundStats) -> None: ...

    def release(self) -> None: ...


class PostcopyState(Protocol):
    """What the pre-copy phases ask of post-copy's state when it is allowed
    (`nodes.migration.postcopy.state.PostcopySource`)."""

    switched: bool                 # RUN went out: the guest is the destination's

    def prefer(self, decision: Decision, stats: PrecopyStats) -> Decision: ...

    def cut_pass(self, ctx: "SourceContext") -> bool: ...

    def due_after(self, rounds: int) -> bool: ...

    def close(self) -> None: ...

    def fill(self, ctx: "SourceContext", r: SourceResult) -> None: ...


@dataclass
class SourceContext:
    """What the source's phases share: the guest, its settings, the channel, the result."""

    # -- the session: set once, when the sender is made ---------------------------------------
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
    history: ProgressHistory | None = None   # the report's progress_history
    # -- the channel: opened at setup (and again at a post-copy reconnect) ---------------------
    sock: socket.socket | None = None
    link: LinkSender | None = None
    reader: RecordReader | None = None
    # -- the pages: the pipeline's, and the live rounds' ----------------------------------------
    pipeline: PagePipeline | None = None
    cursor: PassCursor | None = None
    sync: SyncLog | None = None
    p2m_sent: np.ndarray | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    current: PassUnderWay | None = None   # the pass under way, for a policy deciding mid-pass
    # -- the switch-over: the aids, how the live rounds ended, post-copy when allowed -----------
    convergence: ConvergenceAids | None = None
    decision: Decision | None = None
    postcopy: PostcopyState | None = None
    # -- the hand-over ------------------------------------------------------------------------
    pause_mono: float | None = None
    renamed: bool = False          # the copy here is `<name>--migratedaway`
    handed_over: bool = False      # PERMISSION_TO_GO went out: the guest is the destination's
    guest_left: bool = False       # it resumed on the destination: its writes are not seen here

    def open_link(self, sock: socket.socket, rate_limit: float | None) -> LinkSender:
        """The sending side of a data channel to the destination: the emulated link, the
        rate limit, the host's shared link, and the progress history sampling slow sends
        (at setup, and again on a post-copy reconnect)."""
        s = self.settings
        link = LinkSender(sock, s.link_bytes_per_second, s.latency_seconds, rate_limit,
                          self.shared_link)
        link.wait = self.link_wait
        return link

    def send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.link.send([records.encode_record(rtype, fields)])

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled(f"migration of {self.guest} cancelled by the operator")

    def round_done(self, rnd: RoundStats) -> None:
        if self.convergence is not None:
            self.convergence.round_done(rnd)
        self.rounds.append(rnd)
        self.progress.round_done(rnd)
        self.sample("round-end")

    # -- the progress history (`nodes.migration.progress.ProgressHistory`) ----------------------
    def sample(self, event: str | None = None, now: float | None = None,
               in_flight_bytes: int = 0) -> None:
        """A sample of the progress now (or at `now`, for an event seen late); bytes the
        link has yet to carry are not counted as sent."""
        if self.history is None:
            return
        p = self.progress
        p.dirty_rate_pages_per_second = self.dirty_rate()
        guest = None if self.guest_left else self.runtime.pages_written(self.guest)
        self.history.add(time.monotonic() if now is None else now, event, {
            "phase": p.status, "round": p.round,
            "bytes_sent_total": self.link.bytes_sent - in_flight_bytes if self.link else 0,
            "pages_sent_total": p.pages_sent_total, "remaining_bytes": p.remaining_bytes,
            "dirty_rate_pages_per_second": p.dirty_rate_pages_per_second,
            "expected_downtime_seconds": p.expected_downtime_seconds,
            "guest_pages_written_total": guest})

    def resumed(self) -> None:
        """The guest resumed on the destination (RESULT said when): the resume goes into the
        history at its time, and the guest's writes are no longer seen from here."""
        self.guest_left = True
        r = self.result
        if r.resume_wall and r.pause_wall and self.pause_mono is not None:
            self.sample("resume", now=self.pause_mono + max(0.0, r.resume_wall - r.pause_wall))

    def tick(self) -> None:
        """At a batch boundary: a sample if one is due."""
        if self.history is not None and self.history.due(time.monotonic()):
            self.sample()

    def link_wait(self, seconds: float, nbytes: int) -> None:
        """The link's pacing wait for the `nbytes` just sent, sampled while it lasts
        (`LinkSender.wait`): those bytes cross the (emulated) wire as the wait goes by."""
        if self.history is None:
            time.sleep(seconds)
            return
        self.history.wait(seconds, lambda left: self.sample(
            in_flight_bytes=int(nbytes * left / seconds)))

    def idle(self, seconds: float) -> None:
        """Wait `seconds` with nothing to send (a rate limit's window), sampled while it
        lasts; a cancel ends the wait at once."""
        if self.history is None:
            self.cancel.wait(seconds)
        else:
            self.history.wait(seconds, lambda left: self.sample(), sleep=self.cancel.wait)

    def dirty_rate(self) -> float | None:
        """QEMU's dirty-pages-rate: over the last sync period of a second or more; before
        one has closed, the last round's pages dirtied over its duration."""
        if self.sync is not None and self.sync.dirty_pages_per_second is not None:
            return self.sync.dirty_pages_per_second
        last = self.rounds[-1] if self.rounds else None
        if last is None or last.duration_seconds <= 0:
            return None
        return last.pages_dirtied / last.duration_seconds

    def clean(self, now: float) -> int:
        """A bitmap sync: CLEAN log-dirty, mark what it shows; returns the pages newly
        marked. Counted in `sync` (QEMU's dirty-sync-count and its rate periods)."""
        bitmap, stats = self.hv.shadow_op(self.dom.name, ShadowOp.CLEAN)
        self.result.shadow_faults += stats.fault_count
        fresh = self.cursor.mark(bitmap)
        period = self.sync.synced(now, fresh, self.cursor.pending_pages, self.link.bytes_sent)
        if period is not None and self.convergence is not None:
            self.convergence.period_closed(period, now)   # QEMU's migration_trigger_throttle
        self.progress.dirty_pages = int(fresh)
        self.progress.remaining_bytes = self.cursor.pending_pages * self.hv.page_size
        return fresh


class SourcePhase(Protocol):
    phase: Phase

    def wanted(self, ctx: SourceContext) -> bool: ...

    def run(self, ctx: SourceContext) -> None: ...
