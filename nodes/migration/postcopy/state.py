"""A migration's post-copy state on its source (`PostcopySource`): the switch asked for and
the rule that decides it, the requests the return path brings (a thread hands them over), the
push's pacing, the destination's RESULT, a broken link, and every figure of the report's
`postcopy` block, as QEMU names them where it has names."""

import collections
import threading
import time
from collections.abc import Callable

import numpy as np

from nodes.errors import ConnectionLost, MigbedError
from nodes.migration.clock import to_source_clock
from nodes.migration.decide.policy import PrecopyStats
from nodes.migration.postcopy.nativefault import NativeServer
from nodes.migration.postcopy.preempt import PreemptSender
from nodes.migration.postcopy.returnpath import RequestReader
from nodes.migration.postcopy.trigger import SwitchRule
from nodes.migration.progress import RoundStats
from nodes.migration.results import SourceResult
from nodes.migration.send.link import Pacer
from nodes.migration.send.source_context import Channel, Session
from nodes.migration.settings import MigrationSettings


class PostcopySource:
    """A migration's post-copy state on its source: the switch request, the requests the
    return path brings, what the push sent, and the figures of the report."""

    def __init__(self, settings: MigrationSettings):
        self.rule = SwitchRule(settings.postcopy_after_rounds, settings.postcopy_after_seconds)
        bw = settings.postcopy_bandwidth_bytes_per_second
        self.pacer = Pacer(bw) if bw else None
        self.push_due_at = 0.0                   # monotonic: the push's next record may go
        self.asked = threading.Event()           # migrate-postcopy
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()   # request records' pfns
        self.broken: BaseException | None = None
        self.result: dict | None = None          # the destination's RECEIVER_RESULT
        self.resume_wall: float | None = None
        self.resume_seen: float | None = None     # monotonic: RESUMED reached this side
        self.reader: RequestReader | None = None
        # The preempt channel (`preempt.PreemptSender`; None: requests go to the push), the
        # cursor's lock the push shares with it, and what its channels carried so far.
        self.preempt: PreemptSender | None = None
        self.cursor_lock = threading.Lock()
        # The data channel's one sender at a time while the push runs: the push thread, or
        # the return path's reader serving a request itself (`server`, set by the push).
        self.send_lock = threading.Lock()
        self.server: Callable[[], None] | None = None
        self.preempt_pages = 0
        self.preempt_bytes = 0
        self.preempt_channels = 0                # opened: one at the switch, one a recovery
        # The native fault channel (`nativefault.NativeServer`; None: not open), opened at
        # the switch and again by a recovery, on the same server; its figures are added at
        # each close.
        self.native: NativeServer | None = None
        self.native_label = "native"             # "preempt" when it is the preempt channel
        self.native_seen = dict.fromkeys(("requests", "served", "already_sent", "bytes"), 0)
        self.native_pages = 0                    # its pages and bytes (in the preempt
        self.native_bytes = 0                    # channel's too when it is that channel)
        self.switched = False                    # RUN went out: the guest is the destination's
        self.paused = False
        self.round: RoundStats | None = None
        self.requests = 0                        # pages asked for (QEMU's postcopy-requests)
        self.pages_requested = 0                 # sent because asked for
        self.pages_pushed = 0                    # sent by the background push
        self.requests_already_sent = 0           # asked for, already on their way: skipped
        self.recoveries = 0
        self.paused_seconds = 0.0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.earlier_links_bytes = 0             # bytes of connections that broke
        self.switched_at_seconds: float | None = None
        self.downtime_qemu_seconds: float | None = None
        self.guest_rate_before: float | None = None

    # -- the switch: this migration's trigger, as the arbiter consults it (`switchover`) --
    def due(self, stats: PrecopyStats) -> str | None:
        """Why the switch is due at this decision point (the operator's request counts)."""
        return self.rule.due(stats, self.asked.is_set())

    def timed_out(self, elapsed_seconds: float) -> bool:
        """The time (or the operator) says switch now: the pass under way is cut short."""
        return self.rule.timed_out(elapsed_seconds, self.asked.is_set())

    def due_after(self, rounds: int) -> bool:
        """A switch after N live rounds is due once `rounds` have ended."""
        return self.rule.due_after(rounds)

    def ask(self) -> None:
        self.asked.set()

    # -- the return path's news (from the RequestReader thread) ----------------------------
    def requested(self, pfns: np.ndarray) -> None:
        with self.cond:
            self.requests += len(pfns)
            preempt = self.preempt
        # Asked outside the lock: the preempt channel may send them from this thread, and
        # the push must not wait for that to look at its queue.
        if preempt is not None and preempt.ask(pfns):
            return                           # on the preempt channel, ahead of the push
        with self.cond:
            self.queue.append(pfns)
            self.cond.notify_all()
        self.serve_here()

    def serve_here(self) -> None:
        """The queued requests served by the calling thread (the return path's reader) if
        the data channel is free (the push waits out its pacing): a fault's page then waits
        for no wake-up of the push thread (measured, ~0.1 ms of a fault on this loaded
        machine). Busy, the push serves them before its next record."""
        if not self.send_lock.acquire(blocking=False):
            return
        try:
            if self.server is not None:
                self.server()
        finally:
            self.send_lock.release()

    def serve_from(self, server: Callable[[], None] | None) -> None:
        """Who serves requests from the reader's thread (None: nobody, the push is not
        running: recovering, or past its END)."""
        with self.send_lock:
            self.server = server

    def resumed(self, wall: float) -> None:
        if self.resume_wall is None:
            self.resume_seen = time.monotonic()
        self.resume_wall = wall

    def finished(self, fields: dict) -> None:
        with self.cond:
            self.result = fields
            self.cond.notify_all()

    def broke(self, exc: BaseException) -> None:
        with self.cond:
            if self.broken is None:
                self.broken = exc
            self.cond.notify_all()

    def raise_if_broken(self) -> None:
        with self.cond:
            exc = self.broken
        if exc is not None:
            raise exc

    def take_requests(self) -> list[np.ndarray]:
        with self.cond:
            out = list(self.queue)
            self.queue.clear()
        return out

    def start_reader(self, channel: Channel, guest_pages: int) -> None:
        """The return path's reader on `channel` (after RUN, and again after a reconnect)."""
        with self.cond:
            self.broken = None
        self.reader = RequestReader(channel.sock, channel.reader, self, guest_pages)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
        self.close_preempt()

    def close_preempt(self) -> None:
        """Drop the preempt channel (the link broke, or the migration ended), its figures
        kept."""
        with self.cond:
            preempt, self.preempt = self.preempt, None
        if preempt is not None:
            preempt.close()
            self.preempt_pages += preempt.pages
            self.preempt_bytes += preempt.bytes_sent
        self.close_native()

    def close_native(self) -> None:
        """Stop the native fault channel's thread (the link broke, or the migration
        ended); its counts go into the post-copy's (its mutex stays the cursor's lock)."""
        native = self.native
        if native is None or native.stopped:
            return
        native.stop()
        with self.cursor_lock:               # what it took, folded into the cursor
            pass
        c = native.counts()                  # cumulative: what is new since the last close
        new = {k: c[k] - seen for k, seen in self.native_seen.items()}
        self.native_seen = {k: c[k] for k in self.native_seen}
        with self.cond:
            self.requests += new["requests"]
        self.pages_requested += new["served"]
        self.requests_already_sent += new["already_sent"]
        self.native_pages += new["served"]
        self.native_bytes += new["bytes"]
        if self.native_label == "preempt":
            self.preempt_pages += new["served"]
            self.preempt_bytes += new["bytes"]

    # -- pacing and waiting -------------------------------------------------------------------
    def pushed(self, nbytes: int, start: float) -> None:
        """A push record went: the next is due when the push's own limit says."""
        if self.pacer is not None:
            self.push_due_at = self.pacer.charge(nbytes, start)

    def wait_push(self) -> bool:
        """Wait until the next push record is due; True if a request (or a broken link)
        cut the wait short, so it is served first and the push waits on."""
        with self.cond:
            while not self.queue and self.broken is None:
                left = self.push_due_at - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def wait_result(self, timeout: float) -> dict:
        """The destination's RESULT after END, within the timeout (else the link broke)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.result is None and self.broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.broken = ConnectionLost(
                        f"no progress for {timeout:g} s waiting for the destination's RESULT")
                    break
                self.cond.wait(left)
        self.raise_if_broken()
        return self.result

    # -- the result ---------------------------------------------------------------------------
    def fill(self, r: SourceResult, link_bytes: int) -> None:
        """The post-copy figures of the source's result (QEMU's names where it has them);
        `link_bytes`: what the channel open now carried (those that broke are counted here)."""
        r.switched = self.switched
        if not self.switched:
            return                    # finished as pre-copy: `finish` split its bytes
        self.close_preempt()
        own = self.native_bytes if self.native_label != "preempt" else 0   # not preempt's
        total = self.earlier_links_bytes + link_bytes + self.preempt_bytes + own
        r.bytes_sent_total = total
        r.precopy_bytes = self.precopy_bytes
        r.downtime_bytes = self.downtime_bytes
        r.postcopy_bytes = total - self.precopy_bytes - self.downtime_bytes
        r.postcopy_requests = self.requests
        if self.resume_wall is not None and r.resume_wall is None:    # the destination's
            r.resume_wall = to_source_clock(self.resume_wall, r.clock_offset_seconds)
        r.postcopy = {
            "switched_at_seconds": self.switched_at_seconds,
            "downtime_qemu_seconds": self.downtime_qemu_seconds,
            "pages_requested": self.pages_requested, "pages_pushed": self.pages_pushed,
            "requests_already_sent": self.requests_already_sent,
            "recoveries": self.recoveries, "paused_seconds": self.paused_seconds,
            "guest_rate_before": self.guest_rate_before,
            "channel_bytes": {"main": r.postcopy_bytes - self.preempt_bytes - own,
                              "preempt": self.preempt_bytes,
                              **({"native": own} if own else {})},
            "native_fault_pages": self.native_pages,
            "preempt_pages": self.preempt_pages, "preempt_channels": self.preempt_channels}

    def fail(self, session: Session, r: SourceResult) -> None:
        """The migration failed after the switch. If the destination had confirmed the whole
        guest, it runs there and only this side's own work failed; otherwise neither host
        has all of it: the guest is lost, and the stale copy here goes."""
        if self.result is not None and self.result.get("ok"):
            return
        r.guest_lost = True
        try:
            session.runtime.stop_guest(session.guest)
            session.hv.destroy_domain(session.dom.name, force=True)
        except MigbedError:
            pass
