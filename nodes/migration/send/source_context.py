"""What the source's phases share (`SourceContext`) and what a phase is (`SourcePhase`).

A migration algorithm is a tuple of phases run in order against one context, made of parts
split by who owns them and when they are made, so that none is None for being filled later:

- `Session`: the guest, its settings, the ticket, the result being built; made with the
  sender, before anything moves.
- `SwitchOver`: the policy, the convergence aids, post-copy's state when it is allowed, and
  how the live rounds ended; made with the sender (the operator may ask for post-copy
  before setup has ended), decided by the live rounds.
- `Channel`: socket, link, reader; opened when setup begins (a new one at a post-copy
  reconnect).
- `Pages`: the pipeline, which pages still go (`cursor`), the bitmap syncs (`sync`), the
  rounds done, the pass under way: the live rounds'; made with the channel.
- `HandOver`: the pause, the rename, PERMISSION_TO_GO, the resume on the destination.

The sender holds the session and the switch-over from its start; setup opens the channel and
the pages (`nodes.migration.send.sender.open_context`), which make the `SourceContext` every
phase runs against. Post-copy's state lives in a module that imports this one: it is typed
by the `Protocol` below (what the pre-copy phases and the sender ask of it).
"""

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nodes.errors import MigrationCancelled
from nodes.faults.at_source import SourceFaults
from nodes.migration.decide.convergence import Convergence
from nodes.migration.decide.policy import Decision, PrecopyPolicy, PrecopyStats
from nodes.migration.progress import PhaseClock, Progress, ProgressHistory, RoundStats
from nodes.migration.receive.reader import RecordReader
from nodes.migration.results import SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.dirtysync import SyncLog
from nodes.migration.send.link import LinkSender, Pacer
from nodes.migration.send.pipeline import PagePipeline, PassCursor
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import records
from nodes.migration.wire.channel import Ticket, shut_down
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Phase
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


@dataclass
class Session:
    """The migration as the sender is made with it: set once, read by every phase."""

    hv: Hypervisor
    dom: Domain
    guest: str                     # the guest's name (the domain's until the hand-over)
    settings: MigrationSettings
    runtime: GuestRuntime
    progress: Progress
    cancel: threading.Event
    faults: SourceFaults
    ticket: Ticket
    shared_link: Pacer | None      # the host's uplink, shared by its senders (None: own)
    result: SourceResult
    clock: PhaseClock
    mode_before: Mode
    history: ProgressHistory = field(init=False)    # the report's progress_history

    def __post_init__(self) -> None:
        self.history = ProgressHistory(self.clock.t0)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled(f"migration of {self.guest} cancelled by the operator")

    def sample(self, event: str | None = None, now: float | None = None, *,
               bytes_sent: int = 0, dirty_rate: float | None = None,
               guest_left: bool = False) -> None:
        """A sample of the progress now (or at `now`, for an event seen late): what the
        channel has carried and the dirty rate are the context's (none before setup)."""
        p = self.progress
        p.dirty_rate_pages_per_second = dirty_rate
        guest = None if guest_left else self.runtime.pages_written(self.guest)
        self.history.add(time.monotonic() if now is None else now, event, {
            "phase": p.status, "round": p.round, "bytes_sent_total": bytes_sent,
            "pages_sent_total": p.pages_sent_total, "remaining_bytes": p.remaining_bytes,
            "dirty_rate_pages_per_second": p.dirty_rate_pages_per_second,
            "expected_downtime_seconds": p.expected_downtime_seconds,
            "guest_pages_written_total": guest})

    def tick(self) -> None:
        """At a batch boundary: a sample if one is due."""
        if self.history.due(time.monotonic()):
            self.sample()


class PostcopyState(Protocol):
    """What the pre-copy phases and the sender ask of post-copy's state when it is allowed
    (`nodes.migration.postcopy.state.PostcopySource`): the arbiter's switch trigger, and
    how it ends."""

    switched: bool                 # RUN went out: the guest is the destination's
    resume_wall: float | None      # the destination said its guest resumed (its clock)

    def due(self, stats: PrecopyStats) -> str | None: ...

    def timed_out(self, elapsed_seconds: float) -> bool: ...

    def due_after(self, rounds: int) -> bool: ...

    def close(self) -> None: ...

    def fill(self, r: SourceResult, link_bytes: int) -> None: ...

    def fail(self, session: Session, r: SourceResult) -> None: ...


@dataclass
class SwitchOver:
    """What decides the switch-over (the arbiter's inputs, `nodes.migration.decide.switchover`)
    and what it decided: made with the sender."""

    policy: PrecopyPolicy
    convergence: Convergence       # the aids; released however the migration ends
    postcopy: PostcopyState | None = None     # None: post-copy is not allowed
    decision: Decision = field(default_factory=Decision.go_on)   # how the live rounds ended


@dataclass
class Channel:
    """The data channel to the destination: opened at setup, a new one at a post-copy
    reconnect. `link` is what pages go through (multifd: its channels stand in for the
    link, `PagePipeline.link`)."""

    sock: socket.socket
    link: LinkSender
    reader: RecordReader
    dropped: bool = False          # post-copy: it broke, and is closed until a reconnect

    @property
    def bytes_sent(self) -> int:
        return 0 if self.dropped else self.link.bytes_sent

    def send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.link.send([records.encode_record(rtype, fields)])

    def drop(self) -> None:
        """A broken link after the post-copy switch: closed at once (its return-path reader
        ends with the socket), replaced by a reconnect."""
        self.link.close()
        shut_down(self.sock)
        self.sock.close()
        self.dropped = True

    def close(self) -> None:
        if not self.dropped:
            self.link.close()
            self.sock.close()


@dataclass
class PassUnderWay:
    """The pass under way in continuous mode (`nodes.migration.send.liverounds`)."""

    stats: RoundStats
    start: float = field(default_factory=time.monotonic)


@dataclass
class Pages:
    """The pages' side of the migration: made with the channel, worked by the live rounds,
    stop-and-copy and post-copy's push."""

    pipeline: PagePipeline
    cursor: PassCursor             # which pages still go
    sync: SyncLog                  # the bitmap syncs; counted from log-dirty's start
    p2m_sent: np.ndarray           # the P2M as P2M_FRAMES carried it (at setup)
    rounds: list[RoundStats] = field(default_factory=list)
    current: PassUnderWay | None = None   # the pass under way, for a policy deciding mid-pass


@dataclass
class HandOver:
    """Where the guest is: paused here, renamed, handed over, resumed there."""

    pause_mono: float | None = None    # monotonic: the guest paused here (None: it has not)
    renamed: bool = False          # the copy here is `<name>--migratedaway`
    handed_over: bool = False      # PERMISSION_TO_GO went out: the guest is the destination's
    guest_left: bool = False       # it resumed on the destination: its writes are not seen here


@dataclass
class SourceContext:
    """What the source's phases share, once setup has opened the channel (see the module
    docstring for its parts)."""

    session: Session
    switch: SwitchOver
    channel: Channel
    pages: Pages
    handover: HandOver = field(default_factory=HandOver)

    def open_link(self, sock: socket.socket, rate_limit: float | None) -> LinkSender:
        """The sending side of a data channel to the destination (`new_link`), the progress
        history sampling its slow sends (at setup, and again on a post-copy reconnect)."""
        link = new_link(self.session, sock, rate_limit)
        link.wait = self.link_wait
        return link

    def send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.channel.send_record(rtype, fields)

    def round_done(self, rnd: RoundStats) -> None:
        self.switch.convergence.round_done(rnd)
        self.pages.rounds.append(rnd)
        self.session.progress.round_done(rnd)
        self.sample("round-end")

    # -- the progress history (`nodes.migration.progress.ProgressHistory`) ----------------------
    def sample(self, event: str | None = None, now: float | None = None,
               in_flight_bytes: int = 0) -> None:
        """A sample of the progress now (or at `now`); bytes the link has yet to carry are
        not counted as sent."""
        ch = self.channel
        self.session.sample(event, now, bytes_sent=ch.bytes_sent - in_flight_bytes
                            if not ch.dropped else 0, dirty_rate=self.dirty_rate(),
                            guest_left=self.handover.guest_left)

    def resumed(self) -> None:
        """The guest resumed on the destination (RESULT said when): the resume goes into the
        history at its time, and the guest's writes are no longer seen from here."""
        self.handover.guest_left = True
        r, paused = self.session.result, self.handover.pause_mono
        if r.resume_wall and r.pause_wall and paused is not None:
            self.sample("resume", now=paused + max(0.0, r.resume_wall - r.pause_wall))

    def tick(self) -> None:
        """At a batch boundary: a sample if one is due."""
        if self.session.history.due(time.monotonic()):
            self.sample()

    def link_wait(self, seconds: float, nbytes: int) -> None:
        """The link's pacing wait for the `nbytes` just sent, sampled while it lasts
        (`LinkSender.wait`): those bytes cross the (emulated) wire as the wait goes by."""
        self.session.history.wait(seconds, lambda left: self.sample(
            in_flight_bytes=int(nbytes * left / seconds)))

    def idle(self, seconds: float) -> None:
        """Wait `seconds` with nothing to send (a rate limit's window), sampled while it
        lasts; a cancel ends the wait at once."""
        self.session.history.wait(seconds, lambda left: self.sample(),
                                  sleep=self.session.cancel.wait)

    def dirty_rate(self) -> float | None:
        """QEMU's dirty-pages-rate: over the last sync period of a second or more; before
        one has closed, the last round's pages dirtied over its duration."""
        sync, rounds = self.pages.sync, self.pages.rounds
        if sync.dirty_pages_per_second is not None:
            return sync.dirty_pages_per_second
        last = rounds[-1] if rounds else None
        if last is None or last.duration_seconds <= 0:
            return None
        return last.pages_dirtied / last.duration_seconds

    def clean(self, now: float, into: RoundStats | None = None) -> int:
        """A bitmap sync: CLEAN log-dirty, mark what it shows; returns the pages newly
        marked. Counted in `sync` (QEMU's dirty-sync-count and its rate periods), and as
        dirtied in a round (`dirtied`): `into`, the round this CLEAN ends, if given."""
        s, pages = self.session, self.pages
        bitmap, stats = s.hv.shadow_op(s.dom.name, ShadowOp.CLEAN)
        s.result.shadow_faults += stats.fault_count
        fresh = pages.cursor.mark(bitmap)
        self.dirtied(fresh, into)
        period = pages.sync.synced(now, fresh, pages.cursor.pending_pages,
                                   self.channel.link.bytes_sent)
        if period is not None:
            self.switch.convergence.period_closed(period, now)   # migration_trigger_throttle
        s.progress.dirty_pages = int(fresh)
        s.progress.remaining_bytes = pages.cursor.pending_pages * s.hv.page_size
        return fresh


    def dirtied(self, fresh: int, into: RoundStats | None = None) -> None:
        """Count a sync's newly marked pages in the round they were dirtied in: `into`, else
        the pass under way (a mid-pass policy's), else the last round (a sync between two
        passes, or the one at the pause: the guest wrote them after that round's last sync,
        before the next round began). So every page a round sends after the first is in
        some earlier round's `pages_dirtied`, whatever the policy or the vCPU kind."""
        pages = self.pages
        if into is None and pages.current is not None:
            into = pages.current.stats
        if into is not None:
            into.pages_dirtied += fresh
        elif pages.rounds and fresh:
            last = pages.rounds[-1]
            last.pages_dirtied += fresh
            rounds = self.session.progress.rounds       # what an operator polls, too
            if rounds and rounds[-1].get("index") == last.index:
                rounds[-1] = last.to_dict()


def new_link(session: Session, sock: socket.socket, rate_limit: float | None) -> LinkSender:
    """The sending side of a data channel: the emulated link, the rate limit, the host's
    shared link."""
    s = session.settings
    return LinkSender(sock, s.link_bytes_per_second, s.latency_seconds, rate_limit,
                      session.shared_link)


class SourcePhase(Protocol):
    phase: Phase

    def wanted(self, ctx: SourceContext) -> bool: ...

    def run(self, ctx: SourceContext) -> None: ...
