"""The destination's side of post-copy: the guest runs here while its pages still arrive.

At POSTCOPY_RUN (`PostcopyDestination.run`):

1. **resume**: the pages of the discard set become missing (`Landing.begin_postcopy`); the
   guest's access path learns which pages are present (the landing's `received`) and whom to
   call for the others (`pagefault.PageFaults`, or a process guest's real fault reader from
   the runtime's `make_faults`); its vCPU is made from the context the source
   sent; it resumes in VP mode (the hypervisor translates, so it sees every access, as it
   must while pages are missing); POSTCOPY_RESUMED goes back.
2. **receive**: requested and pushed pages land as they come, until END; the vCPU resumes the
   moment its pages have landed. A broken link pauses the migration (`recovery`): the guest
   runs on, and the receiver waits for the source to reconnect, for as long as it takes.
3. **finish**: every page is here, the page tables are valid: the guest leaves VP for its own
   mode (P2M), and RESULT (with the digest of the pages as they landed) goes back.

With post-copy preempt (`preempt`) the requested pages come on a second connection, accepted
at the resume and after each recovery, landed by a thread of its own; the data channel's END
waits for its END. Each requested page is timed by the channel it landed from (`by_channel`:
the report's split of the fault latency).

If the post-copy cannot complete (the source died, it gave up, this host is going), the guest
is lost: its vCPU stops, its frames are freed, and the source is told (ABORT).
"""

import socket
import time
from typing import Protocol

import numpy as np

from nodes.errors import ConnectionLost, GuestLost, MigbedError, PeerAborted, StreamError
from nodes.migration.postcopy.nativefault import open_native, reopen_native, wait_native_end
from nodes.migration.postcopy.pagefault import (
    FaultLatency,
    FaultsFactory,
    MissingPageFaults,
    PageFaults,
)
from nodes.migration.postcopy.preempt import CHANNELS, PreemptReceiver
from nodes.migration.postcopy.recovery import accept_recovery
from nodes.migration.postcopy.returnpath import ReturnPath
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.runtime import GuestRuntime
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import pagesets
from nodes.migration.wire.channel import Listener
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, Phase
from nodes.xen.domain import Domain, DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.profiles import Mode


class PostcopyReceiver(Protocol):
    """What post-copy needs of the destination's receiver (`nodes.migration.receive.receiver.
    Receiver`, which hands it the migration at POSTCOPY_RUN: a Protocol, so that this module
    needs not import it back). It reads the guest and its landing, sets the receiver's
    status, and replaces its connection when the link breaks."""

    # the guest arriving, and where its pages land
    hv: Hypervisor
    dom: Domain
    name: str
    info: dict
    settings: MigrationSettings
    runtime: GuestRuntime
    landing: Landing
    vcpu: dict
    mode_during: Mode
    mode_after: Mode
    # what post-copy sets
    status: str
    error: str | None
    resume_wall: float | None
    postcopy: "PostcopyDestination | None"
    # the connection, which a recovery replaces
    conn: socket.socket | None
    listener: Listener
    postcopy_run: dict

    @property
    def killed(self) -> bool: ...

    def make_vcpu(self) -> None: ...

    def drop_connection(self) -> None: ...

    def attach_connection(self, conn: socket.socket) -> RecordReader: ...


class PostcopyDestination:
    """One incoming migration after its switch; see the module docstring."""

    def __init__(self, rx: PostcopyReceiver, discard: np.ndarray,
                 make_faults: FaultsFactory | None = None):
        """`make_faults(received, request)`: who handles the guest's faults, made at the
        resume once the discard set is missing (`received` then says which pages are); a
        process guest's host passes one that relaunches its process with those pages
        registered and returns its `nodes.host.faultreader.FaultReader`."""
        self.rx = rx
        self.discard = discard
        self.path = ReturnPath(rx.settings.latency_seconds)
        self.make_faults = make_faults or PageFaults
        self.faults: MissingPageFaults = PageFaults(rx.landing.received, self.path.request)
        self.done = False                 # every page arrived and RESULT went back
        self.lost = False
        self.pauses = 0
        self.paused_seconds = 0.0
        self.resume_wall: float | None = None
        self.end_wall: float | None = None
        self.stale_pages = 0
        self.preempt: PreemptReceiver | None = None
        self.native = False               # the native fault channel runs (`nativefault`)
        self.native_asked = False         # RUN said the source opens one
        self.native_counted = False
        self.by_channel = {ch: FaultLatency() for ch in CHANNELS}

    def run(self, reader: RecordReader) -> None:
        self.resume()
        self.receive(reader)
        self.finish()

    # -- 1. resume ------------------------------------------------------------------------
    def resume(self) -> None:
        rx, dom, hv = self.rx, self.rx.dom, self.rx.hv
        if not rx.vcpu:
            raise StreamError("no VCPU_CONTEXT before POSTCOPY_RUN")
        self.stale_pages = rx.landing.begin_postcopy(self.discard, self._landed)
        self.faults = self.make_faults(rx.landing.received, self.path.request)
        dom.on_missing = self.faults.handle
        dom.present = rx.landing.received
        # The source's one extra channel: its native fault channel (which is the preempt
        # channel when that is asked for), or the preempt channel.
        self.native_asked = bool(rx.postcopy_run.get("native_faults"))
        if self.native_asked:
            self.native = open_native(rx, self.faults)
        elif rx.settings.postcopy_preempt:
            self.preempt = self._open_preempt()
        rx.make_vcpu()
        with dom.lock:
            dom.state = DomainState.PAUSED
        hv.unpause(rx.name)
        rx.resume_wall = self.resume_wall = time.time()
        rx.postcopy = self                 # from here a failure loses the guest
        rx.status = Phase.POSTCOPY.value
        self.path.attach(rx.conn)
        self.path.send(RT.POSTCOPY_RESUMED, {"resume_wall": self.resume_wall})

    def _landed(self, pfns: np.ndarray) -> None:
        """The landing's `on_present`, given before the fault handler is made."""
        self._landed_from(pfns, "main")

    def _landed_preempt(self, pfns: np.ndarray) -> None:
        self._landed_from(pfns, "preempt")

    def _landed_from(self, pfns: np.ndarray, channel: str) -> None:
        """The fault handler told, and each page asked for timed by its channel."""
        faults = self.faults
        asked = faults.asked_at[pfns]
        hit = asked > 0
        now = time.monotonic()          # landed: as the fault handler times it
        faults.landed(pfns)
        if hit.any():
            self.by_channel[channel].observe(now - asked[hit])

    def _open_preempt(self) -> PreemptReceiver:
        rx = self.rx
        return PreemptReceiver(rx.listener, rx.info.migration_id, rx.landing,
                               self._landed_preempt, rx.settings.timeout_seconds)

    # -- 2. receive -----------------------------------------------------------------------
    def receive(self, reader: RecordReader) -> None:
        why: BaseException | None = None
        while True:
            try:
                if why is not None:
                    reader, why = self._recover(why), None
                self._until_end(reader)
                return
            except (PeerAborted, GuestLost):
                raise
            except (ConnectionLost, StreamError) as exc:
                why = exc

    def _until_end(self, reader: RecordReader) -> None:
        landing = self.rx.landing
        while True:
            if self.faults.lost is not None:
                raise GuestLost(self.faults.lost)
            rec = reader.expect(RT.PAGE_DATA, RT.END)
            if rec.type == RT.END:
                if self.preempt is not None:
                    self.preempt.wait_end(self.rx.settings.timeout_seconds)
                if self.native:
                    wait_native_end(self.faults, self.rx.settings.timeout_seconds)
                if landing.missing_pages:
                    raise StreamError(f"END with {landing.missing_pages} pages still missing")
                return
            landing.land(rec.fields["page_data"])

    def _recover(self, why: BaseException) -> RecordReader:
        """postcopy-paused until the source reconnects (see `recovery`)."""
        rx = self.rx
        t0 = time.monotonic()
        rx.status = Outcome.PAUSED
        self.pauses += 1
        self.path.attach(None)
        self._close_preempt()
        if self.native:                       # not opened again: the Python path serves
            self.faults.detach_native()
            self.native = False
        rx.drop_connection()
        got = accept_recovery(rx.listener, rx.info.migration_id, rx.settings.timeout_seconds,
                              lambda: not rx.killed and self.faults.lost is None)
        if got is None:
            raise GuestLost(self.faults.lost or f"{rx.hv.name} is going: the post-copy of "
                                                 f"{rx.name} cannot complete")
        conn, _ = got
        reader = rx.attach_connection(conn)
        self.path.attach(conn)
        self.path.send(RT.RECV_BITMAP, {"bitmap": pagesets.encode_bitmap(rx.landing.received)})
        if self.native_asked:                 # the source opens it once it has the bitmap
            self.native = reopen_native(rx, self.faults)
        elif rx.settings.postcopy_preempt:
            self.preempt = self._open_preempt()
        self.path.send(RT.POSTCOPY_RESUMED, {"resume_wall": self.resume_wall})
        waiting = self.faults.outstanding()
        if len(waiting):
            self.path.request(waiting)
        self.paused_seconds += time.monotonic() - t0
        rx.status = Phase.POSTCOPY.value
        return reader

    # -- 3. finish ------------------------------------------------------------------------
    def finish(self) -> None:
        rx, dom, hv = self.rx, self.rx.dom, self.rx.hv
        problem = hv.check_page_tables(rx.name)
        if problem:
            raise StreamError(f"page tables invalid after the post-copy: {problem}")
        with dom.lock:
            dom.present = None
            dom.on_missing = None
        self._close_preempt()
        self._count_native()
        self.faults.finish()
        hv.set_mode(rx.name, rx.mode_after)
        dom.migrating = False
        self.end_wall = time.time()
        self.done = True
        self.path.send(RT.RECEIVER_RESULT, {"ok": True, "error": None,
                                            "resume_wall": self.resume_wall,
                                            "digest": rx.landing.digest()})

    # -- when it cannot complete ------------------------------------------------------------
    def fail(self, why: str) -> None:
        """The guest is lost: its waiting vCPU stops, the source hears why, the frames go."""
        rx = self.rx
        self.lost = True
        self.faults.lose(f"the post-copy of {rx.name} cannot complete: {why}")
        rx.status, rx.error = Outcome.FAILED, why
        self.path.send(RT.ABORT, {"error": why[:1000]})
        self._close_preempt()                 # nothing lands into frames about to go
        rx.runtime.discard_guest(rx.name)     # its process goes before its uffd closes
        self.faults.stop()
        try:
            rx.hv.destroy_domain(rx.name, force=True)
        except MigbedError:
            pass

    def _native_stats(self) -> dict | None:
        native_stats = getattr(self.faults, "native_stats", None)
        return native_stats() if native_stats is not None else None

    def _count_native(self) -> None:
        """The pages the native thread landed, counted as the landing's own, and timed
        as a channel of their own (`native`)."""
        st = self._native_stats()
        if st is not None and not self.native_counted:
            self.native_counted = True
            self.rx.landing.counted(st["landed"], st["duplicates"])
            label = "preempt" if self.rx.settings.postcopy_preempt else "native"
            lat = self.by_channel.setdefault(label, FaultLatency())
            lat.counts += st["native_counts"]
            lat.count += st["native_latency_count"]
            lat.sum_seconds += st["native_latency_sum"]

    def _close_preempt(self) -> None:
        preempt, self.preempt = self.preempt, None
        if preempt is not None:
            preempt.close()

    def lose(self, why: str) -> None:
        """The control plane says the guest is lost (its source died after the switch)."""
        self.faults.lose(why)

    def stats(self) -> dict:
        landing = self.rx.landing
        applied = landing.applied if landing.applied is not None else np.zeros(0, np.uint8)
        return {**self.faults.stats(), "mode": self.rx.mode_during.value,
                "discard_pages": int(np.count_nonzero(self.discard)),
                "stale_pages": self.stale_pages,
                "pages_applied": int(applied.sum()),
                "pages_applied_more_than_once": int(np.count_nonzero(applied > 1)),
                "duplicates_dropped": landing.duplicates,
                "pauses": self.pauses, "paused_seconds": self.paused_seconds,
                "resume_wall": self.resume_wall, "end_wall": self.end_wall,
                "completed": self.done, "lost": self.lost,
                "fault_latency_by_channel": {
                    ch: {"fault_latency_seconds": lat.to_dict(), "pages": lat.count,
                         "fault_latency_mean_seconds": lat.mean_seconds}
                    for ch, lat in self.by_channel.items()}}


__all__ = ["PostcopyDestination"]
